"""Evaluation: predicted vs real perturbed cells, beside simple baselines.

``evaluate(pred, real, train)`` (and ``perturbdiff evaluate``) scores every *condition* =
(perturbation, context) present in both the prediction and the held-out truth:

- Arc Institute's cell-eval metrics (``cell-eval`` package), run per context with that context's
  control cells as the reference: pearson_delta, mse / mae (and their delta versions),
  overlap_at_N / precision_at_N of DE genes (Wilcoxon, BH FDR 0.05), de_direction_match,
  de_spearman_lfc_sig, de_spearman_sig, roc_auc / pr_auc, ...
- the discrimination score (l1, l2, cosine) with cell-eval's formula but ranked among *all*
  evaluated conditions, not only the perturbations of one context;
- R² of the mean profile (``r2_mean``) and of the mean shift from control (``r2_delta``);
- the energy distance between predicted and real cells in a PCA of the real data
  (``energy_distance``; mean and sd over predicted populations).

The same metrics are computed for the baselines of `perturbdiff.baselines` (control mean,
perturbation mean, additive shift, context mean), built on the same split with the context's
control cells from ``real`` (else from ``train``); a baseline that cannot be formed for a
condition falls back to the controls and is flagged in the ``fallback`` column. `report` writes
``summary.md`` and the plots.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .baselines import BASELINES, TRAIN_BASELINES, baseline_cells, train_stats
from .expression import Normalization, detect_input_space, gene_columns, to_model_space
from .features import as_table, compose, parts, read_table
from .files import atomic_write, read_h5ad
from .losses import energy_distance
from .metrics import DISCRIMINATION, discrimination, r2, realism

__all__ = ["Evaluation", "evaluate", "BASELINES", "HEADLINE_METRICS", "add_parser"]

# (metric, better) shown in the summary; "max" = higher is better.
HEADLINE_METRICS = (
    ("pearson_delta", "max"),
    ("mse", "min"),
    ("mae", "min"),
    ("discrimination_score_l1", "max"),
    ("overlap_at_N", "max"),
    ("precision_at_N", "max"),
    ("de_direction_match", "max"),
    ("de_spearman_lfc_sig", "max"),
    ("roc_auc", "max"),
    ("pr_auc", "max"),
    ("r2_mean", "max"),
    ("r2_delta", "max"),
    ("energy_distance", "min"),
    ("zero_fraction_gap", "min"),
    ("above_real_max", "min"),
)
# Clustering agreement needs Leiden over many perturbations per context and is slow and unstable
# on small test sets; our discrimination scores replace cell-eval's per-context ones.
_SKIP_CELL_EVAL = ["clustering_agreement"]
_KEY_COLS = ["method", "perturbation", "context"]
# One value per context (a correlation across its perturbations), repeated on each condition.
_PER_CONTEXT_CORRELATIONS = ["pearson_edistance", "de_spearman_sig"]
# cell-eval refuses non-integer data with values >= 15 as "not log1p-normalised".
_CELL_EVAL_MAX = 15.0


@dataclass
class Evaluation:
    """What :func:`evaluate` returns.

    Attributes:
        per_condition: one row per (method, perturbation, context) with every metric.
        aggregate: one row per method: the mean of each metric over conditions (``num_conditions``).
        summary: the markdown summary (model vs baselines); files: name -> path of each file written.
    """

    per_condition: pd.DataFrame
    aggregate: pd.DataFrame
    summary: str
    files: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- data preparation
@dataclass
class _Data:
    genes: np.ndarray
    conditions: list[tuple[str, str]]
    real: dict  # condition -> real cells [n, G] (log1p)
    controls: dict  # context -> reference control cells [n, G]
    control_source: dict  # context -> "real" | "train"
    pred_pops: dict  # condition -> list of predicted cells per population
    pred_eval: dict  # condition -> predicted cells scored by cell-eval
    train: dict | None  # sums / counts per (perturbation, context) and control means
    target_sum: float = 1e4  # the space's per-cell total (log1p(counts / total * target_sum))


def _dense(X) -> np.ndarray:
    return (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float32, copy=False)


def log1p_matrix(adata, genes, target_sum: float, name: str, *, prediction: bool = False) -> np.ndarray:
    """X as dense log1p(counts / total * target_sum), columns in ``genes`` order.

    Real data (counts or log1p) go through `to_model_space`, the route training and prediction
    take: each cell is normalised over all genes of its file. A ``prediction`` already in log1p
    space is taken as written (it is the model's output, not data to renormalise).
    """
    X = adata.X
    if X is None:
        raise ValueError(f"{name}: the AnnData has no X")
    space = detect_input_space(X, what=f"{name} expression")
    cols = gene_columns(adata.var_names.astype(str), genes, what=name)
    if (cols < 0).any():
        missing = [g for g, c in zip(genes, cols) if c < 0]
        raise ValueError(f"{name}: {len(missing)} of the prediction's {len(genes)} genes are missing "
                         f"({len(genes) - len(missing)} shared; e.g. {missing[:5]})")
    if prediction and space == "log1p":
        out = _dense(X[:, cols])
    else:
        out, _ = to_model_space(X, cols, space, Normalization(target_sum=target_sum, log1p=True, scale=1.0))
    vmax = float(out.max()) if out.size else 0.0
    if vmax >= _CELL_EVAL_MAX:
        raise ValueError(f"{name}: log1p values up to {vmax:.3g}; cell-eval accepts log1p-normalised data below "
                         f"{_CELL_EVAL_MAX:g} (was the data normalised to a larger total than 1e4?)")
    return out


def _obs_column(adata, key: str, fallback: str | None, name: str) -> np.ndarray:
    if key in adata.obs.columns:
        return adata.obs[key].astype(str).to_numpy()
    if fallback is not None and fallback in adata.obs.columns:
        return adata.obs[fallback].astype(str).to_numpy()
    raise ValueError(f"{name}: obs has no column {key!r} (columns: {list(adata.obs.columns)})")


def _prepare(pred, real, train, *, perturbation_key, context_key, control_label, population) -> _Data:
    genes = np.asarray(pred.var_names.astype(str))
    target_sum = 1e4
    meta = pred.uns.get("perturbdiff", {}) if hasattr(pred, "uns") else {}
    if float(meta.get("target_sum", -1)) > 0:
        target_sum = float(meta["target_sum"])

    def load(adata, name):
        return log1p_matrix(adata, genes, target_sum, name)

    # Predictions (written by `perturbdiff predict` with columns "perturbation" / "context").
    Xp = log1p_matrix(pred, genes, target_sum, "pred", prediction=True)
    p_pert = _obs_column(pred, perturbation_key, "perturbation", "pred")
    p_ctx = _obs_column(pred, context_key, "context", "pred")
    p_pop = pred.obs["population"].to_numpy() if "population" in pred.obs.columns else np.zeros(pred.n_obs, int)
    pops = np.unique(p_pop)
    if population != "all" and int(population) not in set(pops.tolist()):
        raise ValueError(f"population {population} not in the prediction (populations: {pops.tolist()})")

    Xr = load(real, "real")
    r_pert = _obs_column(real, perturbation_key, None, "real")
    r_ctx = _obs_column(real, context_key, None, "real")

    pred_conds = {c for c in zip(p_pert, p_ctx) if c[0] != control_label}
    real_conds = {c for c in zip(r_pert, r_ctx) if c[0] != control_label}
    conditions = sorted(pred_conds & real_conds)
    if not conditions:
        raise ValueError(
            f"no condition (perturbation, context) is in both the prediction ({sorted(pred_conds)[:5]}) "
            f"and the real data ({sorted(real_conds)[:5]})"
        )
    for label, extra in (("prediction", pred_conds - real_conds), ("real data", real_conds - pred_conds)):
        if extra:
            warnings.warn(f"{len(extra)} condition(s) only in the {label} are not evaluated: {sorted(extra)[:5]}",
                          stacklevel=3)

    tr = None
    if train is not None:
        Xt = load(train, "train")
        t_pert = _obs_column(train, perturbation_key, None, "train")
        t_ctx = _obs_column(train, context_key, None, "train")
        tr = train_stats(Xt, t_pert, t_ctx)
        tr["controls"] = {c: _dense(Xt[np.flatnonzero((t_pert == control_label) & (t_ctx == c))])
                          for c in np.unique(t_ctx[t_pert == control_label])}

    controls, control_source = {}, {}
    for ctx in sorted({c for _, c in conditions}):
        rows = np.flatnonzero((r_pert == control_label) & (r_ctx == ctx))
        if rows.size:
            controls[ctx], control_source[ctx] = _dense(Xr[rows]), "real"
        elif tr is not None and ctx in tr["controls"]:
            controls[ctx], control_source[ctx] = tr["controls"][ctx], "train"
        else:
            raise ValueError(f"no control cells ({control_label!r}) for context {ctx!r} in the real"
                             + (" or train" if tr is not None else "") + " data")

    real_cells, pred_pops, pred_eval = {}, {}, {}
    for cond in conditions:
        real_cells[cond] = _dense(Xr[np.flatnonzero((r_pert == cond[0]) & (r_ctx == cond[1]))])
        rows = (p_pert == cond[0]) & (p_ctx == cond[1])
        pred_pops[cond] = [_dense(Xp[np.flatnonzero(rows & (p_pop == k))]) for k in pops
                           if (rows & (p_pop == k)).any()]
        pick = rows if population == "all" else rows & (p_pop == int(population))
        if not pick.any():
            raise ValueError(f"no predicted cells for {cond} in population {population}")
        pred_eval[cond] = _dense(Xp[np.flatnonzero(pick)])
    return _Data(genes, conditions, real_cells, controls, control_source, pred_pops, pred_eval, tr, target_sum)


# --------------------------------------------------------------------------- metrics
def _cell_eval_metrics(cells: dict, data: _Data, profile: str, num_threads: int, real_de: dict, quiet: bool,
                       control_label: str) -> pd.DataFrame:
    """cell-eval per context (that context's controls as reference) -> one row per condition."""
    import anndata as ad
    from cell_eval import MetricsEvaluator

    frames = []
    for ctx in sorted(data.controls):
        conds = [cond for cond in data.conditions if cond[1] == ctx]
        ctrl = data.controls[ctx]

        def build(per_cond, conds=conds, ctrl=ctrl):
            """One context's cells of every condition plus its controls, as cell-eval reads them."""
            X = np.concatenate([per_cond[c] for c in conds] + [ctrl])
            labels = np.concatenate([[c[0]] * len(per_cond[c]) for c in conds] + [[control_label] * len(ctrl)])
            obs = pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(X))])
            return ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=data.genes))

        with tempfile.TemporaryDirectory() as tmp, _quiet(quiet) as errors:
            ev = MetricsEvaluator(
                adata_pred=build(cells), adata_real=build(data.real), de_real=real_de.get(ctx),
                control_pert=control_label, pert_col="perturbation", num_threads=num_threads,
                outdir=tmp, skip_de=profile in ("anndata", "pds"),
            )
            if ev.de_comparison is not None:
                real_de.setdefault(ctx, ev.de_comparison.real.data)  # real DE is shared by all methods
            # Context-level correlations over conditions mean nothing with fewer than 3 of them.
            skip = _SKIP_CELL_EVAL + (_PER_CONTEXT_CORRELATIONS if len(conds) < 3 else [])
            results, _ = ev.compute(profile=profile, skip_metrics=skip, write_csv=False)
        for msg in errors:
            warnings.warn(f"cell-eval ({ctx}): {msg}", stacklevel=2)
        frame = results.to_pandas() if len(results) else pd.DataFrame({"perturbation": [c[0] for c in conds]})
        frame["perturbation"] = frame["perturbation"].astype(str)
        frame.insert(1, "context", ctx)
        frames.append(frame.drop(columns=[f"discrimination_score_{m}" for m in DISCRIMINATION], errors="ignore"))
    return pd.concat(frames, ignore_index=True)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence cell-eval / pdex progress bars and warnings, but collect metric errors."""
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            errors.append(record.getMessage())

    handler = Collect(level=logging.ERROR)
    log = logging.getLogger("cell_eval")
    log.addHandler(handler)
    try:
        if enabled:
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield errors
        else:
            yield errors
    finally:
        log.removeHandler(handler)


def _fit_pca(data: _Data, n_components: int, seed: int, max_fit_cells: int = 20000):
    """PCA of the real data (controls + perturbed cells); None means "energy distance on genes"."""
    if n_components <= 0:
        return None
    from sklearn.decomposition import PCA

    X = np.concatenate(list(data.controls.values()) + list(data.real.values()))
    rng = np.random.default_rng(seed)
    if len(X) > max_fit_cells:
        X = X[rng.choice(len(X), max_fit_cells, replace=False)]
    k = int(min(n_components, X.shape[1], X.shape[0] - 1))
    return PCA(n_components=k, random_state=seed).fit(X)


def _energy(x: np.ndarray, y: np.ndarray, pca, max_cells: int, rng) -> float:
    if len(x) > max_cells:
        x = x[rng.choice(len(x), max_cells, replace=False)]
    if len(y) > max_cells:
        y = y[rng.choice(len(y), max_cells, replace=False)]
    if pca is not None:
        x, y = pca.transform(x), pca.transform(y)
    return float(energy_distance(torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(y, np.float64))))


def _own_metrics(cells: dict, pops: dict, data: _Data, pca, max_cells: int, seed: int) -> pd.DataFrame:
    names = [p for p, _ in data.conditions]
    ctrl_mean = {c: data.controls[c].mean(0, dtype=np.float64) for c in data.controls}
    real_mean = np.stack([data.real[k].mean(0, dtype=np.float64) for k in data.conditions])
    pred_mean = np.stack([cells[k].mean(0, dtype=np.float64) for k in data.conditions])
    base = np.stack([ctrl_mean[c] for _, c in data.conditions])
    real_eff, pred_eff = real_mean - base, pred_mean - base
    rows = []
    rng = np.random.default_rng(seed)
    for i, (p, c) in enumerate(data.conditions):
        eds = [_energy(x, data.real[(p, c)], pca, max_cells, rng) for x in pops[(p, c)]]
        rows.append(dict(
            perturbation=p, context=c,
            r2_mean=r2(real_mean[i], pred_mean[i]), r2_delta=r2(real_eff[i], pred_eff[i]),
            energy_distance=float(np.mean(eds)),
            energy_distance_sd=float(np.std(eds, ddof=1)) if len(eds) > 1 else float("nan"),
            num_populations=len(eds),
            num_real_cells=len(data.real[(p, c)]), num_pred_cells=len(cells[(p, c)]),
            num_control_cells=len(data.controls[c]), control_source=data.control_source[c],
            **realism(cells[(p, c)], data.real[(p, c)], data.target_sum),
        ))
    frame = pd.DataFrame(rows)
    for col, values in discrimination(pred_eff, real_eff, names, data.genes).items():
        frame[col] = values
    return frame


# --------------------------------------------------------------------------- evaluate
def evaluate(
    pred,
    real,
    train=None,
    *,
    outdir: str | os.PathLike | None = None,
    perturbation_key: str = "perturbation",
    context_key: str = "context",
    control_label: str = "control",
    baselines: Sequence[str] | str | None = "auto",
    population: int | str = 0,
    profile: str = "full",
    model_name: str = "PerturbDiff",
    pca_components: int = 50,
    max_cells_energy: int = 2000,
    num_threads: int | None = None,
    seed: int = 0,
    plots: bool = True,
    max_plot_conditions: int = 12,
    quiet: bool = True,
    perturbation_features=None,
) -> Evaluation:
    """Score predicted cells against held-out real cells, beside baselines.

    Args:
        pred: AnnData of predictions (e.g. from ``perturbdiff predict``), log1p-normalised or counts.
            Its ``obs[perturbation_key]`` / ``obs[context_key]`` (falling back to "perturbation" /
            "context") name each cell's condition; ``obs["population"]`` its population.
        real: AnnData of the held-out truth with the same obs keys; its control cells
            (``control_label``) are the reference per context, else those of ``train``.
        train: AnnData of the training cells (controls and perturbed); needed for every baseline
            except ``control_mean``.
        outdir: where to write metrics CSVs, ``summary.md`` and PNG plots (nothing when None).
        baselines: names from ``BASELINES``; ``"auto"`` = with ``train`` the five of every screen
            (control, perturbation and context means, additive shift, anchor), ``additive_combination`` when
            a condition is a combination and ``nearest_neighbour`` with ``perturbation_features``;
            without ``train`` control_mean; ``None`` / ``[]`` = none.
        population: which predicted population cell-eval scores (an int, or ``"all"`` pooled); the
            energy distance is averaged over every population.
        profile: cell-eval profile (``full``, ``minimal``, ``vcc``, ``de``, ``anndata``).
        pca_components: PCA dimensions for the energy distance (0: on genes).
        max_cells_energy: cells per side subsampled for the energy distance (it is O(n²)).
        num_threads: threads for cell-eval's DE (default: all available).
        quiet: silence cell-eval's progress bars and warnings (metric errors are still warned).
        perturbation_features: perturbation name -> feature vector (a mapping or a DataFrame indexed
            by name: a `perturbdiff.features` table), for ``nearest_neighbour``.
    """
    names = pred.obs[perturbation_key if perturbation_key in pred.obs else "perturbation"].astype(str).unique()
    features = None
    if perturbation_features is not None:
        table = as_table(perturbation_features, what="perturbation_features")
        # the table's rows, and combinations composed by predict's rule (A+B: the sum of its parts)
        combos = [n for n in names if n not in table.index and all(q in table.index for q in parts(n))]
        table = pd.concat([table, compose(combos, table)]) if combos else table
        features = {str(k): row.to_numpy(np.float32) for k, row in table.iterrows()}
    if isinstance(baselines, str) and baselines == "auto":
        if train is None:
            baselines = ("control_mean",)
        else:
            combination = any(len(parts(n)) > 1 for n in names)
            baselines = (*BASELINES[:5], *(["additive_combination"] if combination else []),
                         *(["nearest_neighbour"] if features else []))
    elif isinstance(baselines, str):
        baselines = (baselines,)
    baselines = list(baselines or [])
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    if train is None and any(b in TRAIN_BASELINES for b in baselines):
        raise ValueError(f"baselines {[b for b in baselines if b in TRAIN_BASELINES]} need the training data (train=...)")
    if model_name in baselines:
        raise ValueError(f"model_name {model_name!r} clashes with a baseline name")
    if population != "all" and not isinstance(population, (int, np.integer)):
        try:
            population = int(population)
        except (TypeError, ValueError):
            raise ValueError(f"population must be an integer or 'all', got {population!r}") from None
    num_threads = -1 if num_threads is None else int(num_threads)

    from .report import summary_text, write_plots

    data = _prepare(pred, real, train, perturbation_key=perturbation_key, context_key=context_key,
                    control_label=control_label, population=population)
    pca = _fit_pca(data, pca_components, seed)
    methods = {model_name: (data.pred_eval, data.pred_pops, {k: False for k in data.conditions})}
    for b in baselines:
        cells, fallback = baseline_cells(b, data.conditions, data.controls, data.train, control_label, features)
        methods[b] = (cells, {k: [v] for k, v in cells.items()}, fallback)
        if any(fallback.values()):
            warnings.warn(f"baseline {b}: no training data to form it for {[k for k, v in fallback.items() if v][:5]}; "
                          "using the controls there", stacklevel=2)

    frames, real_de = [], {}
    for name, (cells, pops, fallback) in methods.items():
        ce = _cell_eval_metrics(cells, data, profile, num_threads, real_de, quiet, control_label)
        own = _own_metrics(cells, pops, data, pca, max_cells_energy, seed)
        frame = own.merge(ce, on=["perturbation", "context"], how="left")
        frame.insert(0, "method", name)
        frame["fallback"] = [fallback[(p, c)] for p, c in zip(frame["perturbation"], frame["context"])]
        frames.append(frame)
    per_condition = pd.concat(frames, ignore_index=True)
    first = [m for m, _ in HEADLINE_METRICS if m in per_condition.columns]  # headline metrics first
    per_condition = per_condition[_KEY_COLS + [c for c in first + [c for c in per_condition.columns if c not in first]
                                               if c not in _KEY_COLS]]

    metric_cols = [c for c in per_condition.columns if c not in _KEY_COLS and c not in ("control_source", "fallback")
                   and not c.startswith("num_") and pd.api.types.is_numeric_dtype(per_condition[c])]
    aggregate = per_condition.groupby("method", sort=False)[metric_cols].mean()
    aggregate.insert(0, "num_conditions", per_condition.groupby("method", sort=False).size())
    aggregate = aggregate.reset_index()
    summary = summary_text(aggregate, per_condition, data, model_name, population, pca, profile)

    files = {}
    if outdir is not None:
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        files["per_condition"] = atomic_write(out / "metrics_per_condition.csv", lambda p: per_condition.to_csv(p, index=False))
        files["aggregate"] = atomic_write(out / "metrics_aggregate.csv", lambda p: aggregate.to_csv(p, index=False))
        files["summary"] = atomic_write(out / "summary.md", lambda p: Path(p).write_text(summary))
        if plots:
            files.update(write_plots(out, data, methods, per_condition, aggregate, pca, model_name, max_plot_conditions, seed))
    return Evaluation(per_condition, aggregate, summary, files)


# --------------------------------------------------------------------------- command line
def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predicted vs real cells (cell-eval metrics, energy distance) beside baselines",
        description="Compare predicted cells with held-out real cells per condition (perturbation, context): "
        "cell-eval metrics, R², energy distance, and the same for baselines; writes CSVs, summary.md and plots.",
    )
    p.add_argument("--pred", required=True, help="predicted cells (.h5ad, e.g. from perturbdiff predict)")
    p.add_argument("--real", required=True, help="held-out real cells (.h5ad) with their controls if available")
    p.add_argument("--train", help="training cells (.h5ad, controls + perturbed) for the baselines")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--perturbation-key", default="perturbation")
    p.add_argument("--context-key", default="context")
    p.add_argument("--control-label", default="control")
    p.add_argument("--baselines", nargs="*", default=None,
                   help=f"subset of {list(BASELINES)} (default with --train: the five of every screen, additive_combination for "
                        "combinations, nearest_neighbour with --perturbation-features; else control_mean; none: no baselines)")
    p.add_argument("--perturbation-features", help="a perturbation feature table (perturbdiff features), "
                   "for the nearest_neighbour baseline")
    p.add_argument("--population", default="0", help="predicted population scored by cell-eval (int or 'all')")
    p.add_argument("--profile", default="full", choices=["full", "minimal", "vcc", "de", "anndata"])
    p.add_argument("--name", default="PerturbDiff", help="the model's name in the tables")
    p.add_argument("--pca-components", type=int, default=50, help="PCs for the energy distance (0: genes)")
    p.add_argument("--max-cells-energy", type=int, default=2000)
    p.add_argument("--num-threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show cell-eval's progress and warnings")
    p.set_defaults(func=_run)


def _run(args) -> int:
    baselines = "auto" if args.baselines is None else ([] if args.baselines in ([], ["none"]) else args.baselines)
    result = evaluate(
        read_h5ad(args.pred, "--pred"), read_h5ad(args.real, "--real"), read_h5ad(args.train, "--train") if args.train else None,
        outdir=args.out, perturbation_key=args.perturbation_key, context_key=args.context_key,
        control_label=args.control_label, baselines=baselines, population=args.population, profile=args.profile,
        model_name=args.name, pca_components=args.pca_components, max_cells_energy=args.max_cells_energy,
        num_threads=args.num_threads, seed=args.seed, plots=not args.no_plots, quiet=not args.verbose,
        perturbation_features=None if args.perturbation_features is None else read_table(args.perturbation_features),
    )
    print(result.summary)
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0
