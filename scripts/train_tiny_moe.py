"""Train moescope's two bundled MoE language models on CPU from the corpus of build_corpus.py.

Models (transformers' own classes, trained with the family's load-balancing loss through
``output_router_logits=True`` and ``router_aux_loss_coef``):

* ``tiny-mixtral``: MixtralForCausalLM, 8 experts, top-2, 6 layers (coarse-grained).
* ``tiny-finegrained``: Qwen3MoeForCausalLM, 32 experts, top-4, 6 layers (fine-grained).

Both share one byte-level BPE tokenizer trained on the corpus. Seeds are fixed: the same corpus,
``--steps`` and thread count reproduce the shipped weights' quality (CPU float kernels can
differ in the last bits between machines). Weights are saved as float16 safetensors with a
``training_log.json`` that records the run; ``scripts/measure_model_card.py`` writes the cards.

Example::

    python scripts/build_corpus.py
    nice -n 5 python scripts/train_tiny_moe.py --model tiny-mixtral --threads 1 &
    nice -n 5 python scripts/train_tiny_moe.py --model tiny-finegrained --threads 1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "src" / "moescope" / "data" / "models"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Training mixture over domains: HumanEval is tiny (80 K chars), so it gets a small share to
# avoid memorising it; the other four are close to even.
DOMAIN_WEIGHTS = {"code": 0.27, "humaneval": 0.03, "bible_en": 0.22, "bible_es": 0.22, "verse": 0.26}


@dataclass
class TrainConfig:
    """One model's architecture and optimisation settings."""

    name: str
    model_type: str
    arch: dict
    steps: int = 240
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3  # tiny models tolerate a large peak learning rate
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    extra: dict = field(default_factory=dict)


COMMON = {
    "num_hidden_layers": 6,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "output_router_logits": True,
}

CONFIGS = {
    "tiny-mixtral": TrainConfig(
        name="tiny-mixtral",
        model_type="mixtral",
        # Mixtral's own default aux coefficient (0.02) and top-2 of 8, as in Mixtral-8x7B.
        arch={
            **COMMON,
            "intermediate_size": 256,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.02,
            "sliding_window": None,
        },
    ),
    "tiny-finegrained": TrainConfig(
        name="tiny-finegrained",
        model_type="qwen3_moe",
        # Fine-grained: 32 narrow experts, top-4 with normalised top-k weights as in Qwen3-MoE.
        # Same expert parameter count per layer as tiny-mixtral (32 x 64 = 8 x 256). Aux coefficient
        # 0.01 (OLMoE's value; Qwen3's 0.001 let a model this small collapse onto few experts).
        arch={
            **COMMON,
            "head_dim": 32,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "num_experts": 32,
            "num_experts_per_tok": 4,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "router_aux_loss_coef": 0.01,
        },
    ),
}


# --------------------------------------------------------------------------- data


def read_corpus(path: Path) -> dict[str, list[str]]:
    """Training documents grouped by domain from build_corpus.py's train.jsonl."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: run scripts/build_corpus.py first")
    docs: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            docs.setdefault(rec["domain"], []).append(rec["text"])
    return docs


def train_tokenizer(docs: dict[str, list[str]], out: Path, vocab_size: int, sample_chars: int) -> None:
    """Byte-level BPE on an equal-size sample of each domain, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def sample():
        for texts in docs.values():
            n = 0
            for t in texts:
                yield t
                n += len(t)
                if n >= sample_chars:
                    break

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.model_max_length = 1024
    fast.save_pretrained(out)


def token_streams(
    docs: dict[str, list[str]], tok_dir: Path, cache: Path, max_chars: int
) -> dict[str, np.ndarray]:
    """Per domain, the concatenated token ids (documents separated by EOS), cached as .npy."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cache.mkdir(parents=True, exist_ok=True)
    streams = {}
    for domain, texts in docs.items():
        f = cache / f"{domain}.npy"
        if f.is_file():
            streams[domain] = np.load(f)
            continue
        chosen, n = [], 0
        for t in texts:  # documents are in source order; take whole documents up to the budget
            chosen.append(t)
            n += len(t)
            if n >= max_chars:
                break
        ids = tok(chosen, add_special_tokens=False)["input_ids"]
        arr = np.fromiter((i for doc in ids for i in [*doc, tok.eos_token_id]), dtype=np.uint16)
        np.save(f, arr)
        streams[domain] = arr
        print(f"  {domain}: {len(arr)} tokens from {n} chars", file=sys.stderr)
    return streams


def make_batch(streams: dict[str, np.ndarray], rng: np.random.Generator, cfg: TrainConfig) -> torch.Tensor:
    """A (B, T+1) batch: each row a random window of one domain drawn by DOMAIN_WEIGHTS."""
    names = list(streams)
    p = np.array([DOMAIN_WEIGHTS.get(n, 0.0) for n in names])
    p = p / p.sum()
    rows = []
    for d in rng.choice(len(names), size=cfg.batch_size, p=p):
        s = streams[names[d]]
        start = rng.integers(0, len(s) - cfg.seq_len - 1)
        rows.append(s[start : start + cfg.seq_len + 1].astype(np.int64))
    return torch.from_numpy(np.stack(rows))  # (B, T+1)


# --------------------------------------------------------------------------- training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(cfg: TrainConfig, streams: dict[str, np.ndarray], tok_dir: Path, out: Path, work: Path) -> dict:
    """Train one model and write it (float16 safetensors + tokenizer + training_log.json) to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mcfg = AutoConfig.for_model(
        cfg.model_type,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **cfg.arch,
    )
    model = AutoModelForCausalLM.from_config(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    print(f"{cfg.name}: {n_params / 1e6:.2f} M parameters, {cfg.steps} steps", file=sys.stderr)
    curve = []
    t0 = time.time()
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = make_batch(streams, rng, cfg)
        out_ = model(input_ids=batch[:, :-1], labels=batch[:, :-1])  # HF shifts labels internally
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == cfg.steps - 1:
            aux = out_.aux_loss.detach().item()
            lm = out_.loss.detach().item() - cfg.arch["router_aux_loss_coef"] * aux
            curve.append(
                {
                    "step": step,
                    "lm_loss": round(lm, 4),
                    "aux_loss": round(aux, 4),
                    "lr": lr_at(step, cfg),
                    "elapsed_s": round(time.time() - t0, 1),
                }
            )
            print(
                f"{cfg.name} step {step:5d} lm {lm:.3f} aux {aux:.3f} {time.time() - t0:7.0f}s",
                file=sys.stderr,
                flush=True,
            )
    wall = time.time() - t0
    log = {
        "name": cfg.name,
        "train_config": asdict(cfg),
        "domain_weights": DOMAIN_WEIGHTS,
        "parameters": n_params,
        "training_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "wall_time_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "curve": curve,
    }
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.to(torch.float16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"{cfg.name}: saved to {out} after {wall:.0f}s", file=sys.stderr)
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=[*CONFIGS, "all"], default="all", help="which model to train")
    ap.add_argument(
        "--corpus", type=Path, default=REPO / "build" / "corpus" / "train.jsonl", help="train.jsonl"
    )
    ap.add_argument("--work", type=Path, default=REPO / "build" / "train", help="tokenizer and token cache")
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="folder receiving one folder per model")
    ap.add_argument("--steps", type=int, default=None, help="override the number of optimisation steps")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    ap.add_argument("--max-chars", type=int, default=2_500_000, help="training text per domain (chars)")
    ap.add_argument("--prepare-only", action="store_true", help="only build the tokenizer and token cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    docs = read_corpus(args.corpus)
    tok_dir = args.work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        print("training tokenizer", file=sys.stderr)
        train_tokenizer(docs, tok_dir, args.vocab_size, sample_chars=1_500_000)
    streams = token_streams(docs, tok_dir, args.work / "tokens", args.max_chars)
    if args.prepare_only:
        return
    names = list(CONFIGS) if args.model == "all" else [args.model]
    for name in names:
        cfg = CONFIGS[name]
        if args.steps is not None:
            cfg.steps = args.steps
        train(cfg, streams, tok_dir, args.out / name, args.work)


if __name__ == "__main__":
    main()
