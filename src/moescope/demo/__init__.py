"""``moescope demo``: the whole pipeline on the bundled models and held-out corpus, offline.

The demo is a script of ordinary ``moescope`` commands, printed before they run, so a new user can
copy any step and change it. Everything lands under one output directory.

The demo does not import the command line: :func:`run_demo` is handed the function that runs one
command (``moescope demo`` hands it the in-process application; a script may run the
``moescope`` executable), so ``cli -> demo`` is the only direction.
"""

from __future__ import annotations

import shlex
import subprocess
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
                "--token-text",
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
                "--overwrite",
            ]
        )
    fine = str(out / "trace-tiny-finegrained")
    split = out / "split-tiny-finegrained"
    train, test = str(split / "train"), str(split / "test")
    model_file = str(out / f"{predictor}-tiny-finegrained.npz")
    # Fit on some documents, judge on the others: the predictor and the cache never see the test text.
    steps.append(["split", fine, "-o", str(split), "--test-fraction", "0.2", "--overwrite"])
    steps.append(
        ["predict", "fit", train, "--no-split", "--predictor", predictor, "-o", model_file, "--overwrite"]
    )
    steps.append(
        [
            "predict",
            "eval",
            model_file,
            test,
            "--figures",
            str(out / "predict-tiny-finegrained"),
            "--overwrite",
        ]
    )
    steps.append(
        [
            "simulate",
            test,
            "--train",
            train,
            "--cache-fraction",
            "0.25",
            # auto: the fastest of the predictor-free and predictor-guided policies on held-out training
            # documents (on the bundled model's 1-us layers a predictor rarely repays its cost at 1/4
            # cache; BENCHMARKS.md); the sweep prints auto's choice beside LRFU and Belady
            "--policy",
            "auto",
            "--prefetch",
            model_file,
            "--sweep",
            "-o",
            str(out / "simulate-tiny-finegrained"),
            "--overwrite",
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
            "--overwrite",
        ]
    )
    # Routing strategies at equal compute: baseline, top-1, and top-p and p-value routing calibrated to the
    # same mean experts per token (1.5), scored on the bundled corpus by domain; prints the table.
    steps.append(
        [
            "evaluate",
            "tiny-mixtral",
            "corpus",
            *("-s", "baseline", "-s", "topk:k=1", "-s", "topp", "-s", "pvalue:correction=bh"),
            *("--match-k", "1.5", "--calibration", "1", "--limit", "1", "--bootstrap", "200"),
            "-o",
            str(out / "evaluate-tiny-mixtral"),
            "--overwrite",
        ]
    )
    # Last: one self-contained HTML page of the fine-grained model's trace, its analyses and the
    # predictor's hits and misses, token by token.
    steps.append(
        [
            "report",
            fine,
            "--analysis",
            str(out / "analysis-tiny-finegrained"),
            "--predict",
            model_file,
            "-o",
            str(report_path(out)),
            "--overwrite",
        ]
    )
    return steps


def report_path(out: Path) -> Path:
    """Where the demo writes its HTML report."""
    return Path(out) / "report.html"


def run_in_subprocess(args: list[str]) -> None:
    """Run one ``moescope`` command in a child Python (the runner for library use)."""
    code = "import sys; from moescope.cli import main; sys.argv = ['moescope', *sys.argv[1:]]; main()"
    subprocess.run([sys.executable, "-c", code, *args], check=True)


def run_demo(
    out: Path,
    *,
    max_tokens: int = 16000,
    predictor: str = "best",
    run: Callable[[list[str]], None] = run_in_subprocess,
    log: Callable[[str], None] | None = None,
) -> float:
    """Run every demo step with ``run(args)``; returns the wall time in seconds. Stops at the first failure."""
    say = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for args in demo_steps(out, max_tokens=max_tokens, predictor=predictor):
        say(f"\n$ moescope {shlex.join(args)}")
        t0 = time.perf_counter()
        run(args)
        sys.stdout.flush()
        say(f"({time.perf_counter() - t0:.1f} s)")
    total = time.perf_counter() - start
    say(f"\ndemo finished in {total:.0f} s; everything is under {out}/")
    say(f"open the report: {report_path(out)}")
    return total
