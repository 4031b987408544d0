"""Sweeps over cache size, policy and prefetch budget, with the figures the issue asks for."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.simulate.auto import AutoPolicy
from moescope.simulate.deployment import Deployment, ModelCost, cache_capacity
from moescope.simulate.engine import prepare, run, step_prefetch
from moescope.simulate.policies import fit_on_replay_steps, make_policy
from moescope.trace.atomic import atomic_write_json

#: The policies a sweep compares by default (``moescope simulate --sweep`` adds ``auto`` with ``--train``).
SWEEP_POLICIES: tuple[str, ...] = (
    "lru",
    "lfu",
    "lrfu",
    "lru-protect",
    "static",
    "belady",
    "learned-reuse",
    "learned-reuse-admit",
    "next-use",
    "next-use-evict",
)


def sweep(
    trace: Any,
    deployment: Deployment,
    cost: ModelCost,
    *,
    fractions: Sequence[float] = (0.0625, 0.125, 0.25, 0.5, 0.75),
    policies: Sequence[str] = SWEEP_POLICIES,
    prefetchers: Sequence[Any] = (None,),
    mode: str = "decode",
    batch_size: int | None = None,
    shared: bool = False,
    reset: str = "none",
    fit_trace: Any = None,
) -> Any:
    """One summary row per (prefetcher, policy, cache fraction) as a Polars frame.

    ``prefetchers`` holds unfitted :class:`~moescope.simulate.prefetch.Prefetcher` objects (or None);
    each is fitted once on ``fit_trace`` (a training trace, ``"replayed"`` or ``None`` as in
    :func:`~moescope.simulate.engine.simulate`) and its predictions reused. The
    predictor-guided policies (``predictor_guided`` column) are fitted on ``fit_trace`` too.
    ``"auto"`` in ``policies`` (:class:`~moescope.simulate.auto.AutoPolicy`) chooses again at every
    cache size and prefetcher, on held-out documents of ``fit_trace``; its row's ``auto_choice``
    names the policy it chose.
    """
    import polars as pl

    from moescope.simulate.fitting import fit_source

    made = {name: fit_on_replay_steps(make_policy(name), mode, batch_size) for name in policies}
    fit_on = fit_source(trace, fit_trace, *made.values(), *prefetchers)
    steps = prepare(trace, mode=mode, batch_size=batch_size)
    # ``auto`` chooses per cache size and prefetcher, so it is fitted in the loop (its fits on the
    # held-out split are kept between cells)
    fitted = {name: pol if isinstance(pol, AutoPolicy) else pol.fit(fit_on) for name, pol in made.items()}
    chooses = any(isinstance(pol, AutoPolicy) for pol in fitted.values())
    rows: list[dict[str, Any]] = []
    for pf in prefetchers:
        pref, dist, pf_name, pf_given = None, 1, "none", pf
        if pf is not None:
            pf_given = copy.deepcopy(pf) if chooses else None  # auto fits its own copy, unfitted
            pf = pf.fit(fit_on)
            pref, dist, pf_name = step_prefetch(steps, pf.ranked(trace)), int(pf.distance), pf.describe()
        for frac in fractions:
            cap = cache_capacity(
                deployment, cost, trace.num_layers, trace.num_experts, fraction=frac, shared=shared
            )
            for _name, pol in fitted.items():
                if isinstance(pol, AutoPolicy):  # it chooses under each cell's conditions
                    pol.for_replay(
                        deployment=deployment,
                        cost=cost,
                        capacity=cap,
                        shared=shared,
                        mode=mode,
                        batch_size=batch_size,
                        reset=reset,
                        prefetcher=pf_given,
                    ).fit(fit_on)
                res = run(
                    steps,
                    pol,
                    cap,
                    deployment,
                    cost,
                    shared=shared,
                    prefetch=pref,
                    distance=dist,
                    prefetcher_name=pf_name,
                    reset=reset,
                )
                rows.append(
                    {
                        "cache_fraction": frac,
                        "predictor_guided": bool(pol.predictor_guided),
                        "predictor_s_per_layer": pol.critical_path_s(),
                        "auto_choice": pol.choice_ if isinstance(pol, AutoPolicy) else "",
                        **res.summary(),
                    }
                )
    return pl.DataFrame(rows)


def layer_miss_curves(
    steps: Any,
    policy: Any,
    deployment: Deployment,
    cost: ModelCost,
    capacities: Sequence[int],
) -> np.ndarray:
    """``(len(capacities), L)`` demand misses of every layer when each layer has ``c`` slots.

    Per-layer caches are independent, so one replay at ``c`` slots everywhere gives every layer's
    miss count at ``c``: the per-layer miss-ratio curves of ``policy`` (fitted) on ``steps``.
    """
    from moescope.simulate import kernel as K

    L = steps.num_layers
    out = np.zeros((len(capacities), L), np.int64)
    for i, c in enumerate(capacities):
        res = run(steps, policy, np.full(L, int(c), np.int64), deployment, cost)
        out[i] = res.counts[K.C_MISS]
    return out


def allocate_slots(curves: np.ndarray, capacities: Sequence[int], total: int) -> np.ndarray:
    """``(L,)`` slots per layer summing to ``total``: greedy marginal allocation on miss curves.

    Every layer starts at the smallest capacity of ``capacities`` (ascending, consecutive integers);
    each further slot goes to the layer whose misses drop most from it (ties: the lower layer). Fitted
    on a training trace's :func:`layer_miss_curves`, it moves slots from layers whose experts are
    reused little to layers where one more slot saves many loads (equal expert sizes assumed).
    """
    caps = np.asarray(capacities, np.int64)
    if caps.ndim != 1 or caps.size < 2 or (np.diff(caps) != 1).any():
        raise ValueError("capacities must be consecutive integers, ascending")
    n, L = curves.shape
    if n != caps.size:
        raise ValueError(f"curves have {n} rows for {caps.size} capacities")
    if not caps[0] * L <= total <= caps[-1] * L:
        raise ValueError(f"total {total} slots is outside [{caps[0] * L}, {caps[-1] * L}]")
    idx = np.zeros(L, np.int64)
    for _ in range(int(total - caps[0] * L)):
        gain = np.full(L, -np.inf)
        room = idx < n - 1
        gain[room] = curves[idx[room], np.flatnonzero(room)] - curves[idx[room] + 1, np.flatnonzero(room)]
        idx[int(np.argmax(gain))] += 1
    return caps[idx]


def plot_sweep(df: Any, stem: str | Path, params: dict[str, Any] | None = None) -> list[Path]:
    """Hit rate and tokens/s against cache size, one line per policy (and prefetcher): PNG + CSV each."""
    import matplotlib.pyplot as plt

    from moescope.core.figures import save_figure

    stem = Path(stem)
    written: list[Path] = []
    # one colour per policy, one line style per prefetcher, so that 18 lines stay readable
    policies = list(dict.fromkeys(df["policy"].to_list()))
    prefetchers = list(dict.fromkeys(df["prefetcher"].to_list()))
    colours = {pol: f"C{i % 10}" for i, pol in enumerate(policies)}
    styles = {pf: ("-", "--", ":", "-.")[i % 4] for i, pf in enumerate(prefetchers)}
    for metric, label in (("hit_rate", "hit rate"), ("tokens_per_s", "tokens / s")):
        data = df.select("prefetcher", "policy", "cache_fraction", "capacity_experts", metric)
        fig, ax = plt.subplots(figsize=(8.4, 4.2))
        for (pf, pol), part in data.group_by(["prefetcher", "policy"], maintain_order=True):
            part = part.sort("cache_fraction")
            ax.plot(
                part["cache_fraction"],
                part[metric],
                marker="o",
                markersize=3,
                color=colours[pol],
                linestyle=styles[pf],
                label=f"{pol} + {pf}" if pf != "none" else pol,
            )
        if metric == "tokens_per_s":
            for bound, style in (("tokens_per_s_all_in_gpu", ":"), ("tokens_per_s_no_cache", "--")):
                ax.axhline(
                    float(df[bound][0]),
                    color="grey",
                    linestyle=style,
                    label=bound.removeprefix("tokens_per_s_"),
                )
        ax.set_xlabel("cache size (share of all experts)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        out = stem.with_name(f"{stem.name}_{metric}")
        if metric == "tokens_per_s":
            data = data.with_columns(
                tokens_per_s_all_in_gpu=df["tokens_per_s_all_in_gpu"],
                tokens_per_s_no_cache=df["tokens_per_s_no_cache"],
            )
        written += save_figure(fig, data, out, dpi=120)
    if params:
        meta = stem.with_name(f"{stem.name}.json")
        atomic_write_json(meta, json.loads(json.dumps(params, default=str)))
        written.append(meta)
    return written


def prediction_pays(df: Any, fraction: float) -> dict[str, Any]:
    """At cache ``fraction`` of a :func:`sweep`: the best predictor-guided and predictor-free policy
    (without a prefetcher), LRFU and Belady, and a one-paragraph comparison in ``text``.

    The answer to "does prediction pay here?": the demo prints it for the bundled model.
    """
    import polars as pl

    near = pl.Series(np.isclose(df["cache_fraction"].to_numpy(), fraction))
    at = df.filter(near & (df["prefetcher"] == "none"))
    if not len(at):
        raise ValueError(f"the sweep has no row at cache fraction {fraction}")

    def best(rows: Any) -> dict[str, Any] | None:
        return rows.sort("tokens_per_s", descending=True).row(0, named=True) if len(rows) else None

    def named(name: str) -> dict[str, Any] | None:
        return best(at.filter(at["policy"].str.starts_with(name + "(") | (at["policy"] == name)))

    chosen = at["policy"] == "auto"
    guided = best(at.filter(at["predictor_guided"] & ~chosen))
    free = best(at.filter(~at["predictor_guided"] & ~at["policy"].str.starts_with("belady") & ~chosen))
    lrfu, belady, auto = named("lrfu"), named("belady"), best(at.filter(chosen))
    out = {"cache_fraction": fraction, "guided": guided, "free": free, "lrfu": lrfu, "belady": belady}
    out["auto"] = auto

    def line(label: str, r: dict[str, Any] | None) -> str:
        if r is None:
            return f"  {label}: not in the sweep"
        return f"  {label}: {r['policy']}, hit rate {r['hit_rate']:.3f}, {r['tokens_per_s']:.4g} tokens/s"

    lines = [f"cache {fraction:g} of the experts, no prefetch:"]
    lines += [
        line("best predictor-guided", guided),
        line("best predictor-free", free),
        line("LRFU", lrfu),
        line("Belady (offline ceiling)", belady),
    ]
    if auto is not None:
        lines.append(
            f"  auto (chosen on held-out training documents): {auto['auto_choice']}, "
            f"hit rate {auto['hit_rate']:.3f}, {auto['tokens_per_s']:.4g} tokens/s"
        )
    if guided and free and belady:
        g, f, b = guided["tokens_per_s"], free["tokens_per_s"], belady["tokens_per_s"]
        gap = (g - f) / (b - f) if b > f else float("nan")
        lines.append(
            f"  prediction {'pays' if g > f else 'does not pay'}: {100 * (g / f - 1):+.1f}% tokens/s, "
            f"{100 * gap:.0f}% of the gap to Belady closed"
        )
        out["gain"] = g / f - 1
        out["gap_closed"] = gap
    out["text"] = "\n".join(lines)
    return out
