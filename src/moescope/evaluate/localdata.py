"""Small task files in the hub schemas, cut from the bundled held-out corpus (offline tests, demo).

They let every task run with no hub: ``lambada.jsonl`` (``text``: a passage whose last word is the
target), ``hellaswag.jsonl`` (``activity_label`` = domain, ``ctx_a``/``ctx_b`` = a passage, the
true next words among 3 endings taken from other passages), ``wikitext.jsonl`` (``page``) and
``mc.jsonl`` (the documented multiple-choice schema). They are NOT the published benchmarks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from moescope.trace.atomic import atomic_write

_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _passages(words_per: int, domains: list[str] | None, max_chars: int) -> list[tuple[list[str], str]]:
    from moescope.data import load_corpus

    out = []
    for text, domain in load_corpus(domains=domains, max_chars=max_chars):
        words = text.split()
        for start in range(0, len(words) - words_per, words_per):
            out.append((words[start : start + words_per], domain))
    return out


def make_task_files(out: str | Path, *, n: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write ``lambada``, ``hellaswag``, ``wikitext`` and ``mc`` JSONL files with ``n`` records each."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prose = ["bible_en", "verse"]
    lam = []
    for words, _ in _passages(40, prose, 120_000):
        cut = max(i for i in range(len(words)) if _WORD.match(words[i]) or i == 10)
        if cut > 10 and _WORD.match(words[cut]):
            lam.append({"text": " ".join(words[: cut + 1])})
    chunks = _passages(30, [*prose, "code"], 120_000)
    order = rng.permutation(len(chunks))
    hs, mc = [], []
    for i in order[: 2 * n]:
        words, domain = chunks[i]
        others = [chunks[j][0] for j in rng.choice(len(chunks), 3, replace=False) if j != i][:3]
        true_end = " ".join(words[20:30])
        endings = [true_end] + [" ".join(o[20:30]) for o in others]
        perm = rng.permutation(len(endings))
        endings = [endings[p] for p in perm]
        gold = int(np.nonzero(perm == 0)[0][0])
        if len(hs) < n:
            hs.append(
                {
                    "activity_label": domain,
                    "ctx_a": " ".join(words[:14]),
                    "ctx_b": " ".join(words[14:20]),
                    "ctx": " ".join(words[:20]),
                    "endings": endings,
                    "label": str(gold),
                }
            )
        else:
            mc.append({"query": " ".join(words[:20]), "choices": endings, "gold": gold, "label": domain})
    from moescope.data import load_corpus

    pages = [{"page": t[:3000]} for t, _ in load_corpus(max_chars=40_000)]
    picks = rng.permutation(len(pages))[:n]
    files = {
        "lambada": lam[:n],
        "hellaswag": hs,
        "wikitext": [pages[i] for i in sorted(picks)],
        "mc": mc[:n],
    }
    paths = {}
    for name, rows in files.items():
        path = out / f"{name}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
        paths[name] = path
    return paths
