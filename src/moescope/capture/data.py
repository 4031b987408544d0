"""Texts to capture: data sources, data-set presets, tokenisation and windowing.

A capture reads one or more *sources* (text, JSONL/JSON, CSV/TSV, Parquet files, a ``datasets``
``save_to_disk`` directory, a hub data set or a named preset). Every source yields records that go
through one field-mapping step (:class:`FieldMapping`), so a preset applied to a local file behaves
exactly as it does on the hub. Documents get consecutive ids in reading order; empty texts are
skipped and get no id, so the same data always gives the same ids (which resume relies on).

Long documents are cut into windows of ``seq_len`` tokens. Windows do not overlap and no token is
added: ``position`` stays the token's index in the whole document, so a trace row means the same
thing whatever the window size (only the context the model saw before it changes).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: How a ``.txt`` file is cut into documents.
TXT_UNITS = ("paragraph", "file", "line")
#: A text file that is not UTF-8, or a CSV cell this long, is almost certainly not what was meant.
_CSV_FIELD_LIMIT = 1 << 30


# --------------------------------------------------------------------------- presets
def _hellaswag_text(rec: dict[str, Any]) -> str:
    """HellaSwag: the context followed by its gold ending (the context alone when the label is hidden)."""
    ctx = rec["ctx"]
    label = rec.get("label")
    endings = rec.get("endings") or []
    try:
        gold = int(label)
    except (TypeError, ValueError):
        return ctx
    if not 0 <= gold < len(endings):
        return ctx
    return f"{ctx} {endings[gold]}"


@dataclass(frozen=True)
class Preset:
    """A data set the seed studies use: where it lives on the hub and how its records map to text.

    ``text`` is a field name or a function of the record (for data sets whose text spans fields);
    ``needs`` lists the fields that function reads, for the unknown-field error.
    ``label_names`` turns integer labels into category names. ``group`` names a regrouping of
    rows into documents (``"wikitext_articles"``: one document per article, not per line).
    """

    name: str
    path: str
    config: str | None
    split: str
    text: str | Callable[[dict[str, Any]], str]
    needs: tuple[str, ...] = ()
    label_field: str | None = None
    label_names: tuple[str, ...] | None = None
    group: str | None = None
    description: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "wikitext",
            "Salesforce/wikitext",
            "wikitext-103-raw-v1",
            "test",
            "text",
            group="wikitext_articles",
            description="WikiText-103 (raw), one document per article",
        ),
        Preset(
            "wikitext-2",
            "Salesforce/wikitext",
            "wikitext-2-raw-v1",
            "test",
            "text",
            group="wikitext_articles",
            description="WikiText-2 (raw), one document per article",
        ),
        Preset(
            "lambada",
            "EleutherAI/lambada_openai",
            "default",
            "test",
            "text",
            description="LAMBADA (OpenAI version), one passage per document",
        ),
        Preset(
            "hellaswag",
            "Rowan/hellaswag",
            None,
            "validation",
            _hellaswag_text,
            needs=("ctx", "endings"),
            description="HellaSwag, context + gold ending",
        ),
        Preset(
            "ag_news",
            "fancyzhx/ag_news",
            None,
            "test",
            "text",
            label_field="label",
            label_names=("World", "Sports", "Business", "Sci/Tech"),
            description="AG News, labelled with its four categories",
        ),
        Preset(
            "humaneval",
            "openai/openai_humaneval",
            None,
            "test",
            "prompt",
            description="HumanEval, one function prompt per document",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; the error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"--preset: unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------- field mapping
@dataclass
class FieldMapping:
    """Turns a record into ``(text, label)``: the one place field names are interpreted.

    Precedence: an explicit ``text_field`` beats the preset's text rule; a constant ``label`` beats
    ``label_field``, which beats the preset's label field; with none of them the label is
    ``default_label`` (the source's name), so a multi-source trace is labelled by data set.
    """

    text_field: str | None = None
    label_field: str | None = None
    label: str | None = None
    preset: Preset | None = None
    default_label: str = ""
    label_names: Sequence[str] | None = None  # e.g. a datasets ClassLabel's names

    def text_rule(self) -> str | Callable[[dict[str, Any]], str]:
        if self.text_field:
            return self.text_field
        if self.preset is not None:
            return self.preset.text
        return "text"

    def label_rule(self) -> str | None:
        if self.label is not None:
            return None
        return self.label_field or (self.preset.label_field if self.preset else None)

    def _names(self) -> Sequence[str] | None:
        if self.label_field is None and self.preset is not None and self.preset.label_names:
            return self.preset.label_names
        return self.label_names

    def check_fields(self, available: Sequence[str], where: str) -> None:
        """Fail early, naming the field and listing the available ones, when a rule reads a missing field."""
        rule = self.text_rule()
        needs = [rule] if isinstance(rule, str) else list(self.preset.needs if self.preset else ())
        for name in needs:
            if name not in available:
                raise DataError(
                    f"{where}: unknown text field {name!r}; available fields: {', '.join(map(str, available))}"
                    " (choose one with --text-field)"
                )
        lab = self.label_rule()
        if lab is not None and lab not in available:
            raise DataError(
                f"{where}: unknown label field {lab!r}; available fields: {', '.join(map(str, available))}"
                " (choose one with --label-field, or give a constant --label)"
            )

    def map(self, rec: dict[str, Any], where: str) -> tuple[str, str]:
        """``(text, label)`` of one record; ``where`` (file and line or row) goes into errors."""
        rule = self.text_rule()
        if isinstance(rule, str):
            if rule not in rec:
                self.check_fields(list(rec), where)
            text = _as_text(rec[rule], rule, where)
        else:
            self.check_fields(list(rec), where)
            text = rule(rec)
        lab = self.label_rule()
        if lab is None:
            return text, self.label if self.label is not None else self.default_label
        if lab not in rec:
            self.check_fields(list(rec), where)
        return text, self._label_value(rec[lab], lab, where)

    def _label_value(self, value: Any, name: str, where: str) -> str:
        if value is None:
            return ""
        names = self._names()
        if names is not None and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not 0 <= int(value) < len(names):
                raise DataError(
                    f"{where}: label field {name!r} has value {value}, outside the {len(names)} category names"
                    f" {list(names)}"
                )
            return str(names[int(value)])
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)


def _as_text(value: Any, name: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise DataError(f"{where}: text field {name!r} holds {type(value).__name__}, not a string")


# --------------------------------------------------------------------------- sources
@dataclass
class Source:
    """One DATA argument, resolved: what it is, how to read it and what identifies its content."""

    name: str
    kind: str  # txt | jsonl | json | csv | tsv | parquet | disk | hub
    mapping: FieldMapping
    path: Path | None = None
    hub_path: str | None = None
    config: str | None = None
    split: str | None = None
    txt_unit: str = "paragraph"
    max_documents: int | None = None
    group: str | None = None
    _dataset: Any = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        """Identity for the manifest and for resume: changing the data changes this."""
        d: dict[str, Any] = {"source": self.name, "kind": self.kind}
        if self.kind == "hub":
            d.update(path=self.hub_path, config=self.config, split=self.split)
        if self.kind in ("hub", "disk"):
            d["split"] = self.split
            d["fingerprint"] = getattr(self._load_dataset(), "_fingerprint", None)
        elif self.path is not None:
            d["bytes"] = self.path.stat().st_size
            d["sha256"] = _file_sha256(self.path)
        if self.kind == "txt":
            d["txt_unit"] = self.txt_unit
        rule = self.mapping.text_rule()
        d["text"] = rule if isinstance(rule, str) else f"preset:{self.mapping.preset.name}"
        d["label_field"] = self.mapping.label_rule()
        d["label"] = (
            self.mapping.label
            if self.mapping.label is not None
            else (None if self.mapping.label_rule() else self.mapping.default_label)
        )
        if self.mapping.preset is not None:
            d["preset"] = self.mapping.preset.name
        if self.max_documents is not None:
            d["max_documents"] = self.max_documents
        return d

    # ------------------------------------------------------------------ reading
    def texts(self) -> Iterator[tuple[str, str]]:
        """``(text, label)`` pairs in file order, before empty texts are dropped."""
        if self.kind == "txt":
            for text in _read_txt(self.path, self.txt_unit):
                yield (
                    text,
                    self.mapping.label if self.mapping.label is not None else self.mapping.default_label,
                )
            return
        records = self._records()
        if self.group == "wikitext_articles":
            records = _group_wikitext(records, self.mapping.text_rule())
        for rec, where in records:
            yield self.mapping.map(rec, where)

    def _records(self) -> Iterator[tuple[dict[str, Any], str]]:
        if self.kind in ("jsonl", "json"):
            yield from _read_json(self.path)
        elif self.kind in ("csv", "tsv"):
            yield from _read_csv(self.path, self.mapping, delimiter="\t" if self.kind == "tsv" else ",")
        elif self.kind == "parquet":
            yield from _read_parquet(self.path, self.mapping)
        else:
            ds = self._load_dataset()
            feats = getattr(ds, "features", None) or {}
            self.mapping.check_fields(list(ds.column_names), self.name)
            lab = self.mapping.label_rule()
            if lab is not None and self.mapping.label_names is None:
                names = getattr(feats.get(lab), "names", None)
                if names:
                    self.mapping.label_names = list(names)
            for i, rec in enumerate(ds):
                yield rec, f"{self.name} row {i}"

    def _load_dataset(self) -> Any:
        if self._dataset is None:
            self._dataset = _load_from_disk(self.path, self.split) if self.kind == "disk" else _load_hub(self)
            if self.split is None and getattr(self._dataset, "split", None) is not None:
                self.split = str(self._dataset.split)
        return self._dataset


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_txt(path: Path, unit: str) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}); convert it or use another format"
        ) from None
    if unit == "file":
        yield text
    elif unit == "line":
        yield from text.splitlines()
    else:
        yield from re.split(r"\n[ \t\r\f\v]*\n", text)


def _read_json(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    try:
        yield from _read_json_utf8(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} near byte {exc.start} of a block)") from None


def _read_json_utf8(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if path.suffix == ".json" and head.startswith("["):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
                ) from None
            for i, rec in enumerate(rows):
                if not isinstance(rec, dict):
                    raise DataError(
                        f"{path}: item {i} is {type(rec).__name__}, expected an object with fields"
                    )
                yield rec, f"{path} item {i}"
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}:{lineno}: a JSON line must be an object with fields, got {type(rec).__name__}"
                )
            yield rec, f"{path}:{lineno}"


def _read_csv(path: Path, mapping: FieldMapping, delimiter: str) -> Iterator[tuple[dict[str, Any], str]]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        mapping.check_fields(list(reader.fieldnames), str(path))
        for i, rec in enumerate(reader):
            yield rec, f"{path} row {i + 1}"


def _read_parquet(path: Path, mapping: FieldMapping) -> Iterator[tuple[dict[str, Any], str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    mapping.check_fields(names, str(path))
    row = 0
    for rb in pf.iter_batches(batch_size=4096):
        for rec in rb.to_pylist():
            yield rec, f"{path} row {row}"
            row += 1


_WIKITEXT_TITLE = re.compile(r"^ = (?!=).* = ?\n?$")


def _group_wikitext(
    records: Iterator[tuple[dict[str, Any], str]], rule: str | Callable
) -> Iterator[tuple[dict[str, Any], str]]:
    """Join WikiText's one-line rows into articles; a top-level `` = Title = `` row starts one."""
    if not isinstance(rule, str):
        yield from records
        return
    lines: list[str] = []
    start = ""
    for rec, where in records:
        if rule not in rec:
            yield rec, where  # let the mapping raise its unknown-field error
            return
        line = rec[rule] or "\n"  # an empty row stands for a blank line of the original text
        if _WIKITEXT_TITLE.match(line) and any(s.strip() for s in lines):
            yield {rule: "".join(lines).strip()}, start
            lines = []
        if not lines:
            start = where
        lines.append(line)
    if any(s.strip() for s in lines):
        yield {rule: "".join(lines).strip()}, start


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _pick_split(dsd: Any, split: str | None, where: str) -> Any:
    splits = list(dsd.keys())
    if split is not None:
        if split not in dsd:
            raise DataError(
                f"{where}: no split {split!r}; available splits: {', '.join(splits)} (use --split)"
            )
        return dsd[split]
    if len(splits) == 1:
        return dsd[splits[0]]
    raise DataError(f"{where}: has several splits ({', '.join(splits)}); choose one with --split")


def _load_from_disk(path: Path, split: str | None) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{path}: reading a saved data set needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ...
        raise DataError(f"{path}: cannot load the saved data set: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, str(path))
    elif split is not None and ds.split is not None and str(ds.split) != split:
        raise DataError(f"{path}: holds split {str(ds.split)!r}, not --split {split!r}")
    return ds


def _load_hub(src: Source) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{src.name}: loading a hub data set needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(src.hub_path, src.config, split=src.split)
    except Exception as exc:  # offline, unknown name, bad config: datasets raises many types
        raise DataError(
            f"{src.name}: not a file or directory, and loading it as a hub data set"
            f" ({src.hub_path!r}, config {src.config!r}, split {src.split!r}) failed: {exc}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, None, src.name)
    return ds


def resolve_source(
    item: str,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    label: str | None = None,
    preset: str | None = None,
    split: str | None = None,
    data_config: str | None = None,
    txt_unit: str = "paragraph",
    max_documents: int | None = None,
) -> Source:
    """Decide what one DATA argument is: a local file (by suffix), a saved data set, a preset or a hub id.

    ``preset`` applies a preset's field mapping to local files; a DATA argument that *is* a preset
    name loads that preset from the hub.
    """
    if txt_unit not in TXT_UNITS:
        raise ConfigError(f"--txt-unit must be one of {', '.join(TXT_UNITS)}, got {txt_unit!r}")
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"--max-documents must be >= 1, got {max_documents}")
    p = Path(item).expanduser()
    pre = get_preset(preset) if preset else None
    if p.exists():
        default_label = p.stem if p.is_file() else p.name
        mapping = FieldMapping(text_field, label_field, label, pre, default_label)
        common = {
            "mapping": mapping,
            "path": p,
            "max_documents": max_documents,
            "group": pre.group if pre else None,
        }
        if p.is_dir():
            if not _is_saved_dataset(p):
                raise DataError(
                    f"{p}: a directory that is not a datasets save_to_disk folder (no dataset_dict.json or"
                    " state.json); pass its files instead"
                )
            return Source(item, "disk", split=split or (pre.split if pre else None), **common)
        suffix = p.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            if text_field or label_field or pre:
                raise ConfigError(
                    f"{p}: a plain text file has no fields, so --text-field, --label-field and --preset do not apply"
                )
            return Source(item, "txt", txt_unit=txt_unit, **common)
        if suffix in JSON_SUFFIXES:
            return Source(item, "json" if suffix == ".json" else "jsonl", **common)
        if suffix in CSV_SUFFIXES:
            return Source(item, suffix[1:], **common)
        if suffix in PARQUET_SUFFIXES:
            return Source(item, "parquet", **common)
        raise DataError(
            f"{p}: unknown file type {suffix or '(no suffix)'!r}; use .txt, .jsonl, .json, .csv, .tsv or .parquet"
        )
    if item in PRESETS:
        hub = PRESETS[item]
        if pre is not None and pre.name != hub.name:
            raise ConfigError(f"--preset {pre.name} conflicts with DATA {item!r}, itself a preset")
        mapping = FieldMapping(text_field, label_field, label, hub, hub.name)
        return Source(
            item,
            "hub",
            mapping,
            hub_path=hub.path,
            config=data_config or hub.config,
            split=split or hub.split,
            max_documents=max_documents,
            group=hub.group,
        )
    if any(
        item.lower().endswith(s) for s in (*TEXT_SUFFIXES, *JSON_SUFFIXES, *CSV_SUFFIXES, *PARQUET_SUFFIXES)
    ):
        raise DataError(f"{item}: no such file")
    mapping = FieldMapping(text_field, label_field, label, pre, item.rsplit("/", 1)[-1])
    return Source(
        item,
        "hub",
        mapping,
        hub_path=item,
        config=data_config,
        split=split or (pre.split if pre else None),
        max_documents=max_documents,
        group=pre.group if pre else None,
    )


# --------------------------------------------------------------------------- documents
@dataclass
class Document:
    """One non-empty text with its id (consecutive over all sources) and label."""

    doc_id: int
    text: str
    label: str
    source: int  # index of the Source it came from


def iter_documents(sources: Sequence[Source], start: int = 0) -> Iterator[Document]:
    """Documents of all sources in order, ids from 0; empty texts are skipped and take no id.

    ``max_documents`` applies per source. Documents with ``doc_id < start`` are still read (ids
    depend on them) but not yielded, which is how a resumed capture skips what it has.
    """
    doc_id = 0
    for si, src in enumerate(sources):
        n = 0
        for text, label in src.texts():
            if src.max_documents is not None and n >= src.max_documents:
                break
            if not text.strip():
                continue
            if doc_id >= start:
                yield Document(doc_id, text, label, si)
            doc_id += 1
            n += 1


# --------------------------------------------------------------------------- tokens and windows
def ensure_pad_token(tokenizer: Any) -> int:
    """The pad id for batching: the tokenizer's, else its EOS (set on the tokenizer), else an error."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    if getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return int(tokenizer.pad_token_id)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ConfigError(
        f"tokenizer {name!r} has neither a pad token nor an EOS token to pad batches with; set"
        " tokenizer.pad_token before capturing"
    )


def tokenize(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text as the tokenizer encodes it by default (BOS/EOS as it adds them)."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in enc]


#: Characters kept per budgeted token before tokenising (tokens rarely span more than a few dozen).
_CHARS_PER_TOKEN = 64
#: Tokens beyond the budget the cut text must give, so the cut cannot change the tokens kept.
_CUT_SLACK = 16


def iter_tokenized(
    documents: Iterable[Document], tokenizer: Any, *, max_tokens: int | None = None, group: int = 64
) -> Iterator[tuple[Document, np.ndarray]]:
    """Each document with its token ids, tokenised ``group`` documents at a time (one fast batch call).

    With ``max_tokens`` the document that reaches the budget is cut so the total matches it exactly,
    and nothing after it is read.
    """
    budget = max_tokens
    pending: list[Document] = []

    def flush() -> Iterator[tuple[Document, np.ndarray]]:
        nonlocal budget
        # With a budget, a huge text is cut to a character budget first (tokenising a 10 MB line whole
        # to keep 3,000 tokens costs seconds and gigabytes); if the cut text yields too few tokens to be
        # sure the cut did not change the kept ones, the whole text is tokenised after all.
        limit = None if budget is None else budget * _CHARS_PER_TOKEN + 1024
        texts = [d.text if limit is None else d.text[:limit] for d in pending]
        for d, text, ids in zip(pending, texts, tokenize(tokenizer, texts), strict=True):
            if budget is not None:
                if budget <= 0:
                    break
                if len(text) < len(d.text) and len(ids) < budget + _CUT_SLACK:
                    ids = tokenize(tokenizer, [d.text])[0]
                ids = ids[:budget]
                budget -= len(ids)
            yield d, ids
        pending.clear()

    for doc in documents:
        pending.append(doc)
        if len(pending) >= group:
            yield from flush()
            if budget is not None and budget <= 0:
                return
    yield from flush()


@dataclass
class Window:
    """A slice of one document's tokens: ``ids`` start at document position ``start``."""

    doc_id: int
    start: int
    ids: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.ids)


def make_windows(doc_id: int, ids: np.ndarray, seq_len: int) -> list[Window]:
    """Cut a document into consecutive, non-overlapping windows of at most ``seq_len`` tokens."""
    if seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {seq_len}")
    return [Window(doc_id, s, ids[s : s + seq_len]) for s in range(0, len(ids), seq_len)]


def plan_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """Group window indices into batches of similar length (longest first), so padding stays small.

    Sorting is stable on (length, document, start), so the plan is the same on every run.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i]), windows[i].doc_id, windows[i].start))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(windows: Sequence[Window], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad windows into ``input_ids`` and ``attention_mask``, both ``(B, T)``.

    Right padding keeps every real token at the positions it has alone, and causal attention
    never lets a real token see a pad, so batching cannot change routing.
    """
    T = max(len(w) for w in windows)
    input_ids = np.full((len(windows), T), pad_id, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(windows), T), dtype=np.int64)  # (B, T)
    for i, w in enumerate(windows):
        input_ids[i, : len(w)] = w.ids
        mask[i, : len(w)] = 1
    return input_ids, mask
