"""The streaming pass over shard groups in several processes, or on a Ray cluster, merged exactly.

A trace is a list of shards; a batch never spans two. :func:`fold_shards` splits the shards into
contiguous groups balanced by rows, folds each group into fresh accumulators in a worker (a process
of a spawn-context pool, or a Ray task), and merges the groups' accumulators into the caller's in
shard order. Every accumulator merges exactly (:class:`~moescope.analysis.base.Accumulator`), so the
result has the same bits as one process reading the whole trace, whatever the number of workers.

Workers receive the trace as a path and its manifest (no data), read their shards themselves (each
verifying its shards' checksums) and return the accumulators' state: a Ray cluster therefore needs
the trace on a file system every node sees at the same path, and moescope installed on every node.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope.errors import ConfigError, DataError
from moescope.trace.reader import Trace

if TYPE_CHECKING:
    from moescope.analysis._stream import PassContext

#: Below this many tokens per worker, automatic parallelism (``workers=None``) uses fewer workers:
#: starting a process costs about a second (imports), which a small trace does not repay.
MIN_TOKENS_PER_WORKER = 250_000


def shard_groups(trace: Trace, groups: int) -> list[list[int]]:
    """At most ``groups`` contiguous runs of shard indices with about equal rows each (none empty)."""
    rows = np.asarray([int(s["rows"]) for s in trace.manifest["shards"]], np.int64)
    n = len(rows)
    groups = max(1, min(int(groups), n))
    if n == 0:
        return []
    ends = np.cumsum(rows)
    total = int(ends[-1])
    cuts = [0]
    for g in range(1, groups):
        # first shard whose cumulative rows reach g/groups of the total, kept strictly increasing
        c = int(np.searchsorted(ends, total * g / groups, side="left")) + 1
        c = max(c, cuts[-1] + 1)
        if c >= n:
            break
        cuts.append(c)
    cuts.append(n)
    return [list(range(a, b)) for a, b in itertools.pairwise(cuts) if b > a]


def shard_view(trace: Trace, shards: Sequence[int]) -> Trace:
    """A view of ``trace`` (filters kept) that reads only the shards at ``shards``."""
    view = copy.copy(trace)
    view.manifest = {**trace.manifest, "shards": [trace.manifest["shards"][i] for i in shards]}
    return view


def resolve_workers(trace: Trace, workers: int | None, ray_address: str | None = None) -> int:
    """How many shard groups to fold: ``workers`` (None: all local cores, fewer on a small trace),
    never more than the trace has shards."""
    shards = len(trace.manifest["shards"])
    if workers is not None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"`workers` must be an integer >= 1, got {workers!r}")
        return max(1, min(workers, shards))
    if ray_address is not None:
        import ray

        n = int(ray.cluster_resources().get("CPU", 1))
    else:
        n = os.cpu_count() or 1
        rows = sum(int(s["rows"]) for s in trace.manifest["shards"])
        n = min(n, max(1, rows // MIN_TOKENS_PER_WORKER))
    return max(1, min(n, shards))


def fold_group(
    build: Callable[[Trace], list[Any]], trace: Trace, shards: Sequence[int], batch_size: int
) -> tuple[list[Any], int]:
    """In a worker: ``build(trace)`` fresh accumulators, fold the given shards into them.

    ``build`` receives the whole trace (accumulators size their samples on its token count) and
    returns ``(context, accumulators)``; returns the filled accumulators and the rows read.
    """
    from moescope.analysis._stream import run_pass

    ctx, accs = build(trace)
    seen = run_pass(ctx, accs, batch_size, source=shard_view(trace, shards), allow_empty=True)
    return accs, seen


def _merge_into(target: Sequence[Any], part: Sequence[Any]) -> None:
    if len(target) != len(part):
        raise DataError(f"internal: a worker returned {len(part)} accumulators, expected {len(target)}")
    for mine, theirs in zip(target, part, strict=True):
        mine.merge(theirs)


def fold_shards(
    ctx: PassContext,
    build: Callable[[Trace], tuple[PassContext, list[Any]]],
    accumulators: Sequence[Any],
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    batch_size: int = 65536,
    progress: bool = False,
) -> int:
    """Fold ``ctx.trace`` into ``accumulators`` over shard groups in parallel; returns the rows read.

    ``build`` must be a picklable top-level callable (a :func:`functools.partial` of one is fine)
    that makes, from the trace, the context and the same accumulators as ``accumulators`` (fresh).
    With one group (one worker, or one shard) the pass runs in this process. ``ray_address`` runs
    the groups as Ray tasks: ``"local"`` starts a Ray instance on this machine for the call, an
    address (``"ray://host:10001"``, ``"auto"``) joins a cluster; an already initialised Ray is used
    as it is. Raises :class:`DataError` when no row was read.
    """
    from moescope.analysis._stream import run_pass

    trace = ctx.trace
    started = None
    if ray_address is not None:
        started = _ray_start(ray_address)
    try:
        n = resolve_workers(trace, workers, ray_address)
        groups = shard_groups(trace, n)
        t0 = time.perf_counter()
        counts_only = bool(trace.manifest.get("counts"))  # totals start each accumulator: fold them once
        if (len(groups) <= 1 and ray_address is None) or counts_only:
            seen = run_pass(ctx, accumulators, batch_size, progress=progress, allow_empty=True)
        elif ray_address is not None:
            seen = _fold_ray(trace, build, accumulators, groups, batch_size, progress)
        else:
            seen = _fold_processes(trace, build, accumulators, groups, batch_size, progress)
        if progress:
            sys.stderr.write(
                f"analyze: {seen} tokens in {time.perf_counter() - t0:.1f} s over {len(groups)} shard group(s)"
                f"{' on Ray' if ray_address is not None else ''}\n"
            )
    finally:
        if started:
            import ray

            ray.shutdown()
    if seen == 0 and not counts_only:
        raise DataError(f"{trace.path}: no tokens to analyse (empty trace or filter)")
    return seen


def _report(progress: bool, done: int, total: int) -> None:
    if progress:
        sys.stderr.write(f"\ranalyze: {done}/{total} shard groups folded")
        sys.stderr.flush()
        if done == total:
            sys.stderr.write("\n")


def _fold_processes(
    trace: Trace,
    build: Callable,
    accumulators: Sequence[Any],
    groups: list[list[int]],
    batch_size: int,
    progress: bool,
) -> int:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold threads (read-ahead, Polars, BLAS) that fork would copy mid-work
    with ProcessPoolExecutor(max_workers=len(groups), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fold_group, build, trace, g, batch_size) for g in groups]
        seen = 0
        for i, fut in enumerate(futures):  # merge in shard order, whatever order they finish in
            accs, rows = fut.result()
            _merge_into(accumulators, accs)
            seen += rows
            _report(progress, i + 1, len(futures))
    return seen


def _ray_start(address: str) -> bool:
    """Initialise Ray for ``address`` unless it already is; returns whether this call started it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "`ray` needs the ray package: pip install 'moescope[ray]' (or pip install ray)"
        ) from None
    if ray.is_initialized():
        return False
    try:
        if address == "local":  # workers inherit this process's environment (PYTHONPATH included)
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"`ray` {address}: cannot connect to a Ray cluster ({exc})") from None
    return True


def _fold_ray(
    trace: Trace,
    build: Callable,
    accumulators: Sequence[Any],
    groups: list[list[int]],
    batch_size: int,
    progress: bool,
) -> int:
    import ray

    task = ray.remote(fold_group)
    refs = [task.remote(build, trace, g, batch_size) for g in groups]
    seen = 0
    for i, ref in enumerate(refs):  # in shard order
        accs, rows = ray.get(ref)
        _merge_into(accumulators, accs)
        seen += rows
        _report(progress, i + 1, len(refs))
    return seen
