"""The torch network of :class:`~moescope.predict.learned.LearnedPredictor` (imported lazily, with torch).

Every input is a sum of learned rows: of small routing tables such as (layer, expert) with dense
gradients, and of one large ``tokens`` table (token vocabulary and hashed token pairs) with sparse
gradients. The summed vector goes through pre-norm residual MLP blocks and a per-layer output head.

Two input paths compute the same function:

- :meth:`Net.grid` (training): a batch of tokens with *every* layer of each as a cell. Per-token
  sums (the token's own routing, the previous tokens', the same token's earlier occurrence) are
  embedded once per (token, layer) (a batched matmul of multi-hot sets) and reused by all the
  token's cells through cumulative sums, instead of summing ~600 rows for every cell.
- :meth:`Net.flat` (prediction): one target layer and mode for ``n`` queries, from the arrays of a
  :class:`~moescope.predict.queries.Queries` (which already hide what the mode may not see).

Expert ids equal to ``E`` mean "absent" in every input tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

N_REL = 2  # the newest known own layers that also enter through relative-position rows
N_RANK_BUCKETS = 4  # lookahead rank buckets: 0, 1, 2, 3+
N_OVERLAP = 8  # experts shared with the same token's earlier occurrence at the newest known layer: 0..6, 7 = none known
N_AGREE = (
    8  # share of all known own slots that the earlier occurrence shares, in sixths: 0..6, 7 = none known
)
TOKEN_LAYER_FACTOR = 4  # (token, layer) hash buckets per token bucket


class Layout:
    """Sizes of the routing tables for ``L`` layers, ``E`` experts, ``M`` modes, ``W`` previous tokens and
    ``V`` lookahead variants, and the row regions of the small ``cell`` table."""

    def __init__(self, L: int, E: int, M: int, W: int, V: int) -> None:
        self.L, self.E, self.M, self.W, self.V = L, E, M, W, V
        self.same_ov = 0  # (target layer, overlap bucket)
        self.same_agree = self.same_ov + L * N_OVERLAP  # (target layer, agreement bucket)
        self.layer = self.same_agree + L * N_AGREE  # target layer
        self.mode = self.layer + L  # mode index
        self.look = self.mode + M  # (variant, rank bucket, expert) of the gate lookahead
        self.size = self.look + V * N_RANK_BUCKETS * E
        self.pad = self.size


class TokenLayout:
    """Row regions of the ``tokens`` table: ``NV`` vocabulary ids (+1 row for the rest) and ``B`` buckets."""

    def __init__(self, NV: int, B: int) -> None:
        self.NV, self.B = NV, B
        self.tok = 0  # the target token
        self.ptok = self.tok + NV + 1  # the previous token
        self.bigram = self.ptok + NV + 1  # hashed (previous token, token)
        self.tok_layer = self.bigram + B  # hashed (token, target layer)
        self.size = self.tok_layer + TOKEN_LAYER_FACTOR * B
        self.pad = self.size


class Block(nn.Module):
    """Pre-norm residual MLP block: ``h + Linear(Dropout(GELU(Linear(LayerNorm(h)))))``."""

    def __init__(self, D: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(self.drop(F.gelu(self.up(self.norm(h)))))


def overlap(own: torch.Tensor, same: torch.Tensor, E: int) -> torch.Tensor:
    """``(...)`` number of known experts of ``own (..., k)`` that ``same (..., k)`` also holds."""
    eq = (own.unsqueeze(-1) == same.unsqueeze(-2)) & (own < E).unsqueeze(-1)
    return eq.sum((-1, -2))


class Net(nn.Module):
    """Summed embeddings -> residual MLP blocks -> LayerNorm -> per-layer ``Linear(D, E)``.

    Routing tables, each ``(..., E, D)``: ``own`` (layer, expert) of the token's own known layers,
    ``rel`` (r, expert) of its own layer ``r`` steps below the newest known one, ``prev`` (w, layer,
    expert) of previous token ``w`` at every layer and ``prev_tgt`` at the target layer, ``same`` and
    ``same_tgt`` likewise for the same token's earlier occurrence; ``cell`` rows of the target layer,
    mode, same-token agreement and lookahead; ``tokens`` rows of token ids (sparse gradients).
    """

    def __init__(
        self,
        lay: Layout,
        tl: TokenLayout,
        vocab: torch.Tensor,
        *,
        hidden: int,
        depth: int,
        dropout: float,
        top_k: int,
        history_layers: int,
        use_same: bool,
        use_token: bool,
    ) -> None:
        super().__init__()
        self.lay, self.tl = lay, tl
        self.history_layers, self.use_same, self.use_token = history_layers, use_same, use_token
        L, E, W, D = lay.L, lay.E, lay.W, hidden
        self.register_buffer("vocab", vocab, persistent=False)  # sorted token ids with their own row

        def table(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, D).normal_(0.0, 0.02))

        self.own = table(L, E)
        self.rel = table(N_REL, E)
        self.prev = table(W, L, E)
        self.prev_tgt = table(W, L, E)
        self.same = table(L if use_same else 0, E)
        self.same_tgt = table(L if use_same else 0, E)
        self.cell = table(lay.size + 1)
        with torch.no_grad():
            self.cell[lay.pad].zero_()
        # token rows start at zero (rows never hit stay zero and compress to nothing in saved files)
        self.tokens = nn.Parameter(torch.zeros(tl.size + 1, D))
        self.bias = nn.Parameter(torch.zeros(D))
        self.blocks = nn.ModuleList(Block(D, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(D)
        bound = 1.0 / math.sqrt(D)
        self.head_w = nn.Parameter(torch.empty(L, D, E).uniform_(-bound, bound))
        self.head_b = nn.Parameter(torch.full((L, E), math.log(top_k / max(E - top_k, 1))))

    # ------------------------------------------------------------------ shared pieces
    def _cell_sum(
        self,
        layer: torch.Tensor,
        mode: torch.Tensor,
        V: torch.Tensor,
        last_ov: torch.Tensor,
        agree_num: torch.Tensor,
        agree_den: torch.Tensor,
        has_same: torch.Tensor,
        look: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(..., D)`` sum of each cell's ``cell`` rows: target layer, mode, same-token agreement, lookahead."""
        lay = self.lay
        items = [lay.layer + layer, lay.mode + mode]
        if self.use_same:
            ov = torch.where(V > 0, last_ov.clamp(max=N_OVERLAP - 2), N_OVERLAP - 1)
            den = agree_den.clamp(min=1)
            ag = torch.where(V > 0, (agree_num * (N_AGREE - 2) * 2 + den) // (2 * den), N_AGREE - 1)
            items.append(torch.where(has_same, lay.same_ov + layer * N_OVERLAP + ov, lay.pad))
            items.append(torch.where(has_same, lay.same_agree + layer * N_AGREE + ag, lay.pad))
        out = torch.stack(items, -1)
        if look is not None and lay.V:
            m = look.shape[-1]
            rb = torch.arange(m, device=look.device).clamp(max=N_RANK_BUCKETS - 1)
            vi = torch.arange(lay.V, device=look.device).unsqueeze(-1)
            ids = torch.where(look < lay.E, lay.look + (vi * N_RANK_BUCKETS + rb) * lay.E + look, lay.pad)
            out = torch.cat([out, ids.flatten(-2)], -1)
        shape = out.shape[:-1]
        bag = F.embedding_bag(out.reshape(-1, out.shape[-1]), self.cell, mode="sum", padding_idx=lay.pad)
        return bag.view(*shape, -1)

    def _token_sum(
        self, raw_tok: torch.Tensor, raw_ptok: torch.Tensor, layer: torch.Tensor
    ) -> torch.Tensor | None:
        """``(..., D)`` sum of the token rows of each cell (``raw_tok`` -1 where the token is hidden)."""
        if not self.use_token:
            return None
        tl = self.tl

        def row(raw: torch.Tensor) -> torch.Tensor:
            if tl.NV == 0:
                return torch.full_like(raw, tl.NV)
            i = torch.searchsorted(self.vocab, raw.contiguous()).clamp(max=tl.NV - 1)
            return torch.where(self.vocab[i] == raw, i, tl.NV)

        tok = torch.where(raw_tok >= 0, tl.tok + row(raw_tok), tl.pad)
        ptok = torch.where(raw_ptok >= 0, tl.ptok + row(raw_ptok), tl.pad)
        both = (raw_tok >= 0) & (raw_ptok >= 0)
        big = torch.where(both, tl.bigram + (raw_tok * 1_000_003 + raw_ptok * 7919) % tl.B, tl.pad)
        tlr = torch.where(
            raw_tok >= 0, tl.tok_layer + (raw_tok * 131 + layer) % (TOKEN_LAYER_FACTOR * tl.B), tl.pad
        )
        items = torch.stack([tok, ptok, big, tlr], -1)
        shape = items.shape[:-1]
        out = F.embedding_bag(items.reshape(-1, 4), self.tokens, mode="sum", sparse=True, padding_idx=tl.pad)
        return out.view(*shape, -1)

    def _trunk(self, h: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            h = b(h)
        return self.norm(h)

    # ------------------------------------------------------------------ training path
    def grid(
        self,
        own: torch.Tensor,
        prev: torch.Tensor,
        same: torch.Tensor,
        raw_tok: torch.Tensor,
        raw_ptok: torch.Tensor,
        mode: torch.Tensor,
        dist: torch.Tensor,
        look: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(T, L, E)`` logits of every layer of ``T`` tokens, each (token, layer) cell in its own mode.

        ``own (T, L, k)`` the tokens' full routing (a cell sees its layers below ``l - d + 1`` only);
        ``prev (T, W, L, k)``; ``same (T, L, k)``; ``raw_tok``/``raw_ptok (T,)`` ids (-1 none);
        ``mode``/``dist (T, L)`` mode index and distance (0 = temporal) of each cell; ``look (T, L, V, m)``.

        Each routing source is embedded per (token, layer) by one batched matmul of its multi-hot
        ``(L, T, E)`` with the layer's tables side by side; sums over layers are cumulative sums.
        """
        lay = self.lay
        E, L = lay.E, lay.L
        T = own.shape[0]
        D = self.bias.shape[0]
        dev = own.device

        def embed(ids: torch.Tensor, *tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = torch.zeros(L, ids.shape[0], E + 1, device=dev).scatter_(2, ids.transpose(0, 1), 1.0)[..., :E]
            w = torch.cat([t.expand(L, E, D) for t in tables], -1)  # (L, E, g * D)
            return torch.bmm(x, w).transpose(0, 1).split(D, -1)  # g x (T, L, D)

        e_own, *e_rel = embed(own, self.own, *self.rel.unbind(0))
        zero = e_own.new_zeros(T, 1, D)
        layer = torch.arange(L, device=dev).expand(T, L)
        spatial = dist > 0
        V = torch.where(spatial, (layer - dist + 1).clamp(min=0), 0)  # known own layers of each cell
        ti = torch.arange(T, device=dev).unsqueeze(1)
        c_own = torch.cat([zero, e_own.cumsum(1)], 1)  # (T, L + 1, D)
        h = c_own[ti, V]
        if self.history_layers:
            h = h - c_own[ti, (V - self.history_layers).clamp(min=0)]
        for r in range(N_REL):
            src = V - 1 - r
            h = h + e_rel[r][ti, src.clamp(min=0)] * (src >= 0).unsqueeze(-1)
        for w, (pw, ptw) in enumerate(zip(self.prev.unbind(0), self.prev_tgt.unbind(0), strict=True)):
            e_all, e_tgt = embed(prev[:, w], pw, ptw)
            if w == 0:  # temporal: token i-1 is known up to the target layer
                c = torch.cat([zero, e_all.cumsum(1)], 1)
                h = h + c[ti, torch.where(spatial, L, layer + 1)]
            else:
                h = h + e_all.sum(1, keepdim=True)
            h = h + e_tgt
        if self.use_same:
            e_all, e_tgt = embed(same, self.same, self.same_tgt)
            h = h + (e_all.sum(1, keepdim=True) + e_tgt) * spatial.unsqueeze(-1).to(h.dtype)
            ovl = overlap(own, same, E)  # (T, L)
            known = (own < E).sum(-1)
            zi = ovl.new_zeros(T, 1)
            c_ov = torch.cat([zi, ovl.cumsum(1)], 1)
            c_kn = torch.cat([zi, known.cumsum(1)], 1)
            last = ovl[ti, (V - 1).clamp(min=0)]
            has = (same < E).any(-1).any(-1).unsqueeze(1) & spatial
            h = h + self._cell_sum(layer, mode, V, last, c_ov[ti, V], c_kn[ti, V], has, look)
        else:
            none = torch.zeros_like(V)
            h = h + self._cell_sum(layer, mode, V, none, none, none, none > 0, look)
        tok = self._token_sum(
            torch.where(spatial, raw_tok.unsqueeze(1), -1), raw_ptok.unsqueeze(1).expand(T, L), layer
        )
        if tok is not None:
            h = h + tok
        h = self._trunk(h + self.bias)  # (T, L, D)
        return torch.einsum("tld,lde->tle", h, self.head_w) + self.head_b

    # ------------------------------------------------------------------ prediction path
    def flat(
        self,
        own: torch.Tensor,
        prev: torch.Tensor,
        same: torch.Tensor,
        raw_tok: torch.Tensor,
        raw_ptok: torch.Tensor,
        layer: int,
        mode: int,
        dist: int,
        look: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(n, E)`` logits of ``n`` queries for one target ``layer`` and mode.

        ``own (n, L, k)`` holds the known own layers (absent beyond them); ``prev (n, W, L, k)`` and
        ``same (n, L, k)`` what the query may see (absent where hidden); ``raw_tok`` is -1 where hidden;
        ``look (n, V, m)``.
        """
        lay = self.lay
        E, L = lay.E, lay.L
        n = own.shape[0]
        W = prev.shape[1]
        dev = own.device
        j = torch.arange(L, device=dev).view(1, L, 1)

        def bag(ids: torch.Tensor, table: torch.Tensor, off: torch.Tensor | int = 0) -> torch.Tensor | float:
            ids = ids.reshape(n, -1)
            if ids.shape[1] == 0:
                return 0.0
            ok = ids < E
            idx = torch.where(ok, ids + (off if isinstance(off, int) else off.reshape(1, -1)), 0)
            return F.embedding_bag(
                idx, table.reshape(-1, table.shape[-1]), mode="sum", per_sample_weights=ok.to(table.dtype)
            )

        V = max(layer - dist + 1, 0) if dist > 0 else 0
        lo = max(V - self.history_layers, 0) if self.history_layers else 0
        h = self.bias + bag(own[:, lo:V], self.own, (j[:, lo:V] * E).expand(1, V - lo, own.shape[2]))
        for r in range(N_REL):
            if V - 1 - r >= 0:
                h = h + bag(own[:, V - 1 - r], self.rel[r])
        for w in range(W):
            h = h + bag(prev[:, w], self.prev[w], (j * E).expand(1, L, prev.shape[-1]))
            h = h + bag(prev[:, w, layer], self.prev_tgt[w, layer])
        full = torch.full((n,), layer, dtype=torch.long, device=dev)
        Vt = torch.full_like(full, V)
        if self.use_same and dist > 0:
            h = (
                h
                + bag(same, self.same, (j * E).expand(1, L, same.shape[-1]))
                + bag(same[:, layer], self.same_tgt[layer])
            )
            ovl = overlap(own, same, E)  # (n, L), zero beyond the known layers
            last = ovl[:, V - 1] if V > 0 else torch.zeros_like(full)
            has = (same < E).any(-1).any(-1)
            h = h + self._cell_sum(
                full, torch.full_like(full, mode), Vt, last, ovl.sum(1), (own < E).sum((1, 2)), has, look
            )
        else:
            none = torch.zeros_like(full)
            h = h + self._cell_sum(full, torch.full_like(full, mode), Vt, none, none, none, none > 0, look)
        tok = self._token_sum(raw_tok if dist > 0 else torch.full_like(raw_tok, -1), raw_ptok, full)
        if tok is not None:
            h = h + tok
        h = self._trunk(h)
        return h @ self.head_w[layer] + self.head_b[layer]
