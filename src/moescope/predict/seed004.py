"""Seed 004's rule workflow, file for file: extract token journeys, create rules, evaluate them.

Formats (seed document ``004``):

- raw routing JSONL (its input): one record per (problem, layer, token) with ``problem_id``,
  ``layer``, ``experts`` ``[primary, secondary]``, ``gating_probs`` and ``token_idx``;
- token journey ``p<problem>_token_<i>.jsonl``: that token's records, one per layer, in layer order
  (the raw records unchanged, so ``layer``, ``experts``, ``gating_probs``, ``token_idx`` are there);
- rules JSON: ``level1`` .. ``level4`` map ``"layer,e..."`` keys to the majority-vote next expert,
  ``level5`` maps each skip ``K`` to its own table, ``layer_most_common`` backs the hybrid off;
- results JSON: ``metadata`` (timestamp, rules_file, training_files, test_files, num_test_files),
  ``results`` (``level1`` .. ``level5`` with correct / total / accuracy_percent / vs_random, plus
  ``level5_k<K>`` per skip and ``hybrid``) and ``best_level`` (name, accuracy_percent).

Rule keys use the *primary* expert (``experts[0]``) of layers N-2, N-1, N (level 4: primary and
secondary of N) and predict the primary expert of layer N+1 (level 5: N+K). A rule is the most
common successor among the training tokens with that key (first seen wins a tie, as
``collections.Counter.most_common`` does). Evaluation counts only keys that have a rule, as the seed
does; ``vs_random`` divides the accuracy by the 1/E chance of guessing one expert.
A journey with missing layers (the Mixtral log drops some records) simply has no transition there.

The Mixtral log's recorder dropped ``[0.5, 0.5]`` rows *before* numbering, so a (problem, layer)
series shorter than its problem has every later ``token_idx`` shifted by one. :func:`extract_journeys`
finds such series with the importer's own test (:func:`moescope.interop.find_short_series`)
and, like ``moescope import --short-series``, leaves them out of every journey (``"mask"``, the
default) or keeps their records as logged (``"keep-prefix"``); either way it names them.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moescope.errors import ConfigError, DataError

SKIPS = (2, 4, 8)
LEVEL_NAMES = {
    "level1": "Level 1 (Layer, E)",
    "level2": "Level 2 (Layer, Prev, Curr)",
    "level3": "Level 3 (Layer, E-2, E-1, E)",
    "level4": "Level 4 (Layer, P, S)",
    "level5": "Level 5 (Layer, E) -> N+K",
}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            out.append(rec)
    return out


def _field(rec: dict[str, Any], name: str, path: Path, lineno: int | str) -> Any:
    if name not in rec:
        raise DataError(f"{path}:{lineno}: record has no field {name!r}")
    return rec[name]


def extract_tokens(
    raw: str | Path,
    problem: int,
    start: int,
    end: int,
    output_dir: str | Path = ".",
    *,
    short_series: str = "mask",
) -> list[Path]:
    """Write ``p<problem>_token_<i>.jsonl`` for ``start <= token_idx < end``; returns the files written.

    Short (renumbered) series are handled as :func:`extract_journeys` says; use that function to
    learn which series they were.
    """
    return extract_journeys(raw, problem, start, end, output_dir, short_series=short_series)[0]


def extract_journeys(
    raw: str | Path,
    problem: int,
    start: int,
    end: int,
    output_dir: str | Path = ".",
    *,
    short_series: str = "mask",
) -> tuple[list[Path], list[dict[str, int]]]:
    """:func:`extract_tokens`, plus the short series found: ``[{problem, layer, tokens, records}]``.

    ``short_series``: ``"mask"`` leaves every record of a short series out (its positions cannot be
    trusted), ``"keep-prefix"`` keeps them as logged (right only if records were lost at the end).
    """
    import numpy as np

    from moescope.interop import SHORT_SERIES_POLICIES, find_short_series

    if short_series not in SHORT_SERIES_POLICIES:
        raise ConfigError(f"`short_series`: must be one of {SHORT_SERIES_POLICIES}, got {short_series!r}")
    raw, out = Path(raw), Path(output_dir)
    if end <= start:
        raise DataError(f"`tokens`: end ({end}) must be greater than start ({start})")
    mine: list[dict[str, Any]] = []
    for lineno, rec in enumerate(_read_jsonl(raw), 1):
        if _field(rec, "problem_id", raw, lineno) != problem:
            continue
        t = _field(rec, "token_idx", raw, lineno)
        layer = _field(rec, "layer", raw, lineno)
        _field(rec, "experts", raw, lineno)
        for name, v in (("token_idx", t), ("layer", layer)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataError(f"{raw}:{lineno}: field {name!r} must be an integer >= 0, got {v!r:.40}")
        mine.append(rec)
    layers = np.array([r["layer"] for r in mine], np.int64)
    tokens = np.array([r["token_idx"] for r in mine], np.int64)
    L = int(layers.max()) + 1 if len(layers) else 1
    short = [
        {"problem": problem, "layer": layer, "tokens": n, "records": m}
        for _, layer, n, m in find_short_series(np.zeros(len(mine), np.int64), layers, tokens, L)
    ]
    drop = {s["layer"] for s in short} if short_series == "mask" else set()
    by_token: dict[int, list[dict[str, Any]]] = {}
    for rec in mine:
        t = rec["token_idx"]
        if start <= t < end and rec["layer"] not in drop:
            by_token.setdefault(int(t), []).append(rec)
    if not by_token:
        raise DataError(f"{raw}: no records for problem {problem} with token_idx in [{start}, {end})")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for t in sorted(by_token):
        path = out / f"p{problem}_token_{t}.jsonl"
        recs = sorted(by_token[t], key=lambda r: r["layer"])
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        written.append(path)
    return written, short


def load_journey(path: str | Path) -> dict[int, list[int]]:
    """A journey file as ``{layer: experts}`` (ranked: primary first)."""
    path = Path(path)
    journey: dict[int, list[int]] = {}
    for lineno, rec in enumerate(_read_jsonl(path), 1):
        layer = _field(rec, "layer", path, lineno)
        ex = _field(rec, "experts", path, lineno)
        if not isinstance(ex, list) or not ex or not all(isinstance(e, int) for e in ex):
            raise DataError(f"{path}:{lineno}: field 'experts' must be a non-empty list of ints, got {ex!r}")
        if layer in journey:
            raise DataError(f"{path}:{lineno}: layer {layer} appears twice in one token journey")
        journey[int(layer)] = ex
    if not journey:
        raise DataError(f"{path}: empty token journey")
    return journey


def _examples(j: dict[int, list[int]]) -> dict[str, list[tuple[str, int]]]:
    """Every (key, next expert) pair a journey gives, per level (``level5_k<K>`` for skips)."""
    out: dict[str, list[tuple[str, int]]] = {f"level{i}": [] for i in range(1, 5)}
    for K in SKIPS:
        out[f"level5_k{K}"] = []
    p = {n: ex[0] for n, ex in j.items()}
    for n in sorted(j):
        if n + 1 in p:
            nxt = p[n + 1]
            out["level1"].append((f"{n},{p[n]}", nxt))
            if n - 1 in p:
                out["level2"].append((f"{n},{p[n - 1]},{p[n]}", nxt))
                if n - 2 in p:
                    out["level3"].append((f"{n},{p[n - 2]},{p[n - 1]},{p[n]}", nxt))
            if len(j[n]) >= 2:
                out["level4"].append((f"{n},{j[n][0]},{j[n][1]}", nxt))
        for K in SKIPS:
            if n + K in p:
                out[f"level5_k{K}"].append((f"{n},{p[n]}", p[n + K]))
    return out


def create_rules(files: Sequence[str | Path], num_experts: int = 8) -> dict[str, Any]:
    """Majority-vote rules of every level from the training journeys ``files``."""
    if not files:
        raise DataError("create-rules needs at least one token journey file")
    votes: dict[str, dict[str, Counter]] = {}
    layer_votes: dict[int, Counter] = {}
    layers: set[int] = set()
    for f in files:
        j = load_journey(f)
        layers.update(j)
        for level, pairs in _examples(j).items():
            table = votes.setdefault(level, {})
            for key, nxt in pairs:
                table.setdefault(key, Counter())[nxt] += 1
        for n, ex in j.items():
            layer_votes.setdefault(n, Counter())[ex[0]] += 1

    def majority(table: dict[str, Counter]) -> dict[str, int]:
        return {key: c.most_common(1)[0][0] for key, c in table.items()}

    rules: dict[str, Any] = {
        "metadata": {
            "created": _dt.datetime.now().isoformat(),
            "training_files": [Path(f).name for f in files],
            "num_tokens": len(files),
            "num_layers": max(layers) + 1,
            "num_experts": num_experts,
        }
    }
    for i in range(1, 5):
        rules[f"level{i}"] = majority(votes.get(f"level{i}", {}))
    rules["level5"] = {str(K): majority(votes.get(f"level5_k{K}", {})) for K in SKIPS}
    rules["layer_most_common"] = {str(n): c.most_common(1)[0][0] for n, c in sorted(layer_votes.items())}
    return rules


def load_rules(path: str | Path) -> dict[str, Any]:
    """Read and check a rules JSON written by :func:`create_rules`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such rules file")
    try:
        rules = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg})") from None
    for key in ("level1", "level2", "level3", "level4", "level5"):
        if key not in rules:
            raise DataError(f"{path}: rules file has no {key!r} table (make it with create-rules)")
    return rules


def _score(correct: int, total: int, num_experts: int) -> dict[str, Any]:
    acc = 100.0 * correct / total if total else 0.0
    return {
        "correct": correct,
        "total": total,
        "accuracy_percent": round(acc, 2),
        "vs_random": round(acc / (100.0 / num_experts), 2),
    }


def evaluate_rules(
    rules: dict[str, Any], test_files: Sequence[str | Path], rules_file: str | Path | None = None
) -> dict[str, Any]:
    """Seed 004's evaluation: per level, correct / total over the keys that have a rule."""
    if not test_files:
        raise DataError("no test journey files given: rules are evaluated on at least one")
    E = int(rules.get("metadata", {}).get("num_experts", 8))
    tally = {
        name: [0, 0] for name in ["level1", "level2", "level3", "level4", *(f"level5_k{K}" for K in SKIPS)]
    }
    hybrid = [0, 0]
    most_common = {int(k): v for k, v in rules.get("layer_most_common", {}).items()}
    for f in test_files:
        j = load_journey(f)
        for level, pairs in _examples(j).items():
            table = (
                rules["level5"].get(level.split("_k")[1], {}) if level.startswith("level5") else rules[level]
            )
            for key, nxt in pairs:
                if key in table:
                    tally[level][1] += 1
                    tally[level][0] += int(table[key] == nxt)
        p = {n: ex[0] for n, ex in j.items()}
        for n in sorted(p):
            if n + 1 not in p:
                continue
            pred = None
            for level, key in (
                ("level3", f"{n},{p.get(n - 2)},{p.get(n - 1)},{p[n]}"),
                ("level2", f"{n},{p.get(n - 1)},{p[n]}"),
                ("level1", f"{n},{p[n]}"),
            ):
                if key in rules[level]:
                    pred = rules[level][key]
                    break
            if pred is None:
                pred = most_common.get(n + 1)
            hybrid[1] += 1
            hybrid[0] += int(pred == p[n + 1])
    results: dict[str, Any] = {
        name: _score(c, t, E) for name, (c, t) in tally.items() if not name.startswith("level5")
    }
    l5 = [tally[f"level5_k{K}"] for K in SKIPS]
    results["level5"] = _score(sum(c for c, _ in l5), sum(t for _, t in l5), E)
    for K in SKIPS:
        results[f"level5_k{K}"] = _score(*tally[f"level5_k{K}"], E)
    results["hybrid"] = _score(*hybrid, E)
    ranked = [
        (results[f"level{i}"]["accuracy_percent"], f"level{i}")
        for i in range(1, 6)
        if results[f"level{i}"]["total"]
    ]
    best = max(ranked, key=lambda x: x[0]) if ranked else (0.0, None)
    return {
        "metadata": {
            "timestamp": _dt.datetime.now().isoformat(),
            "rules_file": str(rules_file) if rules_file is not None else None,
            "training_files": rules.get("metadata", {}).get("training_files", []),
            "test_files": [Path(f).name for f in test_files],
            "num_test_files": len(test_files),
        },
        "results": results,
        "best_level": {"name": best[1], "accuracy_percent": best[0]},
    }


def format_results(doc: dict[str, Any]) -> str:
    """The seed's text table: level, correct, total, accuracy, times better than random."""
    lines = ["EVALUATION RESULTS", f"{'Level':<31}{'Correct':<11}{'Total':<11}{'Accuracy':<13}vs Random"]
    res = doc["results"]
    for key, label in [*LEVEL_NAMES.items(), ("hybrid", "Hybrid (3 > 2 > 1 > most common)")]:
        r = res[key]
        lines.append(
            f"{label:<31}{r['correct']:<11}{r['total']:<11}{r['accuracy_percent']:<13.1f}{r['vs_random']:.1f}x"
        )
    best = doc["best_level"]
    if best["name"]:
        lines.append("")
        lines.append(f"BEST: {best['name']} with {best['accuracy_percent']:.1f}% accuracy")
    return "\n".join(lines)
