"""``moescope demo``: the whole pipeline on the bundled models and held-out corpus, offline.

The demo is a script of ordinary ``moescope`` commands, printed before they run, so a new user can
copy any step and change it. Everything lands under one output directory.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moescope.data import corpus_path


def demo_steps(out: Path, max_tokens: int = 16000, predictor: str = "best") -> list[list[str]]:
    """The command lines the demo runs, in order (each a list of arguments after ``moescope``)."""
    corpus = sorted(str(p) for p in corpus_path().glob("heldout-*.jsonl"))
    steps: list[list[str]] = []
    for model in ("tiny-mixtral", "tiny-finegrained"):
        trace = str(out / f"trace-{model}")
        steps.append(
            [
                "capture",
                model,
                *corpus,
                "--label-field",
                "domain",
                "--max-documents",
                "6",
                "--max-tokens",
                str(max_tokens),
                "--seq-len",
                "256",
                "--lookahead",
                "2",
                "--logits",
                "--overwrite",
                "-o",
                trace,
            ]
        )
        steps.append(["validate", trace])
        steps.append(
            [
                "analyze",
                trace,
                "-o",
                str(out / f"analysis-{model}"),
                "--tsne-points",
                "300",
                "--permutations",
                "100",
            ]
        )
    fine = str(out / "trace-tiny-finegrained")
    split = out / "split-tiny-finegrained"
    train, test = str(split / "train"), str(split / "test")
    model_file = str(out / f"{predictor}-tiny-finegrained.npz")
    # Fit on some documents, judge on the others: the predictor and the cache never see the test text.
    steps.append(["split", fine, "-o", str(split), "--test-fraction", "0.2", "--overwrite"])
    steps.append(["predict", "fit", train, "--no-split", "--predictor", predictor, "-o", model_file])
    steps.append(["predict", "eval", model_file, test, "--figures", str(out / "predict-tiny-finegrained")])
    steps.append(
        [
            "simulate",
            test,
            "--train",
            train,
            "--cache-fraction",
            "0.25",
            "--policy",
            "learned-reuse",
            "--prefetch",
            model_file,
            "--sweep",
            "-o",
            str(out / "simulate-tiny-finegrained"),
        ]
    )
    steps.append(
        [
            "ablate",
            "tiny-mixtral",
            *corpus,
            "--label-field",
            "domain",
            "--layer",
            "3",
            "--max-documents",
            "2",
            "--rank-by",
            "perplexity",
            "-o",
            str(out / "ablate-tiny-mixtral-layer3"),
        ]
    )
    return steps


def run_demo(
    out: Path, *, max_tokens: int = 16000, predictor: str = "best", log: Callable[[str], None] | None = None
) -> float:
    """Run every demo step in-process; returns the wall time in seconds. Stops at the first failure."""
    from moescope.cli import app

    say = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for args in demo_steps(out, max_tokens=max_tokens, predictor=predictor):
        say(f"\n$ moescope {shlex.join(args)}")
        t0 = time.perf_counter()
        app(args, standalone_mode=False)
        sys.stdout.flush()
        say(f"({time.perf_counter() - t0:.1f} s)")
    total = time.perf_counter() - start
    say(f"\ndemo finished in {total:.0f} s; everything is under {out}/")
    return total
