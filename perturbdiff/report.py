"""The report of an evaluation: ``summary.md`` and the PNG plots, from what `evaluate` computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluation import HEADLINE_METRICS
from .metrics import UNDEFINED_WHY, population_spread
from .files import atomic_write

__all__ = ["summary_text", "write_plots"]


def summary_text(aggregate, per_condition, data, model_name, population, pca, profile) -> str:
    """``summary.md``: the aggregate table (model vs baselines, best in bold) and the model per condition."""
    methods = aggregate["method"].tolist()
    agg = aggregate.set_index("method")
    lines = [
        "# PerturbDiff evaluation",
        "",
        f"{len(data.conditions)} conditions (perturbation, context) in {len(data.controls)} context(s); "
        f"cell-eval profile `{profile}`; population {population} scored by cell-eval; energy distance on "
        + (f"{pca.n_components_} PCs of the real data" if pca is not None else "genes")
        + " (mean over predicted populations). Mean over conditions; best per row in bold.",
        "",
        "| metric | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for metric, better in HEADLINE_METRICS:
        if metric not in agg.columns:
            continue
        values = agg[metric]
        # No bold when every method ties (e.g. all 0): nothing is best then.
        best = (values.max() if better == "max" else values.min()) if values.nunique() > 1 else None
        cells = [("–" if not np.isfinite(v) else (f"**{v:.4g}**" if v == best else f"{v:.4g}")) for v in values]
        lines.append(f"| {metric} {'↑' if better == 'max' else '↓'} | " + " | ".join(cells) + " |")
    undefined = [m for m, _ in HEADLINE_METRICS if m in agg.columns and not np.isfinite(agg[m]).any()
                 and not (m.startswith("discrimination") and len(data.conditions) < 2)]  # said once, below
    notes = [f"- {m}: undefined for every method ({UNDEFINED_WHY.get(m, 'no value could be computed')})" for m in undefined]
    if len(data.conditions) < 2:
        notes.append("- one condition only: the discrimination score (a rank among conditions) is not defined")
    if notes:
        lines += ["", "– marks a metric with no value. Here:", "", *notes]
    model = per_condition[per_condition["method"] == model_name]
    cols = [c for c in ("pearson_delta", "r2_delta", "energy_distance") if c in model.columns]
    lines += ["", f"## {model_name} per condition", "",
              "| perturbation | context | cells (real / pred) | " + " | ".join(cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
    for _, row in model.head(50).iterrows():
        vals = " | ".join("–" if not np.isfinite(row[c]) else f"{row[c]:.3g}" for c in cols)
        lines.append(f"| {row['perturbation']} | {row['context']} | {row['num_real_cells']} / {row['num_pred_cells']} | {vals} |")
    if len(model) > 50:
        lines.append(f"| … {len(model) - 50} more in metrics_per_condition.csv | | | |")
    return "\n".join(lines) + "\n"


def write_plots(out: Path, data, methods, per_condition, aggregate, pca, model_name, max_conditions, seed) -> dict:
    """The PNG plots (mean shifts, PCA of cells, aggregate metrics); returns name -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    # The conditions with the largest real effects are the informative ones to show.
    effect = {k: float(np.abs(data.real[k].mean(0) - data.controls[k[1]].mean(0)).sum()) for k in data.conditions}
    shown = sorted(data.conditions, key=lambda k: -effect[k])[:max_conditions]
    ncol = min(4, len(shown))
    nrow = int(np.ceil(len(shown) / ncol))
    model_cells = methods[model_name][0]
    reference = "additive_shift" if "additive_shift" in methods else None

    # 1. Predicted vs real mean shift per gene, per condition.
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.4 * nrow), squeeze=False)
    for ax, (p, c) in zip(axes.flat, shown):
        ctrl = data.controls[c].mean(0)
        real_d = data.real[(p, c)].mean(0) - ctrl
        if reference:
            ax.scatter(real_d, methods[reference][0][(p, c)].mean(0) - ctrl, s=5, c="0.7", label=reference)
        pred_d = model_cells[(p, c)].mean(0) - ctrl
        ax.scatter(real_d, pred_d, s=6, c="tab:red", label=model_name)
        lim = float(np.abs(np.concatenate([real_d, pred_d])).max()) * 1.05 or 1.0
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
        ax.axhline(0, c="0.85", lw=0.5)
        ax.axvline(0, c="0.85", lw=0.5)
        for g, offset in zip(np.argsort(-np.abs(real_d))[:3], ((4, 4), (4, -10), (-28, 4))):  # apart, not stacked
            ax.annotate(str(data.genes[g]), (real_d[g], pred_d[g]), xytext=offset, textcoords="offset points",
                        fontsize=7)
        r = np.corrcoef(real_d, pred_d)[0, 1] if real_d.std() > 0 and pred_d.std() > 0 else float("nan")
        ax.set_title(f"{p} | {c}\nr = {r:.2f}", fontsize=9)
        ax.set_xlabel("real Δ vs control (log1p units)", fontsize=8)
        ax.set_ylabel("predicted Δ (log1p units)", fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    files["mean_shift_plot"] = atomic_write(out / "mean_shift.png", lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)

    # 2. Real and predicted cells on the real data's PCA, per condition.
    if pca is not None and pca.n_components_ >= 2:
        rng = np.random.default_rng(seed)

        def sub(x, n=400):
            return x[rng.choice(len(x), n, replace=False)] if len(x) > n else x

        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.4 * nrow), squeeze=False)
        for ax, (p, c) in zip(axes.flat, shown):
            for x, color, label in ((data.controls[c], "0.75", "control"), (data.real[(p, c)], "tab:blue", "real"),
                                    (model_cells[(p, c)], "tab:red", model_name)):
                z = pca.transform(sub(x))
                ax.scatter(z[:, 0], z[:, 1], s=4, c=color, alpha=0.6, label=label, linewidths=0)
            ed = per_condition.query("method == @model_name and perturbation == @p and context == @c")["energy_distance"]
            ax.set_title(f"{p} | {c}\nenergy distance {model_name} vs real: {float(ed.iloc[0]):.3g} "
                         f"({pca.n_components_} PCs)", fontsize=8)
            ratio = pca.explained_variance_ratio_
            ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of the real cells' variance)", fontsize=8)
            ax.set_ylabel(f"PC2 ({ratio[1]:.0%})", fontsize=8)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, markerscale=3)
        fig.tight_layout()
        files["pca_plot"] = atomic_write(out / "pca.png", lambda p: fig.savefig(p, dpi=120, format="png"))
        plt.close(fig)

    # 3. Aggregate metrics, model vs baselines.
    metrics = [(m, b) for m, b in HEADLINE_METRICS if m in aggregate.columns]
    ncol3 = min(4, len(metrics))
    nrow3 = int(np.ceil(len(metrics) / ncol3))
    fig, axes = plt.subplots(nrow3, ncol3, figsize=(3.4 * ncol3, 2.6 * nrow3), squeeze=False)
    colors = ["tab:red"] + ["0.6"] * (len(aggregate) - 1)
    for ax, (m, better) in zip(axes.flat, metrics):
        values = aggregate[m].to_numpy(dtype=float)
        ax.set_title(f"{m} {'↑' if better == 'max' else '↓'}", fontsize=9)
        if not np.isfinite(values).any():  # an empty axis would read as a result: say why there is none
            ax.text(0.5, 0.5, "undefined for every method:\n" + UNDEFINED_WHY.get(m, "no value could be computed"),
                    ha="center", va="center", fontsize=7, color="0.3", wrap=True, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.barh(aggregate["method"], np.nan_to_num(values), color=colors)
        for y, v in enumerate(values):
            if not np.isfinite(v):
                ax.text(0, y, " n/a", va="center", fontsize=7, color="0.4")
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    files["metrics_plot"] = atomic_write(out / "metrics.png", lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)

    # 4. With several predicted populations: how far their means differ, per condition.
    spreads = {k: population_spread(np.stack(pops))[1:] for k, pops in methods[model_name][1].items()
               if len(pops) > 1 and len({len(x) for x in pops}) == 1}
    if spreads:
        names = [f"{p} | {c}" for p, c in spreads]
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(names) + 1.2))
        ax.barh(names, [v[0] for v in spreads.values()], color="tab:red", label="spread of the population means")
        ax.scatter([v[1] for v in spreads.values()], range(len(names)), marker="|", s=120, c="k",
                   label="spread from cell sampling alone")
        ax.set_xlabel("RMS over genes of the sd of population means (log1p units)", fontsize=8)
        ax.set_title(f"{model_name}: {len(next(iter(methods[model_name][1].values())))} predicted populations "
                     "per condition", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["population_spread_plot"] = atomic_write(out / "population_spread.png",
                                                       lambda p: fig.savefig(p, dpi=120, format="png"))
        plt.close(fig)
    return files
