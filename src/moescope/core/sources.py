"""Texts to run a model on: data sources, data-set presets, and the options every stage shares.

Capture, ablation (and evaluation) read one or more *sources* (text, JSONL/JSON, CSV/TSV, Parquet files, a ``datasets``
``save_to_disk`` directory, a hub data set or a named preset). Every source yields records that go
through one field-mapping step (:class:`FieldMapping`), so a preset applied to a local file behaves
exactly as it does on the hub. Documents get consecutive ids in reading order; empty texts are
skipped and get no id, so the same data always gives the same ids (which resume relies on).
The file readers live in :mod:`moescope.core.readers`, tokenising and windowing in
:mod:`moescope.core.windows`. :class:`DataOptions` holds the data settings every stage shares, and
:func:`resolve_sources` turns DATA arguments and those options into sources.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.core import readers as R
from moescope.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: How a ``.txt`` file is cut into documents.
TXT_UNITS = ("paragraph", "file", "line")


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
        raise ConfigError(f"`preset`: unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


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
                    " (choose one with `text_field`)"
                )
        lab = self.label_rule()
        if lab is not None and lab not in available:
            raise DataError(
                f"{where}: unknown label field {lab!r}; available fields: {', '.join(map(str, available))}"
                " (choose one with `label_field`, or give a constant `label`)"
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
            d["sha256"] = R.file_sha256(self.path)
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
            for text in R.read_txt(self.path, self.txt_unit):
                yield (
                    text,
                    self.mapping.label if self.mapping.label is not None else self.mapping.default_label,
                )
            return
        records = self._records()
        if self.group == "wikitext_articles":
            records = R.group_wikitext(records, self.mapping.text_rule())
        for rec, where in records:
            yield self.mapping.map(rec, where)

    def _records(self) -> Iterator[tuple[dict[str, Any], str]]:
        if self.kind in ("jsonl", "json"):
            yield from R.read_json(self.path)
        elif self.kind in ("csv", "tsv"):
            yield from R.read_csv(self.path, self.mapping, delimiter="\t" if self.kind == "tsv" else ",")
        elif self.kind == "parquet":
            yield from R.read_parquet(self.path, self.mapping)
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
            self._dataset = (
                R.load_from_disk(self.path, self.split) if self.kind == "disk" else R.load_hub(self)
            )
            if self.split is None and getattr(self._dataset, "split", None) is not None:
                self.split = str(self._dataset.split)
        return self._dataset


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
        raise ConfigError(f"`txt_unit` must be one of {', '.join(TXT_UNITS)}, got {txt_unit!r}")
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"`max_documents` must be >= 1, got {max_documents}")
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
            if not R.is_saved_dataset(p):
                raise DataError(
                    f"{p}: a directory that is not a datasets save_to_disk folder (no dataset_dict.json or"
                    " state.json); pass its files instead"
                )
            return Source(item, "disk", split=split or (pre.split if pre else None), **common)
        suffix = p.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            if text_field or label_field or pre:
                raise ConfigError(
                    f"{p}: a plain text file has no fields, so `text_field`, `label_field` and `preset` do not apply"
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
            raise ConfigError(f"`preset` {pre.name} conflicts with DATA {item!r}, itself a preset")
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


@dataclass
class DataOptions:
    """The data settings capture, ablation and evaluation share (their CLI options map one to one).

    Stage options classes extend it (``CaptureOptions(DataOptions)``), so each field has one
    name, one default and one meaning everywhere.
    """

    text_field: str | None = None
    label_field: str | None = None
    label: str | None = None
    preset: str | None = None
    split: str | None = None
    data_config: str | None = None
    txt_unit: str = "paragraph"
    max_documents: int | None = None  # per data source
    max_tokens: int | None = None  # over all data; the last document is cut to fit
    seq_len: int | None = None  # window length; None: the stage's default (min(model limit, 2048))
    batch_size: int = 8


def resolve_sources(data: Sequence[str], opts: DataOptions) -> list[Source]:
    """One :class:`Source` per DATA argument, with ``opts``' field mapping and limits applied to each."""
    return [
        resolve_source(
            item,
            text_field=opts.text_field,
            label_field=opts.label_field,
            label=opts.label,
            preset=opts.preset,
            split=opts.split,
            data_config=opts.data_config,
            txt_unit=opts.txt_unit,
            max_documents=opts.max_documents,
        )
        for item in data
    ]
