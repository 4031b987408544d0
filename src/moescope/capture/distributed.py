"""Data-parallel capture on ``torch.distributed``: who does which documents, and how ranks agree.

``torchrun --nproc-per-node N -m moescope capture ...`` (or ``accelerate launch``) starts N copies of
the capture; each reads the same ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables and joins one process
group (``gloo`` on CPU; ``cpu:gloo,cuda:nccl`` on GPUs, though only small Python objects travel).

The work is cut into *units* of ``D`` consecutive documents (``--unit-documents``): unit ``u`` holds
documents ``u*D .. u*D+D-1`` and belongs to rank ``u % N``. A unit is batched on its own and written
as one shard, ``part-<u>.parquet``, followed by its record ``part-<u>.json`` (what the manifest will
say about the shard, and the unit's per-data-set counts). So document ids, batches, rows and shard
names are the same for any rank count, and a unit is done exactly when its record exists. Rank 0
holds the output lock, creates the manifest, and once every rank has passed the final agreement it
lists the units' shards in the manifest (the commit record, written last). A resumed capture, with
any rank count, redoes only the units without a record.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError, MoescopeError, TraceError
from moescope.trace.atomic import atomic_write_json
from moescope.trace.manifest import read_manifest
from moescope.trace.outputs import TRACE_TMP

#: Documents per unit when the capture is launched by torchrun and ``--unit-documents`` is not given.
DEFAULT_UNIT_DOCUMENTS = 64
#: How long a rank waits for the others at an agreement point (the slowest rank's last unit).
TIMEOUT_ENV = "MOESCOPE_DIST_TIMEOUT_S"
#: Test hook: ``RANK:UNITS`` makes that rank exit abruptly (``os._exit``) after writing that many units.
FAULT_ENV = "MOESCOPE_FAULT_RANK_EXIT"

RECORD = re.compile(r"^part-(\d{5,})\.json$")


def unit_shard_name(unit: int) -> str:
    """File name of unit ``unit``'s shard (the same for every rank count)."""
    return f"part-{unit:05d}.parquet"


def unit_record_name(unit: int) -> str:
    """File name of unit ``unit``'s record, written right after its shard."""
    return f"part-{unit:05d}.json"


class RankError(MoescopeError):
    """Another rank of a distributed capture failed; this one stops without committing."""


@dataclass
class DistContext:
    """This process's place in a distributed capture (``world == 1``: a plain single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun / accelerate (RANK and WORLD_SIZE set)
    group: bool = False  # a process group was initialised here (and is destroyed by close)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistContext:
        """Read the launcher's variables; ``launched`` is False when they are absent."""
        env = dict(os.environ if env is None else env)
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise ConfigError(
                f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r}:"
                " the launcher's variables must be integers"
            ) from None
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} must lie in 0..WORLD_SIZE-1={world - 1}")
        return cls(rank=rank, world=world, local_rank=local, launched=True)

    def device(self, device: str) -> str:
        """The device of this rank's replica: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when launched."""
        if not self.launched:
            return device
        import torch

        if device in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return "cpu" if device == "auto" else device

    def init(self, device: str) -> None:
        """Join the process group (when launched with more than one rank)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            return
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        timeout = _dt.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 6 * 3600)))
        dist.init_process_group(backend=backend, timeout=timeout)
        self.group = True

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank says whether it is fine; if any is not, every rank raises (none waits forever).

        The rank that failed re-raises its own error; the others raise :class:`RankError` naming it.
        """
        if self.world == 1 or not self.group:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        said: list[Any] = [None] * self.world
        dist.all_gather_object(said, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        bad = [(r, msg) for r, msg in enumerate(said) if msg is not None]
        if bad:
            r, msg = bad[0]
            raise RankError(f"rank {r} of {self.world} failed while {what}: {msg}")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1 or not self.group:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self.group = False


def owner(unit: int, world: int) -> int:
    """The rank that captures ``unit``: round robin, so every rank starts at once."""
    return unit % world


def maybe_fault(rank: int, units_written: int) -> None:
    """The fault hook of the tests: exit abruptly, as a killed rank would, when ``FAULT_ENV`` says so."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    r, _, n = spec.partition(":")
    if int(r) == rank and units_written >= int(n or 1):
        os._exit(17)


# --------------------------------------------------------------------------- records
def write_record(
    directory: Path, unit: int, entry: dict[str, Any] | None, tally: list[dict[str, Any]]
) -> None:
    """Mark ``unit`` done: its shard entry (``None``: no rows) and its per-data-set counts."""
    atomic_write_json(directory / unit_record_name(unit), {"unit": unit, "shard": entry, "datasets": tally})


def read_records(directory: Path) -> dict[int, dict[str, Any]]:
    """Records of finished units whose shard is present with the recorded size (others are not done)."""
    out: dict[int, dict[str, Any]] = {}
    for p in Path(directory).iterdir():
        m = RECORD.match(p.name)
        if not m or not p.is_file():
            continue
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a damaged record: the unit is redone
        unit = int(m.group(1))
        if not isinstance(rec, dict) or rec.get("unit") != unit:
            continue
        shard = rec.get("shard")
        if shard is not None:
            f = Path(directory) / str(shard.get("file"))
            if not f.is_file() or f.stat().st_size != shard.get("bytes"):
                continue
        out[unit] = rec
    return out


def clean_unfinished(directory: Path) -> list[Path]:
    """Delete what interrupted units left: temporaries, shards without a record, records without a shard."""
    directory = Path(directory)
    done = read_records(directory)
    keep = {unit_record_name(u) for u in done} | {
        rec["shard"]["file"] for rec in done.values() if rec["shard"] is not None
    }
    removed = []
    for p in directory.iterdir():
        if not p.is_file():
            continue
        stale = TRACE_TMP.match(p.name) or (
            (RECORD.match(p.name) or re.match(r"^part-\d{5,}\.parquet$", p.name)) and p.name not in keep
        )
        if stale:
            p.unlink()
            removed.append(p)
    return removed


def commit_units(directory: Path, n_units: int | None, *, complete: bool = True) -> dict[str, Any]:
    """Write the manifest that lists every finished unit's shard, in unit order (rank 0, last).

    With ``complete``, units ``0..n_units-1`` must all be done; a missing one is named. Without
    it, whatever is done is listed and the trace stays incomplete (readable with --allow-incomplete).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    records = read_records(directory)
    if complete:
        assert n_units is not None
        missing = [u for u in range(n_units) if u not in records]
        if missing:
            raise TraceError(
                f"{directory}: unit(s) {_ranges(missing)} have no shard (a rank stopped early); the trace stays"
                " incomplete: continue it with `resume` (any number of ranks)"
            )
        records = {u: r for u, r in records.items() if u < n_units}
    shards, labels, rows, last = [], set(manifest.get("labels", [])), 0, None
    datasets = [
        {**d, "documents": 0, "tokens": 0, "labels": [], "first_doc": None, "last_doc": None}
        for d in manifest.get("datasets", [])
    ]
    for u in sorted(records):
        rec = records[u]
        shard = rec["shard"]
        if shard is not None:
            labels.update(shard.get("labels", []))
            shards.append({k: v for k, v in shard.items() if k != "labels"})
            rows += int(shard["rows"])
            last = shard["last_doc"] if last is None else max(last, shard["last_doc"])
        for i, part in enumerate(rec.get("datasets", [])):
            if i >= len(datasets) or not part.get("documents"):
                continue
            e = datasets[i]
            e["documents"] += part["documents"]
            e["tokens"] += part["tokens"]
            e["labels"] = sorted(set(e["labels"]) | set(part["labels"]))
            e["first_doc"] = part["first_doc"] if e["first_doc"] is None else e["first_doc"]
            e["last_doc"] = part["last_doc"]
    manifest["shards"] = shards
    manifest["labels"] = sorted(labels)
    manifest["datasets"] = datasets
    manifest["progress"] = {"last_document": last if complete else None, "rows": rows}
    manifest["complete"] = bool(complete)
    manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(directory / "manifest.json", manifest)
    return manifest


def _ranges(units: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    out, start, prev = [], units[0], units[0]
    for u in [*units[1:], None]:
        if u is not None and u == prev + 1:
            prev = u
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if u is not None:
            start = prev = u
    return ", ".join(out)
