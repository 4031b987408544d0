"""The analyses ``moescope analyze`` runs, each computing, saving and summarising itself.

:data:`ANALYSES` is the one list (in run order: ``density`` reuses ``load``'s table); the command
line and :func:`~moescope.analysis.run.run_analyses` both read it. To add an analysis, write an
:class:`~moescope.analysis.base.Analysis` subclass (here or in its own module) and add it to the list.
"""

from __future__ import annotations

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
from moescope.analysis.base import Analysis, AnalysisRun, fmt


class LoadAnalysis(Analysis):
    """Expert load per layer: shares, imbalance (CV, MaxVio), dead experts, the auxiliary loss."""

    name = "load"
    reads_counts = True

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        self.acc = load.LoadAccumulator(run.ctx)
        return [self.acc]

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        per = self.acc.result()
        run.results["load_per_expert"] = per
        summ = load.load_summary(per, run.ctx.k)
        run.table(per, "load_per_expert")
        run.table(summ, "load_per_layer")
        shares = per.select("layer", "expert", "assignment_share")
        run.figure(load.plot_load(per, run.ctx.k, summ, variable_k=run.ctx.variable_k), shares, "load_bars")
        run.figure(load.plot_load_heatmap(per), shares, "load_heatmap")
        run.figure(
            load.plot_balance_metrics(summ), summ.select("layer", "cv", "max_violation"), "load_imbalance"
        )
        worst = summ.sort("cv", descending=True, nulls_last=True).row(0, named=True)
        return {
            "mean_cv": float(summ["cv"].mean()),
            "mean_max_violation": float(summ["max_violation"].mean()),
            "worst_layer": worst["layer"],
            "worst_cv": worst["cv"],
            "worst_top_expert": worst["top_expert"],
            "worst_top_expert_share": worst["top_expert_share"],
            "dead_experts": int(summ["dead_experts"].sum()),
            "aux_loss_pooled": load.aux_loss(per),
            "perfect_aux_loss": _mean_k(per) if run.ctx.variable_k else run.ctx.k,
        }

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        return (
            f"load: mean CV {fmt(x['mean_cv'])}, mean MaxVio {fmt(x['mean_max_violation'])}, worst layer "
            f"{x['worst_layer']} (expert {x['worst_top_expert']} takes {fmt(x['worst_top_expert_share'], '.1%')}),"
            f" {x['dead_experts']} dead; aux loss {fmt(x['aux_loss_pooled'])} (balanced = {x['perfect_aux_loss']})"
        )


def _mean_k(per: pl.DataFrame) -> float:
    """Mean experts per token of a variable-k trace (pooled over layers): a balanced router's aux loss."""
    layers = per.group_by("layer").agg(pl.col("tokens").first(), pl.col("assignments").sum())
    tokens = int(layers["tokens"].sum())
    return round(float(layers["assignments"].sum() / tokens), 4) if tokens else float("nan")


class EntropyAnalysis(Analysis):
    """Entropy of the router's distribution per token, by layer, with a histogram at the target layer."""

    name = "entropy"
    needs_logits = True

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        self.acc = entropy.EntropyAccumulator(run.ctx)
        return [self.acc]

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        res = self.acc.result()
        target = run.target
        run.table(res["by_layer"], "entropy_by_layer")
        run.figure(
            entropy.plot_entropy_by_layer(res["by_layer"]),
            res["by_layer"].select("layer", "mean_entropy_bits", "std_entropy_bits", "max_possible_bits"),
            "entropy_by_layer_plot",
        )
        run.figure(
            entropy.plot_entropy_histogram(res["histogram"], res["by_layer"], target),
            res["histogram"].filter(pl.col("layer") == target),
            f"entropy_histogram_layer{target}",
            target_layer=target,
        )
        run.table(res["histogram"], "entropy_histogram_all_layers")
        return entropy.entropy_summary(res["by_layer"])

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        return (
            f"entropy: mean {fmt(x['mean_entropy_bits'])} bits of max {fmt(x['max_possible_bits'])}; first layer "
            f"{fmt(x['first_layer_mean_bits'])}, last {fmt(x['last_layer_mean_bits'])}; range "
            f"{fmt(x['min_entropy_bits'])}-{fmt(x['max_entropy_bits'])}"
        )


class CooccurrenceAnalysis(Analysis):
    """Layer-to-layer transitions (mutual information, transition matrices) and within-layer co-activation."""

    name = "cooccurrence"

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        self.transitions = cooccurrence.TransitionAccumulator(run.ctx, run.opts.distances)
        self.coactivation = cooccurrence.CoactivationAccumulator(run.ctx) if run.ctx.k > 1 else None
        self.token_transitions = cooccurrence.TokenTransitionAccumulator(run.ctx)
        return [a for a in (self.transitions, self.coactivation, self.token_transitions) if a is not None]

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        acc, target = self.transitions, run.target
        res = acc.result()
        run.table(res["summary"], "cooccurrence_summary")
        if res["cells"].height:
            run.table(res["cells"], "cooccurrence_cells")
            run.figure(
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
            min_count = run.opts.min_count
            for value in ("p_row", "p_col", "p_joint", "lift"):
                run.figure(
                    cooccurrence.plot_transition(res["cells"], lf, lt, value, names, min_count),
                    cells.select("i", "j", "symbol_from", "symbol_to", "count", value),
                    f"cooccurrence_L{lf}_L{lt}_{value}",
                    layer_from=lf,
                    layer_to=lt,
                    alphabet=acc.mode,
                    min_count=min_count,
                )
            cooccurrence_extras(run, acc, res, self.token_transitions, lf, lt, min_count)
        s = res["summary"]
        entry: dict[str, Any] = {
            "alphabet": acc.mode,
            "symbols": acc.A,
            "mean_mi_bits": float(s["mi_bits"].mean()) if s.height else None,
            "mean_mi_corrected_bits": float(s["mi_corrected_bits"].mean()) if s.height else None,
            "mean_nmi": float(s["nmi"].mean()) if s.height and s["nmi"].null_count() < s.height else None,
        }
        if self.coactivation is not None:
            co = self.coactivation.result()
            run.table(co, "coactivation")
            run.figure(
                cooccurrence.plot_coactivation(co, target, run.ctx.E),
                co.filter(pl.col("layer") == target).select("a", "b", "p_b_given_a"),
                f"coactivation_layer{target}",
                target_layer=target,
            )
            entry["max_p_b_given_a"] = float(co["p_b_given_a"].max())
        return entry

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        return (
            f"co-occurrence ({x.get('alphabet')}): mean MI {fmt(x.get('mean_mi_bits'))} bits (bias-corrected "
            f"{fmt(x.get('mean_mi_corrected_bits'))}), mean NMI {fmt(x.get('mean_nmi'))}"
        )


class RepetitionAnalysis(Analysis):
    """How often consecutive tokens reuse experts, against the null of independent routing."""

    name = "repetition"

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        self.acc = locality.RepetitionAccumulator(run.ctx)
        return [self.acc]

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        rep = self.acc.result()
        run.table(rep, "repetition")
        run.table(locality.table5(rep), "repetition_table5")
        g = rep.filter(pl.col("domain") == "all")
        run.figure(locality.plot_repetition(rep, variable_k=run.ctx.variable_k), g, "repetition_by_layer")
        return {
            "first_choice_same_mean": float(g["first_choice_same"].mean())
            if g["first_choice_same"].null_count() < g.height
            else None,
            "first_choice_null": float(g["first_choice_null"][0]),
            "any_shared_mean": float(g["any_shared"].mean()),
            "any_shared_null": float(g["any_shared_null"][0]),
        }

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        return (
            f"repetition: first choice {fmt(x['first_choice_same_mean'], '.1%')} (null "
            f"{fmt(x['first_choice_null'], '.1%')}), any shared {fmt(x['any_shared_mean'], '.1%')} (null "
            f"{fmt(x['any_shared_null'], '.1%')})"
        )


class SpecialisationAnalysis(Analysis):
    """Vocabulary and domain specialisation of experts, with a permutation test on the domain labels."""

    name = "specialisation"

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        self.vocab = specialisation.VocabAccumulator(run.ctx)
        self.domain = specialisation.DomainAccumulator(run.ctx)
        return [self.vocab, self.domain]

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        opts, target = run.opts, run.target
        v = specialisation.vocab_frames(self.vocab, opts.min_count, 10)
        run.table(v["per_token"], "vocab_per_token")
        run.table(v["top_tokens"], "vocab_top_tokens")
        if v["summary"].height:
            run.figure(
                specialisation.plot_vocab_specialisation(v["summary"], variable_k=run.ctx.variable_k),
                v["summary"],
                "vocab_specialisation",
                min_count=opts.min_count,
            )
        d = self.domain.result(opts.permutations, opts.seed)
        for name in ("share", "jsd", "test", "mi_by_layer"):
            run.table(d[name], f"domain_{name}")
        if len(run.trace.labels) > 1 and d["share"].height:
            run.figure(
                specialisation.plot_domain_share(d["share"], target, variable_k=run.ctx.variable_k),
                d["share"]
                .filter(pl.col("layer") == target)
                .select("domain", "expert", "token_fraction", "ratio_to_uniform"),
                f"domain_share_layer{target}",
                target_layer=target,
            )
        t = d["test"].row(0, named=True)
        vs = v["summary"]
        return {
            "vocab_specialisation_weighted_mean": float(vs["specialisation_weighted"].mean())
            if vs.height
            else None,
            "uniform_fraction": float(vs["uniform_fraction"][0])
            if run.ctx.variable_k and vs.height
            else run.ctx.k / run.ctx.E,
            "domain_mi_bits_mean": t["mi_bits_mean"],
            "domain_p_value": t["p_value"],
            "domain_test_note": t["note"],
        }

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        return (
            f"specialisation: vocabulary {fmt(x['vocab_specialisation_weighted_mean'])} (uniform "
            f"{fmt(x['uniform_fraction'])}); domain MI {fmt(x['domain_mi_bits_mean'], '.4f')} bits, p = "
            f"{fmt(x['domain_p_value'], '.3g')}"
        )


class TrajectoriesAnalysis(Analysis):
    """Paths of experts through the layers: the most frequent, an embedding, sample curves."""

    name = "trajectories"

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        self.acc = trajectories.TrajectoryAccumulator(run.ctx, run.opts.max_tokens, run.opts.seed)
        return [self.acc]

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        opts, ctx = run.opts, run.ctx
        s = self.acc.result()
        full = s.top_paths(20)
        part = s.top_partial_paths(3 if ctx.Ls >= 3 else ctx.Ls, 20)
        run.table(full, "trajectory_paths_full")
        run.table(part, "trajectory_paths_partial")
        if full.height:
            run.figure(
                trajectories.plot_top_paths(full, "Most frequent full paths"),
                full,
                "trajectory_paths_full_plot",
            )
        if part.height:
            run.figure(
                trajectories.plot_top_paths(part, "Most frequent partial paths"),
                part,
                "trajectory_paths_partial_plot",
            )
        emb = s.embedding(tsne_points=opts.tsne_points, seed=opts.seed)
        color = "domain" if len(run.trace.labels) > 1 else "token_class"
        run.figure(
            trajectories.plot_embedding(emb, "pc1", "pc2", color, "PCA of path encodings"),
            emb.select("sample_index", "token_id", color, "pc1", "pc2", "pc1_variance", "pc2_variance"),
            "trajectory_pca",
            color=color,
        )
        if emb["tsne1"].null_count() < emb.height:
            e2 = emb.drop_nulls("tsne1")
            run.figure(
                trajectories.plot_embedding(e2, "tsne1", "tsne2", color, "t-SNE of path encodings"),
                e2.select("sample_index", "token_id", color, "tsne1", "tsne2"),
                "trajectory_tsne",
                color=color,
            )
        cur = s.typical_paths(8)
        if cur.height:
            run.figure(
                trajectories.plot_typical_curves(cur, ctx.E), cur, "trajectory_curves", ordering="E1 < E2"
            )
            run.figure(
                trajectories.plot_curves_3d(cur, ctx.E), cur, "trajectory_curves_3d", ordering="E1 < E2"
            )
        return {
            "sampled_tokens": len(s.experts),
            "sample_rate": s.rate,
            "top_path_share": float(full["share"][0]) if full.height else None,
            "distinct_full_paths_in_top20": full.height,
        }

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        return f"trajectories: {x['sampled_tokens']} tokens sampled; top full path {fmt(x['top_path_share'], '.2%')}"


class DensityAnalysis(Analysis):
    """A kernel density model of router logits, scored on held-out vectors (or on ``compare``'s trace)."""

    name = "density"
    needs_logits = True

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        n = run.opts.kde_points if run.other is not None else 2 * run.opts.kde_points
        self.acc = density.LogitSampleAccumulator(run.ctx, n, run.opts.seed)
        return [self.acc]

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        opts, target = run.opts, run.target
        samples = self.acc.result()
        if run.other is None:
            fit_s = {k: x[: len(x) // 2] for k, x in samples.items()}
            score_s = {k: x[len(x) // 2 :] for k, x in samples.items()}
            scored_on = "held-out half of this trace's sample"
        else:
            fit_s = samples
            score_s = density.sample_logits(
                run.other, run.ctx.layer_ids, max_points=opts.kde_points, seed=opts.seed + 1
            )
            scored_on = str(opts.compare)
        model = density.fit_from_samples(
            fit_s,
            num_experts=run.ctx.E,
            top_k=run.ctx.k,
            kernel=opts.kde_kernel,
            bandwidth=opts.kde_bandwidth,
            trim=opts.kde_trim,
            seed=opts.seed,
            source=str(run.trace_path),
        )
        run.files.extend(p.name for p in model.save(run.out / "density_model"))
        res = density.score_from_samples(model, score_s)
        for name in ("summary", "by_rank", "by_popularity"):
            run.table(res[name], f"density_pvalues_{name}")
        dist = density.logit_distributions(fit_s, run.trace.routing.router_kind)
        for q in ("raw_logit", "probability"):
            run.figure(
                density.plot_logit_distributions(dist, q),
                dist.filter(pl.col("quantity") == q),
                f"density_{q}_hist",
            )
        per = run.results.get("load_per_expert")
        if per is not None:
            ws = per.select(
                "layer",
                "expert",
                "assignments",
                (pl.col("mean_router_weight") * pl.col("assignments")).alias("weight_sum"),
            )
            run.table(ws, "density_weight_sums_and_choice_counts")
            run.figure(
                density.plot_weight_sums_and_counts(ws, variable_k=run.ctx.variable_k),
                ws,
                "density_weight_sums_and_choice_counts_plot",
            )
        self.models = density_stage2(run, fit_s, score_s)
        kc = density.kernel_comparison(model, target)
        run.figure(
            density.plot_kernel_comparison(kc), kc, f"density_kernels_layer{target}", target_layer=target
        )
        ph = density.pvalue_histogram(res["p_values"])
        run.figure(
            density.plot_pvalues(ph, f"KDE p-values, scored on {scored_on}"),
            ph,
            "density_pvalues",
            kernel=opts.kde_kernel,
            bandwidth=opts.kde_bandwidth,
            trim=opts.kde_trim,
            scored_on=scored_on,
        )
        run.figure(
            density.plot_pvalue_groups(res["by_rank"], "rank", "Marginal p-values by k-th best logit"),
            res["by_rank"],
            "density_pvalues_by_rank",
        )
        run.figure(
            density.plot_pvalue_groups(
                res["by_popularity"], "popularity_rank", "Marginal p-values by expert popularity"
            ),
            res["by_popularity"],
            "density_pvalues_by_popularity",
        )
        if opts.per_expert_plots:
            for layer in run.ctx.layer_ids:
                pe = density.per_expert_distributions(fit_s, layer)
                run.figure(density.plot_per_expert(pe), pe, f"density_per_expert_layer{layer}")
        return {
            "kernel": opts.kde_kernel,
            "trim": opts.kde_trim,
            "scored_on": scored_on,
            "mean_share_p_below_0.05": float(res["summary"]["share_p_below_0.05"].mean()),
            "mean_ks_stat_vs_uniform": float(res["summary"]["ks_stat_vs_uniform"].mean()),
            "models": self.models,
        }

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        return (
            f"density ({x['kernel']}): p < 0.05 for {fmt(x['mean_share_p_below_0.05'], '.1%')} of vectors "
            f"scored on {x['scored_on']}"
        )


class DependenceAnalysis(Analysis):
    """Seed 000's three correlations between layers (Pearson, Spearman, MI against a shuffle) and a
    spectral co-clustering of the expert-pair co-occurrence."""

    name = "dependence"

    def accumulators(self, run: AnalysisRun) -> list[Any]:
        self.acc = dependence.DependenceAccumulator(run.ctx, run.opts.max_tokens, run.opts.seed)
        return [self.acc]

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        opts = run.opts
        return dependence.report(
            self.acc.result(),
            run.target,
            permutations=opts.permutations,
            n_clusters=opts.biclusters,
            method=opts.bicluster_method,
            seed=opts.seed,
            table=run.table,
            figure=run.figure,
        )

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        if not x.get("pairs"):
            return "dependence: no layer pair"
        return (
            f"dependence: mean |Pearson r| {fmt(x['mean_abs_pearson_r'])}; corrected MI {fmt(x['mean_mi_corrected_bits'])}"
            f" bits vs {fmt(x['mean_shuffled_mi_bits'])} shuffled (excess {fmt(x['mean_excess_mi_bits'])}),"
            f" p <= 0.05 for {x['pairs_p_below_0.05']} of {x['pairs']} pairs; co-cluster blocks hold "
            f"{fmt(x['mean_block_share'], '.0%')} (independence {fmt(x['mean_block_share_null'], '.0%')})"
        )


class CompareAnalysis(Analysis):
    """Expert loads of this trace against a second trace of the same model (runs when ``compare`` is set)."""

    name = "compare"
    selectable = False

    def skip_reason(self, run: AnalysisRun) -> str | None:
        return "" if run.other is None else None  # "": not asked for, no note

    def finish(self, run: AnalysisRun) -> dict[str, Any]:
        opts, tr, other = run.opts, run.trace, run.other
        assert other is not None
        cmp = specialisation.compare_traces(tr, other, opts.layers, n_perm=opts.permutations, seed=opts.seed)
        for name in ("share", "jsd", "test"):
            run.table(cmp[name], f"compare_{name}")
        if cmp["jsd"].height:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6.5, 3.2))
            ax.plot(cmp["jsd"]["layer"], cmp["jsd"]["jsd_bits"], "o-")
            ax.set_xlabel("layer")
            ax.set_ylabel("JSD of expert loads (bits)")
            ax.set_title(f"{tr.path.name} vs {other.path.name}")
            fig.tight_layout()
            run.figure(fig, cmp["jsd"], "compare_jsd_by_layer", compare=str(opts.compare))
        t = cmp["test"].row(0, named=True)
        return {
            "other": str(opts.compare),
            "mi_bits_mean": t["mi_bits_mean"],
            "p_value": t["p_value"],
            "mean_jsd_bits": float(cmp["jsd"]["jsd_bits"].mean()) if cmp["jsd"].height else None,
        }

    @staticmethod
    def describe(x: dict[str, Any]) -> str:
        return f"compare: mean JSD {fmt(x['mean_jsd_bits'], '.4f')} bits, p = {fmt(x['p_value'], '.3g')}"


def density_stage2(run: AnalysisRun, fit_s: dict, score_s: dict) -> dict[str, Any]:
    """Seed 002 stage 2: full, ``_trimmed_{t}`` and per-kernel models fitted together, saved as
    ``density_model{suffix}`` and compared on the held-out vectors."""
    ctx, opts = run.ctx, run.opts
    cmp, models = density.compare_models(
        fit_s, score_s, num_experts=ctx.E, top_k=ctx.k, bandwidth=opts.kde_bandwidth, seed=opts.seed
    )
    main_is_full = opts.kde_kernel == "gaussian" and opts.kde_trim is None
    for name, m in models.items():
        if name or not main_is_full:  # the full Gaussian model may be the main one, saved already
            run.files.extend(p.name for p in m.save(run.out / f"density_model{name or '_full'}"))
    run.table(cmp, "density_model_comparison")
    if "heldout_mean_logdensity" in cmp.columns:
        run.figure(density.plot_model_comparison(cmp), cmp, "density_model_comparison_plot")
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
    run: AnalysisRun, acc: Any, res: dict[str, Any], tok: Any, lf: int, lt: int, min_count: int
) -> None:
    """Seed 000's pitfall and token-to-token figures: every adjacent pair in a grid (row, column and
    joint normalisation), and the consecutive-token pair matrix beside the layer-to-layer one."""
    pairs = res["summary"].filter(pl.col("distance") == 1).select("layer_from", "layer_to").rows()
    cells = res["cells"].filter(pl.col("distance") == 1)
    for value in ("p_row", "p_col", "p_joint"):
        run.figure(
            cooccurrence.plot_transition_grid(cells, pairs, value, acc.A, min_count),
            cells.select("layer_from", "layer_to", "i", "j", "count", value),
            f"cooccurrence_all_pairs_{value}",
            min_count=min_count,
            alphabet=acc.mode,
        )
    if tok is None or tok.A != acc.A:
        return
    run.table(tok.result(), "cooccurrence_token_to_token_summary")
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
    run.figure(
        cooccurrence.plot_layer_and_token_pairs(lc, tc, names, lf, lt),
        df,
        f"cooccurrence_layer_vs_token_L{lf}",
        layer=lf,
        next_layer=lt,
    )


#: Every analysis, in run order; the selectable ones are ``moescope analyze --analyses`` choices.
ANALYSES: dict[str, type[Analysis]] = {
    cls.name: cls
    for cls in (
        LoadAnalysis,
        EntropyAnalysis,
        CooccurrenceAnalysis,
        RepetitionAnalysis,
        SpecialisationAnalysis,
        TrajectoriesAnalysis,
        DensityAnalysis,
        DependenceAnalysis,
        CompareAnalysis,
    )
}

#: The names a user may choose (``AnalyzeOptions.analyses``, ``--analyses``).
ANALYSIS_NAMES: tuple[str, ...] = tuple(n for n, cls in ANALYSES.items() if cls.selectable)
