"""The simple baselines every prediction is scored beside (all in log1p space).

With c the held-out context, p the perturbation, ctrl_c the control cells of c and means taken
over training cells: ``control_mean`` is ctrl_c itself; ``perturbation_mean`` shifts ctrl_c to the
pooled mean of p's cells in other contexts; ``additive_shift`` adds the average over other
contexts c' of (mean of p in c' − mean of controls in c'); ``context_mean`` shifts ctrl_c to the
mean of all perturbed cells of c. Shifted cells are clipped at 0. A baseline that cannot be formed
for a condition falls back to ctrl_c (and says so).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["BASELINES", "TRAIN_BASELINES", "train_stats", "additive_effect", "baseline_cells"]

BASELINES = ("control_mean", "perturbation_mean", "additive_shift", "context_mean")
TRAIN_BASELINES = ("perturbation_mean", "additive_shift", "context_mean")  # need the training cells


def train_stats(X, pert: np.ndarray, ctx: np.ndarray) -> dict:
    """Per (perturbation, context) sums and counts of train cells, by one sparse product."""
    keys = pd.MultiIndex.from_arrays([pert, ctx])
    codes, uniques = pd.factorize(keys)
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniques), len(codes)))
    Xs = X if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    sums = onehot @ Xs
    sums = np.asarray(sums.toarray() if sp.issparse(sums) else sums, dtype=np.float64)
    counts = np.bincount(codes, minlength=len(uniques))
    return {"sums": {tuple(k): sums[i] for i, k in enumerate(uniques)},
            "counts": {tuple(k): int(counts[i]) for i, k in enumerate(uniques)}}


def additive_effect(train: dict, perturbation, control_label, exclude_context=None) -> np.ndarray | None:
    """The additive shift's effect of ``perturbation``: over the contexts c (except ``exclude_context``)
    where it and the controls both have training cells, the mean of (mean of its cells in c − mean of
    the controls of c); ``None`` where there is no such context.

    ``train`` is `train_stats`' format: sums [G] and counts keyed by (perturbation, context). The
    model's additive pathway (`perturbdiff.data.CellSetDataset.perturbation_effects`) uses this rule too.
    """
    sums, counts = train["sums"], train["counts"]
    effects = [sums[k] / counts[k] - sums[(control_label, k[1])] / counts[(control_label, k[1])]
               for k in sums if k[0] == perturbation and k[1] != exclude_context and (control_label, k[1]) in sums]
    return np.mean(effects, axis=0) if effects else None


def baseline_cells(name: str, conditions, controls: dict, train: dict | None, control_label: str) -> tuple[dict, dict]:
    """A baseline's predicted cells per condition, and whether it fell back to the controls.

    Args:
        name: one of `BASELINES`.
        conditions: (perturbation, context) pairs to predict.
        controls: context -> its control cells [n, G] (log1p).
        train: `train_stats` of the training cells (needed by every baseline but ``control_mean``).
        control_label: the perturbation name of control cells.
    """
    cells, fallback = {}, {}
    tr = train
    for p, c in conditions:
        ctrl = controls[c]
        ctrl_mean = ctrl.mean(0, dtype=np.float64)
        shift = None
        if name == "perturbation_mean":
            keys = [k for k in tr["sums"] if k[0] == p and k[1] != c]
            if keys:
                mu = sum(tr["sums"][k] for k in keys) / sum(tr["counts"][k] for k in keys)
                shift = mu - ctrl_mean
        elif name == "additive_shift":
            shift = additive_effect(tr, p, control_label, exclude_context=c)
        elif name == "context_mean":
            keys = [k for k in tr["sums"] if k[1] == c and k[0] != control_label]
            if keys:
                nu = sum(tr["sums"][k] for k in keys) / sum(tr["counts"][k] for k in keys)
                shift = nu - ctrl_mean
        elif name != "control_mean":
            raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
        fallback[(p, c)] = name != "control_mean" and shift is None
        cells[(p, c)] = ctrl if shift is None else np.clip(ctrl + shift.astype(np.float32), 0, None)
    return cells, fallback
