"""What every importer shares: model facts, the issue report, documents, and the trace write.

An importer turns a routing log into :class:`RoutedDocument` objects (one per prompt, problem or
sample) and hands them to :func:`write_documents`, which writes a trace atomically: into a
temporary directory beside the target, moved into place only when every document is in.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import ConfigError, DataError
from moescope.trace.manifest import RoutingSpec
from moescope.trace.schema import default_columns, id_dtype, missing_id

#: How many examples of each kind of record problem the report keeps (the counts are always exact).
MAX_EXAMPLES = 10
#: How many masked series the manifest lists one by one (the count is always exact).
MAX_LISTED_SERIES = 5000


@dataclass(frozen=True)
class ModelFacts:
    """Routing facts of a known model whose logs carry no configuration.

    Derived, never typed: the shipped config (:mod:`moescope.models.registry`) read through the
    family table (:func:`moescope.core.families.config_facts`), exactly as capture reads a model.
    """

    name: str
    model_id: str
    family: str
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    num_hidden_layers: int
    n_shared_experts: int = 0
    router_kind: str = "softmax"


def known_models() -> list[str]:
    """Names ``--model`` accepts: the shipped configs (``moescope params --list`` names the same)."""
    from moescope.models.registry import shipped_names

    return shipped_names()


@functools.cache
def _model_facts(name: str) -> ModelFacts:
    from moescope.core.families import config_facts
    from moescope.models.registry import HUB_IDS, load_config

    f = config_facts(load_config(name))
    return ModelFacts(
        name=name,
        model_id=HUB_IDS.get(name, name),
        family=f.model_type,
        num_experts=f.num_experts,
        top_k=f.top_k,
        moe_layers=f.moe_layers,
        num_hidden_layers=f.num_hidden_layers,
        n_shared_experts=f.n_shared_experts,
        router_kind=f.router_kind,
    )


def preset(name: str | None) -> ModelFacts | None:
    """The known model called ``name`` (``None`` or ``"none"``: none); unknown names list the known ones."""
    if name is None or name.lower() == "none":
        return None
    from moescope.models.registry import resolve_shipped

    key = resolve_shipped(name)
    if key is None:
        raise ConfigError(f"`model`: unknown model {name!r}; known: {', '.join(known_models())} or 'none'")
    return _model_facts(key)


def preset_for_model_id(model_id: str) -> ModelFacts | None:
    """The known model whose name or hub id matches a free-form model string (``config`` of seed 002 logs)."""
    from moescope.models.registry import HUB_IDS, VARIANT_IDS

    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    target = norm(model_id)
    for name in known_models():
        ids = (HUB_IDS.get(name, name), *VARIANT_IDS.get(name, ()))
        if norm(name) in target or any(norm(i.split("/")[-1]) in target for i in ids):
            return _model_facts(name)
    return None


def parse_index_list(text: str | Sequence[int] | None, option: str = "moe_layers") -> list[int] | None:
    """``"1-26"``, ``"0,2,4"`` or ``"0-3,8"`` as a sorted list of decoder-layer indices."""
    if text is None:
        return None
    if not isinstance(text, str):
        layers = [int(x) for x in text]
    else:
        layers = []
        for part in text.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ConfigError(f"option {option}: cannot read {part!r}; write e.g. '1-26' or '0,2,4'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ConfigError(f"option {option}: range {part!r} runs backwards")
            layers.extend(range(lo, hi + 1))
    if not layers or sorted(set(layers)) != layers:
        raise ConfigError(f"option {option}: values must be distinct and increasing, got {text!r}")
    return layers


@dataclass
class ImportOptions:
    """Options an importer may take; each format says which ones it uses (others are refused).

    model : a known model (:func:`known_models`) whose routing facts apply, or ``"none"``; ``None`` means the format's default.
    num_experts, top_k, moe_layers, family, n_shared_experts, num_hidden_layers : override the facts.
    label : domain label of every document (default: the log's data set name, else the file stem).
    tokenizer : SentencePiece ``.model``, ``tokenizer.json``, a local tokenizer folder, or
        ``mistral-common:<file>``; used to rebuild token ids.
    text : seed 004 outputs JSONL (``problem_id``, ``generated``) whose tokens are the routed ones.
    short_series : ``"mask"`` (default) or ``"keep-prefix"``: what to do with a series that is
        shorter than its document when the log renumbers its token counter after a dropped record.
    expert_map : engine logs with redundant experts: a ``(layers, physical)`` physical-to-logical
        map (``.npy``, ``.json`` or ``.pt``) that maps the logged physical slots to logical experts.
    seq_len : FLAME-MoE traces: tokens per training sequence, to cut the token stream into documents.
    """

    model: str | None = None
    num_experts: int | None = None
    top_k: int | None = None
    moe_layers: str | list[int] | None = None
    family: str | None = None
    n_shared_experts: int | None = None
    num_hidden_layers: int | None = None
    label: str | None = None
    tokenizer: str | None = None
    text: str | Path | None = None
    short_series: str = "mask"
    expert_map: str | Path | None = None
    seq_len: int | None = None


@dataclass
class RoutedDocument:
    """The rows of one document. Routing arrays are ``(n, L, k)``; missing cells hold the sentinel."""

    doc_id: int
    label: str
    position: np.ndarray  # (n,)
    experts: np.ndarray  # (n, L, k)
    weights: np.ndarray | None = None  # (n, L, k), NaN where missing
    logits: np.ndarray | None = None  # (n, L, E), NaN where missing
    token_id: np.ndarray | None = None  # (n,), -1 unknown
    token: list[str] | None = None
    loss: float | None = None  # the document's mean next-token loss (nats), when the log has it

    def __len__(self) -> int:
        return len(self.position)


@dataclass
class ImportReport:
    """Counts and first examples of every record problem, plus the (document, layer) series masked.

    Nothing is ever shifted to fill a hole: a cell without a trustworthy record holds the
    ``missing`` sentinel and the series is listed here and in the manifest ``source`` section.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    masked_series: list[dict[str, Any]] = field(default_factory=list)
    masked_series_count: int = 0
    masked_cells: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, count: int = 1, example: str | None = None) -> None:
        """Count ``count`` problems of ``kind``; keep ``example`` if fewer than ``MAX_EXAMPLES`` are kept."""
        if count <= 0:
            return
        self.counts[kind] = self.counts.get(kind, 0) + int(count)
        if example is not None:
            kept = self.examples.setdefault(kind, [])
            if len(kept) < MAX_EXAMPLES:
                kept.append(example)

    def mask(self, doc_id: int, layer: int, expected: int, found: int, reason: str, masked: int) -> None:
        """Record that series (doc_id, decoder layer) has ``masked`` cells set to missing."""
        self.masked_series_count += 1
        self.masked_cells += int(masked)
        if len(self.masked_series) < MAX_LISTED_SERIES:
            self.masked_series.append(
                {
                    "doc_id": int(doc_id),
                    "layer": int(layer),
                    "expected": int(expected),
                    "found": int(found),
                    "masked": int(masked),
                    "reason": reason,
                }
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImportReport:
        """Rebuild a report from its manifest form (``to_dict``)."""
        return cls(
            counts=dict(d.get("issues", {})),
            examples=dict(d.get("examples", {})),
            masked_series=list(d.get("masked_series", [])),
            masked_series_count=int(d.get("masked_series_count", 0)),
            masked_cells=int(d.get("masked_cells", 0)),
            notes=list(d.get("notes", [])),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "issues": dict(sorted(self.counts.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
            "masked_series_count": self.masked_series_count,
            "masked_cells": self.masked_cells,
            "masked_series": self.masked_series,
            "masked_series_listed": len(self.masked_series),
            "notes": self.notes,
        }

    def summary(self) -> str:
        """A few lines for people: counts, first examples, masked series."""
        lines = []
        for kind, n in sorted(self.counts.items()):
            ex = self.examples.get(kind, [])
            lines.append(f"{kind}: {n}" + (f" (first: {ex[0]})" if ex else ""))
        if self.masked_series_count:
            first = ", ".join(f"doc {s['doc_id']} layer {s['layer']}" for s in self.masked_series[:5])
            lines.append(
                f"masked series: {self.masked_series_count} ({self.masked_cells} cells set to missing);"
                f" first: {first}"
            )
        lines.extend(self.notes)
        return "\n".join(lines)


@dataclass
class Facts:
    """Resolved routing facts for one import (what the RoutingSpec is built from)."""

    num_experts: int
    top_k: int
    moe_layers: list[int]
    family: str = "unknown"
    router_kind: str = "unknown"
    n_shared_experts: int = 0
    num_hidden_layers: int | None = None
    model_id: str | None = None

    @property
    def sentinel(self) -> int:
        return missing_id(self.num_experts)

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype(self.num_experts)

    def column_of(self) -> dict[int, int]:
        """Decoder-layer index -> routing column."""
        return {layer: i for i, layer in enumerate(self.moe_layers)}

    def spec(self) -> RoutingSpec:
        return RoutingSpec(
            num_experts=self.num_experts,
            top_k=self.top_k,
            moe_layers=list(self.moe_layers),
            family=self.family,
            router_kind=self.router_kind,
            n_shared_experts=self.n_shared_experts,
            num_hidden_layers=self.num_hidden_layers,
        )


def resolve_facts(
    opts: ImportOptions,
    default_model: str | None,
    *,
    num_experts: int | None = None,
    top_k: int | None = None,
    moe_layers: Sequence[int] | None = None,
    num_hidden_layers: int | None = None,
    model_id: str | None = None,
    family: str | None = None,
    seen_layers: Sequence[int] | None = None,
    where: str = "",
) -> Facts:
    """Combine, in rising priority: the preset, what the log itself says, and explicit options.

    A value the log states that contradicts an explicit option or the preset is an error naming
    both, since importing under the wrong facts silently mislabels every expert. ``seen_layers``
    (the layers that occur in the records) is the last resort for ``moe_layers``.
    """
    facts_preset = preset(opts.model if opts.model is not None else default_model)
    if facts_preset is None and opts.model is None and model_id:
        facts_preset = preset_for_model_id(model_id)
    layers_opt = parse_index_list(opts.moe_layers)

    def pick(name: str, option: Any, logged: Any, from_preset: Any) -> Any:
        if option is not None and logged is not None and option != logged:
            raise ConfigError(
                f"{where}: the log says {name}={logged}, but option --{name.replace('_', '-')}={option}"
            )
        if option is None and logged is not None and from_preset is not None and logged != from_preset:
            raise ConfigError(
                f"{where}: the log says {name}={logged}, but model {facts_preset.name!r} has {from_preset};"
                " pass `model` none (and the facts) or the right `model`"
            )
        for value in (option, logged, from_preset):
            if value is not None:
                return value
        return None

    p = facts_preset
    E = pick("num_experts", opts.num_experts, num_experts, p.num_experts if p else None)
    k = pick("top_k", opts.top_k, top_k, p.top_k if p else None)
    layers = pick(
        "moe_layers",
        layers_opt,
        list(moe_layers) if moe_layers is not None else None,
        list(p.moe_layers) if p else None,
    )
    if layers is None and seen_layers is not None and len(seen_layers):
        layers = sorted({int(x) for x in seen_layers})
    if E is None:
        raise ConfigError(
            f"{where}: the log does not say how many experts the model has: pass `num_experts` or `model`"
        )
    if k is None:
        raise ConfigError(f"{where}: the log does not say top_k: pass `top_k` or `model`")
    if layers is None:
        raise ConfigError(
            f"{where}: the log does not say which layers are MoE layers: pass `moe_layers` or `model`"
        )
    if not 1 <= k <= E:
        raise ConfigError(f"{where}: top_k={k} must be in 1..num_experts={E}")
    hidden = opts.num_hidden_layers or num_hidden_layers or (p.num_hidden_layers if p else None)
    if hidden is not None and hidden <= max(layers):
        raise ConfigError(f"{where}: num_hidden_layers={hidden} but MoE layer {max(layers)} is listed")
    return Facts(
        num_experts=int(E),
        top_k=int(k),
        moe_layers=[int(x) for x in layers],
        family=opts.family or family or (p.family if p else "unknown"),
        router_kind=p.router_kind if p else "unknown",
        n_shared_experts=int(
            opts.n_shared_experts if opts.n_shared_experts is not None else (p.n_shared_experts if p else 0)
        ),
        num_hidden_layers=hidden,
        model_id=model_id or (p.model_id if p else None),
    )


def check_ids(ids: np.ndarray, num_experts: int, where: Any) -> None:
    """Raise naming the first bad cell when an id is negative or >= E; ``where(flat_row)`` says where.

    ``ids`` is ``(R, k)``; ``where`` maps a row index to a location string ("file:line ...").
    """
    bad = (ids < 0) | (ids >= num_experts)
    if bad.any():
        row, slot = np.argwhere(bad)[0]
        raise DataError(
            f"{where(int(row))}: expert id {int(ids[row, slot])} is out of range 0..{num_experts - 1}"
            f" ({int(bad.sum())} such ids); is `num_experts` / `model` right?"
        )
    if ids.shape[1] > 1:
        srt = np.sort(ids, axis=1)
        rep = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if rep.any():
            row = int(np.flatnonzero(rep)[0])
            raise DataError(
                f"{where(row)}: expert {ids[row].tolist()} repeats an id inside one token's top-k"
                f" ({int(rep.sum())} such rows); a top-k selection never does"
            )


def slot_order_of(weights: np.ndarray | None, experts: np.ndarray, sentinel: int, claimed: str) -> str:
    """Check a claimed ``"rank"`` order against the weights: ``"set"`` when some weight rises along k."""
    if claimed != "rank" or weights is None:
        return claimed
    valid = (experts != sentinel).all(axis=-1)
    w = weights[valid]
    if w.size and (np.diff(w, axis=-1) > 1e-6).any():
        return "set"
    return "rank"


def expand_paths(paths: Sequence[str | Path], suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Files named directly, plus the files with ``suffixes`` inside named folders (natural order)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [q for q in p.iterdir() if q.is_file() and q.name.endswith(suffixes)]
            if not found:
                raise DataError(f"{p}: folder holds no {what} files ({', '.join(suffixes)})")
            out.extend(sorted(found, key=natural_key))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not out:
        raise DataError(f"no {what} files given")
    return out


def natural_key(p: Path | str) -> list[Any]:
    """Sort key that orders ``prompt_2`` before ``prompt_10``."""
    name = p.name if isinstance(p, Path) else str(p)
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def default_label(opts: ImportOptions, logged: str | None, path: Path) -> str:
    """The ``--label`` option, else the data set named in the log, else the file name without suffixes."""
    if opts.label:
        return opts.label
    if logged:
        return str(logged)
    name = path.name
    for suffix in (".tar.xz", ".tar.gz", ".jsonl", ".json", ".csv", ".npz", ".npy", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def write_documents(
    out: str | Path,
    facts: Facts,
    documents: Iterable[RoutedDocument],
    *,
    weights: bool,
    logits: bool = False,
    token_text: bool = False,
    doc_loss: bool = False,
    source: dict[str, Any],
    report: ImportReport,
    tokenizer: dict[str, Any] | None = None,
    overwrite: bool = False,
    shard_rows: int = 65536,
    counts: dict[str, Any] | None = None,
) -> Path:
    """Write ``documents`` (increasing ``doc_id``) to the trace ``out``, atomically.

    The trace is built in ``.<name>.<uuid8>.incomplete`` beside ``out`` and renamed into place at the
    end, so a failed import never leaves a half-written trace; ``source`` gets the report's counts.
    ``source["slot_order"]`` (``"rank"`` or ``"set"``, default ``"rank"``; the importer may settle it
    while reading) becomes the trace's ``routing.slot_order``. ``counts`` (a counts-only log, see
    :func:`counts_section`) becomes the manifest's ``counts`` section; such a trace has no rows.
    """
    from moescope.trace.outputs import check_replace_trace, remove_leftovers
    from moescope.trace.writer import TraceWriter

    out = Path(out)
    check_replace_trace(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)  # temporary folders of an earlier, killed import into the same place
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.incomplete")
    columns = default_columns(weights=weights, logits=logits, token_text=token_text, doc_loss=doc_loss)
    model = {"id": facts.model_id} if facts.model_id else {}
    try:
        writer = TraceWriter.create(
            tmp,
            facts.spec(),
            columns=columns,
            model=model,
            tokenizer=tokenizer or {},
            source=source,
            shard_rows=shard_rows,
        )
        labels: dict[str, int] = {}
        buffered: list[RoutedDocument] = []
        rows = 0
        last_doc: int | None = None
        for doc in documents:
            if last_doc is not None and doc.doc_id <= last_doc:
                raise DataError(f"document ids must increase: {doc.doc_id} after {last_doc}")
            last_doc = doc.doc_id
            if not len(doc):
                continue
            labels[doc.label] = labels.get(doc.label, 0) + 1
            buffered.append(doc)
            rows += len(doc)
            if rows >= shard_rows:
                _append(writer, buffered, weights, logits, token_text, doc_loss)
                buffered, rows = [], 0
        if buffered:
            _append(writer, buffered, weights, logits, token_text, doc_loss)
        writer.manifest["datasets"] = [
            {"name": name, "labels": [name], "documents": n} for name, n in labels.items()
        ]
        writer.set_slot_order(source.get("slot_order", "rank"))
        if counts is not None:
            writer.manifest["counts"] = counts
        rest = {key: value for key, value in source.items() if key != "slot_order"}
        writer.manifest["source"] = {**rest, "report": report.to_dict()}
        writer.close()
        from moescope.trace.outputs import swap_in

        swap_in(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return out


def _append(
    writer: Any,
    docs: list[RoutedDocument],
    weights: bool,
    logits: bool,
    token_text: bool,
    doc_loss: bool = False,
) -> None:
    """Append whole documents in one call and commit them (one Arrow table per call keeps writing fast)."""
    n = [len(d) for d in docs]
    label = [d.label for d, m in zip(docs, n, strict=True) for _ in range(m)]
    token_ids = [d.token_id if d.token_id is not None else np.full(len(d), -1, np.int32) for d in docs]
    writer.append(
        doc_id=np.repeat([d.doc_id for d in docs], n),
        position=np.concatenate([d.position for d in docs]),
        token_id=np.concatenate(token_ids),
        label=label,
        experts=np.concatenate([d.experts for d in docs]),
        weights=np.concatenate([d.weights for d in docs]) if weights else None,
        logits=np.concatenate([d.logits for d in docs]) if logits else None,
        token=[t for d in docs for t in (d.token or [""] * len(d))] if token_text else None,
        doc_loss=np.repeat([np.nan if d.loss is None else d.loss for d in docs], n) if doc_loss else None,
    )
    writer.commit(docs[-1].doc_id)


def iter_trace_documents(
    trace: Any, columns: list[str], batch_size: int = 65536
) -> Iterator[tuple[int, Any]]:
    """Stream a trace one document at a time as ``(doc_id, Batch)``; memory holds one document plus a batch."""
    from moescope.trace.reader import Batch

    pending: list[Any] = []
    for b in trace.iter_batches(columns=sorted(set(columns) | {"doc_id"}), batch_size=batch_size):
        cuts = np.flatnonzero(np.diff(b.doc_id)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(b)]])
        for s, e in zip(starts, ends, strict=True):
            piece = _slice_batch(b, s, e)
            if pending and pending[0].doc_id[0] != piece.doc_id[0]:
                yield int(pending[0].doc_id[0]), _concat_batches(pending, Batch)
                pending = []
            pending.append(piece)
    if pending:
        yield int(pending[0].doc_id[0]), _concat_batches(pending, Batch)


def _slice_batch(b: Any, s: int, e: int) -> Any:
    from moescope.trace.reader import Batch

    out = Batch()
    for name in ("doc_id", "position", "token_id", "label", "experts", "weights", "logits", "doc_loss"):
        v = getattr(b, name)
        setattr(out, name, v[s:e] if v is not None else None)
    out.token = b.token[s:e] if b.token is not None else None
    return out


def _concat_batches(parts: list[Any], batch_cls: type) -> Any:
    if len(parts) == 1:
        return parts[0]
    out = batch_cls()
    for name in ("doc_id", "position", "token_id", "label", "experts", "weights", "logits", "doc_loss"):
        vals = [getattr(p, name) for p in parts]
        setattr(out, name, np.concatenate(vals) if vals[0] is not None else None)
    out.token = [t for p in parts for t in p.token] if parts[0].token is not None else None
    return out


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; bad JSON or a non-object names file and line."""
    import json

    try:
        f = open(path, "rb")  # bytes: a decoding error is then pinned to its line
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def iter_json_responses(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, response)`` for each response an engine's client saved: one per line of a ``.jsonl``
    file (``path:line``), else the one object or each item of the list of a ``.json`` file (``path[j]``)."""
    import json

    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            yield f"{path}:{lineno}", obj
        return
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a JSON response ({exc})") from None
    if isinstance(obj, list):
        for j, o in enumerate(obj):
            yield f"{path}[{j}]", o
    else:
        yield str(path), obj


def require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` checked for presence and type; the error names the place and the field."""
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {names}, got {value!r:.60}")
    return value


def id_rows(values: list[Any], k: int | None, field_name: str, where: Any) -> np.ndarray:
    """A list of per-record id lists as an ``(R, k)`` int64 array; ragged or non-integer rows are errors.

    ``where(i)`` names record ``i``. ``k`` None takes the first row's length.
    """
    k = len(values[0]) if k is None and values and isinstance(values[0], list) else k
    try:
        arr = np.array(values)
        ok = arr.ndim == 2 and arr.shape[1] == k and arr.dtype.kind in "iu"
    except (ValueError, TypeError, OverflowError):
        ok = False
    if not ok:
        for i, v in enumerate(values):
            if not isinstance(v, list) or len(v) != k or not all(type(x) is int for x in v):
                got = f"{len(v)} ids" if isinstance(v, list) else type(v).__name__
                raise DataError(
                    f"{where(i)}: field {field_name!r} must be a list of {k} integer expert ids (top_k={k}), got"
                    f" {got}: {v!r:.80}"
                )
        raise DataError(f"{where(0)}: field {field_name!r} could not be read")
    return arr.astype(np.int64, copy=False)


def float_rows(values: list[Any], k: int, field_name: str, where: Any) -> np.ndarray:
    """A list of per-record float lists as an ``(R, k)`` float32 array; wrong lengths are errors."""
    try:
        arr = np.array(values, dtype=np.float32)
        ok = arr.ndim == 2 and arr.shape[1] == k
    except (ValueError, TypeError):
        ok = False
    if not ok:
        for i, v in enumerate(values):
            if not isinstance(v, list) or len(v) != k or not all(isinstance(x, int | float) for x in v):
                raise DataError(
                    f"{where(i)}: field {field_name!r} must be a list of {k} numbers, got {v!r:.80}"
                )
        raise DataError(f"{where(0)}: field {field_name!r} could not be read")
    return arr


@dataclass
class Imported:
    """What a format reader hands to :func:`write_documents`.

    ``documents`` may be a generator that fills ``report`` and ``source`` as it goes: both are
    read only after the last document is written.
    """

    facts: Facts
    documents: Iterable[RoutedDocument]
    report: ImportReport
    source: dict[str, Any]
    weights: bool = False
    logits: bool = False
    token_text: bool = False
    tokenizer: dict[str, Any] | None = None
    doc_loss: bool = False
    counts: dict[str, Any] | None = None  # a counts-only log: the manifest's ``counts`` section


def counts_section(assignments: np.ndarray, tokens: np.ndarray, summed_over: str) -> dict[str, Any]:
    """The manifest's ``counts`` section of a counts-only trace (docs/trace-format.md).

    ``assignments`` ``(L, E)``: how many top-k slots chose each expert at each MoE layer column,
    all slots counted; ``tokens`` ``(L,)``: tokens routed at each column; ``summed_over`` says what
    the engine's records were summed over (steps, ranks).
    """
    a = np.asarray(assignments, np.int64)
    t = np.asarray(tokens, np.int64)
    if a.ndim != 2 or t.shape != (a.shape[0],) or (a < 0).any() or (t < 0).any():
        raise DataError(f"counts must be non-negative, (L, E) and (L,); got {a.shape} and {t.shape}")
    return {"assignments": a.tolist(), "tokens": t.tolist(), "summed_over": summed_over}


def locator(
    files: Sequence[Path], file_idx: Sequence[int] | np.ndarray, lines: Sequence[int] | np.ndarray
) -> Any:
    """``where(i)`` -> ``"file:line"`` of record ``i`` from parallel file-index and line arrays."""

    def where(i: int) -> str:
        return f"{files[int(file_idx[i])]}:{int(lines[i])}"

    return where


def check_layers(layers: np.ndarray, facts: Facts, where: Any) -> np.ndarray:
    """Routing column of each record's decoder layer; a layer that is not a MoE layer names its record."""
    moe = np.asarray(facts.moe_layers)
    col = np.searchsorted(moe, layers)
    bad = (col >= len(moe)) | (moe[np.minimum(col, len(moe) - 1)] != layers)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where(i)}: layer {int(layers[i])} is not a MoE layer of this model (moe_layers"
            f" {_ranges(facts.moe_layers)}); pass `moe_layers` or the right `model`"
        )
    return col


def _ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2,5"``."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(out)


#: Options every importer takes: the routing facts (or a model preset giving them) and a label.
ROUTING_OPTIONS = frozenset(
    {
        "model",
        "num_experts",
        "top_k",
        "moe_layers",
        "family",
        "n_shared_experts",
        "num_hidden_layers",
        "label",
    }
)
