"""``python -m moescope``: the command line, as launchers such as ``torchrun -m moescope`` start it."""

from moescope.cli import main

if __name__ == "__main__":
    main()
