"""A learned predictor (seed 000, method 2): summed embeddings of everything visible, then a residual MLP.

Every piece of visible information is a row of a learned table; the rows are summed into one vector:

- the token's own experts at every known layer (``history_layers=0``; or the newest ``history_layers``)
  as (layer, expert), and again at its two newest known layers as (relative position, expert);
- the full routing (every layer) of each of the ``window`` previous tokens of the document, and their
  experts at the target layer; in temporal mode the previous token only up to the target layer;
- the full routing of the most recent earlier occurrence of the same token in the document and its
  experts at the target layer, plus how far it agrees with the token's own known layers
  (``use_same_token``; a repeated token is often routed like its earlier occurrence);
- the token and the previous token (a vocabulary of the training ids seen at least twice, the rest
  sharing one row), the hashed (previous token, token) bigram and (token, target layer) pair;
- the target layer, the mode (distance, or temporal) and, when the trace holds them and
  ``use_lookahead`` is set, the gate-lookahead ids as (variant, rank bucket, expert).

The sum goes through ``depth`` pre-norm residual blocks ``[LayerNorm, Linear(D, 2D), GELU, Dropout,
Linear(2D, D)]``, a LayerNorm and a per-target-layer ``Linear(D, E)``; experts are ranked by logit. It
is trained with binary cross-entropy against the multi-hot expert set, AdamW with a one-cycle
learning rate for the dense weights and SparseAdam for the token rows (only the rows a batch touches
are updated). A batch holds whole tokens with all their layers, each (token, layer) cell in one of
the fitted modes drawn at random per epoch, so the per-token sums are embedded once for all the
token's cells (see :mod:`moescope.predict._learned_net`). One model serves every layer and mode.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, ClassVar

import numpy as np

from moescope.errors import ConfigError
from moescope.predict.base import BasePredictor, Boolean, Interval, Modes, Options, OrNone, RandomState
from moescope.predict.queries import Queries, iter_contexts, split_lookahead_column

PREDICT_CHUNK = 4096  # queries per forward pass when predicting


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


def _ids(a: np.ndarray, E: int, missing: int) -> np.ndarray:
    """Expert ids with ``missing`` replaced by ``E`` (the "absent" id of the network), compact dtype."""
    return np.where(a == missing, E, a).astype(np.uint16 if E >= 255 else np.uint8)


def _one_cycle(steps: int, warm_up: float = 0.1) -> Any:
    """Learning-rate factor of a one-cycle schedule: cosine warm-up from 1/25 to 1 over the first
    ``warm_up`` of the steps, then cosine decay to 1/25 / 10^4 (torch's ``OneCycleLR`` shape, which
    fails on runs of fewer than ten steps)."""
    w = max(1, int(warm_up * steps))

    def factor(step: int) -> float:
        if step < w:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * step / w)) / 2
        p = min((step - w) / max(steps - w, 1), 1.0)
        return 4e-6 + (1 - 4e-6) * (1 + math.cos(math.pi * p)) / 2

    return factor


class LearnedPredictor(BasePredictor):
    """Summed-embedding residual MLP on token ids and routing history (spatial and temporal); see the module docstring.

    Parameters
    ----------
    distances : modes to fit (spatial distances >= 1; 0 = temporal); one model serves them all.
    hidden : width ``D`` of the embeddings and the residual stream.
    depth : number of residual MLP blocks.
    history_layers : own known layers that enter as (layer, expert) rows; 0 = all of them.
    window : previous tokens whose full routing enters as features.
    token_buckets : the most vocabulary rows for token ids, and the hash buckets of token pairs.
    use_token, use_lookahead : feature groups to use (lookahead only if the trace holds it).
    use_same_token : use the routing of the same token's earlier occurrence in the document.
    dropout : dropout rate inside the residual blocks.
    epochs, batch_size, lr, weight_decay : training passes, (token, layer) cells per step, peak
        learning rate of the one-cycle schedule, AdamW weight decay of the dense weights.
    max_samples : cap on training (token, layer) cells per epoch; whole tokens are drawn at random beyond it.
    random_state : seed of sampling, initialisation, dropout and shuffling.
    device : ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when torch sees a GPU) for fitting and predicting.
    num_threads : torch threads while fitting and predicting on the CPU (None: torch's default).
    verbose : log training progress to stderr.

    Attributes
    ----------
    weights_ : the module's parameters as NumPy arrays (saved without pickle).
    vocab_ : sorted token ids with their own embedding row.
    modes_, variants_ : fitted modes and lookahead variants used.
    train_loss_ : mean BCE loss of each epoch; ``train_samples_`` training cells per epoch.
    """

    name: ClassVar[str] = "learned"
    version: ClassVar[int] = 2  # 2: residual MLP on full-routing inputs (version 1: bag + 2 layers)
    table: ClassVar[bool] = False
    _parameter_constraints: ClassVar[dict[str, Any]] = {
        "distances": Modes(),
        "hidden": Interval(int, 4, 4096),
        "depth": Interval(int, 0, 16),
        "history_layers": Interval(int, 0, 1024),
        "window": Interval(int, 0, 64),
        "token_buckets": Interval(int, 1, 1 << 22),
        "use_token": Boolean(),
        "use_lookahead": Boolean(),
        "use_same_token": Boolean(),
        "dropout": Interval(float, 0.0, 0.9),
        "epochs": Interval(int, 1, 1000),
        "batch_size": Interval(int, 1, 1 << 20),
        "lr": Interval(float, 0.0, 10.0),
        "weight_decay": Interval(float, 0.0, 1.0),
        "max_samples": Interval(int, 1, None),
        "random_state": RandomState(),
        "device": Options("cpu", "cuda", "auto"),
        "num_threads": OrNone(Interval(int, 1, 256)),
        "verbose": Boolean(),
    }

    def __init__(
        self,
        *,
        distances: tuple[int, ...] = (1,),
        hidden: int = 256,
        depth: int = 2,
        history_layers: int = 0,
        window: int = 2,
        token_buckets: int = 16384,
        use_token: bool = True,
        use_lookahead: bool = False,
        use_same_token: bool = True,
        dropout: float = 0.1,
        epochs: int = 4,
        batch_size: int = 2048,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        max_samples: int = 4_000_000,
        random_state: int | None = 0,
        device: str = "cpu",
        num_threads: int | None = 1,
        verbose: bool = False,
    ) -> None:
        self.distances = distances
        self.hidden = hidden
        self.depth = depth
        self.history_layers = history_layers
        self.window = window
        self.token_buckets = token_buckets
        self.use_token = use_token
        self.use_lookahead = use_lookahead
        self.use_same_token = use_same_token
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_samples = max_samples
        self.random_state = random_state
        self.device = device
        self.num_threads = num_threads
        self.verbose = verbose

    def history_window(self) -> int:
        return max(self.window, 1)

    def _modes(self) -> list[int]:
        return [int(d) for d in self.modes_]

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"learned: {msg}", file=sys.stderr, flush=True)

    def _torch_device(self) -> Any:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "LearnedPredictor: device='cuda' but torch sees no CUDA device; use 'cpu' or 'auto'"
            )
        return torch.device(self.device)

    # ------------------------------------------------------------------ model
    def _build(self) -> Any:
        import torch

        from moescope.predict._learned_net import Layout, Net, TokenLayout

        lay = Layout(self.num_layers_, self.num_experts_, len(self.modes_), self.window, len(self.variants_))
        tl = TokenLayout(len(self.vocab_), self.token_buckets)
        return Net(
            lay,
            tl,
            torch.from_numpy(np.asarray(self.vocab_, np.int64)),
            hidden=self.hidden,
            depth=self.depth,
            dropout=self.dropout,
            top_k=self.top_k_,
            history_layers=self.history_layers,
            use_same=self.use_same_token,
            use_token=self.use_token,
        )

    def _after_load(self) -> None:
        import torch

        module = self._build()
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in self.weights_.items()}
        module.load_state_dict(state)
        module.eval()
        self._module = module.to(self._torch_device())

    # ------------------------------------------------------------------ fit
    def _collect(self, trace: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Per-token training arrays (routing, previous tokens, same token, ids, lookahead), tokens drawn
        at random beyond ``max_samples`` cells."""
        L, E, k, W = self.num_layers_, self.num_experts_, self.top_k_, self.window
        keep = min(1.0, self.max_samples / max(trace.num_tokens * L, 1))
        look = bool(self.variants_)
        m = max(self.look_m_, 1)
        parts: dict[str, list[np.ndarray]] = {}
        for ctx in iter_contexts(trace, window=self.history_window(), lookahead=look):
            rows = np.nonzero(rng.random(len(ctx)) < keep)[0] if keep < 1 else np.arange(len(ctx))
            if not len(rows):
                continue
            miss = ctx.missing
            q = ctx.queries(0, 1, rows=rows)  # the spatial view: finished previous tokens, ids, same token
            prev = np.full((len(rows), W, L, k), miss, q.prev.dtype)
            w = min(W, q.prev.shape[1])
            prev[:, :w] = q.prev[:, :w]
            same = q.same_token if q.same_token is not None else np.full((len(rows), L, k), miss, q.own.dtype)
            got = {
                "own": _ids(ctx.actual[rows], E, miss),
                "prev": _ids(prev, E, miss),
                "same": _ids(same, E, miss),
                "tok": q.token_id.astype(np.int64),
                "ptok": q.prev_token_id[:, 0].astype(np.int64)
                if q.prev_token_id.shape[1]
                else np.full(len(rows), -1),
            }
            if look:
                la = np.full((len(rows), len(self.modes_), L, len(self.variants_), m), miss, q.own.dtype)
                for mi, d in enumerate(self.modes_):
                    for layer in range(int(d), L) if d > 0 else ():
                        ql = ctx.queries(layer, int(d), rows=rows)
                        for vi, v in enumerate(self.variants_):
                            if v in ql.lookahead:
                                a = ql.lookahead[v][:, :m]
                                la[:, mi, layer, vi, : a.shape[1]] = a
                got["look"] = _ids(la, E, miss)
            for key, v in got.items():
                parts.setdefault(key, []).append(v)
        if not parts:
            raise ConfigError("LearnedPredictor: max_samples kept no training token")
        return {key: np.concatenate(v) for key, v in parts.items()}

    def _vocabulary(self, tok: np.ndarray) -> np.ndarray:
        """Sorted ids of the training tokens seen at least twice (at most ``token_buckets``, most frequent first)."""
        ids, counts = np.unique(tok[tok >= 0], return_counts=True)
        keep = counts >= 2
        ids, counts = ids[keep], counts[keep]
        if len(ids) > self.token_buckets:
            ids = ids[np.argsort(-counts, kind="stable")[: self.token_buckets]]
        return np.sort(ids).astype(np.int64)

    def _fit(self, trace: Any) -> None:
        with torch_threads(self.num_threads):
            self._fit_model(trace)

    def _fit_model(self, trace: Any) -> None:
        import torch

        self.modes_ = np.asarray(sorted(set(int(d) for d in self.distances)), np.int64)
        vs = (
            sorted({v for v, _ in map(split_lookahead_column, trace.lookahead_columns)})
            if self.use_lookahead
            else []
        )
        self.variants_ = list(vs)
        la = trace.columns.get("lookahead") or {}
        self.look_m_ = int(la.get("m") or trace.top_k) if vs else 0
        rng = np.random.default_rng(self.random_state)
        t0 = time.perf_counter()
        data = self._collect(trace, rng)
        self.vocab_ = self._vocabulary(data["tok"])
        E, L = self.num_experts_, self.num_layers_
        dev = self._torch_device()
        cuda = dev.type == "cuda"
        t = {key: torch.from_numpy(v).to(dev) for key, v in data.items()}
        n = len(data["tok"])
        valid_all = (t["own"] < E).all(-1)  # (n, L): a target with an unrecorded slot is not learned from
        modes = torch.from_numpy(self.modes_).to(dev)
        per = max(1, self.batch_size // L)  # tokens per step
        steps = self.epochs * ((n + per - 1) // per)
        self._log(
            f"{n} tokens x {L} layers, {len(self.vocab_)} vocabulary ids, prepared in "
            f"{time.perf_counter() - t0:.0f}s; {steps} steps on {dev}"
        )
        with torch.random.fork_rng(devices=[dev] if cuda else []):
            torch.manual_seed(0 if self.random_state is None else int(self.random_state))
            module = self._build().to(dev)
            dense = [p for name, p in module.named_parameters() if name != "tokens"]
            opt = torch.optim.AdamW(dense, lr=self.lr, weight_decay=self.weight_decay, fused=True)
            opt_tok = torch.optim.SparseAdam([module.tokens], lr=self.lr)  # only the rows a batch touches
            scheds = [torch.optim.lr_scheduler.LambdaLR(o, _one_cycle(steps)) for o in (opt, opt_tok)]
            losses = []
            module.train()
            for epoch in range(self.epochs):
                order = torch.from_numpy(rng.permutation(n)).to(dev)
                cell_modes = torch.from_numpy(rng.integers(len(self.modes_), size=(n, L))).to(dev)
                total = torch.zeros((), device=dev)
                for s in range(0, n, per):
                    idx = order[s : s + per]
                    mi = cell_modes[s : s + per]
                    dist = modes[mi]
                    look = None
                    if "look" in t:
                        lk = t["look"][idx]  # (T, M, L, V, m): each cell takes its mode's lookahead
                        look = lk[
                            torch.arange(len(idx), device=dev)[:, None], mi, torch.arange(L, device=dev)
                        ].long()
                    own = t["own"][idx].long()
                    logits = module.grid(
                        own,
                        t["prev"][idx].long(),
                        t["same"][idx].long(),
                        t["tok"][idx],
                        t["ptok"][idx],
                        mi,
                        dist,
                        look,
                    )
                    y = torch.zeros(len(idx), L, E + 1, device=dev).scatter_(2, own, 1.0)[..., :E]
                    valid = valid_all[idx].to(logits.dtype)
                    bce = torch.nn.functional.binary_cross_entropy_with_logits(
                        logits, y, reduction="none"
                    ).mean(-1)
                    count = valid.sum()
                    loss = (bce * valid).sum() / count.clamp(min=1)
                    opt.zero_grad(set_to_none=True)
                    opt_tok.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    opt_tok.step()
                    for sc in scheds:
                        sc.step()
                    total += (bce * valid).sum().detach()
                losses.append(float(total) / max(int(valid_all.sum()), 1))
                self._log(
                    f"epoch {epoch + 1}/{self.epochs} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f}s)"
                )
        module.eval()
        self._module = module
        self.weights_ = {key: v.detach().cpu().numpy().copy() for key, v in module.state_dict().items()}
        self.train_loss_ = [float(x) for x in losses]
        self.train_samples_ = int(valid_all.sum())

    # ------------------------------------------------------------------ predict
    def _scores(self, q: Queries) -> np.ndarray:
        import torch

        if getattr(self, "_module", None) is None:
            self._after_load()
        module = self._module
        dev = next(module.parameters()).device
        n, L, E, W = len(q), self.num_layers_, self.num_experts_, self.window
        k, miss = q.prev.shape[-1], q.missing
        own = np.full((n, L, k), miss, q.own.dtype)
        own[:, : q.own.shape[1]] = q.own
        prev = np.full((n, W, L, k), miss, q.prev.dtype)
        w = min(W, q.prev.shape[1])
        prev[:, :w] = q.prev[:, :w]
        same = (
            q.same_token
            if q.same_token is not None and not q.temporal
            else np.full((n, L, k), miss, q.own.dtype)
        )
        ptok = q.prev_token_id[:, 0] if q.prev_token_id.shape[1] else np.full(n, -1)
        look = None
        if self.variants_:
            look = np.full((n, len(self.variants_), max(self.look_m_, 1)), miss, q.own.dtype)
            for vi, v in enumerate(self.variants_):
                if v in q.lookahead:
                    a = q.lookahead[v][:, : look.shape[2]]
                    look[:, vi, : a.shape[1]] = a
        mode = int(np.searchsorted(self.modes_, q.distance))
        own, prev, same = _ids(own, E, miss), _ids(prev, E, miss), _ids(same, E, miss)
        look = None if look is None else _ids(look, E, miss)
        out = np.empty((n, E), np.float32)

        def tt(a: np.ndarray, s: int) -> Any:
            return torch.from_numpy(np.array(a[s : s + PREDICT_CHUNK], dtype=np.int64)).to(dev)

        with torch.inference_mode(), torch_threads(self.num_threads):
            for s in range(0, n, PREDICT_CHUNK):
                logits = module.flat(
                    tt(own, s),
                    tt(prev, s),
                    tt(same, s),
                    tt(q.token_id, s),
                    tt(ptok, s),
                    q.layer,
                    mode,
                    q.distance,
                    None if look is None else tt(look, s),
                )
                out[s : s + PREDICT_CHUNK] = logits.float().cpu().numpy()
        return out
