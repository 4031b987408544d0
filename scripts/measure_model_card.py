"""Measure the bundled models and write their model cards (MODEL_CARD.md + card.json).

Every number on a card comes from this script: the architecture and parameter counts from the
saved model, training tokens and wall time from the model's ``training_log.json`` (written by
``scripts/train_tiny_moe.py``), and, on the committed held-out slices, the loss per domain next
to a unigram baseline, plus routing statistics read with forward hooks on the router modules.

The unigram baselines are token distributions of the training streams
(``build/train/tokens/*.npy``, add-0.5 smoothing) scored on the same held-out tokens: pooled over
all domains (what a model that ignores context would reach) and per domain (a context-free model
that is told the domain).

Example::

    python scripts/measure_model_card.py --max-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from moescope.data import BUNDLED_MODELS, bundled_model_path, corpus_domains, load_corpus  # noqa: E402

# No trailing newline: BPE merges a newline with the next line's indentation, so a bare newline
# token is rare in training and the models end the document after it.
PROMPTS = ["def fibonacci(n):", "And God said unto Moses,", "Y dijo Dios:", "ROMEO."]


def unigram_logprobs(token_dir: Path, vocab: int) -> dict[str, np.ndarray]:
    """log p(token), shape (V,), add-0.5 smoothing: per training stream and for all ("*") pooled."""
    files = sorted(token_dir.glob("*.npy"))
    if not files:
        raise SystemExit(f"no training token streams in {token_dir}: run scripts/train_tiny_moe.py first")
    counts = {f.stem: np.bincount(np.load(f).astype(np.int64), minlength=vocab)[:vocab] + 0.5 for f in files}
    counts["*"] = np.sum(list(counts.values()), axis=0)
    return {name: np.log(c / c.sum()) for name, c in counts.items()}


class RouterHooks:
    """Records each MoE layer's router input and chosen experts (from ``mlp.gate``'s own output)."""

    def __init__(self, model) -> None:
        self.gates = [layer.mlp.gate for layer in model.model.layers]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.gates]
        self.experts: list[list[torch.Tensor]] = [[] for _ in self.gates]
        self.handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, i: int):
        def hook(_module, args, output):
            self.inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))  # (N, H)
            self.experts[i].append(output[2].detach())  # (N, k)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def domain_tokens(tok, docs: list[str]) -> np.ndarray:
    """Documents tokenised as in training: no BOS, each followed by EOS."""
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    return np.fromiter((i for d in ids for i in [*d, tok.eos_token_id]), dtype=np.int64)


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two distributions."""
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def measure(name: str, path: Path, max_tokens: int, seq_len: int, token_dir: Path) -> dict:
    """Card numbers of the model saved at ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    log = json.loads((path / "training_log.json").read_text())
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    k = cfg.num_experts_per_tok
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    active = total - expert_params * (n_experts - k) / n_experts
    uni = unigram_logprobs(token_dir, len(tok))

    domains = corpus_domains()
    per_domain: dict[str, dict] = {}
    usage: dict[str, np.ndarray] = {}
    recall_num = np.zeros(cfg.num_hidden_layers - 1)
    recall_den = 0
    for domain in domains:
        ids = domain_tokens(tok, [t for t, _ in load_corpus(domains=[domain])])
        n_win = max(1, min(len(ids) - 1, max_tokens) // seq_len)
        windows = torch.from_numpy(ids[: n_win * seq_len + 1])
        x = torch.stack(
            [
                windows[i * seq_len : (i + 1) * seq_len + 1]
                for i in range(n_win)
                if (i + 1) * seq_len + 1 <= len(windows)
            ]
        )  # (W, T+1)
        hooks = RouterHooks(model)
        losses = []
        for b in range(0, len(x), 8):
            logits = model(input_ids=x[b : b + 8, :-1]).logits.float()  # (B, T, V)
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[b : b + 8, 1:].reshape(-1), reduction="none"
                )
            )
        hooks.close()
        loss = float(torch.cat(losses).mean())
        targets = x[:, 1:].reshape(-1).numpy()
        uni_loss = float(-uni["*"][targets].mean())
        uni_domain = float(-uni[domain][targets].mean()) if domain in uni else float("nan")
        experts = [torch.cat(e) for e in hooks.experts]  # L x (N, k)
        inputs = [torch.cat(h) for h in hooks.inputs]  # L x (N, H)
        usage[domain] = np.stack([np.bincount(e.reshape(-1).numpy(), minlength=n_experts) for e in experts])
        for layer in range(cfg.num_hidden_layers - 1):
            w_next = model.model.layers[layer + 1].mlp.gate.weight  # (E, H)
            pred = (inputs[layer] @ w_next.T).topk(k, dim=-1).indices  # (N, k)
            hit = (pred[:, :, None] == experts[layer + 1][:, None, :]).any(-1).sum(-1)  # (N,)
            recall_num[layer] += float(hit.sum()) / k
        recall_den += len(experts[0])
        per_domain[domain] = {
            "tokens": int(targets.size),
            "loss_nats": round(loss, 4),
            "perplexity": round(float(np.exp(loss)), 2),
            "unigram_loss_nats": round(uni_loss, 4),
            "domain_unigram_loss_nats": round(uni_domain, 4),
        }
        print(
            f"{name} {domain:10s} loss {loss:.3f} unigram {uni_loss:.3f} ({targets.size} tokens)",
            file=sys.stderr,
        )

    load = np.sum([u for u in usage.values()], axis=0)  # (L, E)
    cv = (load.std(axis=1) / load.mean(axis=1)).round(3).tolist()
    share = {d: u / u.sum(axis=1, keepdims=True) for d, u in usage.items()}
    js = {
        f"{a}|{b}": round(
            float(
                np.mean([js_divergence_bits(share[a][i], share[b][i]) for i in range(cfg.num_hidden_layers)])
            ),
            4,
        )
        for a, b in [("code", "bible_en"), ("code", "verse"), ("bible_en", "bible_es"), ("bible_en", "verse")]
    }
    samples = {}
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
        samples[prompt] = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return {
        "name": name,
        "family": cfg.model_type,
        "architecture": cfg.architectures[0] if cfg.architectures else cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_experts": n_experts,
        "top_k": k,
        "expert_intermediate_size": getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size,
        "vocab_size": len(tok),
        "parameters_total": int(total),
        "parameters_active_per_token": round(active),
        "weights_file_bytes": (path / "model.safetensors").stat().st_size,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "training_tokens": log["training_tokens"],
        "training_steps": log["train_config"]["steps"],
        "training_wall_time_s": log["wall_time_s"],
        "training_threads": log["threads"],
        "heldout": per_domain,
        "load_cv_per_layer": cv,
        "next_layer_gate_slot_recall": {
            "per_layer": (recall_num / recall_den).round(4).tolist(),
            "mean": round(float((recall_num / recall_den).mean()), 4),
            "chance": round(k / n_experts, 4),
        },
        "domain_js_divergence_bits_mean_over_layers": js,
        "samples": samples,
    }


def render(card: dict) -> str:
    """MODEL_CARD.md text for one model's numbers."""
    n = card
    rows = "\n".join(
        f"| {d} | {v['tokens']} | {v['loss_nats']:.3f} | {v['perplexity']:.1f} | {v['unigram_loss_nats']:.3f}"
        f" | {v['domain_unigram_loss_nats']:.3f} |"
        for d, v in n["heldout"].items()
    )
    recall = n["next_layer_gate_slot_recall"]
    per_layer = ", ".join(f"{r:.3f}" for r in recall["per_layer"])
    js = "\n".join(
        f"| {k.replace('|', ' vs ')} | {v:.4f} |"
        for k, v in n["domain_js_divergence_bits_mean_over_layers"].items()
    )
    samples = "\n\n".join(f"Prompt `{p!r}` →\n\n```\n{p}{s}\n```" for p, s in n["samples"].items())
    return f"""# {n["name"]}

A small Mixture-of-Experts language model bundled with moescope so that routing can be studied
offline. Trained from scratch on CPU by `scripts/train_tiny_moe.py` on a multi-domain corpus of
public-domain and permissively licensed text (`moescope/data/corpus/ATTRIBUTION.md`). It is a
research fixture, not a useful text generator.

All numbers below were written by `scripts/measure_model_card.py` (also in `card.json`).

## Architecture

| field | value |
|---|---|
| class | `{n["architecture"]}` (`model_type` {n["family"]}) |
| decoder layers (all MoE) | {n["num_hidden_layers"]} |
| hidden size | {n["hidden_size"]} |
| routed experts per layer | {n["num_experts"]} |
| experts per token (top-k) | {n["top_k"]} |
| expert FFN width | {n["expert_intermediate_size"]} |
| vocabulary (byte-level BPE) | {n["vocab_size"]} |
| parameters, total | {n["parameters_total"]:,} |
| parameters, active per token | {n["parameters_active_per_token"]:,} |
| weights file (float16 safetensors) | {n["weights_file_bytes"] / 1e6:.1f} MB |
| load-balancing loss coefficient | {n["router_aux_loss_coef"]} |

## Training

| field | value |
|---|---|
| training tokens | {n["training_tokens"]:,} ({n["training_steps"]} steps) |
| wall time | {n["training_wall_time_s"] / 60:.1f} min on {n["training_threads"]} CPU thread(s), shared machine |

Loads offline: `AutoModelForCausalLM.from_pretrained(moescope.data.bundled_model_path("{n["name"]}"))`.

## Held-out loss per domain

Cross-entropy in nats per token on the committed held-out slices (never seen in training),
next to unigram models scored on the same tokens: one fitted on all training tokens (what the
model would reach ignoring context) and one fitted on the domain's own training tokens (a
context-free model that is told the domain).

| domain | tokens | loss (nats) | perplexity | unigram, all (nats) | unigram, same domain (nats) |
|---|---|---|---|---|---|
{rows}

## Routing on the held-out slices

- Expert load coefficient of variation per layer (std/mean of assignment counts, ddof 0):
  {", ".join(f"{c:.3f}" for c in n["load_cv_per_layer"])}.
- Next layer's gate applied to this layer's gate input, distance 1, slot recall per layer
  (layer l predicts l+1): {per_layer}; mean {recall["mean"]:.3f} against chance k/E = {recall["chance"]:.3f}.
- Domain specialisation: Jensen-Shannon divergence (bits) between two domains' expert-usage
  distributions, mean over layers:

| domains | JS divergence (bits) |
|---|---|
{js}

## Greedy samples

{samples}

## Licence

Weights: Apache-2.0 (moescope's licence). Training text: see the corpus ATTRIBUTION.md.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=[*BUNDLED_MODELS, "all"], default="all", help="which card to write")
    ap.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored per domain")
    ap.add_argument("--seq-len", type=int, default=256, help="evaluation window (the training length)")
    ap.add_argument(
        "--tokens", type=Path, default=REPO / "build" / "train" / "tokens", help="training streams"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "--models-dir", type=Path, default=None, help="measure models here instead of the bundled ones"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = list(BUNDLED_MODELS) if args.model == "all" else [args.model]
    for name in names:
        path = args.models_dir / name if args.models_dir else bundled_model_path(name)
        card = measure(name, path, args.max_tokens, args.seq_len, args.tokens)
        (path / "card.json").write_text(
            json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (path / "MODEL_CARD.md").write_text(render(card), encoding="utf-8")
        print(f"wrote {path / 'MODEL_CARD.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
