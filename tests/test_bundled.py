"""The bundled corpus slices and models: load offline, generate, learned, and route with structure.

Routing is read with this file's own forward hooks on ``mlp.gate`` (independent of the capture
engine), written to a trace with TraceWriter and read back with ``Trace.iter_batches``. The
checks compare against plainly computed nulls: a unigram model, shuffled domain labels, and the
analytic chance k/E.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from moescope.data import BUNDLED_MODELS, bundled_model_path, corpus_domains, corpus_path, load_corpus
from moescope.errors import ConfigError, DataError, MoescopeError
from moescope.trace import RoutingSpec, Trace, TraceWriter
from moescope.trace.schema import default_columns
from moescope.trace.validate import validate_trace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ = 96  # tokens per document window in the routing tests
DOCS_PER_DOMAIN = 10
CODE, PROSE = "code", "bible_en"


# --------------------------------------------------------------------------- corpus


def test_corpus_has_labelled_domains_and_attribution():
    domains = corpus_domains()
    assert len(domains) >= 4
    assert {"code", "bible_en", "bible_es", "verse"} <= set(domains)
    attribution = (corpus_path() / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for domain in domains:
        assert f"| {domain} |" in attribution, domain
    docs = load_corpus()
    assert {d for _, d in docs} == set(domains)
    sizes = {d: sum(len(t) for t, dd in docs if dd == d) for d in domains}
    assert all(s > 10_000 for s in sizes.values()), sizes
    assert sum(sizes.values()) < 5_000_000, sizes  # a few MB in all
    assert all(t.strip() for t, _ in docs)


def test_load_corpus_max_chars_takes_whole_documents():
    full = load_corpus(domains=["verse"])
    small = load_corpus(domains=["verse"], max_chars=5000)
    assert 1 <= len(small) < len(full)
    assert small == full[: len(small)]
    assert sum(len(t) for t, _ in small[:-1]) < 5000 <= sum(len(t) for t, _ in small)


def test_held_out_bibles_are_parallel_chapters():
    recs = {}
    for domain in ("bible_en", "bible_es"):
        with (corpus_path() / f"heldout-{domain}.jsonl").open(encoding="utf-8") as fh:
            recs[domain] = {json.loads(line)["source"].split("#")[0] for line in fh}
    assert recs["bible_en"] == recs["bible_es"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"split": "train"}, "split 'train'"),
        ({"domains": ["klingon"]}, "klingon"),
        ({"max_chars": 0}, "max_chars"),
    ],
)
def test_load_corpus_bad_input(kwargs, needle):
    with pytest.raises(DataError, match=needle):
        load_corpus(**kwargs)


def test_bundled_model_path_unknown_name():
    with pytest.raises(ConfigError, match="tiny-mixtral, tiny-finegrained"):
        bundled_model_path("tiny-llama")
    assert issubclass(ConfigError, MoescopeError)


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module", params=BUNDLED_MODELS)
def bundled(request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_model_path(request.param)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return request.param, path, model, tok


def test_architecture_size_and_files(bundled):
    name, path, model, tok = bundled
    cfg = model.config
    assert (path / "model.safetensors").stat().st_size <= 25 * 2**20
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"F16", "BF16"}, dtypes
    assert (path / "MODEL_CARD.md").is_file() and (path / "card.json").is_file()
    if name == "tiny-mixtral":
        assert cfg.model_type == "mixtral"
        assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)
        assert cfg.num_hidden_layers >= 6
    else:
        assert cfg.model_type in ("qwen3_moe", "olmoe")
        assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 4
    assert cfg.router_aux_loss_coef > 0
    assert tok.bos_token and tok.eos_token and tok.pad_token
    assert len(tok) == cfg.vocab_size


def test_generates_text(bundled):
    _, _, model, tok = bundled
    enc = tok("def add(a, b):", return_tensors="pt", add_special_tokens=False)
    n_new = 16
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id
        )
    new = out[0, enc["input_ids"].shape[1] :]
    assert len(new) == n_new
    assert tok.decode(new, skip_special_tokens=True).strip()
    # Greedy decoding is the argmax of the model's own forward pass at every step (EOS masked,
    # as min_new_tokens asks).
    with torch.no_grad():
        logits = model(input_ids=out[:, :-1]).logits[0, enc["input_ids"].shape[1] - 1 :]  # (n_new, V)
    logits[:, tok.eos_token_id] = -float("inf")
    assert torch.equal(logits.argmax(-1), new)


def _windows(tok, domain: str) -> list[list[int]]:
    """First SEQ tokens of the first DOCS_PER_DOMAIN held-out documents with at least SEQ tokens."""
    return _split_domain(tok, domain)[0]


def _split_domain(tok, domain: str) -> tuple[list[list[int]], np.ndarray]:
    """The test windows, and every token of the domain's later held-out documents (not in a window)."""
    windows, rest = [], []
    for text, _ in load_corpus(domains=[domain]):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(windows) < DOCS_PER_DOMAIN:
            if len(ids) >= SEQ:
                windows.append(ids[:SEQ])
        else:
            rest.extend(ids)
    assert len(windows) == DOCS_PER_DOMAIN, domain
    return windows, np.asarray(rest)


def test_held_out_loss_beats_unigram(bundled):
    """The model uses context: its loss is far below a unigram model of the same domain.

    The unigram model is fitted (add-0.5 smoothing) on the domain's other held-out documents, so
    it knows the domain's vocabulary, which the language model must infer from context.
    """
    _, _, model, tok = bundled
    for domain in (CODE, PROSE):
        windows, rest = _split_domain(tok, domain)
        x = torch.tensor(windows)  # (D, SEQ)
        with torch.no_grad():
            logits = model(input_ids=x).logits[:, :-1]  # (D, SEQ-1, V): predicts x[:, 1:]
        targets = x[:, 1:].reshape(-1)
        loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets))
        counts = np.bincount(rest, minlength=len(tok)) + 0.5
        assert rest.size > 20_000, (domain, rest.size)
        unigram = float(-np.log(counts[targets.numpy()] / counts.sum()).mean())
        assert loss < unigram - 0.5, (domain, loss, unigram)


class _GateHooks:
    """Forward hooks on every ``mlp.gate``: router input (N, H) and chosen experts (N, k)."""

    def __init__(self, model):
        self.inputs, self.experts = {}, {}
        self.handles = [
            layer.mlp.gate.register_forward_hook(self._make(i)) for i, layer in enumerate(model.model.layers)
        ]

    def _make(self, i):
        def hook(_mod, args, output):
            self.inputs[i] = args[0].detach().reshape(-1, args[0].shape[-1])
            self.experts[i] = output[2].detach()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def routed(bundled, tmp_path_factory):
    """Route code and prose windows, write them as a trace, and keep the router inputs."""
    name, _, model, tok = bundled
    cfg = model.config
    E = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    k, L = cfg.num_experts_per_tok, cfg.num_hidden_layers
    windows = _windows(tok, CODE) + _windows(tok, PROSE)
    labels = [CODE] * DOCS_PER_DOMAIN + [PROSE] * DOCS_PER_DOMAIN
    x = torch.tensor(windows)  # (D, SEQ)
    hooks = _GateHooks(model)
    with torch.no_grad():
        model(input_ids=x)
    hooks.remove()
    experts = torch.stack([hooks.experts[i] for i in range(L)], dim=1).numpy()  # (D*SEQ, L, k)
    inputs = [hooks.inputs[i] for i in range(L)]
    spec = RoutingSpec(
        num_experts=E,
        top_k=k,
        moe_layers=list(range(L)),
        family=cfg.model_type,
        num_hidden_layers=L,
        module_paths=[f"model.layers.{i}.mlp" for i in range(L)],
    )
    out = tmp_path_factory.mktemp(name) / "trace"
    n = x.numel()
    with TraceWriter.create(out, spec, columns=default_columns(weights=False), model={"name": name}) as w:
        w.append(
            doc_id=np.repeat(np.arange(len(windows)), SEQ),
            position=np.tile(np.arange(SEQ), len(windows)),
            token_id=x.reshape(-1).numpy(),
            label=np.repeat(labels, SEQ).tolist(),
            experts=experts,
        )
        w.commit(len(windows) - 1)
    assert validate_trace(out) == []
    trace = Trace.open(out)
    assert trace.num_tokens == n
    return model, trace, inputs


def _doc_usage(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Per document, expert-usage counts per layer (D, L, E), and each document's label code (D,)."""
    E, L = trace.num_experts, trace.num_layers
    usage = np.zeros((0, L, E))
    doc_label = {}
    for b in trace.iter_batches(columns=["doc_id", "label", "experts"], batch_size=500):
        ndoc = int(b.doc_id.max()) + 1
        if ndoc > len(usage):
            usage = np.concatenate([usage, np.zeros((ndoc - len(usage), L, E))])
        for layer in range(L):
            idx = (b.doc_id[:, None] * E + b.experts[:, layer, :].astype(np.int64)).reshape(-1)
            usage[:, layer, :] += np.bincount(idx, minlength=len(usage) * E).reshape(len(usage), E)
        doc_label.update(zip(b.doc_id.tolist(), b.label.tolist(), strict=True))
    return usage, np.array([doc_label[d] for d in range(len(usage))])


def _mean_js_bits(usage: np.ndarray, is_a: np.ndarray) -> float:
    """Mean over layers of the Jensen-Shannon divergence (bits) between group A's and B's expert shares."""
    a = usage[is_a].sum(0)
    b = usage[~is_a].sum(0)
    p = a / a.sum(-1, keepdims=True)
    q = b / b.sum(-1, keepdims=True)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_pm = np.where(p > 0, p * np.log2(p / m), 0.0).sum(-1)
        kl_qm = np.where(q > 0, q * np.log2(q / m), 0.0).sum(-1)
    return float((0.5 * kl_pm + 0.5 * kl_qm).mean())


def test_domain_usage_differs_from_shuffled_label_null(routed):
    """Code and prose use experts differently: a permutation test over whole documents."""
    _, trace, _ = routed
    usage, label = _doc_usage(trace)
    is_code = label == trace.labels.index(CODE)
    assert is_code.sum() == DOCS_PER_DOMAIN
    observed = _mean_js_bits(usage, is_code)
    rng = np.random.default_rng(0)
    null = np.array([_mean_js_bits(usage, rng.permutation(is_code)) for _ in range(199)])
    p_value = (1 + np.sum(null >= observed)) / (1 + len(null))
    assert p_value <= 0.01, (observed, null.max(), p_value)
    assert observed > 3 * np.median(null), (observed, np.median(null))


def test_next_layer_gate_predicts_next_layer_far_above_chance(routed):
    """Layer l+1's gate applied to layer l's router input recovers layer l+1's experts (slot recall)."""
    model, trace, inputs = routed
    experts = trace.experts()  # (N, L, k), read back from the trace
    E, k, L = trace.num_experts, trace.top_k, trace.num_layers
    recalls = []
    for layer in range(L - 1):
        w_next = model.model.layers[layer + 1].mlp.gate.weight  # (E, H)
        pred = torch.nn.functional.linear(inputs[layer], w_next).topk(k, dim=-1).indices.numpy()  # (N, k)
        actual = experts[:, layer + 1, :]
        hits = (pred[:, :, None] == actual[:, None, :]).any(-1).sum(-1)  # (N,)
        recalls.append(hits.mean() / k)
    chance = k / E
    # Every layer beats chance by more than 10 binomial standard errors of a slot-level rate...
    stderr = np.sqrt(chance * (1 - chance) / (len(experts) * k))
    assert min(recalls) > chance + 10 * stderr, (recalls, chance, stderr)
    # ...and on average the prediction is far above chance.
    assert np.mean(recalls) > 2 * chance, (recalls, chance)
    # The same gate applied to the layer's own input reproduces the recorded choice exactly.
    w0 = model.model.layers[0].mlp.gate.weight
    same = torch.nn.functional.linear(inputs[0], w0).topk(k, dim=-1).indices.numpy()
    assert np.array_equal(np.sort(same, -1), np.sort(experts[:, 0, :].astype(np.int64), -1))
