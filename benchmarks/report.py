"""HTML report cost: time to write, page size, peak memory, and time to first render in headless Chromium.

For each trace given (default: the demo's two traces under ``--demo DIR``) and for a synthetic
trace of ``--tokens`` rows (default 1M; 16 layers, 64 experts, top-8, like OLMoE), it times
``build_report`` plus the atomic write in a fresh child process (its peak RSS is the memory figure),
then opens the page in the system Chromium and times navigation start to the page's ``data-ready``
mark (the script has parsed the data and drawn the summary, viewer, atlas, compare and zoomable
plots). The synthetic trace is written twice over with two analysis folders (run first, untimed):
``load,entropy`` (the atlas counts load, first choices and domains itself, in its pass) and
``load,specialisation,cooccurrence`` (it reads those counts and the same-layer partners from the
folder and only samples the trace for next-layer partners and token tables).

Goals: under 10 s to write and under 2 s to first render on 2 cores.

Run: .venv/bin/python benchmarks/report.py [--demo demo-out] [--tokens 1000000] [--out runs/bench-report]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from moescope.analysis.run import AnalyzeOptions, run_analyses
from moescope.report.build import build_report
from moescope.trace.atomic import atomic_write
from moescope.trace.synthetic import write_synthetic_trace


def _write(trace: Path, analysis: Path, out: Path) -> tuple[float, float, int, float]:
    import resource

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    page, info = build_report(trace, analysis=analysis)
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    secs, cpu_s = time.perf_counter() - t0, cpu() - c0
    return secs, cpu_s, info["bytes"], _peak_rss_mb()


def _peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` belongs to the process's own address space;
    ``ru_maxrss`` would also carry the parent's peak over the fork and exec that start the child."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_seconds(trace: Path, analysis: Path, out: Path) -> tuple[float, float, int, float]:
    """Wall and CPU seconds (all threads) to build and write the page, its bytes, and the child
    process's peak RSS in MB. CPU seconds are what a loaded machine does not inflate."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_write, trace, analysis, out).result()


def render_seconds(path: Path, chromium: str, reps: int) -> float:
    """Median over ``reps`` fresh pages of navigation start -> ``body[data-ready]`` (page-side clock)."""
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(reps):
            page = b.new_page(viewport={"width": 1300, "height": 900})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
            page.goto(path.resolve().as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            ms = page.evaluate("() => window.moescopeReadyMs")
            times.append(ms / 1000)
            page.close()
        b.close()
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=Path("demo-out"))
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-report"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = []
    for model in ("tiny-mixtral", "tiny-finegrained"):
        trace, ana = args.demo / f"trace-{model}", args.demo / f"analysis-{model}"
        if trace.is_dir() and ana.is_dir():
            cases.append((f"demo {model}", trace, ana))
    if args.tokens:
        syn = args.out / f"synthetic-{args.tokens}"
        if not (syn / "manifest.json").is_file():
            write_synthetic_trace(
                syn,
                n_tokens=args.tokens,
                num_layers=16,
                num_experts=64,
                top_k=8,
                law="token",
                doc_len=512,
                labels=("web", "code", "math"),
                vocab_size=50_000,
            )
        for names in ("load,entropy", "load,specialisation,cooccurrence"):
            ana = args.out / f"synthetic-{args.tokens}-{names.replace(',', '-')}"
            if not (ana / "summary.json").is_file():
                run_analyses(
                    syn, ana, AnalyzeOptions(analyses=names.split(","), permutations=20, progress=False)
                )
            cases.append(
                (f"synthetic {args.tokens:,} tokens (L=16, E=64, k=8), --analysis {names}", syn, ana)
            )
    rows = []
    for name, trace, ana in cases:
        html = args.out / f"{trace.name}-{ana.name}.html"
        secs, cpu_s, size, rss = write_seconds(trace, ana, html)
        render = render_seconds(html, args.chromium, args.reps) if Path(args.chromium).exists() else None
        rows.append(
            {
                "case": name,
                "write_s": round(secs, 2),
                "write_cpu_s": round(cpu_s, 2),
                "bytes": size,
                "peak_rss_mb": round(rss),
                "render_s": render and round(render, 2),
            }
        )
    print("| case | write s (wall) | write CPU s | page MB | peak RSS MB | first render s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['write_s']} | {r['write_cpu_s']} | {r['bytes'] / 1e6:.2f} | {r['peak_rss_mb']}"
            f" | {r['render_s']} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
