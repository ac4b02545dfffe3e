"""Calibration of the distribution over populations, on real data and on synthetic data.

    python benchmarks/populations.py                         # glioblastoma, every patient (hours on 2 cores)
    python benchmarks/populations.py --folds 0 1 --steps 1500
    python benchmarks/populations.py --dataset synthetic     # known hidden replicate effects, on and off

**glioblastoma** (`../shared/data/glioblastoma_panobinostat.h5ad`; five patients): per fold one
patient's treated cells are held out and a model is trained with the user's default finetuning
config and the patient *hidden* (``data.hidden_covariates=[context]``: each training set is one
patient's cells with that patient's controls, the model is never told which patient), so what
varies between patients is what ``--num-populations K`` samples. For the held-out patient it
predicts K populations (one set of the model's set size each) (a) from that patient's control
cells and (b) from the pooled control cells of the other patients, and compares how much the K
predicted responses (population mean - control mean) vary with how much the real responses of
the training patients vary (`perturbdiff.metrics.between_variance`, sampling noise removed; the
ratio predicted / real is 1 when calibrated). It also ranks the held-out patient's real
population among the K predicted ones by energy distance (0: more central than every predicted
population, 1: farther out than all; about uniform when calibrated). References: a
deterministic predictor repeated K times (spread 0) and the *bootstrap* of the training
patients' responses (each population: the held-out patient's controls + a training patient's
mean response, drawn with replacement).

**synthetic** (`perturbdiff.data.synthetic`, hidden per-replicate response variation over six
batches, batch hidden): the same ratio for every (cell type, perturbation), with the hidden
effect on (``response_spread`` 0.5) and off (0): the ratio should be near 1 with it on and the
predicted variance near 0 with it off.

Prints one JSON document (and writes OUTPUT/populations.json); finished trainings are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _holdout import _run  # noqa: E402
from suite import DEFAULT_CONFIG, _atlas, _glioblastoma, _PATIENTS, Dataset  # noqa: E402

K_DEFAULT = 8


def _log1p_normalised(X) -> np.ndarray:
    import scipy.sparse as sp

    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)


def _shift(cells: np.ndarray, control: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A population's mean response and its sampling variance per gene."""
    return (cells.mean(0) - control.mean(0),
            cells.var(0, ddof=1) / len(cells) + control.var(0, ddof=1) / len(control))


def _train(args, atlas: Path, out: Path, held_context: str | None, held_perturbation: str | None, hidden: str) -> Path:
    model_dir = out / "model_run" / "model"
    cmd = [sys.executable, "finetune/run.py", "--config", str(Path(args.config).resolve()), "--atlas", str(atlas.resolve()),
           "--output-dir", str((out / "model_run").resolve()), "--max-steps", str(args.steps), "--seed", str(args.seed),
           "--overwrite", f"data.hidden_covariates=[{hidden}]", "data.val_fraction=0", "train.val_every=0",
           "train.save_every=0", "train.tracker=none", *args.override]
    if held_context:
        cmd += ["--heldout-contexts", held_context, "--heldout-perturbations", held_perturbation]
    stamp = out / "train_command.json"
    if (model_dir / "model.safetensors").exists() and stamp.exists() and json.loads(stamp.read_text()) == cmd[1:]:
        print(f"    reusing {model_dir}", flush=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        _run(cmd, out / "train.log")
        stamp.write_text(json.dumps(cmd[1:]))
    return model_dir


def _populations(pipe, control_adata, perturbation, context, *, context_key, perturbation_key, K, n, seed, steps):
    """K predicted populations of n cells [K, n, G] (model gene order) and their control cells' means [K, G]."""
    pred = pipe.predict(control_adata, perturbation=perturbation, context=context, perturbation_key=perturbation_key,
                        context_key=context_key, batch_key=None, cells_per_condition=n, set_size=n,
                        num_populations=K, num_steps=steps, seed=seed, progress=False)
    return np.asarray(pred.X, np.float64).reshape(K, n, -1), list(pred.var_names)


def _energy(a: np.ndarray, b: np.ndarray) -> float:
    import torch

    from perturbdiff.losses import energy_distance

    return float(energy_distance(torch.from_numpy(a), torch.from_numpy(b)))


def _rank(real: np.ndarray, pops: np.ndarray) -> float:
    """Where the real population falls among the predicted ones by energy distance: the share of
    predicted populations that are farther from the others than the real one is from them."""
    K = len(pops)
    d = np.array([[_energy(pops[i], pops[j]) if i != j else 0.0 for j in range(K)] for i in range(K)])
    spread_k = d.sum(1) / (K - 1)
    real_d = np.mean([_energy(real, p) for p in pops])
    return float(np.mean(spread_k < real_d))


def glioblastoma(args) -> dict:
    import anndata as ad

    from perturbdiff.metrics import between_variance
    from perturbdiff.pipeline import PerturbDiffPipeline

    screen = _glioblastoma()
    ds = Dataset("glioblastoma", None, "condition", "ctrl", "patient_id", folds=[], dataset_name="glioblastoma")
    out = Path(args.output_dir) / "glioblastoma"
    atlas = _atlas(screen, ds, out / "atlas.zarr")
    L = _log1p_normalised(screen.X)
    obs = screen.obs
    treated = (obs["condition"] == "panobinostat").to_numpy()
    patient = obs["patient_id"].to_numpy()
    rng = np.random.default_rng(args.seed)
    folds = args.folds if args.folds is not None else range(len(_PATIENTS))
    rows = []
    for f in folds:
        held = _PATIENTS[f]
        print(f"[glioblastoma fold {f}] held out: {held} x panobinostat", flush=True)
        t0 = time.time()
        model_dir = _train(args, atlas, out / f"fold{f}" / f"seed{args.seed}", held, "panobinostat", "context")
        pipe = PerturbDiffPipeline.from_pretrained(model_dir)
        cols = [list(screen.var_names).index(g) for g in pipe.config.gene_names]
        Lm = L[:, cols]
        own_ctrl = Lm[(patient == held) & ~treated]
        real_h = Lm[(patient == held) & treated]
        others = [p for p in _PATIENTS if p != held]
        real = [_shift(Lm[(patient == p) & treated], Lm[(patient == p) & ~treated]) for p in others]
        real_between = between_variance(np.stack([s for s, _ in real]), np.stack([v for _, v in real]))
        n = int(pipe.config.set_size or 64)
        res = {"fold": f, "held_out": held, "real_between": real_between}
        for source, cells in (("own_controls", (patient == held) & ~treated), ("pooled_controls", (patient != held) & ~treated)):
            control = screen[cells].copy()
            control.obs["patient_id"] = held  # the pooled controls stand for the held-out patient's
            pops, _ = _populations(pipe, control, "panobinostat", held, context_key="patient_id",
                                   perturbation_key="condition", K=args.num_populations, n=n, seed=args.seed,
                                   steps=args.sample_steps)
            ctrl_mean = Lm[cells].mean(0)
            shifts = pops.mean(1) - ctrl_mean
            pred_between = between_variance(shifts, pops.var(1, ddof=1) / n)
            res[source] = {"pred_between": pred_between, "ratio": pred_between / real_between,
                           "rank_of_real": _rank(real_h[rng.choice(len(real_h), n, replace=len(real_h) < n)], pops)}
        # bootstrap reference: the held-out patient's controls + a training patient's mean response
        picks = rng.integers(0, len(others), args.num_populations)
        boot = np.stack([own_ctrl[rng.choice(len(own_ctrl), n)] + real[k][0] for k in picks])
        boot_between = between_variance(boot.mean(1) - own_ctrl.mean(0), boot.var(1, ddof=1) / n)
        res["bootstrap"] = {"pred_between": boot_between, "ratio": boot_between / real_between,
                            "rank_of_real": _rank(real_h[rng.choice(len(real_h), n, replace=len(real_h) < n)], boot)}
        res["deterministic"] = {"pred_between": 0.0, "ratio": 0.0}
        res["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(res), flush=True)
        rows.append(res)
    summary = {}
    for key in ("own_controls", "pooled_controls", "bootstrap"):
        ratios = [r[key]["ratio"] for r in rows]
        ranks = [r[key]["rank_of_real"] for r in rows]
        summary[key] = {"ratio_mean": float(np.mean(ratios)), "ratio_sd": float(np.std(ratios)),
                        "rank_of_real_mean": float(np.mean(ranks))}
    return {"folds": rows, "summary": summary}


def synthetic(args) -> dict:
    from perturbdiff.data.synthetic import make_synthetic_adata
    from perturbdiff.metrics import between_variance
    from perturbdiff.pipeline import PerturbDiffPipeline

    out = Path(args.output_dir) / "synthetic"
    result = {}
    for spread in (0.5, 0.0):
        adata = make_synthetic_adata(num_cells=8000, num_genes=48, num_contexts=2, num_perturbations=3, num_batches=6,
                                     response_spread=spread, seed=0)
        run = out / f"spread{spread:g}" / f"seed{args.seed}"
        run.mkdir(parents=True, exist_ok=True)
        screen = run / "screen.h5ad"
        if not screen.exists():
            adata.write_h5ad(screen)
        from perturbdiff.data import build_atlas

        atlas = run / "atlas.zarr"
        if not atlas.exists():
            build_atlas(adata, atlas, perturbation_key="perturbation", control_label="control", context_key="cell_type",
                        batch_key="batch", dataset_name="synthetic", seed=0, progress=False)
        model_dir = _train(args, atlas, run, None, None, "batch")
        pipe = PerturbDiffPipeline.from_pretrained(model_dir)
        L = _log1p_normalised(adata.X)[:, [list(adata.var_names).index(g) for g in pipe.config.gene_names]]
        obs = adata.obs
        n = int(pipe.config.set_size or 64)
        rows = []
        for ctx in sorted(obs["cell_type"].unique()):
            for pert in sorted(set(obs["perturbation"]) - {"control"}):
                real = []
                for b in sorted(obs["batch"].unique()):
                    pm = ((obs["cell_type"] == ctx) & (obs["perturbation"] == pert) & (obs["batch"] == b)).to_numpy()
                    cm = ((obs["cell_type"] == ctx) & (obs["perturbation"] == "control") & (obs["batch"] == b)).to_numpy()
                    if pm.sum() >= 20 and cm.sum() >= 20:
                        real.append(_shift(L[pm], L[cm]))
                pops, _ = _populations(pipe, adata, pert, ctx, context_key="cell_type", perturbation_key="perturbation",
                                       K=args.num_populations, n=n, seed=args.seed, steps=args.sample_steps)
                rows.append({"context": ctx, "perturbation": pert, "batches": len(real),
                             "real_between": between_variance(np.stack([s for s, _ in real]), np.stack([v for _, v in real])),
                             "pred_between": between_variance(pops.mean(1), pops.var(1, ddof=1) / n)})
        real_b, pred_b = np.mean([r["real_between"] for r in rows]), np.mean([r["pred_between"] for r in rows])
        result[f"response_spread={spread:g}"] = {"conditions": rows, "real_between": float(real_b),
                                                 "pred_between": float(pred_b), "ratio": float(pred_b / real_b)}
        print(json.dumps({k: v for k, v in result[f"response_spread={spread:g}"].items() if k != "conditions"}), flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["glioblastoma", "synthetic"], default="glioblastoma")
    p.add_argument("--folds", nargs="+", type=int, help="glioblastoma folds (held-out patient index; default: all five)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--num-populations", type=int, default=K_DEFAULT)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--output-dir", default="runs/populations")
    args = p.parse_args(argv)
    if args.num_populations < 2:
        p.error("--num-populations must be >= 2")
    t0 = time.time()
    result = glioblastoma(args) if args.dataset == "glioblastoma" else synthetic(args)
    doc = {"dataset": args.dataset, "seed": args.seed, "steps": args.steps, "num_populations": args.num_populations,
           "sample_steps": args.sample_steps, "override": args.override,
           "config": os.path.relpath(args.config, REPO), "seconds": round(time.time() - t0, 1), **result}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from perturbdiff.files import atomic_json

    atomic_json(out / f"populations_{args.dataset}.json", doc)
    print(json.dumps({k: v for k, v in doc.items() if k not in ("folds",)}, indent=1, default=str))
    return doc


if __name__ == "__main__":
    main()
