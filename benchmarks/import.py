"""Import speed: ``moescope import moe-beyond`` on the 999-prompt DeepSeek-V2-Lite archive (goal: < 30 s, 2 cores).

The archive (13.8 MB of xz, 92 MB of CSV, 2,448,290 token-layer rows) lives in ``../shared/data``;
it is never copied into the repository. Each repetition imports it into a fresh temporary trace
and the script prints wall time, CPU time of this process (user + system, all threads: a fair
figure when other jobs share the cores), rows per second and peak resident memory (ru_maxrss).
The median repetition is reported; ``--json`` prints one JSON document instead of the table.

    .venv/bin/python benchmarks/import.py
    .venv/bin/python benchmarks/import.py --reps 3 --path some/other/archive.tar.xz
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = (
    ROOT.parent
    / "shared"
    / "data"
    / "deepseek-v2-lite-puffin"
    / "training_data_eamc_prompts_0001-1000.tar.xz"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=DEFAULT, help="MoE-Beyond archive, CSV file or folder.")
    ap.add_argument("--format", default="moe-beyond", help="Import format of --path.")
    ap.add_argument("--reps", type=int, default=3, help="Repetitions; the median is reported.")
    ap.add_argument("--json", action="store_true", help="Print one JSON document.")
    args = ap.parse_args()
    if not args.path.exists():
        raise SystemExit(f"{args.path}: not found (the benchmark reads ../shared/data)")

    from moescope.interop import import_log

    runs = []
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            tr = import_log(args.format, args.path, Path(tmp) / "trace")
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            tokens, layers = tr.num_tokens, tr.num_layers
            trace_bytes = sum(s["bytes"] for s in tr.manifest["shards"])
        runs.append({"wall_s": wall, "cpu_s": cpu})
    wall = statistics.median(r["wall_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    result = {
        "path": str(args.path),
        "format": args.format,
        "tokens": tokens,
        "token_layer_rows": tokens * layers,
        "reps": args.reps,
        "wall_s_median": round(wall, 2),
        "cpu_s_median": round(cpu, 2),
        "wall_s_all": [round(r["wall_s"], 2) for r in runs],
        "rows_per_s": round(tokens * layers / wall),
        "trace_bytes": trace_bytes,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cores": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "goal_wall_s": 30,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"import {args.format}: {args.path.name}")
    print(f"{tokens:,} tokens, {tokens * layers:,} token-layer rows -> {trace_bytes / 1e6:.1f} MB trace")
    print("| wall s (median) | CPU s (median) | rows/s | peak RSS MB | load avg | goal |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {wall:.2f} | {cpu:.2f} | {result['rows_per_s']:,} | {result['peak_rss_mb']} |"
        f" {result['load_avg_1min']} on {result['cores']} cores | < 30 s wall |"
    )


if __name__ == "__main__":
    main()
