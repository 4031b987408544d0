"""Run ablation conditions over a corpus and compare each with the unablated baseline, per domain.

One baseline pass and one pass per condition run over the same batches, so every comparison is
on the same tokens. Each pass keeps only per-document sums (:class:`~moescope.ablate.measure.DocTotals`)
and per-domain counts of changed routing, so memory does not grow with the number of conditions.
The baseline pass also records the routing (a capture of the same data), from which the load
share of each expert comes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from moescope.ablate.hooks import MODES, ExpertAblator
from moescope.ablate.measure import (
    HARM_SIGN,
    METRICS,
    DocTotals,
    baseline_intervals,
    compare,
    resample_counts,
    token_scores,
)
from moescope.core.sources import DataOptions
from moescope.errors import ConfigError, DataError

#: Label of the row that pools every domain.
ALL = "all"


@dataclass
class AblateOptions(DataOptions):
    """Every setting of an ablation run: the shared data settings plus the ablation's own; the CLI
    options map one to one (``seq_len`` None: min(max_position_embeddings, 2048), as capture)."""

    layers: list[int] | str | None = None  # decoder-layer indices, "all", or None: the middle MoE layer
    experts: list[tuple[int, ...]] | None = None  # conditions (sets disabled together); None: each expert
    mode: str = "reroute"
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    rank_by: str = "accuracy"
    figures: bool = True


@dataclass
class Prepared:
    """Tokenised data cut into padded batches, with each document's label."""

    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (input_ids, mask, doc index) each (B, T)
    doc_labels: np.ndarray  # (D,) int: index into ``domains``
    domains: list[str]
    tokens: int
    seq_len: int


@dataclass
class AblationResult:
    """Tables of one run: ``results`` per (condition, domain), ``baseline`` per domain, ``load``,
    ``routing_change`` per (condition, MoE layer) and run facts in ``info``."""

    results: pl.DataFrame
    baseline: pl.DataFrame
    load: pl.DataFrame
    routing_change: pl.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def check_options(opts: AblateOptions) -> None:
    """Refuse bad options before any work, naming the option."""
    if opts.mode not in MODES:
        raise ConfigError(f"`mode` must be one of {', '.join(MODES)}, got {opts.mode!r}")
    if opts.rank_by not in METRICS:
        raise ConfigError(f"`rank_by` must be one of {', '.join(METRICS)}, got {opts.rank_by!r}")
    for name, value in (("`batch_size`", opts.batch_size), ("`bootstrap`", opts.bootstrap)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    for name, value in (("`max_tokens`", opts.max_tokens), ("`seq_len`", opts.seq_len)):
        if value is not None and value < 2:
            raise ConfigError(f"{name} must be >= 2 (a prediction needs two tokens), got {value}")
    if not 0 < opts.confidence < 1:
        raise ConfigError(f"`confidence` must be in (0, 1), got {opts.confidence}")
    if isinstance(opts.layers, str) and opts.layers != "all":
        raise ConfigError(f"`layer` must be decoder-layer indices or 'all', got {opts.layers!r}")


# --------------------------------------------------------------------------- data
def default_data() -> tuple[list[str], str]:
    """The bundled held-out corpus files and the record field holding their domain."""
    from moescope.data import corpus_domains, corpus_path

    return [str(corpus_path() / f"heldout-{d}.jsonl") for d in corpus_domains()], "domain"


def prepare(tokenizer: Any, data: Sequence[str], opts: AblateOptions, seq_len: int, pad_id: int) -> Prepared:
    """Read, tokenise and window the documents (capture's loaders), then plan padded batches."""
    from moescope.core.sources import iter_documents, resolve_sources
    from moescope.core.windows import iter_tokenized, make_windows, pad_batch, plan_batches

    sources = resolve_sources(data, opts)
    windows: list[Any] = []
    labels: list[str] = []
    tokens = 0
    for d, ids in iter_tokenized(iter_documents(sources), tokenizer, max_tokens=opts.max_tokens):
        if len(ids) < 2:
            continue  # nothing to predict
        windows.extend(make_windows(len(labels), ids, seq_len))
        labels.append(d.label)
        tokens += len(ids)
    if not windows:
        raise DataError(f"no document of {', '.join(data)} has two or more tokens to predict from")
    domains = sorted(set(labels))
    code = {d: i for i, d in enumerate(domains)}
    batches = []
    for plan in plan_batches(windows, opts.batch_size):
        wins = [windows[i] for i in plan]
        ids, mask = pad_batch(wins, pad_id)  # (B, T)
        doc = np.repeat(np.array([w.doc_id for w in wins], dtype=np.int64)[:, None], ids.shape[1], axis=1)
        batches.append((ids, mask, doc))
    return Prepared(batches, np.array([code[x] for x in labels]), domains, tokens, seq_len)


# --------------------------------------------------------------------------- conditions
def conditions(ablator: ExpertAblator, opts: AblateOptions) -> list[tuple[int, tuple[int, ...]]]:
    """``(decoder_layer, experts disabled together)`` for every pass after the baseline."""
    spec = ablator.spec
    if opts.layers is None:
        layers = [spec.moe_layers[len(spec.moe_layers) // 2]]
    elif opts.layers == "all":
        layers = list(spec.moe_layers)
    else:
        layers = [int(x) for x in opts.layers]
    for layer in layers:
        ablator.position(layer)  # refuses a dense or missing layer, listing the MoE ones
    sets = opts.experts if opts.experts is not None else [(e,) for e in range(spec.num_experts)]
    out = []
    for layer in layers:
        for s in sets:
            if not s:
                raise ConfigError("`experts`: an empty expert set")
            bad = [e for e in s if not 0 <= e < spec.num_experts]
            if bad:
                raise ConfigError(f"`experts`: ids {bad} are outside 0..{spec.num_experts - 1}")
            out.append((layer, tuple(sorted(set(s)))))
    return out


def experts_label(experts: Sequence[int]) -> str:
    """``3`` for one expert, ``3+5`` for a set disabled together."""
    return "+".join(str(e) for e in experts)


# --------------------------------------------------------------------------- passes
@dataclass
class _Pass:
    """What one pass over the data leaves behind."""

    totals: DocTotals
    routing: list[np.ndarray] | None = None  # baseline: per batch (n, L, k) sorted ids of real tokens
    changed: np.ndarray | None = None  # (domains, L) tokens whose expert set changed at each MoE layer
    any_changed: np.ndarray | None = None  # (domains,) ... at any MoE layer, or routed to a disabled expert
    downstream: np.ndarray | None = None  # (domains,) ... at any MoE layer after the ablated one
    direct: np.ndarray | None = None  # (domains,) tokens that had a disabled expert in their top-k
    seconds: float = 0.0


def _forward(model: Any, ids: np.ndarray, mask: np.ndarray, device: Any, positions: bool):
    import torch

    input_ids = torch.from_numpy(ids).to(device)
    attention_mask = torch.from_numpy(mask).to(device)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if positions:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(**kwargs).logits
        return token_scores(logits, input_ids, attention_mask)


def run_pass(
    model: Any,
    ablator: ExpertAblator,
    prep: Prepared,
    *,
    condition: tuple[int, tuple[int, ...]] | None = None,
    baseline: _Pass | None = None,
) -> _Pass:
    """One pass over every batch with ``condition`` disabled (``None``: the baseline).

    The baseline records each real token's routing; an ablated pass compares its routing with it.
    """
    import inspect

    import torch

    ablator.set(None if condition is None else {condition[0]: condition[1]})
    device = model.get_input_embeddings().weight.device
    positions = "position_ids" in inspect.signature(model.forward).parameters
    nd, L = len(prep.domains), ablator.spec.num_moe_layers
    res = _Pass(DocTotals.zeros(len(prep.doc_labels)))
    if condition is None:
        res.routing = []
    else:
        j = ablator.position(condition[0])
        disabled = np.array(condition[1])
        res.changed = np.zeros((nd, L), dtype=np.int64)
        res.any_changed = np.zeros(nd, dtype=np.int64)
        res.downstream = np.zeros(nd, dtype=np.int64)
        res.direct = np.zeros(nd, dtype=np.int64)
    t0 = time.perf_counter()
    for b, (ids, mask, doc) in enumerate(prep.batches):
        valid, c1, c5, nll = _forward(model, ids, mask, device, positions)
        v = valid.cpu().numpy()
        d = doc[:, :-1][v]
        res.totals.add(d, c1.cpu().numpy()[v], c5.cpu().numpy()[v], nll.cpu().numpy()[v].astype(np.float64))
        real = torch.from_numpy(mask.reshape(-1).astype(bool))
        routing = np.stack(
            [r.reshape(-1, r.shape[-1])[real.to(r.device)].cpu().numpy() for r in ablator.routing], axis=1
        )  # (n, L, k)
        routing.sort(axis=-1)
        if condition is None:
            res.routing.append(routing.astype(np.int32))
            continue
        assert baseline is not None and baseline.routing is not None
        base = baseline.routing[b]
        dom = prep.doc_labels[
            doc.reshape(-1)[mask.reshape(-1).astype(bool)]
        ]  # (n,) domain of each real token
        changed = (routing != base).any(axis=-1)  # (n, L)
        direct = np.isin(base[:, j], disabled).any(axis=-1)  # (n,)
        for layer in range(L):
            res.changed[:, layer] += np.bincount(dom, weights=changed[:, layer], minlength=nd).astype(
                np.int64
            )
        res.any_changed += np.bincount(dom, weights=changed.any(axis=1) | direct, minlength=nd).astype(
            np.int64
        )
        res.downstream += np.bincount(dom, weights=changed[:, j + 1 :].any(axis=1), minlength=nd).astype(
            np.int64
        )
        res.direct += np.bincount(dom, weights=direct, minlength=nd).astype(np.int64)
    res.seconds = time.perf_counter() - t0
    ablator.set(None)
    return res


def load_shares(baseline: _Pass, prep: Prepared, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Load share ``c_e / (k T)`` per (domain + 'all', MoE layer, expert) and tokens per domain."""
    nd, L, E, k = len(prep.domains), spec.num_moe_layers, spec.num_experts, spec.top_k
    counts = np.zeros((nd, L, E), dtype=np.int64)
    tokens = np.zeros(nd, dtype=np.int64)
    assert baseline.routing is not None
    for (_, mask, doc), routing in zip(prep.batches, baseline.routing, strict=True):
        dom = prep.doc_labels[doc.reshape(-1)[mask.reshape(-1).astype(bool)]]
        tokens += np.bincount(dom, minlength=nd)
        for layer in range(L):
            flat = (dom[:, None] * E + routing[:, layer]).reshape(-1)
            counts[:, layer] += np.bincount(flat, minlength=nd * E).reshape(nd, E)
    counts = np.concatenate([counts, counts.sum(0, keepdims=True)])  # last row: all domains
    tokens = np.append(tokens, tokens.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / (k * tokens[:, None, None])
    return share, tokens


# --------------------------------------------------------------------------- the run
def run_ablation(
    model: Any,
    tokenizer: Any,
    data: Sequence[str],
    opts: AblateOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> AblationResult:
    """Baseline plus every condition of ``opts`` over ``data``; returns the comparison tables.

    ``data`` are DATA arguments as ``moescope capture`` takes them (empty: the bundled held-out
    corpus, labelled by domain). ``model`` is a loaded causal LM in eval mode.
    """
    from moescope.capture.runner import DEFAULT_MAX_SEQ_LEN
    from moescope.core.windows import ensure_pad_token

    opts = opts or AblateOptions()
    check_options(opts)
    log = log or (lambda _msg: None)
    if model.training:
        raise ConfigError("the model is in training mode (router jitter, dropout); call model.eval() first")
    if not data:
        data, field_name = default_data()
        if opts.label_field is None and opts.label is None:
            opts = AblateOptions(**{**opts.__dict__, "label_field": field_name})
    ablator = ExpertAblator(model, mode=opts.mode, record=True)
    conds = conditions(ablator, opts)
    max_pos = getattr(ablator.config, "max_position_embeddings", None)
    seq_len = opts.seq_len or int(min(max_pos or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN))
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"`seq_len` {seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    prep = prepare(tokenizer, data, opts, seq_len, ensure_pad_token(tokenizer))
    D = len(prep.doc_labels)
    log(
        f"{D} documents, {prep.tokens} tokens, {len(prep.batches)} batches, {len(conds)} conditions + baseline"
    )

    groups = [np.flatnonzero(prep.doc_labels == i) for i in range(len(prep.domains))]
    W = resample_counts(groups, D, opts.bootstrap, opts.seed)
    scopes = [(name, groups[i]) for i, name in enumerate(prep.domains)] + [(ALL, np.arange(D))]

    with ablator:
        base = run_pass(model, ablator, prep)
        log(f"baseline: {base.seconds:.1f} s")
        share, tokens = load_shares(base, prep, ablator.spec)
        rows: list[dict[str, Any]] = []
        change_rows: list[dict[str, Any]] = []
        seconds = [base.seconds]
        for cond in conds:
            layer, experts = cond
            res = run_pass(model, ablator, prep, condition=cond, baseline=base)
            seconds.append(res.seconds)
            j = ablator.position(layer)
            label = experts_label(experts)
            log(f"layer {layer} experts {label}: {res.seconds:.1f} s")
            assert res.changed is not None and res.any_changed is not None
            assert res.downstream is not None and res.direct is not None
            for si, (scope, docs) in enumerate(scopes):
                dsel = slice(None) if scope == ALL else si
                n_tok = int(tokens[-1] if scope == ALL else tokens[si])
                cmp = compare(base.totals, res.totals, docs, W, opts.confidence)
                sign = HARM_SIGN[opts.rank_by]
                lo, hi = sign * cmp[f"delta_{opts.rank_by}_lo"], sign * cmp[f"delta_{opts.rank_by}_hi"]
                rows.append(
                    {
                        "layer": layer,
                        "moe_layer": j,
                        "experts": label,
                        "n_disabled": len(experts),
                        "mode": opts.mode,
                        "domain": scope,
                        "documents": len(docs),
                        "predictions": int(base.totals.n[docs].sum()),
                        "tokens": n_tok,
                        "load_share": float(share[-1 if scope == ALL else si, j, list(experts)].sum()),
                        "direct_share": _ratio(res.direct[dsel], n_tok),
                        "routing_changed_share": _ratio(res.any_changed[dsel], n_tok),
                        "downstream_changed_share": _ratio(res.downstream[dsel], n_tok),
                        **cmp,
                        "impact": sign * cmp[f"delta_{opts.rank_by}"] + 0.0,  # + 0.0: no negative zero
                        "impact_lo": min(lo, hi) + 0.0,
                        "impact_hi": max(lo, hi) + 0.0,
                    }
                )
            for t in range(ablator.spec.num_moe_layers):
                change_rows.append(
                    {
                        "layer": layer,
                        "experts": experts_label(experts),
                        "mode": opts.mode,
                        "observed_layer": ablator.spec.moe_layers[t],
                        "observed_moe_layer": t,
                        "changed_share": _ratio(res.changed[:, t], int(tokens[-1])),
                    }
                )

    baseline_rows = [
        {
            "domain": scope,
            "documents": len(docs),
            "predictions": int(base.totals.n[docs].sum()),
            **baseline_intervals(base.totals, docs, W, opts.confidence),
        }
        for scope, docs in scopes
    ]
    spec = ablator.spec
    load_rows = [
        {
            "domain": scope,
            "layer": spec.moe_layers[t],
            "moe_layer": t,
            "expert": e,
            "load_share": float(share[si, t, e]),
        }
        for si, (scope, _) in enumerate(scopes)
        for t in range(spec.num_moe_layers)
        for e in range(spec.num_experts)
    ]
    info = {
        "family": spec.family,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "moe_layers": list(spec.moe_layers),
        "mode": opts.mode,
        "rank_by": opts.rank_by,
        "documents": D,
        "tokens": prep.tokens,
        "predictions": int(base.totals.n.sum()),
        "domains": prep.domains,
        "seq_len": prep.seq_len,
        "batches": len(prep.batches),
        "conditions": len(conds),
        "bootstrap": opts.bootstrap,
        "confidence": opts.confidence,
        "seed": opts.seed,
        "resampling": "documents, stratified by domain, paired",
        "seconds_baseline": seconds[0],
        "seconds_conditions": float(sum(seconds[1:])),
        "tokens_per_second": float(prep.tokens * len(seconds) / max(sum(seconds), 1e-9)),
    }
    return AblationResult(
        pl.DataFrame(rows),
        pl.DataFrame(baseline_rows),
        pl.DataFrame(load_rows),
        pl.DataFrame(change_rows),
        info,
    )


def _ratio(count: Any, total: int) -> float:
    c = float(np.sum(count))
    return c / total if total else float("nan")
