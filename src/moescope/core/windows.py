"""Tokenise and window documents for a forward pass: the shared last step of capture and ablation.

Long documents are cut into windows of ``seq_len`` tokens. Windows do not overlap and no token is
added: ``position`` stays the token's index in the whole document, so a trace row means the same
thing whatever the window size (only the context the model saw before it changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moescope.core.sources import Document
from moescope.errors import ConfigError


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
        raise ConfigError(f"`seq_len` must be >= 1, got {seq_len}")
    return [Window(doc_id, s, ids[s : s + seq_len]) for s in range(0, len(ids), seq_len)]


def plan_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """Group window indices into batches of similar length (longest first), so padding stays small.

    Sorting is stable on (length, document, start), so the plan is the same on every run.
    """
    if batch_size < 1:
        raise ConfigError(f"`batch_size` must be >= 1, got {batch_size}")
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
