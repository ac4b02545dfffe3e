"""PerturbDiff's own per-condition metrics, computed beside cell-eval's: the discrimination score
ranked over every evaluated condition, R² of mean profiles, and whether predicted cells look like
sequenced cells (zeros, per-cell totals, values beyond any real one)."""

from __future__ import annotations

import numpy as np

__all__ = ["DISCRIMINATION", "UNDEFINED_WHY", "discrimination", "r2", "realism", "population_spread", "between_variance"]

# Why a metric can have no value, said wherever it is shown undefined (summary, plots).
UNDEFINED_WHY = {
    "pearson_delta": "a predicted shift of zero (e.g. the control cells) has no correlation",
    "overlap_at_N": "no DE genes in the real cells", "precision_at_N": "no DE genes in the real cells",
    "de_direction_match": "no DE genes in the real cells", "de_spearman_lfc_sig": "no DE genes in the real cells",
    "roc_auc": "no DE genes in the real cells", "pr_auc": "no DE genes in the real cells",
    "discrimination_score_l1": "a single condition cannot be ranked against others",
    "r2_delta": "the real shift is constant",
}

DISCRIMINATION = ("l1", "l2", "cosine")


def target_genes(perturbation: str, genes: np.ndarray) -> np.ndarray:
    """Columns to exclude for a perturbation: its own name or any '+'-part (CRISPR targets)."""
    parts = {perturbation, *perturbation.split("+")}
    return np.isin(genes, list(parts))


def discrimination(pred_eff: np.ndarray, real_eff: np.ndarray, names: list[str], genes: np.ndarray) -> dict:
    """cell-eval's discrimination score, ranked among all evaluated conditions: 1 - rank / n."""
    from sklearn.metrics import pairwise_distances

    n = len(names)
    if n < 2:  # ranking one condition among itself is 1 by construction: no result
        return {f"discrimination_score_{m}": np.full(n, np.nan) for m in DISCRIMINATION}
    out = {m: np.zeros(n) for m in DISCRIMINATION}
    for i, p in enumerate(names):
        keep = ~target_genes(p, genes)
        for m in DISCRIMINATION:
            metric = "manhattan" if m == "l1" else ("euclidean" if m == "l2" else "cosine")
            d = pairwise_distances(real_eff[:, keep], pred_eff[i, keep][None], metric=metric).ravel()
            rank = int(np.flatnonzero(np.argsort(d, kind="stable") == i)[0])
            out[m][i] = 1 - rank / n
    return {f"discrimination_score_{m}": v for m, v in out.items()}


def r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    return float("nan") if ss_tot == 0 else 1 - float(((y_true - y_pred) ** 2).sum()) / ss_tot


def realism(x: np.ndarray, real: np.ndarray, target_sum: float) -> dict:
    """Do the cells look sequenced? Zeros, per-cell totals and the range of values, beside the real cells'.

    ``zero_fraction_gap``: |exact-zero share of x − of real|; ``total_ratio``: median per-cell total of
    expm1(x) over the target sum (1 for normalised cells); ``above_real_max``: share of values above
    the largest real value of their gene (cells no sequencer produced).
    """
    totals = np.expm1(x.astype(np.float64)).sum(1)
    return dict(zero_fraction_gap=float(abs((x == 0).mean() - (real == 0).mean())),
                total_ratio=float(np.median(totals) / target_sum) if len(x) else float("nan"),
                above_real_max=float((x > real.max(0, initial=0.0) + 1e-6).mean()) if len(x) else float("nan"))


def population_spread(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """How far the K predicted populations of one condition differ: ``values`` [K, n, G].

    Returns the per-gene sd of the K population means [G]; their root-mean-square over genes (the
    condition's *population spread*); and the spread that n cells drawn from one population would
    show by chance alone (the root-mean-square over genes of sqrt(within-population variance / n)),
    which a spread must exceed to say the populations differ. NaN for K = 1.
    """
    K, n, G = values.shape
    if K < 2:
        return np.full(G, np.nan, np.float32), float("nan"), float("nan")
    v = values.astype(np.float64)
    sd = v.mean(1).std(0, ddof=1)
    noise = np.sqrt(v.var(1, ddof=1).mean(0) / n) if n > 1 else np.zeros(G)
    return sd.astype(np.float32), float(np.sqrt(np.mean(sd**2))), float(np.sqrt(np.mean(noise**2)))


def between_variance(means: np.ndarray, noise_var: np.ndarray) -> float:
    """How much K populations' mean profiles (or mean shifts) ``means`` [K, G] vary beyond chance:
    the mean over genes of their variance across populations minus ``noise_var`` [K, G] (or [G]),
    the variance each mean has from sampling its cells alone (within-variance / n, summed over
    the parts of a shift). The quantity calibration compares, predicted vs real; can be < 0 when
    the populations differ less than their sampling noise. NaN for K < 2."""
    means = np.asarray(means, np.float64)
    if len(means) < 2:
        return float("nan")
    noise = np.asarray(noise_var, np.float64)
    return float(np.mean(means.var(0, ddof=1) - (noise.mean(0) if noise.ndim == 2 else noise)))
