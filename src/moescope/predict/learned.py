"""A small learned predictor (seed 000, method 2: "not a bazooka"): a bag-of-features MLP in PyTorch.

Every piece of visible information becomes an item of one ``EmbeddingBag`` (sum of learned vectors):

- the token's own experts at its last ``history_layers`` known layers, as (source layer, expert);
- the target layer and the mode (distance, or temporal);
- the hashed token id (the strongest single cue: routing is largely decided by token id, OpenMoE)
  and the hashed (previous token, token) bigram and (token, target layer) pair;
- the previous ``window`` tokens' experts at the target layer, and the previous token's at the next
  layer (temporal context), plus the previous token's hashed id;
- optionally the gate-lookahead ids (variant, rank bucket, expert);
- the experts of the most recent earlier occurrence of the same token id in the document at the
  target layer, and how many experts that occurrence shares with the token's own newest known layer
  (``use_same_token``; in a prompt, a repeated token is often routed like its earlier occurrence).

The bag goes through ``LayerNorm -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, E)``, trained with binary
cross-entropy against the multi-hot expert set, and experts are ranked by logit. One model serves
every target layer and every fitted mode. The embedding table gets sparse gradients (``SparseAdam``), so
a step costs the rows it touches, not the whole table. Samples are stored compactly (uint8 ids) and their item
indices are built per minibatch, so memory is about 100 bytes per training (token, layer) pair.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, ClassVar

import numpy as np

from moescope.predict.base import BasePredictor, Boolean, Interval, Modes, OrNone, RandomState
from moescope.predict.queries import Queries, iter_labelled, set_mask

N_RANK_BUCKETS = 4
TOKEN_LAYER_FACTOR = 4  # (token, layer) buckets per token bucket
N_OVERLAP = 8  # overlap buckets: min(shared experts, 6), and 7 = the token has no known layer yet


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run torch with ``n`` intra-op threads, restoring the previous count afterwards.

    One thread is the default: the model is small, and on a busy machine torch's spinning worker
    threads made each training step a hundred times slower than a single thread.
    """
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Layout:
    """Item-index layout of the embedding table for given sizes."""

    def __init__(self, L: int, E: int, M: int, W: int, buckets: int, variants: int) -> None:
        self.L, self.E, self.M, self.W, self.B, self.V = L, E, M, W, buckets, variants
        self.own = 0  # (source layer, expert)
        self.layer = self.own + L * E
        self.mode = self.layer + L
        self.tok = self.mode + M
        self.prev = self.tok + buckets  # (target layer, w, expert): expert ids mean nothing across layers
        self.prev_next = self.prev + L * W * E  # (target layer, expert): previous token at layer l+1
        self.prev_tok = self.prev_next + L * E
        self.bigram = self.prev_tok + buckets  # hashed (previous token, token)
        self.look = self.bigram + buckets
        self.same = self.look + variants * N_RANK_BUCKETS * E  # (target layer, expert) of the same token earlier
        self.same_ov = self.same + L * E  # (target layer, overlap bucket)
        self.tok_layer = self.same_ov + L * N_OVERLAP  # hashed (token, target layer)
        self.size = self.tok_layer + TOKEN_LAYER_FACTOR * buckets
        self.pad = self.size  # EmbeddingBag padding index

    def hashed(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of the hashed token regions: rows never hit stay zero (small files)."""
        B = self.B
        return [(self.tok, self.tok + B), (self.prev_tok, self.prev_tok + B), (self.bigram, self.bigram + B),
                (self.tok_layer, self.size)]


class _Samples:
    """Compact training samples; grows by appending blocks."""

    FIELDS = ("layer", "mode", "own", "prev", "prev_next", "tok", "prev_tok", "bigram", "look", "same", "same_ov", "tok_layer",
              "target")

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {f: [] for f in self.FIELDS}

    def add(self, **arrays: np.ndarray) -> None:
        for f in self.FIELDS:
            self.parts[f].append(arrays[f])

    def build(self) -> dict[str, np.ndarray]:
        return {f: np.concatenate(v) for f, v in self.parts.items()}


class LearnedPredictor(BasePredictor):
    """Bag-of-features MLP on token id and expert history (spatial and temporal); see the module docstring.

    Parameters
    ----------
    distances : modes to fit (spatial distances >= 1; 0 = temporal); one model serves them all.
    hidden : width ``H`` of the embedding and hidden layer.
    history_layers : how many of the token's most recent known layers enter as features.
    window : previous tokens whose experts at the target layer enter as features.
    token_buckets : hash buckets for token ids (the embedding rows for tokens).
    use_token, use_lookahead : feature groups to use (lookahead only if the trace holds it).
    use_same_token : use the routing of the same token's earlier occurrence in the document.
    epochs, batch_size, lr, weight_decay : Adam training settings.
    max_samples : cap on training (token, layer, mode) samples, drawn at random beyond it.
    random_state : seed of sampling, initialisation and shuffling.
    num_threads : torch threads while fitting and predicting (None: torch's default).
    verbose : log training progress to stderr.

    Attributes
    ----------
    weights_ : the module's parameters as NumPy arrays (saved without pickle).
    modes_, variants_ : fitted modes and lookahead variants used.
    train_loss_ : mean BCE loss of each epoch.
    """

    name: ClassVar[str] = "learned"
    table: ClassVar[bool] = False
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "distances": Modes(),
        "hidden": Interval(int, 4, 4096),
        "history_layers": Interval(int, 0, 64),
        "window": Interval(int, 0, 64),
        "token_buckets": Interval(int, 1, 1 << 22),
        "use_token": Boolean(),
        "use_lookahead": Boolean(),
        "use_same_token": Boolean(),
        "epochs": Interval(int, 1, 1000),
        "batch_size": Interval(int, 1, 1 << 20),
        "lr": Interval(float, 0.0, 10.0),
        "weight_decay": Interval(float, 0.0, 1.0),
        "max_samples": Interval(int, 1, None),
        "random_state": RandomState(),
        "num_threads": OrNone(Interval(int, 1, 256)),
        "verbose": Boolean(),
    }

    def __init__(
        self,
        *,
        distances: tuple[int, ...] = (1,),
        hidden: int = 128,
        history_layers: int = 4,
        window: int = 2,
        token_buckets: int = 8192,
        use_token: bool = True,
        use_lookahead: bool = False,
        use_same_token: bool = True,
        epochs: int = 4,
        batch_size: int = 512,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        max_samples: int = 2_000_000,
        random_state: int | None = 0,
        num_threads: int | None = 1,
        verbose: bool = False,
    ) -> None:
        self.distances = distances
        self.hidden = hidden
        self.history_layers = history_layers
        self.window = window
        self.token_buckets = token_buckets
        self.use_token = use_token
        self.use_lookahead = use_lookahead
        self.use_same_token = use_same_token
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_samples = max_samples
        self.random_state = random_state
        self.num_threads = num_threads
        self.verbose = verbose

    def history_window(self) -> int:
        return max(self.window, 1)

    def _modes(self) -> list[int]:
        return [int(d) for d in self.modes_]

    # ------------------------------------------------------------------ features
    def _layout(self) -> _Layout:
        return _Layout(
            self.num_layers_, self.num_experts_, len(self.modes_), self.window, self.token_buckets, len(self.variants_)
        )

    def _compact(self, q: Queries) -> dict[str, np.ndarray]:
        """Per-query compact features (uint8/16 ids, ``E`` = absent)."""
        n, E, k = len(q), q.num_experts, q.prev.shape[-1]
        miss = q.missing

        def ids(a: np.ndarray) -> np.ndarray:
            return np.where(a == miss, E, a).astype(np.uint16 if E >= 255 else np.uint8)

        A = self.history_layers
        own = np.full((n, A, k), miss, q.own.dtype)
        V = q.own.shape[1]
        for j in range(min(A, V)):
            own[:, j] = q.own[:, V - 1 - j]
        W = self.window
        prev = np.full((n, W, k), miss, q.prev.dtype)
        w = min(W, q.prev.shape[1])
        if w:
            prev[:, :w] = q.prev[:, :w, q.layer]
        nxt = np.full((n, k), miss, q.prev.dtype)
        if q.prev.shape[1] and q.layer + 1 < q.prev.shape[2]:
            nxt = q.prev[:, 0, q.layer + 1]
        m = max(self.look_m_, 1)
        look = np.full((n, max(len(self.variants_), 1), m), miss, q.own.dtype)
        for vi, v in enumerate(self.variants_):
            if v in q.lookahead:
                a = q.lookahead[v]
                look[:, vi, : min(a.shape[1], m)] = a[:, :m]
        B = self.token_buckets
        raw_tok = q.token_id.astype(np.int64)
        raw_prev = q.prev_token_id[:, 0].astype(np.int64) if q.prev_token_id.shape[1] else np.full(n, -1, np.int64)
        tok = np.where(raw_tok >= 0, raw_tok % B, -1) if self.use_token else np.full(n, -1)
        ptok = np.where(raw_prev >= 0, raw_prev % B, -1) if self.use_token else np.full(n, -1)
        both = (raw_tok >= 0) & (raw_prev >= 0) & self.use_token
        bigram = np.where(both, (raw_tok * 1_000_003 + raw_prev * 7919) % B, -1)
        tok_layer = np.where(tok >= 0, (raw_tok * 131 + q.layer) % (TOKEN_LAYER_FACTOR * B), -1)
        same = np.full((n, k), miss, q.own.dtype)
        same_ov = np.full(n, -1, np.int8)
        if self.use_same_token and q.same_token is not None:
            same = q.same_token[:, q.layer]
            has = ~(same == miss).all(axis=1)  # (n,)
            if V:
                mine = set_mask(q.own[:, V - 1], E, miss)  # (n, E) the newest known layer
                theirs = set_mask(q.same_token[:, V - 1], E, miss)
                ov = np.minimum((mine & theirs).sum(axis=1), N_OVERLAP - 2)
            else:
                ov = np.full(n, N_OVERLAP - 1)
            same_ov = np.where(has, ov, -1).astype(np.int8)
        mode = int(np.searchsorted(self.modes_, q.distance))
        return {
            "layer": np.full(n, q.layer, np.int16),
            "mode": np.full(n, mode, np.int8),
            "own": ids(own),
            "prev": ids(prev),
            "prev_next": ids(nxt),
            "tok": tok.astype(np.int32),
            "prev_tok": ptok.astype(np.int32),
            "bigram": bigram.astype(np.int32),
            "tok_layer": tok_layer.astype(np.int32),
            "look": ids(look),
            "same": ids(same),
            "same_ov": same_ov,
            "distance": np.full(n, q.distance, np.int16),
        }

    def _items(self, f: dict[str, np.ndarray], distance: np.ndarray) -> np.ndarray:
        """``(n, P)`` int64 item indices (``pad`` where absent) from compact features."""
        lay = self._layout()
        E = lay.E
        n = len(f["layer"])
        layer = f["layer"].astype(np.int64)
        cols = []
        own = f["own"].astype(np.int64)  # (n, A, k)
        A = own.shape[1]
        src = np.where(distance == 0, -1, layer - np.maximum(distance, 1))[:, None] - np.arange(A)[None, :]  # (n, A)
        ok = (own < E) & (src[..., None] >= 0)
        cols.append(np.where(ok, lay.own + np.maximum(src, 0)[..., None] * E + own, lay.pad).reshape(n, -1))
        cols.append((lay.layer + layer)[:, None])
        cols.append((lay.mode + f["mode"].astype(np.int64))[:, None])
        tok = f["tok"].astype(np.int64)
        cols.append(np.where(tok >= 0, lay.tok + tok, lay.pad)[:, None])
        prev = f["prev"].astype(np.int64)  # (n, W, k)
        wi = np.arange(prev.shape[1])[None, :, None]
        W = prev.shape[1]
        cols.append(np.where(prev < E, lay.prev + (layer[:, None, None] * W + wi) * E + prev, lay.pad).reshape(n, -1))
        nxt = f["prev_next"].astype(np.int64)
        cols.append(np.where(nxt < E, lay.prev_next + layer[:, None] * E + nxt, lay.pad))
        ptok = f["prev_tok"].astype(np.int64)
        cols.append(np.where(ptok >= 0, lay.prev_tok + ptok, lay.pad)[:, None])
        bigram = f["bigram"].astype(np.int64)
        cols.append(np.where(bigram >= 0, lay.bigram + bigram, lay.pad)[:, None])
        if len(self.variants_):
            look = f["look"].astype(np.int64)  # (n, V, m)
            m = look.shape[2]
            rb = np.minimum(np.arange(m), N_RANK_BUCKETS - 1)[None, None, :]
            vi = np.arange(look.shape[1])[None, :, None]
            cols.append(np.where(look < E, lay.look + (vi * N_RANK_BUCKETS + rb) * E + look, lay.pad).reshape(n, -1))
        same = f["same"].astype(np.int64)  # (n, k)
        cols.append(np.where(same < E, lay.same + layer[:, None] * E + same, lay.pad))
        ov = f["same_ov"].astype(np.int64)
        cols.append(np.where(ov >= 0, lay.same_ov + layer * N_OVERLAP + ov, lay.pad)[:, None])
        tl = f["tok_layer"].astype(np.int64)
        cols.append(np.where(tl >= 0, lay.tok_layer + tl, lay.pad)[:, None])
        return np.concatenate(cols, axis=1)

    # ------------------------------------------------------------------ model
    def _build(self) -> Any:
        import torch
        from torch import nn

        lay = self._layout()

        class BagMLP(nn.Module):
            def __init__(self, size: int, pad: int, H: int, E: int) -> None:
                super().__init__()
                self.bag = nn.EmbeddingBag(size + 1, H, mode="sum", padding_idx=pad, sparse=True)
                # a bag sums dozens of items: unit-variance rows would saturate the ReLU at the start
                nn.init.normal_(self.bag.weight, 0.0, 0.05)
                with torch.no_grad():
                    self.bag.weight[pad].zero_()
                    for a, b in lay.hashed():  # learned from zero: the downstream layers break symmetry
                        self.bag.weight[a:b].zero_()
                self.bias = nn.Parameter(torch.zeros(H))
                self.norm = nn.LayerNorm(H)
                self.hid = nn.Linear(H, H)
                self.out = nn.Linear(H, E)

            def forward(self, items: torch.Tensor) -> torch.Tensor:
                h = torch.relu(self.norm(self.bag(items) + self.bias))  # (B, H)
                h = torch.relu(self.hid(h))  # (B, H)
                return self.out(h)  # (B, E)

        return BagMLP(lay.size, lay.pad, self.hidden, self.num_experts_)

    def _after_load(self) -> None:
        import torch

        self._module = self._build()
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in self.weights_.items()}
        self._module.load_state_dict(state)
        self._module.eval()

    # ------------------------------------------------------------------ fit
    def _collect(self, trace: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Compact samples of every (token, layer, mode) with recorded routing, subsampled to ``max_samples``."""
        total = trace.num_tokens * self.num_layers_ * len(self.modes_)
        keep = min(1.0, self.max_samples / max(total, 1))
        samples = _Samples()
        look = self.use_lookahead and bool(self.variants_)
        for q, actual, valid in iter_labelled(trace, list(self.modes_), window=self.history_window(), lookahead=look):
            sel = valid & (rng.random(len(q)) < keep) if keep < 1 else valid
            if not sel.any():
                continue
            f = self._compact(q)
            f = {k: v[sel] for k, v in f.items()}
            f["target"] = set_mask(actual[sel], q.num_experts, q.missing)
            samples.add(**{k: f[k] if k != "mode" else f["distance"] for k in _Samples.FIELDS})
        return samples.build()

    def _fit(self, trace: Any) -> None:
        with torch_threads(self.num_threads):
            self._fit_model(trace)

    def _fit_model(self, trace: Any) -> None:
        import torch

        self.modes_ = np.asarray(sorted(set(int(d) for d in self.distances)), np.int64)
        from moescope.predict.queries import _split_lookahead

        vs = sorted({v for v, _ in map(_split_lookahead, trace.lookahead_columns)}) if self.use_lookahead else []
        self.variants_ = list(vs)
        la = trace.columns.get("lookahead") or {}
        self.look_m_ = int(la.get("m") or trace.top_k) if vs else 0
        rng = np.random.default_rng(self.random_state)
        data = self._collect(trace, rng)
        distance = data.pop("mode").astype(np.int64)
        data["mode"] = np.searchsorted(self.modes_, distance).astype(np.int8)
        target = torch.from_numpy(data.pop("target").astype(np.float32))
        n = len(target)
        torch.manual_seed(0 if self.random_state is None else int(self.random_state))
        module = self._build()
        dense = [p for name, p in module.named_parameters() if not name.startswith("bag.")]
        opt = torch.optim.Adam(dense, lr=self.lr, weight_decay=self.weight_decay)
        opt_bag = torch.optim.SparseAdam([module.bag.weight], lr=self.lr)  # no weight decay on sparse rows
        lossf = torch.nn.BCEWithLogitsLoss()
        losses = []
        steps_total = self.epochs * ((n + self.batch_size - 1) // self.batch_size)
        # linear decay to a tenth of lr over the whole run
        decay = lambda step: 1.0 - 0.9 * min(step / max(steps_total, 1), 1.0)  # noqa: E731
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt, opt_bag)]
        t0 = time.perf_counter()
        for epoch in range(self.epochs):
            order = rng.permutation(n)
            total = 0.0
            module.train()
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                f = {k: v[idx] for k, v in data.items()}
                items = torch.from_numpy(self._items(f, distance[idx]))
                opt.zero_grad()
                opt_bag.zero_grad()
                loss = lossf(module(items), target[idx])
                loss.backward()
                opt.step()
                opt_bag.step()
                for sc in scheds:
                    sc.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / max(n, 1))
            if self.verbose:
                print(
                    f"learned: epoch {epoch + 1}/{self.epochs} loss {losses[-1]:.4f} "
                    f"({n} samples, {time.perf_counter() - t0:.0f}s)",
                    file=sys.stderr,
                )
        module.eval()
        self._module = module
        self.weights_ = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
        self.train_loss_ = [float(x) for x in losses]
        self.train_samples_ = int(n)

    # ------------------------------------------------------------------ predict
    def _scores(self, q: Queries) -> np.ndarray:
        import torch

        if getattr(self, "_module", None) is None:
            self._after_load()
        f = self._compact(q)
        distance = f.pop("distance").astype(np.int64)
        out = np.empty((len(q), q.num_experts), np.float32)
        with torch.inference_mode(), torch_threads(self.num_threads):
            for s in range(0, len(q), 65536):
                part = {k: v[s : s + 65536] for k, v in f.items()}
                items = torch.from_numpy(self._items(part, distance[s : s + 65536]))
                out[s : s + 65536] = self._module(items).numpy()
        return out
