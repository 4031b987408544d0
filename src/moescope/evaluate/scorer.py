"""Score text with a causal MoE model under a routing strategy, the way lm-evaluation-harness does.

The request types are lm-eval's: ``loglikelihood`` of a continuation given a context (sum of
log-probabilities, and whether greedy decoding reproduces it) and ``loglikelihood_rolling`` of a
whole text in disjoint windows of the model's length. Tokenisation, windows and truncation copy
lm-eval's ``HFLM`` (0.4): ``tokenizer.encode`` with its default special tokens, context trailing
spaces moved to the continuation, the pair encoded whole then split, a BOS (else EOS) prefix token
for the first rolling window, left truncation to ``max_length + 1`` tokens. Batches are right-padded
and the model is called without an attention mask, as lm-eval does: a causal LM never attends to
later positions, and MoE routing is per token, so padding changes no score.

Every forward pass runs inside a :class:`~moescope.strategies.StrategyRouter`, which also counts the
experts each real (non-padding) token used per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moescope.errors import ConfigError
from moescope.strategies import StrategyPlan, StrategyRouter, parse_strategy

DEFAULT_MAX_LENGTH = 2048


def resolve_max_length(model: Any, tokenizer: Any) -> int:
    """The context length lm-eval would use: config positions, else the tokenizer's, else 2048."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 10**12:
        return int(limit)
    return DEFAULT_MAX_LENGTH


@dataclass
class ActiveCounter:
    """Sum of experts used per MoE layer over real tokens, and the number of tokens."""

    sums: np.ndarray
    tokens: int = 0

    def mean(self) -> np.ndarray:
        """Mean experts per token at each MoE layer."""
        return self.sums / max(self.tokens, 1)


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (context_len=1): ``(context, continuation)`` pairs."""
    out = []
    if not tokens:
        return out
    first = min(max_len, len(tokens))
    out.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        window = tokens[end - max_len - 1 : end - 1]
        out.append((window[: len(window) - (n - 1)], tokens[end - n : end]))
        done += n
    return out


class Scorer:
    """Log-likelihoods of text under ``model`` with a routing strategy applied.

    Parameters
    ----------
    model, tokenizer : a transformers causal MoE LM (eval mode) and its tokenizer.
    strategy : a spec (:func:`~moescope.strategies.parse_strategy`), a plan, or ``None`` (baseline).
    batch_size : sequences per forward pass.
    max_length : context length (default: as lm-eval resolves it).
    samples : calibration logits for a ``pvalue`` strategy without a density file.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        strategy: str | StrategyPlan | None = None,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        samples: dict[int, np.ndarray] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"option `batch_size` must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        plan = strategy if isinstance(strategy, StrategyPlan) else parse_strategy(strategy)
        self.router = StrategyRouter(model, plan, record=True, samples=samples)
        self.batch_size = batch_size
        self.max_length = max_length or resolve_max_length(model, tokenizer)
        self.counter = ActiveCounter(np.zeros(self.router.spec.num_moe_layers))
        emb = model.get_input_embeddings()
        self.device = emb.weight.device if emb is not None else next(model.parameters()).device
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        self._bos_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None

    @property
    def strategy(self) -> str:
        return self.router.plan.spec

    def reset_counter(self) -> None:
        self.counter = ActiveCounter(np.zeros(self.router.spec.num_moe_layers))

    # -------------------------------------------------------------------------- tokenisation
    def tok_encode(self, text: str) -> list[int]:
        """lm-eval's ``tok_encode``: default special tokens, unless the text already starts with BOS."""
        if self._bos_text and text.startswith(self._bos_text):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, trailing context spaces moved to the continuation."""
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # -------------------------------------------------------------------------- forward passes
    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-softmax ``(B, T, V)`` of right-padded rows; counts experts on the real tokens."""
        T = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), T, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            valid[i, : len(r)] = True
        with torch.no_grad(), self.router:
            logits = self.model(batch.to(self.device)).logits
        mask = valid.reshape(-1)
        for j, a in enumerate(self.router.applied):
            if a is not None:
                self.counter.sums[j] += float(a.count.reshape(-1)[mask.to(a.count.device)].sum())
        self.counter.tokens += int(mask.sum())
        return torch.log_softmax(logits, dim=-1)

    def loglikelihood_tokens(
        self,
        pairs: Sequence[tuple[list[int], list[int]]],
        *,
        token_detail: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[tuple[float, bool] | dict[str, Any]]:
        """Per ``(context ids, continuation ids)``: ``(sum log p, greedy)``, or per-token detail.

        With ``token_detail`` each result is a dict of per-continuation-token arrays: ``logp``,
        ``correct`` (argmax equals the token) and ``top5`` (the token is among the 5 best).
        """
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[Any] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows, conts = [], []
            for i in chunk:
                ctx, cont = pairs[i]
                if not ctx or not cont:
                    raise ConfigError("a loglikelihood request needs a non-empty context and continuation")
                rows.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            logp = self._forward(rows)
            for b, i in enumerate(chunk):
                n, c = len(rows[b]), len(conts[b])
                lp = logp[b, n - c : n]  # (c, V)
                tok = torch.tensor(conts[b], device=lp.device)
                got = lp.gather(1, tok[:, None]).squeeze(1)
                if token_detail:
                    top5 = lp.topk(min(5, lp.shape[-1]), dim=-1).indices
                    results[i] = {
                        "logp": got.double().cpu().numpy(),
                        "correct": (lp.argmax(-1) == tok).cpu().numpy(),
                        "top5": (top5 == tok[:, None]).any(-1).cpu().numpy(),
                    }
                else:
                    results[i] = (float(got.sum()), bool((lp.argmax(-1) == tok).all()))
            if progress is not None:
                progress(len(chunk))
        return results

    def loglikelihood(
        self, requests: Iterable[tuple[str, str]], progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), greedy)`` per ``(context, continuation)``."""
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs, progress=progress)  # type: ignore[return-value]

    def rolling_tokens(self, texts: Sequence[str]) -> list[list[tuple[list[int], list[int]]]]:
        """Each text's rolling windows, as lm-eval forms them."""
        return [rolling_windows(self.tok_encode(t), self.prefix_token_id, self.max_length) for t in texts]

    def loglikelihood_rolling(
        self, texts: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> list[float]:
        """Sum of log-probabilities of every token of each text (lm-eval ``loglikelihood_rolling``)."""
        windows = self.rolling_tokens(texts)
        flat = [w for ws in windows for w in ws]
        res = self.loglikelihood_tokens(flat, progress=progress)
        out, at = [], 0
        for ws in windows:
            out.append(float(sum(r[0] for r in res[at : at + len(ws)])))  # type: ignore[index]
            at += len(ws)
        return out

    def token_detail(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> list[dict]:
        """Per text, per predicted token (BOS excluded): ``logp``, ``correct``, ``top5`` arrays."""
        windows = []
        for t in texts:
            ids = self.tok_encode(t)
            if ids and ids[0] == self.prefix_token_id:
                ids = ids[1:]
            windows.append(rolling_windows(ids, self.prefix_token_id, self.max_length) if ids else [])
        flat = [w for ws in windows for w in ws]
        res = self.loglikelihood_tokens(flat, token_detail=True, progress=progress)
        out, at = [], 0
        for ws in windows:
            parts = res[at : at + len(ws)]
            at += len(ws)
            out.append(
                {
                    key: np.concatenate([p[key] for p in parts]) if parts else np.zeros(0)  # type: ignore[index]
                    for key in ("logp", "correct", "top5")
                }
            )
        return out
