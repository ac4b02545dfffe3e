"""Where does a Kang hold-out prediction go? Decompose each predicted mean shift.

For every held-out (cell type, stim) condition of a `kang_holdout.py` run, the predicted population's
mean shift from that type's control mean is regressed (least squares, over genes, log1p space) on

    the real shift (stim - ctrl of the held-out type itself), and
    for every training cell type u: (u's stimulated mean - the held-out type's control mean),

so a coefficient of 1 on the real shift and 0 elsewhere is a perfect prediction, and a large
coefficient on a training type u means the model generated *stimulated u cells* from the held-out
type's controls (the held-out type's identity is lost). Also printed: the correlation of the
predicted shift with the real one (pearson_delta), the additive shift's (from means here, so it
differs a little from cell-eval's, which scores the shifted control cells clipped at zero), and the
genes with the largest error.

    python benchmarks/kang_decompose.py runs/kang_holdout/pred_scratch.h5ad [more predictions...]

Prints one JSON object per prediction file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kang_holdout import BENCH  # noqa: E402


def context_means(screen, genes, *, perturbation_key: str = BENCH.perturbation_key,
                  context_key: str = BENCH.context_key, control_label: str = BENCH.control_label) -> dict:
    """Each context's control mean and stimulated mean (over its non-control cells), log1p, in
    ``genes`` order: ``{"control": {context: [G]}, "stimulated": {context: [G]}}``."""
    from perturbdiff.evaluation import log1p_matrix

    X = log1p_matrix(screen, genes, 1e4, "screen")
    ctx = screen.obs[context_key].astype(str).to_numpy()
    is_control = screen.obs[perturbation_key].astype(str).to_numpy() == control_label
    means = {"control": {}, "stimulated": {}}
    for c in dict.fromkeys(ctx):
        for kind, rows in (("control", is_control), ("stimulated", ~is_control)):
            means[kind][c] = np.asarray(X[(ctx == c) & rows].mean(0)).ravel()
    return means


def decompose(pred, means: dict, heldout, top: int = 10) -> dict:
    """Per held-out context: pearson_delta, the regression coefficients and the worst genes.

    ``pred``: predicted cells (obs "context"; counts or log1p); ``means``: `context_means` of the
    screen in ``pred``'s gene order.
    """
    from perturbdiff.evaluation import log1p_matrix

    genes = np.asarray(pred.var_names.astype(str))
    Xp = log1p_matrix(pred, genes, 1e4, "prediction", prediction=True)
    p_ctx = pred.obs["context"].astype(str).to_numpy()
    ctrl_mean, stim_mean = means["control"], means["stimulated"]
    train_types = [c for c in ctrl_mean if c not in heldout]
    additive = np.mean([stim_mean[u] - ctrl_mean[u] for u in train_types], 0)
    out = {}
    for c in heldout:
        ctrl = ctrl_mean[c]
        real = stim_mean[c] - ctrl
        predicted = np.asarray(Xp[p_ctx == c].mean(0)).ravel() - ctrl
        A = np.stack([real] + [stim_mean[u] - ctrl for u in train_types], 1)
        coef, *_ = np.linalg.lstsq(A, predicted, rcond=None)
        residual = predicted - A @ coef
        err = predicted - real
        worst = np.argsort(-np.abs(err))[:top]
        out[c] = {
            "pearson_delta": float(np.corrcoef(predicted, real)[0, 1]),
            "pearson_delta_additive_shift": float(np.corrcoef(additive, real)[0, 1]),
            "coef_real_shift": round(float(coef[0]), 3),
            "coef_stimulated_training_type": {u: round(float(k), 3) for u, k in zip(train_types, coef[1:])},
            "residual_norm": round(float(np.linalg.norm(residual)), 3),
            "real_shift_norm": round(float(np.linalg.norm(real)), 3),
            "largest_errors": [{"gene": str(genes[i]), "predicted": round(float(predicted[i]), 3),
                                "real": round(float(real[i]), 3), "control_mean": round(float(ctrl[i]), 3)}
                               for i in worst],
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", nargs="+", help="pred_*.h5ad files written by kang_holdout.py")
    p.add_argument("--heldout-contexts", nargs="+", default=BENCH.heldout_contexts)
    p.add_argument("--top", type=int, default=10, help="genes with the largest error to list per condition")
    args = p.parse_args(argv)
    import anndata as ad

    screen = BENCH.load()
    cache = {}  # the screen's means, per gene order (one normalisation for all predictions over the same genes)
    for path in args.predictions:
        pred = ad.read_h5ad(path)
        genes = tuple(pred.var_names.astype(str))
        if genes not in cache:
            cache[genes] = context_means(screen, np.asarray(genes))
        result = {"prediction": path, "conditions": decompose(pred, cache[genes], args.heldout_contexts, top=args.top)}
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
