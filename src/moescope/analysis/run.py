"""``moescope analyze`` as a library call: one streaming pass, then tables and figures.

Every selected analysis contributes an accumulator to a single :func:`run_pass`, so the trace is
read once whatever the number of analyses. Analyses whose columns are absent are skipped with a
note in ``summary.json`` rather than failing the run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from moescope.analysis import (
    cooccurrence,
    density,
    dependence,
    entropy,
    load,
    locality,
    specialisation,
    trajectories,
)
from moescope.analysis._stream import check_same_model, make_context, run_pass
from moescope.errors import ConfigError
from moescope.report.figures import save_figure, save_table
from moescope.trace.atomic import atomic_write_json
from moescope.trace.reader import Trace


@dataclass
class AnalyzeOptions:
    """What ``moescope analyze`` runs; defaults match the CLI."""

    analyses: list[str] = field(default_factory=lambda: list(ANALYSES))
    layers: list[int] | None = None
    domains: list[str] | None = None
    target_layer: int | None = None
    compare: Path | None = None
    distances: list[int] = field(default_factory=lambda: [1])
    min_count: int = 10
    permutations: int = 200
    max_tokens: int = 100_000
    tsne_points: int = 1000
    kde_kernel: str = "gaussian"
    kde_bandwidth: str = "scott"
    kde_trim: int | None = None
    kde_points: int = 2000
    per_expert_plots: bool = False
    biclusters: int = 4
    bicluster_method: str = "cocluster"
    seed: int = 0
    progress: bool = False


ANALYSES = (
    "load",
    "entropy",
    "cooccurrence",
    "repetition",
    "specialisation",
    "trajectories",
    "density",
    "dependence",
)


def _log(msg: str) -> None:
    sys.stderr.write(f"analyze: {msg}\n")


def run_analyses(trace_path: str | Path, out: str | Path, opts: AnalyzeOptions) -> dict[str, Any]:
    """Run ``opts.analyses`` on the trace, write CSV/PNG/JSON under ``out``; returns the summary."""
    out = Path(out)
    tr = Trace.open(trace_path)
    if opts.domains:
        tr = tr.filter(domain=opts.domains)
    ctx = make_context(tr, opts.layers)
    ids = ctx.layer_ids
    target = opts.target_layer if opts.target_layer is not None else ids[len(ids) // 2]
    if target not in ids:
        raise ConfigError(f"--target-layer: {target} is not among the analysed MoE layers {ids}")
    other = Trace.open(opts.compare) if opts.compare else None
    if other is not None:
        check_same_model(tr, other)
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    notes: list[str] = []
    summary: dict[str, Any] = {
        "trace": str(trace_path),
        "output": str(out),
        "tokens": tr.num_tokens,
        "layers": ids,
        "num_experts": ctx.E,
        "top_k": ctx.k,
        "router_kind": tr.routing.router_kind,
        "slots_ordered": ctx.ordered,
        "target_layer": target,
        "analyses": {},
    }
    params = {"trace": str(trace_path), "k": ctx.k, "num_experts": ctx.E, "seed": opts.seed}

    def table(df: pl.DataFrame, name: str) -> None:
        files.append(str(save_table(df, out / f"{name}.csv").name))

    def figure(fig: Any, df: pl.DataFrame, name: str, **extra: Any) -> None:
        files.extend(p.name for p in save_figure(fig, df, out / name, {**params, **extra}))

    want = set(opts.analyses)
    if not ctx.ordered:
        notes.append("slots are unordered in this trace: first-choice measures are null")
    if "entropy" in want and not tr.has_logits:
        notes.append("entropy skipped: the trace has no 'logits' column")
        want.discard("entropy")
    if "density" in want and not tr.has_logits:
        notes.append("density skipped: the trace has no 'logits' column")
        want.discard("density")

    accs: dict[str, Any] = {}
    if "load" in want:
        accs["load"] = load.LoadAccumulator(ctx)
    if "entropy" in want:
        accs["entropy"] = entropy.EntropyAccumulator(ctx)
    if "cooccurrence" in want:
        accs["transitions"] = cooccurrence.TransitionAccumulator(ctx, opts.distances)
        if ctx.k > 1:
            accs["coactivation"] = cooccurrence.CoactivationAccumulator(ctx)
        accs["token_transitions"] = cooccurrence.TokenTransitionAccumulator(ctx)
    if "repetition" in want:
        accs["repetition"] = locality.RepetitionAccumulator(ctx)
    if "specialisation" in want:
        accs["vocab"] = specialisation.VocabAccumulator(ctx)
        accs["domain"] = specialisation.DomainAccumulator(ctx)
    if "trajectories" in want:
        accs["trajectories"] = trajectories.TrajectoryAccumulator(ctx, opts.max_tokens, opts.seed)
    if "density" in want:
        n = opts.kde_points if other is not None else 2 * opts.kde_points
        accs["density"] = density.LogitSampleAccumulator(ctx, n, opts.seed)
    if "dependence" in want:
        accs["dependence"] = dependence.DependenceAccumulator(ctx, opts.max_tokens, opts.seed)
    _log(f"{tr.num_tokens} tokens, {ctx.Ls} layers, analyses: {', '.join(a for a in ANALYSES if a in want)}")
    run_pass(ctx, list(accs.values()), progress=opts.progress)

    if "load" in accs:
        per = accs["load"].result()
        summ = load.load_summary(per, ctx.k)
        table(per, "load_per_expert")
        table(summ, "load_per_layer")
        figure(
            load.plot_load(per, ctx.k, summ), per.select("layer", "expert", "assignment_share"), "load_bars"
        )
        figure(load.plot_load_heatmap(per), per.select("layer", "expert", "assignment_share"), "load_heatmap")
        figure(load.plot_balance_metrics(summ), summ.select("layer", "cv", "max_violation"), "load_imbalance")
        worst = summ.sort("cv", descending=True, nulls_last=True).row(0, named=True)
        summary["analyses"]["load"] = {
            "mean_cv": float(summ["cv"].mean()),
            "mean_max_violation": float(summ["max_violation"].mean()),
            "worst_layer": worst["layer"],
            "worst_cv": worst["cv"],
            "worst_top_expert": worst["top_expert"],
            "worst_top_expert_share": worst["top_expert_share"],
            "dead_experts": int(summ["dead_experts"].sum()),
            "aux_loss_pooled": load.aux_loss(per),
            "perfect_aux_loss": ctx.k,
        }
    if "entropy" in accs:
        res = accs["entropy"].result()
        table(res["by_layer"], "entropy_by_layer")
        figure(
            entropy.plot_entropy_by_layer(res["by_layer"]),
            res["by_layer"].select("layer", "mean_entropy_bits", "std_entropy_bits", "max_possible_bits"),
            "entropy_by_layer_plot",
        )
        h = res["histogram"].filter(pl.col("layer") == target)
        figure(
            entropy.plot_entropy_histogram(res["histogram"], res["by_layer"], target),
            h,
            f"entropy_histogram_layer{target}",
            target_layer=target,
        )
        table(res["histogram"], "entropy_histogram_all_layers")
        summary["analyses"]["entropy"] = entropy.entropy_summary(res["by_layer"])
    if "transitions" in accs:
        acc = accs["transitions"]
        res = acc.result()
        table(res["summary"], "cooccurrence_summary")
        if res["cells"].height:
            table(res["cells"], "cooccurrence_cells")
            figure(
                cooccurrence.plot_mi(res["summary"]),
                res["summary"].select(
                    "layer_from", "layer_to", "distance", "mi_bits", "mi_bias_bits", "mi_corrected_bits"
                ),
                "cooccurrence_mi",
            )
            pair = res["summary"].filter(pl.col("layer_from") == target).head(1)
            if pair.height == 0:
                pair = res["summary"].head(1)
            lf, lt = int(pair["layer_from"][0]), int(pair["layer_to"][0])
            names = acc.symbol_names()
            cells = res["cells"].filter((pl.col("layer_from") == lf) & (pl.col("layer_to") == lt))
            for value in ("p_row", "p_col", "p_joint", "lift"):
                figure(
                    cooccurrence.plot_transition(res["cells"], lf, lt, value, names, opts.min_count),
                    cells.select("i", "j", "symbol_from", "symbol_to", "count", value),
                    f"cooccurrence_L{lf}_L{lt}_{value}",
                    layer_from=lf,
                    layer_to=lt,
                    alphabet=acc.mode,
                    min_count=opts.min_count,
                )
            cooccurrence_extras(
                acc, res, accs.get("token_transitions"), lf, lt, opts.min_count, table, figure
            )
        s = res["summary"]
        summary["analyses"]["cooccurrence"] = {
            "alphabet": acc.mode,
            "symbols": acc.A,
            "mean_mi_bits": float(s["mi_bits"].mean()) if s.height else None,
            "mean_mi_corrected_bits": float(s["mi_corrected_bits"].mean()) if s.height else None,
            "mean_nmi": float(s["nmi"].mean()) if s.height and s["nmi"].null_count() < s.height else None,
        }
    if "coactivation" in accs:
        co = accs["coactivation"].result()
        table(co, "coactivation")
        g = co.filter(pl.col("layer") == target)
        figure(
            cooccurrence.plot_coactivation(co, target, ctx.E),
            g.select("a", "b", "p_b_given_a"),
            f"coactivation_layer{target}",
            target_layer=target,
        )
        summary["analyses"].setdefault("cooccurrence", {})["max_p_b_given_a"] = float(co["p_b_given_a"].max())
    if "repetition" in accs:
        rep = accs["repetition"].result()
        table(rep, "repetition")
        t5 = locality.table5(rep)
        table(t5, "repetition_table5")
        g = rep.filter(pl.col("domain") == "all")
        figure(locality.plot_repetition(rep), g, "repetition_by_layer")
        summary["analyses"]["repetition"] = {
            "first_choice_same_mean": float(g["first_choice_same"].mean())
            if g["first_choice_same"].null_count() < g.height
            else None,
            "first_choice_null": float(g["first_choice_null"][0]),
            "any_shared_mean": float(g["any_shared"].mean()),
            "any_shared_null": float(g["any_shared_null"][0]),
        }
    if "vocab" in accs:
        v = specialisation._vocab_frames(accs["vocab"], opts.min_count, 10)
        table(v["per_token"], "vocab_per_token")
        table(v["top_tokens"], "vocab_top_tokens")
        if v["summary"].height:
            figure(
                specialisation.plot_vocab_specialisation(v["summary"]),
                v["summary"],
                "vocab_specialisation",
                min_count=opts.min_count,
            )
        d = accs["domain"].result(opts.permutations, opts.seed)
        for name in ("share", "jsd", "test", "mi_by_layer"):
            table(d[name], f"domain_{name}")
        if len(tr.labels) > 1 and d["share"].height:
            g = d["share"].filter(pl.col("layer") == target)
            figure(
                specialisation.plot_domain_share(d["share"], target),
                g.select("domain", "expert", "token_fraction", "ratio_to_uniform"),
                f"domain_share_layer{target}",
                target_layer=target,
            )
        t = d["test"].row(0, named=True)
        vs = v["summary"]
        summary["analyses"]["specialisation"] = {
            "vocab_specialisation_weighted_mean": float(vs["specialisation_weighted"].mean())
            if vs.height
            else None,
            "uniform_fraction": ctx.k / ctx.E,
            "domain_mi_bits_mean": t["mi_bits_mean"],
            "domain_p_value": t["p_value"],
            "domain_test_note": t["note"],
        }
    if "trajectories" in accs:
        s = accs["trajectories"].result()
        full = s.top_paths(20)
        part = s.top_partial_paths(3 if ctx.Ls >= 3 else ctx.Ls, 20)
        table(full, "trajectory_paths_full")
        table(part, "trajectory_paths_partial")
        if full.height:
            figure(
                trajectories.plot_top_paths(full, "Most frequent full paths"),
                full,
                "trajectory_paths_full_plot",
            )
        if part.height:
            figure(
                trajectories.plot_top_paths(part, "Most frequent partial paths"),
                part,
                "trajectory_paths_partial_plot",
            )
        emb = s.embedding(tsne_points=opts.tsne_points, seed=opts.seed)
        color = "domain" if len(tr.labels) > 1 else "token_class"
        figure(
            trajectories.plot_embedding(emb, "pc1", "pc2", color, "PCA of path encodings"),
            emb.select("sample_index", "token_id", color, "pc1", "pc2", "pc1_variance", "pc2_variance"),
            "trajectory_pca",
            color=color,
        )
        if emb["tsne1"].null_count() < emb.height:
            e2 = emb.drop_nulls("tsne1")
            figure(
                trajectories.plot_embedding(e2, "tsne1", "tsne2", color, "t-SNE of path encodings"),
                e2.select("sample_index", "token_id", color, "tsne1", "tsne2"),
                "trajectory_tsne",
                color=color,
            )
        cur = s.typical_paths(8)
        if cur.height:
            figure(trajectories.plot_typical_curves(cur, ctx.E), cur, "trajectory_curves", ordering="E1 < E2")
            figure(trajectories.plot_curves_3d(cur, ctx.E), cur, "trajectory_curves_3d", ordering="E1 < E2")
        summary["analyses"]["trajectories"] = {
            "sampled_tokens": len(s.experts),
            "sample_rate": s.rate,
            "top_path_share": float(full["share"][0]) if full.height else None,
            "distinct_full_paths_in_top20": full.height,
        }
    if "density" in accs:
        samples = accs["density"].result()
        if other is None:
            fit_s = {k: x[: len(x) // 2] for k, x in samples.items()}
            score_s = {k: x[len(x) // 2 :] for k, x in samples.items()}
            scored_on = "held-out half of this trace's sample"
        else:
            fit_s = samples
            score_s = density.sample_logits(other, ids, max_points=opts.kde_points, seed=opts.seed + 1)
            scored_on = str(opts.compare)
        model = density.fit_from_samples(
            fit_s,
            num_experts=ctx.E,
            top_k=ctx.k,
            kernel=opts.kde_kernel,
            bandwidth=opts.kde_bandwidth,
            trim=opts.kde_trim,
            seed=opts.seed,
            source=str(trace_path),
        )
        files.extend(p.name for p in model.save(out / "density_model"))
        res = density.score_from_samples(model, score_s)
        for name in ("summary", "by_rank", "by_popularity"):
            table(res[name], f"density_pvalues_{name}")
        dist = density.logit_distributions(fit_s, tr.routing.router_kind)
        for q in ("raw_logit", "probability"):
            figure(
                density.plot_logit_distributions(dist, q),
                dist.filter(pl.col("quantity") == q),
                f"density_{q}_hist",
            )
        if "load" in accs:
            ws = per.select(
                "layer",
                "expert",
                "assignments",
                (pl.col("mean_router_weight") * pl.col("assignments")).alias("weight_sum"),
            )
            table(ws, "density_weight_sums_and_choice_counts")
            figure(density.plot_weight_sums_and_counts(ws), ws, "density_weight_sums_and_choice_counts_plot")
        summary["analyses"]["density_models"] = density_stage2(
            fit_s, score_s, ctx, opts, out, files, table, figure
        )
        kc = density.kernel_comparison(model, target)
        figure(density.plot_kernel_comparison(kc), kc, f"density_kernels_layer{target}", target_layer=target)
        ph = density.pvalue_histogram(res["p_values"])
        figure(
            density.plot_pvalues(ph, f"KDE p-values, scored on {scored_on}"),
            ph,
            "density_pvalues",
            kernel=opts.kde_kernel,
            bandwidth=opts.kde_bandwidth,
            trim=opts.kde_trim,
            scored_on=scored_on,
        )
        figure(
            density.plot_pvalue_groups(res["by_rank"], "rank", "Marginal p-values by k-th best logit"),
            res["by_rank"],
            "density_pvalues_by_rank",
        )
        figure(
            density.plot_pvalue_groups(
                res["by_popularity"], "popularity_rank", "Marginal p-values by expert popularity"
            ),
            res["by_popularity"],
            "density_pvalues_by_popularity",
        )
        if opts.per_expert_plots:
            for layer in ids:
                pe = density.per_expert_distributions(fit_s, layer)
                figure(density.plot_per_expert(pe), pe, f"density_per_expert_layer{layer}")
        summary["analyses"]["density"] = {
            "kernel": opts.kde_kernel,
            "trim": opts.kde_trim,
            "scored_on": scored_on,
            "mean_share_p_below_0.05": float(res["summary"]["share_p_below_0.05"].mean()),
            "mean_ks_stat_vs_uniform": float(res["summary"]["ks_stat_vs_uniform"].mean()),
        }
    if "dependence" in accs:
        summary["analyses"]["dependence"] = dependence.report(
            accs["dependence"].result(),
            target,
            permutations=opts.permutations,
            n_clusters=opts.biclusters,
            method=opts.bicluster_method,
            seed=opts.seed,
            table=table,
            figure=figure,
        )
    if other is not None:
        cmp = specialisation.compare_traces(tr, other, opts.layers, n_perm=opts.permutations, seed=opts.seed)
        for name in ("share", "jsd", "test"):
            table(cmp[name], f"compare_{name}")
        if cmp["jsd"].height:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6.5, 3.2))
            ax.plot(cmp["jsd"]["layer"], cmp["jsd"]["jsd_bits"], "o-")
            ax.set_xlabel("layer")
            ax.set_ylabel("JSD of expert loads (bits)")
            ax.set_title(f"{tr.path.name} vs {other.path.name}")
            fig.tight_layout()
            figure(fig, cmp["jsd"], "compare_jsd_by_layer", compare=str(opts.compare))
        t = cmp["test"].row(0, named=True)
        summary["analyses"]["compare"] = {
            "other": str(opts.compare),
            "mi_bits_mean": t["mi_bits_mean"],
            "p_value": t["p_value"],
            "mean_jsd_bits": float(cmp["jsd"]["jsd_bits"].mean()) if cmp["jsd"].height else None,
        }
    summary["notes"] = notes
    summary["files"] = sorted(set(files))
    atomic_write_json(out / "summary.json", _clean(summary))
    for n in notes:
        _log(n)
    return _clean(summary)


def density_stage2(
    fit_s: dict,
    score_s: dict,
    ctx: Any,
    opts: AnalyzeOptions,
    out: Path,
    files: list,
    table: Any,
    figure: Any,
) -> dict[str, Any]:
    """Seed 002 stage 2: full, ``_trimmed_{t}`` and per-kernel models fitted together, saved as
    ``density_model{suffix}`` and compared on the held-out vectors."""
    cmp, models = density.compare_models(
        fit_s, score_s, num_experts=ctx.E, top_k=ctx.k, bandwidth=opts.kde_bandwidth, seed=opts.seed
    )
    main_is_full = opts.kde_kernel == "gaussian" and opts.kde_trim is None
    for name, m in models.items():
        if name or not main_is_full:  # the full Gaussian model may be the main one, saved already
            files.extend(p.name for p in m.save(out / f"density_model{name or '_full'}"))
    table(cmp, "density_model_comparison")
    if "heldout_mean_logdensity" in cmp.columns:
        figure(density.plot_model_comparison(cmp), cmp, "density_model_comparison_plot")
        g = (
            cmp.drop_nulls("heldout_mean_logdensity")
            .group_by("model")
            .agg(pl.col("heldout_mean_logdensity").mean(), pl.col("ks_stat_vs_uniform").mean())
        )
        return {
            r["model"]: {k: r[k] for k in ("heldout_mean_logdensity", "ks_stat_vs_uniform")}
            for r in g.rows(named=True)
        }
    return {}


def cooccurrence_extras(
    acc: Any, res: dict[str, Any], tok: Any, lf: int, lt: int, min_count: int, table: Any, figure: Any
) -> None:
    """Seed 000's pitfall and token-to-token figures: every adjacent pair in a grid (row, column and
    joint normalisation), and the consecutive-token pair matrix beside the layer-to-layer one."""
    pairs = res["summary"].filter(pl.col("distance") == 1).select("layer_from", "layer_to").rows()
    cells = res["cells"].filter(pl.col("distance") == 1)
    for value in ("p_row", "p_col", "p_joint"):
        figure(
            cooccurrence.plot_transition_grid(cells, pairs, value, acc.A, min_count),
            cells.select("layer_from", "layer_to", "i", "j", "count", value),
            f"cooccurrence_all_pairs_{value}",
            min_count=min_count,
            alphabet=acc.mode,
        )
    if tok is None or tok.A != acc.A:
        return
    table(tok.result(), "cooccurrence_token_to_token_summary")
    ids = acc.ctx.layer_ids
    li = ids.index(lf)
    lc = cooccurrence.transition_matrix(res["cells"], lf, lt, "count", acc.A).astype(np.int64)
    tc = tok.matrices()[li]
    names = acc.symbol_names()
    a, b = np.meshgrid(np.arange(acc.A), np.arange(acc.A), indexing="ij")
    df = pl.DataFrame(
        {
            "i": a.ravel().astype(np.int32),
            "j": b.ravel().astype(np.int32),
            "symbol_i": [names[x] for x in a.ravel()],
            "symbol_j": [names[x] for x in b.ravel()],
            "layer_to_layer_count": lc.ravel(),
            "token_to_token_count": tc.ravel(),
        }
    )
    figure(
        cooccurrence.plot_layer_and_token_pairs(lc, tc, names, lf, lt),
        df,
        f"cooccurrence_layer_vs_token_L{lf}",
        layer=lf,
        next_layer=lt,
    )


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN becomes None, NumPy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def summary_text(s: dict[str, Any]) -> str:
    """A few lines a person can read: the headline number of each analysis."""
    a = s["analyses"]
    lines = [
        f"{s['trace']}: {s['tokens']} tokens, {len(s['layers'])} MoE layers, top-{s['top_k']} of {s['num_experts']}"
    ]

    def f(x: Any, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    if "load" in a:
        x = a["load"]
        lines.append(
            f"load: mean CV {f(x['mean_cv'])}, mean MaxVio {f(x['mean_max_violation'])}, worst layer "
            f"{x['worst_layer']} (expert {x['worst_top_expert']} takes {f(x['worst_top_expert_share'], '.1%')}),"
            f" {x['dead_experts']} dead; aux loss {f(x['aux_loss_pooled'])} (balanced = {x['perfect_aux_loss']})"
        )
    if "entropy" in a:
        x = a["entropy"]
        lines.append(
            f"entropy: mean {f(x['mean_entropy_bits'])} bits of max {f(x['max_possible_bits'])}; first layer "
            f"{f(x['first_layer_mean_bits'])}, last {f(x['last_layer_mean_bits'])}; range "
            f"{f(x['min_entropy_bits'])}-{f(x['max_entropy_bits'])}"
        )
    if "cooccurrence" in a:
        x = a["cooccurrence"]
        lines.append(
            f"co-occurrence ({x.get('alphabet')}): mean MI {f(x.get('mean_mi_bits'))} bits (bias-corrected "
            f"{f(x.get('mean_mi_corrected_bits'))}), mean NMI {f(x.get('mean_nmi'))}"
        )
    if "repetition" in a:
        x = a["repetition"]
        lines.append(
            f"repetition: first choice {f(x['first_choice_same_mean'], '.1%')} (null "
            f"{f(x['first_choice_null'], '.1%')}), any shared {f(x['any_shared_mean'], '.1%')} (null "
            f"{f(x['any_shared_null'], '.1%')})"
        )
    if "specialisation" in a:
        x = a["specialisation"]
        lines.append(
            f"specialisation: vocabulary {f(x['vocab_specialisation_weighted_mean'])} (uniform "
            f"{f(x['uniform_fraction'])}); domain MI {f(x['domain_mi_bits_mean'], '.4f')} bits, p = "
            f"{f(x['domain_p_value'], '.3g')}"
        )
    if "trajectories" in a:
        x = a["trajectories"]
        lines.append(
            f"trajectories: {x['sampled_tokens']} tokens sampled; top full path {f(x['top_path_share'], '.2%')}"
        )
    if "density" in a:
        x = a["density"]
        lines.append(
            f"density ({x['kernel']}): p < 0.05 for {f(x['mean_share_p_below_0.05'], '.1%')} of vectors "
            f"scored on {x['scored_on']}"
        )
    if a.get("dependence", {}).get("pairs"):
        x = a["dependence"]
        lines.append(
            f"dependence: mean |Pearson r| {f(x['mean_abs_pearson_r'])}; corrected MI {f(x['mean_mi_corrected_bits'])}"
            f" bits vs {f(x['mean_shuffled_mi_bits'])} shuffled (excess {f(x['mean_excess_mi_bits'])}),"
            f" p <= 0.05 for {x['pairs_p_below_0.05']} of {x['pairs']} pairs; co-cluster blocks hold "
            f"{f(x['mean_block_share'], '.0%')} (independence {f(x['mean_block_share_null'], '.0%')})"
        )
    if "compare" in a:
        x = a["compare"]
        lines.append(f"compare: mean JSD {f(x['mean_jsd_bits'], '.4f')} bits, p = {f(x['p_value'], '.3g')}")
    lines += [f"note: {n}" for n in s["notes"]]
    lines.append(f"{len(s['files'])} files in {s['output']}")
    return "\n".join(lines)
