"""The output guard: what a command may write, replace or delete, and who else is writing there.

Every command that writes goes through :func:`claim`, so they all behave the same way:

- an existing, non-empty output is replaced only with ``--overwrite``, and only when moescope can
  prove it wrote it (a trace with its ``manifest.json``, an output folder with its
  ``.moescope-output.json`` marker, a predictor ``.npz`` with its header, an HTML report with its
  generator tag, any other file with a ``.<name>.moescope-output.json`` record of its SHA-256 beside
  it); anything else is refused
  with a message naming the path;
- a command that adds named files to a folder the user may share (seed 004's journeys, written to
  the current directory by default) claims only those names: the folder may hold anything else,
  and an existing file of those names is replaced only when the folder's marker lists it;
- replacing deletes only moescope's own file names (shards, manifest, its temporaries, the files a
  marker lists), never a user's notes that happen to sit in the same folder;
- an output never lies inside one of the command's inputs, nor an input inside the output;
- a lock file beside the output (pid, host, start time) stops a second writer with a clear error;
  a lock left by a dead process on this host is recognised as stale and taken over;
- an interrupted command (Ctrl-C) leaves a note of what it left behind, which ``moescope``'s entry
  point prints on its way out with exit status 130.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError

#: Marker of an output folder written by moescope (analysis, simulation, split ...).
MARKER = ".moescope-output.json"
LOCK_SUFFIX = ".moescope-lock"
#: Folder kinds proven by a marker; "trace" is proven by its manifest, "predictor" by its header.
DIR_KINDS = ("trace", "analysis", "split", "simulation", "ablation", "folder")
FILE_KINDS = ("predictor", "report", "file")

#: moescope's own names inside a trace directory (shards, manifest, their atomic-write temporaries).
#: ``part-NNNNN.json``: a work unit's record in a unit-structured (distributed) capture.
TRACE_FILE = re.compile(r"^(manifest\.json|part-\d{5,}\.(parquet|json))$")
TRACE_TMP = re.compile(r"^\.(manifest\.json|part-\d{5,}\.(parquet|json))\.[0-9a-f]{8}\.tmp$")

#: What interrupted commands left behind, for the entry point's last line.
_LEFT: list[str] = []


def left_behind() -> list[str]:
    """Notes of outputs an interrupted command left (read by ``moescope.cli.main``)."""
    return list(_LEFT)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- ownership
def is_trace_dir(path: Path) -> bool:
    """True when ``path`` holds a ``manifest.json`` that says it is a moescope trace."""
    m = Path(path) / "manifest.json"
    if not m.is_file():
        return False
    try:
        doc = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == "moescope-trace"


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a moescope output folder, or ``None`` when absent or unreadable."""
    m = Path(path) / MARKER
    try:
        doc = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("tool") == "moescope" else None


def is_predictor_file(path: Path) -> bool:
    """True when ``path`` is an ``.npz`` whose JSON header says it is a moescope predictor."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            if "__header__" not in z.files:
                return False
            header = json.loads(z["__header__"].tobytes().decode("utf-8"))
    except Exception:  # any unreadable file is simply not proven ours
        return False
    return isinstance(header, dict) and header.get("format") == "moescope-predictor"


def file_record_path(path: Path) -> Path:
    """Where the record proving that moescope wrote the file ``path`` lives: a hidden sibling."""
    path = Path(path)
    return path.parent / f".{path.name}{MARKER}"


def _sha256(path: Path) -> str:
    from moescope.trace.writer import file_sha256  # here: the writer imports this module

    return file_sha256(path)


def is_own_file(path: Path) -> bool:
    """True when ``path`` is a file moescope wrote and nobody changed since (its record's SHA-256 matches)."""
    try:
        doc = json.loads(file_record_path(path).read_text(encoding="utf-8"))
        return (
            isinstance(doc, dict)
            and doc.get("tool") == "moescope"
            and Path(path).is_file()
            and doc.get("sha256") == _sha256(path)
        )
    except (OSError, ValueError):
        return False


def is_report_file(path: Path) -> bool:
    """True when ``path`` is an HTML page whose head says ``<meta name="generator" content="moescope report">``."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'<meta name="generator" content="moescope report">' in head


def _proof(path: Path, kind: str) -> str | None:
    """Why ``path`` is moescope's output of ``kind``; ``None`` when it cannot be proven."""
    if kind == "trace":
        return "its manifest.json" if is_trace_dir(path) else None
    if kind == "predictor":
        return "its predictor header" if is_predictor_file(path) else None
    if kind == "report":
        return "its generator meta tag" if is_report_file(path) else None
    if kind == "file":
        return f"its {file_record_path(path).name}" if is_own_file(path) else None
    marker = read_marker(path)
    if marker is not None and marker.get("kind") == kind:
        return f"its {MARKER}"
    return None


_NEEDS = {
    "trace": "a moescope trace (no manifest.json of format moescope-trace)",
    "predictor": "a moescope predictor file (no moescope-predictor header)",
    "report": 'a moescope report (no <meta name="generator" content="moescope report"> in its head)',
    "file": f"a file moescope can prove it wrote (no matching .<name>{MARKER} beside it)",
}


def _refuse_foreign(path: Path, kind: str) -> ConfigError:
    needs = _NEEDS.get(kind, f"a moescope {kind} folder (no {MARKER} marker)")
    return ConfigError(
        f"{path}: exists and is not {needs}; moescope replaces only what it wrote, so it leaves this"
        " alone: move it away or choose another `output`"
    )


# --------------------------------------------------------------------------- clearing
def clear_trace_dir(path: Path) -> None:
    """Delete a trace's own files (manifest, ``part-NNNNN.parquet``, their temporaries); keep the rest."""
    for p in Path(path).iterdir():
        if p.is_file() and (TRACE_FILE.match(p.name) or TRACE_TMP.match(p.name)):
            p.unlink()


def trace_orphans(path: Path, listed: set[str]) -> list[Path]:
    """moescope's shard and temporary names in ``path`` that the manifest does not list."""
    out = []
    for p in Path(path).iterdir():
        if not p.is_file():
            continue
        if TRACE_TMP.match(p.name) or (
            TRACE_FILE.match(p.name) and p.name != "manifest.json" and p.name not in listed
        ):
            out.append(p)
    return out


def _clear(path: Path, kind: str) -> None:
    if kind == "trace":
        clear_trace_dir(path)
        return
    if kind in FILE_KINDS:
        return  # files are replaced atomically, never deleted first
    marker = read_marker(path) or {}
    for rel in marker.get("files", []):
        target = (path / rel).resolve()
        if path.resolve() in target.parents and target.is_file():
            target.unlink()
    for sub in marker.get("traces", []):
        t = path / sub
        if t.is_dir() and is_trace_dir(t):
            clear_trace_dir(t)
            with contextlib.suppress(OSError):
                t.rmdir()
    with contextlib.suppress(FileNotFoundError):
        (path / MARKER).unlink()


# --------------------------------------------------------------------------- inputs
def check_not_input(output: Path, inputs: Sequence[str | Path | None], option: str = "`output`") -> None:
    """Refuse an output that is one of the inputs, lies inside one, or holds one."""
    out = Path(output).resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if out == src or src in out.parents:
            raise ConfigError(
                f"{option} {output}: lies inside the input {item}; moescope never writes into its own"
                " inputs: choose another output"
            )
        if out in src.parents:
            raise ConfigError(
                f"{option} {output}: holds the input {item}; writing there could destroy the input:"
                " choose another output"
            )


# --------------------------------------------------------------------------- locking
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(output: Path) -> Path:
    """The lock file of an output: a hidden sibling, so it works for folders and files alike."""
    output = Path(output)
    if not output.name:  # "." or "/": name the folder itself
        output = output.resolve()
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def locked(output: Path) -> Iterator[Path]:
    """Hold the lock of ``output``; a second writer gets a :class:`ConfigError` naming the holder."""
    lock = lock_path(output)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None and _stale(holder):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                if holder
                else "an unreadable lock"
            )
            raise ConfigError(
                f"{output}: another moescope run is writing here ({who}); wait for it to finish, or remove"
                f" {lock} if that run is gone"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise ConfigError(f"{output}: could not take the lock {lock}")
    try:
        yield lock
    finally:
        holder = _read_lock(lock)
        if holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _stale(holder: dict[str, Any]) -> bool:
    """A lock is stale when its process, on this host, is gone (another host's lock is respected)."""
    if not holder:
        return True  # vanished between our attempts
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    return not _pid_alive(pid)


# --------------------------------------------------------------------------- the claim
class Claim:
    """What :func:`claim` hands to the command: the path, and a place to note files written."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.traces: list[str] = []
        self.left: str | None = None  # what an interruption leaves, in words

    def write_marker(self, status: str, files: Sequence[str] | None = None) -> None:
        doc = {
            "tool": "moescope",
            "kind": self.kind,
            "status": status,
            "updated": _now(),
            "files": sorted(files or []),
            "traces": list(self.traces),
        }
        _atomic_json(self.path / MARKER, doc)


def _atomic_json(path: Path, obj: object) -> None:
    """Write JSON beside ``path`` then rename it into place (the trace package depends on this module)."""
    tmp = path.with_name(f".{path.name}.{os.getpid():x}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MARKER)


@contextlib.contextmanager
def claim(
    path: str | Path,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | Path | None] = (),
    resume: bool = False,
    option: str = "`output`",
    left: str | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[Claim]:
    """Take ``path`` as this command's output of ``kind`` for the duration of the ``with`` block.

    Checks the kind of path, the inputs and the lock, then (with ``overwrite``) clears what moescope
    wrote there before. ``resume`` lets a trace be continued in place. ``left`` describes, for an
    interruption, what stays behind (default: a sentence built from the kind). ``names`` (a folder
    kind only) claims just those file names inside ``path``, which may hold anything else.
    """
    if kind not in DIR_KINDS + FILE_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    if names is not None and (kind not in DIR_KINDS or kind == "trace"):
        raise ValueError("names= applies to output folders other than traces")
    path = Path(path)
    if names is not None and left is None:
        left = f"part of the files to write in {path} (its {MARKER} lists them; `overwrite` replaces them)"
    if names is None:
        check_not_input(path, inputs, option)
    else:
        for name in names:
            check_not_input(path / name, inputs, option)
    is_dir_kind = kind in DIR_KINDS
    if is_dir_kind and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a directory; this command writes a folder")
    if not is_dir_kind and path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; this command writes a file, give a file path")
    try:
        lock_cm = locked(path)
        lock_cm.__enter__()
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write there ({_os_reason(exc)})") from None
    c = Claim(path, kind)
    ok = False
    interrupted = False
    before: set[str] = set()  # names mode: the files the marker already lists as moescope's
    try:
        created = not path.exists()
        if names is not None:
            marker = read_marker(path) or {}
            if marker.get("kind") == kind:
                before = {f for f in marker.get("files", []) if (path / f).is_file()}
            _check_names(path, kind, names, before, overwrite)
        else:
            exists = _holds_something(path) if is_dir_kind else path.exists()
            if exists and not resume:
                if not overwrite:
                    raise ConfigError(
                        f"{path}: already exists" + (" and is not empty" if is_dir_kind else "") + "; pass"
                        " `overwrite` to replace it"
                    )
                if _proof(path, kind) is None:
                    raise _refuse_foreign(path, kind)
                if kind != "trace":  # a trace is cleared by its writer, right before the new one starts
                    _clear(path, kind)
        if is_dir_kind and kind != "trace":
            path.mkdir(parents=True, exist_ok=True)
            c.write_marker("incomplete", sorted(before))
        yield c
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        try:
            if ok and kind == "file" and path.is_file():
                _atomic_json(file_record_path(path), {"tool": "moescope", "sha256": _sha256(path)})
            if is_dir_kind and kind != "trace" and path.is_dir():
                if names is None:
                    files = _files_under(path)
                else:
                    files = sorted(before | {n for n in names if (path / n).is_file()})
                if ok:
                    c.write_marker("complete", files)
                elif not files and (path / MARKER).exists():
                    (path / MARKER).unlink()  # a run that failed before writing leaves nothing behind
                    if created:
                        with contextlib.suppress(OSError):
                            path.rmdir()
                elif (path / MARKER).exists():
                    c.write_marker("incomplete", files)
        finally:
            lock_cm.__exit__(None, None, None)
            if interrupted:  # said after the clean-up, so the line matches what is really left
                wrote = path.exists() and (
                    kind == "trace" or (_holds_something(path) if names is None else (path / MARKER).exists())
                )
                _LEFT.append(
                    (c.left or left or _default_left(c))
                    if wrote
                    else f"{path} untouched (nothing written yet)"
                )


def _check_names(path: Path, kind: str, names: Sequence[str], ours: set[str], overwrite: bool) -> None:
    """Names mode: refuse existing files of ``names`` without ``overwrite``, or that the marker does not list."""
    existing = [n for n in names if (path / n).exists()]
    if not existing:
        return
    if not overwrite:
        raise ConfigError(
            f"{path / existing[0]}: already exists ({len(existing)} of the files to write do);"
            " pass `overwrite` to replace them"
        )
    foreign = [n for n in existing if n not in ours]
    if foreign:
        raise ConfigError(
            f"{path / foreign[0]}: exists and its folder's {MARKER} does not list it as a file moescope"
            " wrote; moescope replaces only what it wrote, so it leaves this alone: move it away or"
            " choose another `output`"
        )


def _holds_something(path: Path) -> bool:
    """A folder counts as empty when it is absent or holds nothing but moescope's marker."""
    return path.is_dir() and any(p.name != MARKER for p in path.iterdir())


def _default_left(c: Claim) -> str:
    if not c.path.exists():
        return f"nothing at {c.path}"
    if c.kind == "trace":
        return f"a partial trace in {c.path}"
    if c.kind in FILE_KINDS:
        return f"{c.path} unchanged (files are replaced only when complete)"
    n = len(_files_under(c.path)) if c.path.is_dir() else 0
    return f"a partial {c.kind} folder {c.path} ({n} files; rerun with `overwrite` to replace it)"


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied or read-only file system"
    return exc.strerror or str(exc)


def remove_leftovers(output: Path, suffixes: Sequence[str] = (".incomplete", ".replaced")) -> list[Path]:
    """Remove ``.<name>.<hex8><suffix>`` siblings of ``output`` that an earlier, killed run left.

    Only folders holding nothing but trace files are removed; call this while holding the lock.
    """
    output = Path(output)
    pat = re.compile(rf"^\.{re.escape(output.name)}\.[0-9a-f]{{8}}({'|'.join(map(re.escape, suffixes))})$")
    removed = []
    if not output.parent.is_dir():
        return removed
    for p in output.parent.iterdir():
        if p.is_dir() and pat.match(p.name):
            if all(
                q.is_file() and (TRACE_FILE.match(q.name) or TRACE_TMP.match(q.name)) for q in p.iterdir()
            ):
                shutil.rmtree(p)
                removed.append(p)
    return removed


def check_replace_trace(out: Path, overwrite: bool) -> None:
    """Refuse to write a trace over a non-empty ``out`` unless ``overwrite`` and it is a moescope trace
    holding only moescope's files (its shards, manifest and temporaries)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"{out}: already exists and is not empty; pass `overwrite` to replace it")
        if not is_trace_dir(out):
            raise ConfigError(
                f"{out}: exists and is not a moescope trace (no manifest.json); moescope replaces only what"
                " it wrote, so it leaves this alone: move it away or choose another `output`"
            )
        foreign = [p.name for p in out.iterdir() if not (TRACE_FILE.match(p.name) or TRACE_TMP.match(p.name))]
        if foreign:
            raise ConfigError(
                f"{out}: holds files moescope did not write ({', '.join(sorted(foreign)[:5])}); move them"
                " away before replacing the trace"
            )


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``, replacing what is there by two renames (the old one
    is moved aside first and removed last, so ``out`` is never half-written)."""
    import uuid

    if out.exists():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.replaced")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
