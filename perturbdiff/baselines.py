"""The simple baselines every prediction is scored beside (all in log1p space).

With c the held-out context, p the perturbation, ctrl_c the control cells of c and means taken
over training cells: ``control_mean`` is ctrl_c itself; ``perturbation_mean`` shifts ctrl_c to the
pooled mean of p's cells in other contexts; ``additive_shift`` adds the average over other
contexts c' of (mean of p in c' − mean of controls in c'); ``context_mean`` shifts ctrl_c to the
mean of all perturbed cells of c. For perturbations the training data never saw:
``additive_combination`` (a combination ``A+B``) adds the effects of its parts, each in c where it
was trained there, else its additive-shift effect; ``nearest_neighbour`` (with perturbation
features) adds the effect of the training perturbation whose features are closest (cosine), in c
where it was trained there, else over its contexts. Shifted cells are clipped at 0. A baseline
that cannot be formed for a condition falls back to ctrl_c (and says so).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["BASELINES", "TRAIN_BASELINES", "FEATURE_BASELINES", "train_stats", "additive_effect", "baseline_cells"]

BASELINES = ("control_mean", "perturbation_mean", "additive_shift", "context_mean", "additive_combination",
             "nearest_neighbour")
TRAIN_BASELINES = BASELINES[1:]  # need the training cells
FEATURE_BASELINES = ("nearest_neighbour",)  # need perturbation features


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

    ``train`` is `train_stats`' format: sums [G] and counts keyed by (perturbation, context).
    """
    sums, counts = train["sums"], train["counts"]
    effects = [sums[k] / counts[k] - sums[(control_label, k[1])] / counts[(control_label, k[1])]
               for k in sums if k[0] == perturbation and k[1] != exclude_context and (control_label, k[1]) in sums]
    return np.mean(effects, axis=0) if effects else None


def _effect_in(train: dict, perturbation, context, control_label) -> np.ndarray | None:
    """A training perturbation's effect in ``context`` where it was trained there, else over its contexts."""
    sums, counts = train["sums"], train["counts"]
    key, ctrl = (perturbation, context), (control_label, context)
    if key in sums and ctrl in sums:
        return sums[key] / counts[key] - sums[ctrl] / counts[ctrl]
    return additive_effect(train, perturbation, control_label)


def _nearest(perturbation, features: dict, trained: set) -> str | None:
    """The trained perturbation (other than itself) whose features are closest by cosine similarity."""
    if perturbation not in features:
        return None
    names = sorted(n for n in trained if n in features and n != perturbation)
    if not names:
        return None
    M = np.stack([features[n] for n in names]).astype(np.float64)
    v = np.asarray(features[perturbation], dtype=np.float64)
    sim = M @ v / (np.linalg.norm(M, axis=1) * np.linalg.norm(v) + 1e-12)
    return names[int(np.argmax(sim))]


def baseline_cells(name: str, conditions, controls: dict, train: dict | None, control_label: str,
                   features: dict | None = None) -> tuple[dict, dict]:
    """A baseline's predicted cells per condition, and whether it fell back to the controls.

    Args:
        name: one of `BASELINES`.
        conditions: (perturbation, context) pairs to predict.
        controls: context -> its control cells [n, G] (log1p).
        train: `train_stats` of the training cells (needed by every baseline but ``control_mean``).
        control_label: the perturbation name of control cells.
        features: perturbation name -> feature vector (``nearest_neighbour``).
    """
    from .features import parts

    if name in FEATURE_BASELINES and not features:
        raise ValueError(f"baseline {name} needs perturbation features")
    trained = {k[0] for k in train["sums"] if k[0] != control_label} if train else set()
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
        elif name == "additive_combination":
            singles = parts(p)
            effects = [_effect_in(tr, q, c, control_label) for q in singles if q in trained]
            if len(singles) > 1 and len(effects) == len(singles) and all(e is not None for e in effects):
                shift = np.sum(effects, axis=0)
        elif name == "nearest_neighbour":
            neighbour = _nearest(p, features, trained)
            if neighbour is not None:
                shift = _effect_in(tr, neighbour, c, control_label)
        elif name != "control_mean":
            raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
        fallback[(p, c)] = name != "control_mean" and shift is None
        cells[(p, c)] = ctrl if shift is None else np.clip(ctrl + shift.astype(np.float32), 0, None)
    return cells, fallback
