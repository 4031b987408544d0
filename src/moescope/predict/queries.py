"""What a predictor may see: batches of (token, layer) queries built from a trace without leaks.

A *query* asks for the expert set of token ``i`` at MoE layer ``l``. Its *mode* fixes what is known:

- spatial, distance ``d >= 1``: the token's own routing at layers ``0 .. l-d``, its token id, and the
  full routing of the earlier tokens of the same document (decode semantics: they are finished);
  ``l < d`` leaves only the token id and earlier tokens (the first MoE layer at ``d = 1``);
- temporal (``d = 0``, the seed's "same layer of the next token"): at layer ``l`` of token ``i-1``,
  predict layer ``l`` of token ``i``. Known: token ``i-1`` up to layer ``l``, earlier tokens fully,
  and their token ids; token ``i``'s own id and routing are hidden.

:class:`Context` holds a block of consecutive trace rows plus the ``window`` rows before it, and
:meth:`Context.queries` cuts a :class:`Queries` for one (layer, mode) whose arrays hold only the
visible information, so a predictor cannot cheat by construction.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from moescope.errors import ConfigError
from moescope.trace.reader import Batch, Trace

TEMPORAL = 0  # the distance code of temporal queries


def mode_name(distance: int) -> str:
    """``"d1"``, ``"d2"``... for spatial distances, ``"temporal"`` for 0."""
    return "temporal" if distance == TEMPORAL else f"d{distance}"


def parse_mode(name: str | int) -> int:
    """Inverse of :func:`mode_name`; also accepts plain integers (``0`` = temporal)."""
    if isinstance(name, (int, np.integer)):
        d = int(name)
    elif name in ("temporal", "t"):
        d = TEMPORAL
    else:
        s = str(name)
        try:
            d = int(s[1:] if s.startswith("d") else s)
        except ValueError:
            raise ConfigError(
                f"mode {name!r}: use 'temporal' or a spatial distance such as 'd1' or 2"
            ) from None
    if d < 0:
        raise ConfigError(f"mode {name!r}: a spatial distance must be >= 1 (0 means temporal)")
    return d


def hash_tokens(tokens: list[str | None]) -> np.ndarray:
    """Stable non-negative int32 ids for token strings (CRC-32 of UTF-8); ``None`` gives -1.

    Logs without token ids (the DeepSeek-V2-Lite log holds BPE pieces only) still let token-aware
    predictors work: equal strings get equal ids on every run and machine.
    """
    out = np.fromiter(
        (-1 if t is None else zlib.crc32(t.encode("utf-8")) & 0x7FFFFFFF for t in tokens),
        dtype=np.int64,
        count=len(tokens),
    )
    return out.astype(np.int32)


@dataclass
class Queries:
    """A batch of ``n`` queries for one target layer and one mode, holding only visible information.

    Attributes
    ----------
    layer : target MoE layer column ``l``.
    distance : spatial distance ``d >= 1``, or 0 for temporal.
    own : ``(n, V, k)`` the target token's experts at layers ``0 .. V-1``, ``V = max(l-d+1, 0)``
        (``V = 0`` for temporal queries).
    prev : ``(n, W, L, k)`` experts of the ``W`` previous tokens of the same document, most recent
        first; ``missing`` where there is no such token or the entry is not yet known.
    token_id : ``(n,)`` the target token's id (hashed token text when the trace has no ids); -1 if hidden.
    prev_token_id : ``(n, W)`` ids of the previous tokens; -1 where none.
    lookahead : ``{variant: (n, m)}`` gate-lookahead ids for layer ``l`` computed at layer ``l-d``
        (spatial queries with ``l >= d`` on traces that hold them), best first.
    num_experts, missing : ``E`` and the sentinel id for "no routing recorded".
    same_token : ``(n, L, k)`` experts of the most recent earlier occurrence of the same token id in
        the same document (finished, so every layer is known), ``missing`` where there is none;
        ``None`` for temporal queries (the token is hidden) or when the builder did not track it.
    """

    layer: int
    distance: int
    own: np.ndarray
    prev: np.ndarray
    token_id: np.ndarray
    prev_token_id: np.ndarray
    num_experts: int
    missing: int
    lookahead: dict[str, np.ndarray] = field(default_factory=dict)
    same_token: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.token_id)

    @property
    def temporal(self) -> bool:
        return self.distance == TEMPORAL

    def chain(self, depth: int) -> np.ndarray:
        """``(n, depth, k)``: the most recent ``depth`` known layers of the *source* token, newest first.

        Spatial: the target token's layers ``l-d, l-d-1, ...``. Temporal: the previous token's layers
        ``l, l-1, ...``. Unknown layers are filled with ``missing``.
        """
        n = len(self)
        k = self.prev.shape[-1] if self.prev.ndim == 4 else self.own.shape[-1]
        out = np.full((n, depth, k), self.missing, dtype=self.own.dtype)
        if self.temporal:
            if self.prev.shape[1] == 0:
                return out
            src, top = self.prev[:, 0], self.layer
        else:
            src, top = self.own, self.own.shape[1] - 1
        for j in range(depth):
            if top - j < 0:
                break
            out[:, j] = src[:, top - j]
        return out


class Context:
    """Consecutive trace rows (``n`` of them) with their previous-token windows resolved.

    Built by :func:`iter_contexts`; :meth:`queries` gives the :class:`Queries` of one layer and mode,
    :attr:`actual` the true expert sets ``(n, L, k)`` (``missing`` where unrecorded).
    """

    def __init__(
        self,
        experts: np.ndarray,
        token_id: np.ndarray,
        doc_id: np.ndarray,
        prev_index: np.ndarray,
        num_experts: int,
        missing: int,
        lookahead: dict[str, np.ndarray] | None = None,
        lookahead_ok: bool = True,
        start: int = 0,
        position: np.ndarray | None = None,
        same_token: np.ndarray | None = None,
    ) -> None:
        # Arrays cover the carried rows too; rows ``start:`` are this context's own rows.
        self._experts = experts  # (c + n, L, k)
        self._token_id = token_id  # (c + n,)
        self._lookahead = lookahead or {}
        self._start = start
        self.doc_id = doc_id[start:]  # (n,)
        self.position = position[start:] if position is not None else None  # (n,)
        self.prev_index = prev_index  # (n, W) indices into the carried arrays, -1 if none
        self.num_experts = num_experts
        self.missing = missing
        self.num_layers = experts.shape[1]
        self.top_k = experts.shape[2]
        w = prev_index.shape[1]
        safe = np.where(prev_index >= 0, prev_index, 0)
        self._prev = experts[safe]  # (n, W, L, k)
        self._prev[prev_index < 0] = missing
        self._prev_token = (
            np.where(prev_index >= 0, token_id[safe], -1).astype(np.int32).reshape(len(prev_index), w)
        )
        self.lookahead_ok = lookahead_ok
        self._same = same_token  # (n, L, k) or None

    def __len__(self) -> int:
        return len(self.doc_id)

    @property
    def actual(self) -> np.ndarray:
        """``(n, L, k)`` the true expert ids of this context's rows."""
        return self._experts[self._start :]

    @property
    def token_id(self) -> np.ndarray:
        return self._token_id[self._start :]

    def queries(self, layer: int, distance: int, rows: np.ndarray | None = None) -> Queries:
        """The :class:`Queries` for target ``layer`` in mode ``distance`` (0 = temporal), optionally for ``rows``."""
        if not 0 <= layer < self.num_layers:
            raise ConfigError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        own_all = self.actual
        prev = self._prev
        tok = self.token_id
        ptok = self._prev_token
        same = self._same
        if rows is not None:
            own_all, prev, tok, ptok = own_all[rows], prev[rows], tok[rows], ptok[rows]
            same = same[rows] if same is not None else None
        look: dict[str, np.ndarray] = {}
        if distance == TEMPORAL:
            own = own_all[:, :0]
            if prev.shape[1] and layer + 1 < self.num_layers:
                prev = prev.copy()
                prev[:, 0, layer + 1 :] = self.missing  # token i-1 is only known up to layer l
            tok = np.full(len(tok), -1, np.int32)
            same = None  # the token itself is not known yet
        else:
            own = own_all[:, : max(layer - distance + 1, 0)]
            src = layer - distance
            if src >= 0 and self.lookahead_ok:
                for name, arr in self._lookahead.items():
                    variant, d = split_lookahead_column(name)
                    if d == distance:
                        a = arr[self._start :]
                        look[variant] = (a if rows is None else a[rows])[:, src]
        return Queries(
            layer=layer,
            distance=distance,
            own=own,
            prev=prev,
            token_id=tok,
            prev_token_id=ptok,
            num_experts=self.num_experts,
            missing=self.missing,
            lookahead=look,
            same_token=same,
        )


def split_lookahead_column(name: str) -> tuple[str, int]:
    """``"lookahead_gate_input_d2"`` -> ``("gate_input", 2)``."""
    body = name[len("lookahead_") :]
    variant, _, d = body.rpartition("_d")
    return variant, int(d)


def trace_token_ids(batch: Batch) -> np.ndarray:
    """Token ids of a batch; hashed token text where the trace stores no ids (-1)."""
    tok = np.asarray(batch.token_id, dtype=np.int32)
    if batch.token is not None and (tok < 0).any():
        hashed = hash_tokens(batch.token)
        tok = np.where(tok < 0, hashed, tok).astype(np.int32)
    return tok


def iter_contexts(
    trace: Trace,
    *,
    window: int = 4,
    lookahead: bool = True,
    batch_size: int = 65536,
) -> Iterator[Context]:
    """Stream a trace as :class:`Context` blocks; memory stays flat whatever the trace length.

    The last ``window`` rows of each block are carried into the next, so previous-token windows
    cross batch boundaries exactly; they never cross document boundaries.
    """
    cols = ["doc_id", "position", "token_id", "experts"]
    if trace.columns.get("token_text"):
        cols.append("token")
    la_cols = trace.lookahead_columns if lookahead else []
    cols += la_cols
    E, missing = trace.num_experts, trace.missing_id
    carry: Batch | None = None
    carry_tok: np.ndarray | None = None
    memory: _TokenMemory | None = None
    for b in trace.iter_batches(cols, batch_size=batch_size):
        tok = trace_token_ids(b)
        same, memory = _same_token_history(b.doc_id, b.position, tok, b.experts, missing, memory)
        if carry is not None and len(carry):
            c = len(carry)
            experts = np.concatenate([carry.experts, b.experts])
            doc = np.concatenate([carry.doc_id, b.doc_id])
            pos = np.concatenate([carry.position, b.position])
            tok_all = np.concatenate([carry_tok, tok])
            la = {k: np.concatenate([carry.lookahead[k], b.lookahead[k]]) for k in la_cols}
        else:
            c = 0
            experts, doc, pos, tok_all = b.experts, b.doc_id, b.position, tok
            la = dict(b.lookahead)
        n = len(b)
        idx = np.arange(c, c + n)
        prev_index = np.full((n, window), -1, np.int64)
        for w in range(window):
            j = idx - 1 - w
            ok = j >= 0
            jj = np.where(ok, j, 0)
            ok &= (doc[jj] == doc[idx]) & (pos[jj] < pos[idx])
            prev_index[:, w] = np.where(ok, jj, -1)
        yield Context(
            experts, tok_all, doc, prev_index, E, missing, la, start=c, position=pos, same_token=same
        )
        keep = min(window, c + n)
        carry = Batch(
            doc_id=doc[-keep:],
            position=pos[-keep:],
            experts=experts[-keep:],
            lookahead={k: v[-keep:] for k, v in la.items()},
        )
        carry_tok = tok_all[-keep:]


@dataclass
class _TokenMemory:
    """Last occurrence of each token id in the document still open at the end of a batch."""

    doc: int
    keys: np.ndarray  # (m,) sorted token ids
    experts: np.ndarray  # (m, L, k)


def _same_token_history(
    doc: np.ndarray,
    pos: np.ndarray,
    tok: np.ndarray,
    experts: np.ndarray,
    missing: int,
    memory: _TokenMemory | None,
) -> tuple[np.ndarray, _TokenMemory | None]:
    """``(n, L, k)`` experts of each row's most recent earlier occurrence of its token id in its document.

    Earlier occurrences in this batch are found by sorting on (document, token, position); those in
    earlier batches of a document that spans the boundary come from ``memory``, which is returned
    updated for the next batch. Unknown token ids (-1) never match.
    """
    n = len(doc)
    tok = tok.astype(np.int64)
    out = np.full(experts.shape, missing, experts.dtype)
    if n == 0:
        return out, memory
    order = np.lexsort((pos, tok, doc))
    a, b = order[:-1], order[1:]
    hit = (doc[a] == doc[b]) & (tok[a] == tok[b]) & (tok[b] >= 0)
    src = np.full(n, -1, np.int64)
    src[b[hit]] = a[hit]
    found = src >= 0
    out[found] = experts[src[found]]
    if memory is not None and len(memory.keys):
        rows = np.nonzero(~found & (doc == memory.doc) & (tok >= 0))[0]
        at = np.minimum(np.searchsorted(memory.keys, tok[rows]), len(memory.keys) - 1)
        ok = memory.keys[at] == tok[rows]
        out[rows[ok]] = memory.experts[at[ok]]
    last = int(doc[-1])
    rows = np.nonzero((doc == last) & (tok >= 0))[0]
    rev = rows[::-1]  # newest first, so np.unique keeps each token's last occurrence
    keys, first = np.unique(tok[rev], return_index=True)
    vals = experts[rev[first]]
    if memory is not None and memory.doc == last and len(memory.keys):
        old = ~np.isin(memory.keys, keys)
        keys = np.concatenate([keys, memory.keys[old]])
        vals = np.concatenate([vals, memory.experts[old]])
        o = np.argsort(keys, kind="stable")
        keys, vals = keys[o], vals[o]
    return out, _TokenMemory(last, keys, vals)


def set_mask(ids: np.ndarray, num_experts: int, missing: int) -> np.ndarray:
    """``(..., k)`` ids -> ``(..., E)`` boolean membership; ``missing`` ids are ignored."""
    return scatter_counts(ids, num_experts, missing) > 0


def scatter_counts(
    ids: np.ndarray, num_experts: int, missing: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """``(..., k)`` ids -> ``(..., E)`` float32 sums of ``weights`` (default 1) per expert id.

    One ``np.bincount`` over flat ``row * (E + 1) + id`` codes (``missing`` goes to a spare column),
    several times faster than ``np.add.at`` or building one-hot arrays.
    """
    shape = ids.shape[:-1]
    rows = int(np.prod(shape)) if shape else 1
    E1 = num_experts + 1
    flat = ids.reshape(rows, -1).astype(np.int64)
    flat = np.where((flat == missing) | (flat >= num_experts) | (flat < 0), num_experts, flat)
    codes = (np.arange(rows, dtype=np.int64)[:, None] * E1 + flat).ravel()
    w = None if weights is None else np.broadcast_to(weights, ids.shape).reshape(-1)
    out = np.bincount(codes, weights=w, minlength=rows * E1).reshape(rows, E1)[:, :num_experts]
    return out.astype(np.float32).reshape(*shape, num_experts)


def routed_rows(trace: Trace, actual: np.ndarray, missing: int) -> np.ndarray:
    """``(n,)`` bool: the queries whose target has recorded routing.

    In a strategy trace (``capture.variable_k``) a row holds its experts and then padding (the
    ``missing`` sentinel), so a row is routed when any slot is used and the padding is masked slot
    by slot downstream; elsewhere a sentinel anywhere means the routing was not recorded.
    """
    pad = actual == missing
    if trace.manifest.get("capture", {}).get("variable_k"):
        return ~pad.all(axis=-1)
    return ~pad.any(axis=-1)


def iter_labelled(
    trace: Trace,
    modes: list[int],
    *,
    window: int = 1,
    lookahead: bool = True,
    batch_size: int = 65536,
) -> Iterator[tuple[Queries, np.ndarray, np.ndarray]]:
    """Training/evaluation stream: ``(queries, actual (n, k), valid (n,))`` per block, layer and mode.

    ``valid`` is False where the target (token, layer) has no recorded routing; such queries are
    neither scored nor learned from (their ids stay ``missing`` in any history that includes them).
    """
    for ctx in iter_contexts(trace, window=window, lookahead=lookahead, batch_size=batch_size):
        for layer in range(ctx.num_layers):
            actual = ctx.actual[:, layer]  # (n, k)
            valid = routed_rows(trace, actual, ctx.missing)
            for d in modes:
                yield ctx.queries(layer, d), actual, valid


def require_ranked(trace: Trace, parameter: str, value: str) -> None:
    """Refuse a first-choice option on a trace whose slots form a set (``routing.slot_order``)."""
    if not trace.ranked:
        raise ConfigError(
            f"{trace.path}: {parameter}={value!r} needs slots in rank order (slot 0 = the first choice),"
            f" but this trace's slot order is {trace.slot_order!r}: its ids form a set; use {parameter}='set'"
            " or 'auto'"
        )
