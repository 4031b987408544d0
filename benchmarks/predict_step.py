"""CPU cost of one training step of the learned predictor's network, per (token, layer) cell.

Random DeepSeek-V2-Lite-shaped inputs (26 layers, top-6 of 64, window 2); each configuration is
``hidden depth dropout tokens_per_step``; reports the median CPU seconds of a forward + backward +
AdamW step (``time.process_time``, one torch thread, after one warm-up step) divided by the cells.
This is what sizes ``best``'s learned part (``moescope.predict.registry.BEST_LEARNED``).

    nice python benchmarks/predict_step.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moescope.predict._learned_net import Layout, Net, TokenLayout

L, E, K, W = 26, 64, 6, 2
CONFIGS = ["256,2,0.1,78", "256,2,0.0,78", "256,2,0.1,312", "256,2,0.0,312", "128,2,0.1,312", "128,2,0.0,312"]


def step_cost(hidden: int, depth: int, dropout: float, tokens: int, reps: int = 6) -> float:
    """Median CPU microseconds per (token, layer) cell of one training step."""
    torch.manual_seed(0)
    net = Net(
        Layout(L, E, 1, W, 0),
        TokenLayout(2000, 16384),
        torch.arange(2000),
        hidden=hidden,
        depth=depth,
        dropout=dropout,
        top_k=K,
        history_layers=0,
        use_same=True,
        use_token=True,
    )
    opt = torch.optim.AdamW([p for n, p in net.named_parameters() if n != "tokens"], fused=True)
    own = torch.stack([torch.randperm(E)[:K] for _ in range(tokens * L)]).view(tokens, L, K)
    prev = torch.randint(0, E + 1, (tokens, W, L, K))
    same = torch.randint(0, E + 1, (tokens, L, K))
    tok, ptok = torch.randint(0, 3000, (tokens,)), torch.randint(0, 3000, (tokens,))
    mode, dist = torch.zeros(tokens, L, dtype=torch.long), torch.ones(tokens, L, dtype=torch.long)
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        logits = net.grid(own, prev, same, tok, ptok, mode, dist, None)
        y = torch.zeros(tokens, L, E + 1).scatter_(2, own, 1.0)[..., :E]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.process_time() - t0)
    return float(np.median(times[1:])) * 1e6 / (tokens * L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=";".join(CONFIGS), help="hidden,depth,dropout,tokens;...")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for cfg in args.configs.split(";"):
        h, d, p, t = cfg.split(",")
        us = step_cost(int(h), int(d), float(p), int(t))
        print(
            f"hidden {h} depth {d} dropout {p} tokens/step {t} ({int(t) * L} cells): {us:.1f} us CPU per cell"
        )


if __name__ == "__main__":
    main()
