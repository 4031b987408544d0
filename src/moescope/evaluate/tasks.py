"""Evaluation tasks with lm-evaluation-harness's exact definitions, plus two of moescope's own.

==============  =========================================================================================
``lambada``     lm-eval ``lambada_openai``: context = the text without its last word, continuation =
                ``" " + last word``; ``acc`` = greedy decoding reproduces it, ``perplexity`` =
                ``exp(-mean log p)``. Hub schema: ``{"text": ...}``.
``hellaswag``   lm-eval ``hellaswag``: query = preprocess(activity_label + ": " + ctx_a + " " +
                ctx_b.capitalize()), 4 endings scored as ``" " + ending``; ``acc`` = argmax log p,
                ``acc_norm`` = argmax log p / len(ending in characters). Hub schema: ``activity_label,
                ctx_a, ctx_b, endings, label``.
``wikitext``    lm-eval ``wikitext``: rolling log-likelihood of the detokenised ``page``;
                ``word_perplexity`` = exp(-sum log p / sum words), ``byte_perplexity`` =
                exp(-sum log p / sum bytes), ``bits_per_byte`` = -sum log p / sum bytes / ln 2, words
                and bytes counted on the original page. Hub schema: ``{"page": ...}``.
``corpus``      a labelled corpus (the TinyMistral document's per-category accuracy): next-token
                ``acc``, ``top5`` and ``perplexity``, overall and per category. Default: the bundled
                held-out corpus by domain; a file needs ``text`` and ``label``.
``mc``          a multiple-choice JSONL of your own: ``{"query": str, "choices": [str, ...], "gold":
                int}`` (optional ``label``); scored like hellaswag (``" " + choice``, acc, acc_norm).
==============  =========================================================================================

A task is named ``NAME`` (the hub preset, needs the ``datasets`` hub) or ``NAME=FILE`` (a local
``.jsonl``/``.json`` in the hub schema).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from moescope.errors import ConfigError, DataError

Progress = Callable[[int], None] | None


def hellaswag_preprocess(text: str) -> str:
    """lm-eval ``tasks/hellaswag/utils.py::preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def wikitext_detokenizer(string: str) -> str:
    """lm-eval ``tasks/wikitext/preprocess_wikitext.py::wikitext_detokenizer``."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ").replace(" 's", "'s")
    return string


def read_records(path: Path, task: str) -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl`` (one object per line) or ``.json`` (a list of objects)."""
    if not path.is_file():
        raise ConfigError(f"task {task}: {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"task {task}: {path}: cannot read ({exc})") from None
    rows: list[Any] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"task {task}: {path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        rows = data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else []
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"task {task}: {path}:{lineno}: invalid JSON ({exc.msg})") from None
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"task {task}: {path}: record {i} is {type(row).__name__}, not an object")
    if not rows:
        raise DataError(f"task {task}: {path}: no records")
    return rows


def require_fields(
    rows: list[dict], fields: dict[str, type | tuple[type, ...]], task: str, where: str
) -> None:
    """Every row has every field with the right type; the error names the file, record and field."""
    for i, row in enumerate(rows, 1):
        for name, kind in fields.items():
            if name not in row:
                raise DataError(f"task {task}: {where}: record {i} has no field {name!r}")
            if not isinstance(row[name], kind):
                raise DataError(
                    f"task {task}: {where}: record {i} field {name!r} is {type(row[name]).__name__},"
                    f" expected {getattr(kind, '__name__', kind)}"
                )


@dataclass
class TaskData:
    """Loaded documents of one task and where they came from."""

    docs: list[dict[str, Any]]
    source: str


class Task:
    """One task: its hub preset, required fields, how it scores documents and aggregates samples."""

    name: ClassVar[str] = ""
    primary: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    fields: ClassVar[dict[str, Any]] = {}
    hub: ClassVar[tuple[str, str | None, str] | None] = None

    def __init__(self, source: str | None = None, *, label: str | None = None) -> None:
        self.source = source
        self.label = label or self.name

    def load(self, limit: int | None = None) -> TaskData:
        """The documents, from the local file or the hub preset (first ``limit`` only)."""
        if self.source is None:
            rows, where = self._hub_rows(), f"hub {self.hub[0] if self.hub else ''}"
        else:
            path = Path(self.source).expanduser()
            rows, where = read_records(path, self.label), str(path)
        if limit is not None:
            if limit < 1:
                raise ConfigError(f"option `limit` must be >= 1, got {limit}")
            rows = rows[:limit]
        require_fields(rows, self.fields, self.label, where)
        self.check(rows, where)
        return TaskData(rows, where)

    def check(self, rows: list[dict], where: str) -> None:
        """Task-specific validation beyond field presence."""

    def _hub_rows(self) -> list[dict]:
        if self.hub is None:
            raise ConfigError(f"task {self.label}: give a file, {self.name}=FILE.jsonl")
        path, name, split = self.hub
        try:
            import datasets

            ds = datasets.load_dataset(path, name, split=split)
        except Exception as exc:  # offline, no datasets, unknown config: all mean "give a file"
            raise ConfigError(
                f"task {self.name}: cannot load the hub preset {path} ({type(exc).__name__}: {str(exc)[:160]});"
                f" give a local file in the hub schema: {self.name}=FILE.jsonl"
            ) from None
        return [dict(r) for r in ds]

    def score(self, scorer: Any, docs: list[dict], progress: Progress = None) -> dict[str, np.ndarray]:
        """Per-sample columns (``loss`` = mean negative log-likelihood per token included)."""
        raise NotImplementedError

    def n_requests(self, docs: list[dict]) -> int:
        return len(docs)

    def aggregate(self, cols: dict[str, np.ndarray]) -> dict[str, float]:
        """Task metrics from per-sample columns (also used on bootstrap resamples)."""
        raise NotImplementedError


class Lambada(Task):
    """lm-eval ``lambada_openai``: last-word accuracy and perplexity."""

    name = "lambada"
    primary = "acc"
    fields: ClassVar[dict[str, Any]] = {"text": str}
    hub = ("EleutherAI/lambada_openai", "default", "test")

    def check(self, rows: list[dict], where: str) -> None:
        for i, row in enumerate(rows, 1):
            if len(row["text"].split(" ")) < 2:
                raise DataError(
                    f"task {self.label}: {where}: record {i} field 'text' has no last word to predict"
                )

    def score(self, scorer: Any, docs: list[dict], progress: Progress = None) -> dict[str, np.ndarray]:
        reqs = [(" ".join(d["text"].split(" ")[:-1]), " " + d["text"].split(" ")[-1]) for d in docs]
        pairs = [scorer.encode_pair(c, x) for c, x in reqs]
        res = scorer.loglikelihood_tokens(pairs, progress=progress)
        ll = np.array([r[0] for r in res])
        n = np.array([len(p[1]) for p in pairs], dtype=float)
        return {"ll": ll, "acc": np.array([float(r[1]) for r in res]), "n_tokens": n, "loss": -ll / n}

    def aggregate(self, cols: dict[str, np.ndarray]) -> dict[str, float]:
        return {"acc": float(cols["acc"].mean()), "perplexity": float(math.exp(-cols["ll"].mean()))}


class MultipleChoice(Task):
    """A multiple-choice JSONL: ``query``, ``choices``, ``gold``; acc and acc_norm as lm-eval computes them."""

    name = "mc"
    primary = "acc"
    fields: ClassVar[dict[str, Any]] = {"query": str, "choices": list, "gold": int}

    def check(self, rows: list[dict], where: str) -> None:
        for i, row in enumerate(rows, 1):
            ch = row["choices"]
            if len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                raise DataError(
                    f"task {self.label}: {where}: record {i} field 'choices' needs >= 2 non-empty strings"
                )
            if not 0 <= row["gold"] < len(ch):
                raise DataError(
                    f"task {self.label}: {where}: record {i} field 'gold'={row['gold']} is not a choice index"
                )

    def items(self, docs: list[dict]) -> list[tuple[str, list[str], int]]:
        return [(d["query"], list(d["choices"]), int(d["gold"])) for d in docs]

    def n_requests(self, docs: list[dict]) -> int:
        return sum(len(c) for _, c, _ in self.items(docs))

    def score(self, scorer: Any, docs: list[dict], progress: Progress = None) -> dict[str, np.ndarray]:
        items = self.items(docs)
        pairs = [scorer.encode_pair(q, " " + c) for q, choices, _ in items for c in choices]
        res = scorer.loglikelihood_tokens(pairs, progress=progress)
        acc, acc_norm, ll_gold, n_gold, at = [], [], [], [], 0
        for _, choices, gold in items:
            lls = np.array([r[0] for r in res[at : at + len(choices)]])
            lens = np.array([float(len(c)) for c in choices])
            acc.append(float(np.argmax(lls) == gold))
            acc_norm.append(float(np.argmax(lls / lens) == gold))
            ll_gold.append(lls[gold])
            n_gold.append(len(pairs[at + gold][1]))
            at += len(choices)
        ll, n = np.array(ll_gold), np.array(n_gold, dtype=float)
        out = {"acc": np.array(acc), "acc_norm": np.array(acc_norm), "ll": ll, "n_tokens": n, "loss": -ll / n}
        if docs and "label" in docs[0]:
            out["category"] = np.array([str(d.get("label", "")) for d in docs])
        return out

    def aggregate(self, cols: dict[str, np.ndarray]) -> dict[str, float]:
        return {"acc": float(cols["acc"].mean()), "acc_norm": float(cols["acc_norm"].mean())}


class HellaSwag(MultipleChoice):
    """lm-eval ``hellaswag``: acc and acc_norm over the 4 preprocessed endings."""

    name = "hellaswag"
    primary = "acc_norm"
    fields: ClassVar[dict[str, Any]] = {
        "activity_label": str,
        "ctx_a": str,
        "ctx_b": str,
        "endings": list,
        "label": (int, str),
    }
    hub = ("Rowan/hellaswag", None, "validation")

    def check(self, rows: list[dict], where: str) -> None:
        for i, row in enumerate(rows, 1):
            try:
                gold = int(row["label"])
            except ValueError:
                raise DataError(
                    f"task {self.label}: {where}: record {i} field 'label' is not an integer"
                ) from None
            if not 0 <= gold < len(row["endings"]):
                raise DataError(
                    f"task {self.label}: {where}: record {i} field 'label'={gold} is not an ending index"
                )

    def items(self, docs: list[dict]) -> list[tuple[str, list[str], int]]:
        out = []
        for d in docs:
            query = hellaswag_preprocess(
                d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
            )
            out.append((query, [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"])))
        return out


class WikiText(Task):
    """lm-eval ``wikitext``: word and byte perplexity, bits per byte of whole pages."""

    name = "wikitext"
    primary = "word_perplexity"
    higher_is_better = False
    fields: ClassVar[dict[str, Any]] = {"page": str}
    hub = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test")

    def n_requests(self, docs: list[dict]) -> int:
        return len(docs)

    def score(self, scorer: Any, docs: list[dict], progress: Progress = None) -> dict[str, np.ndarray]:
        texts = [wikitext_detokenizer(d["page"]) for d in docs]
        windows = scorer.rolling_tokens(texts)
        flat = [w for ws in windows for w in ws]
        res = scorer.loglikelihood_tokens(flat)
        ll, n, at = [], [], 0
        for ws in windows:
            ll.append(sum(r[0] for r in res[at : at + len(ws)]))
            n.append(sum(len(w[1]) for w in ws))
            at += len(ws)
            if progress is not None:
                progress(1)
        ll_a, n_a = np.array(ll), np.maximum(np.array(n, dtype=float), 1)
        return {
            "ll": ll_a,
            "words": np.array([len(re.split(r"\s+", d["page"])) for d in docs], dtype=float),
            "bytes": np.array([len(d["page"].encode("utf-8")) for d in docs], dtype=float),
            "n_tokens": n_a,
            "loss": -ll_a / n_a,
        }

    def aggregate(self, cols: dict[str, np.ndarray]) -> dict[str, float]:
        ll, words, nbytes = cols["ll"].sum(), cols["words"].sum(), cols["bytes"].sum()
        return {
            "word_perplexity": float(math.exp(-ll / words)),
            "byte_perplexity": float(math.exp(-ll / nbytes)),
            "bits_per_byte": float(-ll / nbytes / math.log(2)),
        }


class Corpus(Task):
    """A labelled corpus: next-token accuracy, top-5 and perplexity, overall and per category."""

    name = "corpus"
    primary = "acc"
    fields: ClassVar[dict[str, Any]] = {"text": str, "label": str}

    def __init__(self, source: str | None = None, *, label: str | None = None, max_chars: int = 4000) -> None:
        super().__init__(source, label=label)
        self.max_chars = max_chars

    def _hub_rows(self) -> list[dict]:
        from moescope.data import load_corpus

        return [{"text": t, "label": d} for t, d in load_corpus(max_chars=self.max_chars)]

    def load(self, limit: int | None = None) -> TaskData:
        data = super().load(None)
        if self.source is None:
            data.source = "bundled held-out corpus"
        if limit is not None:  # per category, so every category stays in
            taken: dict[str, int] = {}
            docs = []
            for d in data.docs:
                if taken.get(d["label"], 0) < limit:
                    docs.append(d)
                    taken[d["label"]] = taken.get(d["label"], 0) + 1
            data.docs = docs
        return data

    def score(self, scorer: Any, docs: list[dict], progress: Progress = None) -> dict[str, np.ndarray]:
        detail = scorer.token_detail([d["text"] for d in docs], progress=progress)
        n = np.array([len(x["logp"]) for x in detail], dtype=float)
        ll = np.array([x["logp"].sum() for x in detail])
        nn = np.maximum(n, 1)
        return {
            "ll": ll,
            "n_tokens": n,
            "correct": np.array([x["correct"].sum() for x in detail], dtype=float),
            "top5_hits": np.array([x["top5"].sum() for x in detail], dtype=float),
            "loss": -ll / nn,
            "category": np.array([d["label"] for d in docs]),
        }

    def n_requests(self, docs: list[dict]) -> int:
        return len(docs)

    def aggregate(self, cols: dict[str, np.ndarray]) -> dict[str, float]:
        def block(sel: np.ndarray) -> tuple[float, float, float]:
            n = max(cols["n_tokens"][sel].sum(), 1)
            return (
                cols["correct"][sel].sum() / n,
                cols["top5_hits"][sel].sum() / n,
                math.exp(-cols["ll"][sel].sum() / n),
            )

        everything = np.ones(len(cols["ll"]), bool)
        acc, top5, ppl = block(everything)
        out = {"acc": float(acc), "top5": float(top5), "perplexity": float(ppl)}
        for cat in sorted(set(cols["category"].tolist())):
            a, t, p = block(cols["category"] == cat)
            out.update({f"acc[{cat}]": float(a), f"top5[{cat}]": float(t), f"perplexity[{cat}]": float(p)})
        return out


#: Task registry: name -> class.
TASKS: dict[str, type[Task]] = {t.name: t for t in (Lambada, HellaSwag, WikiText, Corpus, MultipleChoice)}


def parse_task(text: str) -> Task:
    """``NAME`` (hub preset, or the bundled corpus for ``corpus``) or ``NAME=FILE``."""
    name, eq, path = text.partition("=")
    name = name.strip().lower()
    cls = TASKS.get(name)
    if cls is None:
        raise ConfigError(f"unknown task {name!r} in {text!r}; tasks: {', '.join(TASKS)} (NAME or NAME=FILE)")
    if eq and not path.strip():
        raise ConfigError(f"task {text!r}: give a file after '='")
    if cls is MultipleChoice and not eq:
        raise ConfigError("task mc needs a file: mc=FILE.jsonl with fields query, choices, gold")
    return cls(path.strip() or None)


def bootstrap_ci(
    task: Task, cols: dict[str, np.ndarray], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric, resampling samples (documents) with replacement."""
    n = len(cols["ll"])
    if n < 2:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for key, value in task.aggregate({k: v[idx] for k, v in cols.items()}).items():
            draws.setdefault(key, []).append(value)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in draws.items()}
