"""``--max-tokens`` bounds tokenisation: a huge text is cut before the tokenizer sees it."""

from __future__ import annotations

import numpy as np

from moescope.core import windows as data_mod
from moescope.core.sources import Document
from moescope.core.windows import iter_tokenized, tokenize
from moescope.models.tokenizer import byte_tokenizer


def test_a_huge_line_is_cut_before_tokenising_and_keeps_the_same_tokens(monkeypatch):
    tok = byte_tokenizer()
    rng = np.random.default_rng(0)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(1, 12))) for _ in range(200_000)]
    huge = " ".join(words)  # about 1.3 MB on one line
    seen: list[int] = []
    real = data_mod.tokenize

    def spy(tokenizer, texts):
        seen.extend(len(t) for t in texts)
        return real(tokenizer, texts)

    monkeypatch.setattr(data_mod, "tokenize", spy)
    docs = [Document(0, huge, "x", 0), Document(1, "never read", "x", 0)]
    got = list(iter_tokenized(docs, tok, max_tokens=3000))
    assert len(got) == 1 and len(got[0][1]) == 3000
    assert max(seen) <= 3000 * 64 + 1024 < len(huge)  # the tokenizer never saw the whole line
    full = tokenize(tok, [huge])[0][:3000]  # independent: the whole text tokenised, then cut
    assert np.array_equal(got[0][1], full)
