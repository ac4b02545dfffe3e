"""The benchmark suite: one default configuration, every real screen in reach, folds x seeds, one scoreboard.

    python benchmarks/suite.py                                  # everything (hours on 2 CPU cores)
    python benchmarks/suite.py --datasets glioblastoma --seeds 0 1 2
    python benchmarks/suite.py --datasets kang --folds 0 --seeds 0 --steps 100   # a quick look

Every run trains the conditional model **from scratch with the user's default finetuning config**
(`finetune/configs/default.yaml`, via `finetune/run.py --atlas`), the same for every dataset; only
the column names and the split differ (and the budget flags below, which are the suite's, not a
dataset's): the default's budget (`train.max_steps`) unless ``--steps`` says otherwise. No resume
checkpoints are written.

Datasets (a dataset whose file is absent is skipped, saying so):

| name | data | context | folds (held-out contexts ∩ held-out perturbations) |
|---|---|---|---|
| kang | Kang 2018 IFN-β PBMC (`data/kang.py`), 2,000 HVGs | cell type | {B, CD14 Mono, NK}, {CD14 Mono, DC}, {T, B, CD16 Mono} ∩ stim |
| kang_all | the same, every gene (14,053) | cell type | {B, CD14 Mono, NK} ∩ stim |
| kang_small | kang with the training cells subsampled to 1,500 | cell type | as kang |
| glioblastoma | `../shared/data/glioblastoma_panobinostat.h5ad` | patient | each patient ∩ panobinostat |
| perturbench | `../shared/data/perturbench_devel.h5ad` (glioma lines) | cell line | one line ∩ three kinases, three folds |
| norman_singles | the same file's Norman 2019 K562 CRISPRa singles | K562 | a third of the 17 singles, held out entirely |
| norman_doubles | the same, singles and doubles | K562 | doubles whose two singles are trained (3 + 2) |

The Norman datasets are run once per perturbation feature source (``--features``: ``go``, the GO
table of `perturbdiff.features` from Bioconductor's org.Hs.eg.sqlite at ``PERTURBDIFF_GO_ANNOTATIONS``;
``none``, the floor), each its own scoreboard row (``norman_singles[go]``); their baselines add the
nearest training perturbation in feature space and, for doubles, the additive combination of singles.

Each (dataset, fold, seed) run: build the dataset's atlas (once per dataset), train, predict every
held-out condition from its context's control cells, and score with `perturbdiff.evaluation.evaluate`
beside its baselines; once per fold, the *split-half ceiling*: half of the real held-out cells
scored as the prediction of the other half (the distance to it shows how much is left to gain).
Each run's result is written to OUTPUT/<dataset>/fold<k>/seed<s>/result.json; a rerun reuses
finished runs whose settings match (an interrupted suite resumes), and refuses a folder whose
finished runs used other settings unless ``--overwrite``.

Output: the scoreboard (a table per dataset, mean ± sd over folds x seeds, and for each dataset and
metric whether the model beats each baseline) on stdout and in OUTPUT/scoreboard.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _holdout import REPO, _conditions, _json_safe, _predict, _run  # noqa: E402

from perturbdiff.baselines import BASELINES  # noqa: E402
from perturbdiff.pipeline import ANCHOR_WEIGHT  # noqa: E402

DEFAULT_CONFIG = REPO / "finetune" / "configs" / "default.yaml"
SHARED_DATA = Path(os.environ.get("PERTURBDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
# The scoreboard's metrics (evaluate's names), and which way is better.
METRICS = {"pearson_delta": "max", "overlap_at_N": "max", "discrimination_score_l1": "max",
           "energy_distance": "min", "mae": "min"}
REALISM = ("zero_fraction_gap", "total_ratio", "above_real_max", "de_nsig_counts_pred", "de_nsig_counts_real")
# What the default must beat on the target metrics (issue 14).
TARGETS = ("pearson_delta", "energy_distance")
CEILING = "split_half"
# Feature sources for datasets of genetic perturbations, side by side; "none" is the floor.
FEATURE_SOURCES = ("go", "none")
GO_ANNOTATIONS = Path(os.environ.get("PERTURBDIFF_GO_ANNOTATIONS",
                                     Path.home() / ".cache" / "perturbdiff" / "go" / "org.Hs.eg.sqlite"))


# --------------------------------------------------------------------------- datasets
@dataclass
class Dataset:
    """A screen (raw counts), its columns and its folds: (held-out contexts, held-out perturbations)."""

    name: str
    load: object  # () -> AnnData of counts, or None when the data are not here (with `missing` saying why)
    perturbation_key: str
    control_label: str
    context_key: str
    folds: list
    dataset_key: str | None = None
    dataset_name: str | None = None
    max_train_cells: int | None = None  # subsample every cell but the held-out ones to this many
    features: bool = False  # genetic perturbations: run once per feature source (FEATURE_SOURCES)
    missing: str = ""
    notes: str = ""


def _kang_counts():
    spec = importlib.util.spec_from_file_location("kang_recipe", REPO / "data" / "kang.py")
    kang = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kang)
    from perturbdiff.data.synthetic import default_atlas_path

    return kang.load_annotated(kang.download(default_atlas_path().parent / "kang2018"), seed=0)


def _top_variable(adata, n: int):
    """The screen restricted to its n most variable genes, chosen as the atlas builder chooses them."""
    import scipy.sparse as sp

    from perturbdiff.data.builder import highly_variable_genes

    X = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(X.sum(1)).ravel()
    Xn = sp.diags(np.where(totals > 0, 1e4 / np.maximum(totals, 1), 0)) @ X
    mean = np.asarray(Xn.mean(0)).ravel()
    var = np.asarray(Xn.multiply(Xn).mean(0)).ravel() - mean**2
    _, flags = highly_variable_genes(mean, var, n)
    return adata[:, flags].copy()


def _perturbench_devel(part: str, keep=None):
    """One dataset of PerturBench devel (``mcfaline23``: the glioma lines, ``norman19``: K562 CRISPRa)
    as counts, optionally only the cells whose perturbation passes ``keep``."""
    import anndata as ad
    import scipy.sparse as sp

    from perturbdiff.expression import log1p_to_counts

    adata = ad.read_h5ad(SHARED_DATA / "perturbench_devel.h5ad")
    adata = adata[adata.obs["dataset"].astype(str) == part].copy()
    adata.obs = adata.obs[["perturbation", "cell_type"]].astype(str)
    if keep is not None:
        adata = adata[keep(adata.obs["perturbation"]).to_numpy()].copy()
    adata.X, _ = log1p_to_counts(sp.csr_matrix(adata.X))  # X is log1p over the whole transcriptome
    return adata


def _perturbench():
    return _perturbench_devel("mcfaline23")


def _norman(doubles: bool):
    """PerturBench devel's Norman 2019 part (CRISPRa in K562); without ``doubles`` only the singles."""
    return _perturbench_devel("norman19", keep=lambda names: (names == "control") | names.isin(_NORMAN_SINGLES)
                              | (doubles & names.str.contains("+", regex=False)))


def _glioblastoma():
    import anndata as ad

    adata = ad.read_h5ad(SHARED_DATA / "glioblastoma_panobinostat.h5ad")
    adata.obs = adata.obs[["condition", "patient_id"]].astype(str)
    return adata


_KANG_FOLDS = [(["B", "CD14 Mono", "NK"], ["stim"]), (["CD14 Mono", "DC"], ["stim"]), (["T", "B", "CD16 Mono"], ["stim"])]
_KINASES = ["SGK1", "MAP3K21", "MAP4K3", "MAPK1", "MAP2K3", "TGFBR2", "MAP4K5", "MAP2K6", "PLK4"]
_PATIENTS = ["PW030", "PW032", "PW034", "PW036", "PW040"]
# Norman 2019 singles (the 18 of PerturBench devel), held out entirely, a third per fold; and the
# doubles whose two parts are singles of the screen, held out with the singles all trained.
# IER5L is left out: org.Hs.eg.db 3.16 has no GO annotation for it, and every source must score the
# same perturbations.
_NORMAN_SINGLES = ["FOXO4", "HK2", "KLF1", "KMT2A", "MAP2K3", "MAP2K6", "MAP3K21", "MAP4K3", "MAP4K5",
                   "MAPK1", "MIDN", "NIT1", "PLK4", "SGK1", "SLC38A2", "TGFBR2", "TMSB4X"]
_NORMAN_SEEN_DOUBLES = ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]


def datasets() -> dict[str, Dataset]:
    def shared(file):
        return "" if (SHARED_DATA / file).is_file() else f"{SHARED_DATA / file} not found (set PERTURBDIFF_SHARED_DATA)"

    kang = dict(perturbation_key="condition", control_label="ctrl", context_key="cell_type", dataset_name="kang2018")
    return {d.name: d for d in [
        Dataset("kang", lambda: _top_variable(_kang_counts(), 2000), folds=_KANG_FOLDS, **kang,
                notes="2,000 highly variable genes"),
        Dataset("kang_all", _kang_counts, folds=_KANG_FOLDS[:1], **kang, notes="every gene"),
        Dataset("kang_small", lambda: _top_variable(_kang_counts(), 2000), folds=_KANG_FOLDS, max_train_cells=1500,
                **kang, notes="2,000 HVGs; training cells subsampled to 1,500"),
        Dataset("glioblastoma", _glioblastoma, "condition", "ctrl", "patient_id", dataset_name="glioblastoma",
                folds=[([p], ["panobinostat"]) for p in _PATIENTS], missing=shared("glioblastoma_panobinostat.h5ad"),
                notes="300 genes; one patient's treated cells held out per fold"),
        Dataset("perturbench", _perturbench, "perturbation", "control", "cell_type", dataset_name="mcfaline23",
                folds=[(["A172"], _KINASES[0:3]), (["T98G"], _KINASES[3:6]), (["U87MG"], _KINASES[6:9])],
                missing=shared("perturbench_devel.h5ad"), notes="500 genes; CRISPRi in three glioma lines"),
        Dataset("norman_singles", lambda: _norman(False), "perturbation", "control", "cell_type", dataset_name="norman19",
                folds=[(["k562"], _NORMAN_SINGLES[k::3]) for k in range(3)], features=True,
                missing=shared("perturbench_devel.h5ad"),
                notes="500 genes; CRISPRa singles in K562, a third of them held out entirely per fold"),
        Dataset("norman_doubles", lambda: _norman(True), "perturbation", "control", "cell_type", dataset_name="norman19",
                folds=[(["k562"], _NORMAN_SEEN_DOUBLES[0:3]), (["k562"], _NORMAN_SEEN_DOUBLES[3:5])], features=True,
                missing=shared("perturbench_devel.h5ad"),
                notes="500 genes; double perturbations whose two singles are trained"),
        Dataset("synthetic", lambda: _synthetic(), "perturbation", "control", "cell_type", dataset_name="synthetic",
                folds=[(["celltype0"], ["PERT0", "PERT1"])], notes="the built-in synthetic screen (smoke runs)"),
    ]}


def _synthetic():
    from perturbdiff.data.synthetic import make_synthetic_adata

    adata = make_synthetic_adata(num_cells=3000, num_genes=100, num_contexts=3, num_perturbations=4, seed=0)
    adata.obs = adata.obs[["perturbation", "cell_type"]].astype(str)
    return adata


DEFAULT_DATASETS = ("kang", "kang_all", "kang_small", "glioblastoma", "perturbench")


# --------------------------------------------------------------------------- one run
def _subsample_training(screen, ds: Dataset, parts: dict, seed: int):
    """Keep every held-out perturbed cell; subsample all other cells to ``ds.max_train_cells``."""
    held = set(parts["real"].obs_names) - set(parts["control"].obs_names)
    others = np.array([n for n in screen.obs_names if n not in held])
    if len(others) <= ds.max_train_cells:
        return screen
    keep = set(np.random.default_rng(seed).choice(others, size=ds.max_train_cells, replace=False)) | held
    return screen[[n in keep for n in screen.obs_names]].copy()


def _split(screen, ds: Dataset, fold):
    from perturbdiff.data import SplitSpec
    from perturbdiff.data.splits import split_for_evaluation

    spec = SplitSpec.held_out(*fold)
    return split_for_evaluation(screen, spec, perturbation_key=ds.perturbation_key, context_key=ds.context_key,
                                control_label=ds.control_label, dataset=ds.dataset_name)


def _atlas(screen, ds: Dataset, path: Path) -> Path:
    from perturbdiff.data import build_atlas

    if not _complete(path):
        build_atlas(screen, path, perturbation_key=ds.perturbation_key, control_label=ds.control_label,
                    context_key=ds.context_key, dataset_name=ds.dataset_name, seed=0, overwrite=True, progress=False)
    return path


def _complete(path: Path) -> bool:
    """Is there a complete atlas at ``path``? (Any other error than "absent" or "incomplete/damaged"
    is raised, rather than answered by rebuilding over the folder.)"""
    from perturbdiff.data import open_atlas
    from perturbdiff.data.store import AtlasError

    try:
        open_atlas(path)
        return True
    except (FileNotFoundError, AtlasError):
        return False


def _scores(aggregate) -> dict:
    agg = aggregate.set_index("method")
    cols = [c for c in (*METRICS, *REALISM) if c in agg.columns]
    return {m: {c: _json_safe(agg.loc[m, c]) for c in cols} for m in agg.index}


def _ceiling(parts, ds: Dataset, seed: int) -> dict:
    """Half of the real held-out cells of each condition scored as the prediction of the other half."""
    from perturbdiff.evaluation import evaluate

    real = parts["real"]
    is_ctrl = real.obs[ds.perturbation_key].astype(str).to_numpy() == ds.control_label
    rng = np.random.default_rng(seed)
    half = np.zeros(real.n_obs, dtype=bool)
    keys = real.obs[ds.perturbation_key].astype(str) + "|" + real.obs[ds.context_key].astype(str)
    for key in keys[~is_ctrl].unique():
        idx = np.flatnonzero((keys == key).to_numpy() & ~is_ctrl)
        half[rng.choice(idx, size=len(idx) // 2, replace=False)] = True
    ev = evaluate(real[half].copy(), real[~half].copy(), perturbation_key=ds.perturbation_key,
                  context_key=ds.context_key, control_label=ds.control_label, model_name=CEILING,
                  baselines=None, seed=seed, plots=False)
    return _scores(ev.aggregate)[CEILING]


def _variant_name(ds: Dataset, source: str | None) -> str:
    return ds.name if source is None else f"{ds.name}[{source}]"


def _features(ds: Dataset, screen, source: str | None, path: Path):
    """The perturbation feature table of a dataset for one source (written to ``path``), or None."""
    if source in (None, "none"):
        return None
    from perturbdiff.features import compose, go_features, read_table, write_table

    if not path.exists():
        names = sorted(set(screen.obs[ds.perturbation_key].astype(str)) - {ds.control_label})
        if source != "go":
            raise ValueError(f"unknown feature source {source!r}; choose from {FEATURE_SOURCES}")
        write_table(compose(names, go_features(GO_ANNOTATIONS), what=f"GO annotations {GO_ANNOTATIONS}"), path)
    return read_table(path)


def run_one(ds: Dataset, screen, fold_index: int, seed: int, args, out: Path, source: str | None = None) -> dict:
    """Train, predict and score one (dataset, feature source, fold, seed); returns the run's result dict."""
    from perturbdiff.evaluation import evaluate
    from perturbdiff.files import atomic_json

    fold = ds.folds[fold_index]
    name = _variant_name(ds, source)
    feature_path = out / ds.name / f"features_{source}.csv"
    features = _features(ds, screen, source, feature_path)
    run_dir = out / name / f"fold{fold_index}" / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    parts = _split(screen, ds, fold)
    if ds.max_train_cells:
        screen = _subsample_training(screen, ds, parts, seed=fold_index)
        parts = _split(screen, ds, fold)
        atlas = _atlas(screen, ds, out / ds.name / f"fold{fold_index}" / "atlas.zarr")
    else:
        atlas = _atlas(screen, ds, out / ds.name / "atlas.zarr")
    bench = SimpleNamespace(perturbation_key=ds.perturbation_key, context_key=ds.context_key,
                            control_label=ds.control_label)
    conditions = _conditions(parts["real"], bench)
    n_train = parts["train"].n_obs
    cmd = shlex.split(args.launcher) + [
        "finetune/run.py", "--config", str(Path(args.config).resolve()), "--atlas", str(atlas.resolve()),
        "--output-dir", str((run_dir / "model_run").resolve()), "--max-steps", str(args.steps), "--seed", str(seed),
        "--heldout-contexts", *fold[0], "--heldout-perturbations", *fold[1], "--overwrite",
        "train.val_every=0", "train.save_every=0", "train.tracker=none",
        *(["--preset", args.preset] if args.preset else []), *args.override,
        *(["--perturbation-features", str(feature_path.resolve())] if features is not None else []),
        *([f"train.export_every={args.curve}"] if args.curve else []),
    ]
    model_dir = run_dir / "model_run" / "model"
    # a model this exact command finished earlier is reused (an interrupted suite resumes mid-run)
    stamp = run_dir / "train_command.json"
    if (model_dir / "model.safetensors").exists() and stamp.exists() and json.loads(stamp.read_text()) == cmd[1:]:
        print(f"    reusing the model trained earlier: {model_dir}", flush=True)
        train_s = json.loads((run_dir / "train_seconds.json").read_text())
    else:
        stamp.unlink(missing_ok=True)
        train_s = _run(cmd, run_dir / "train.log")
        atomic_json(run_dir / "train_seconds.json", round(train_s, 1))
        atomic_json(stamp, cmd[1:])
    pargs = SimpleNamespace(set_size=None, num_populations=args.num_populations, sample_steps=args.sample_steps,
                            guidance_scale=0.0, seed=seed)
    pred, predict_s = _predict(pargs, bench, model_dir, parts["control"], conditions, features=features)
    ev = evaluate(pred, parts["real"], parts["train"], perturbation_key=ds.perturbation_key,
                  context_key=ds.context_key, control_label=ds.control_label, model_name="perturbdiff",
                  baselines="auto", seed=seed, outdir=run_dir / "eval", plots=False, perturbation_features=features)
    scores = _scores(ev.aggregate)
    scores[CEILING] = _ceiling(parts, ds, seed)
    curve = _curve(run_dir, bench, parts, conditions, pargs, ds, features, scores["perturbdiff"]) if args.curve else None
    sweep = _anchor_sweep(model_dir, bench, parts, conditions, pargs, ds, features, args.anchor_weights)
    return {"dataset": name, "features": source, "fold": fold_index, "heldout_contexts": fold[0], "heldout_perturbations": fold[1],
            "seed": seed, "settings": _settings(args), "training_cells": int(n_train),
            "conditions": [f"{p} | {c}" for p, c in conditions.itertuples(index=False)],
            "timings_s": {"train": round(train_s, 1), "predict": round(predict_s, 1), "total": round(time.time() - t0, 1)},
            "scores": scores, **({"curve": curve} if curve is not None else {}),
            **({"anchor_sweep": sweep} if sweep else {})}


def _anchor_sweep(model_dir: Path, bench, parts, conditions, pargs, ds: Dataset, features, weights) -> list[dict]:
    """The same model's scores with each anchor weight (``--anchor-weights``): how far each predicted
    cell's change should move toward the anchor's. Read on the held-out cells: it measures the
    setting over the datasets (the default is one value for all); it does not tune a run."""
    rows = []
    for w in weights or []:
        row = _model_scores(SimpleNamespace(**{**vars(pargs), "anchor_weight": w}), bench, model_dir, parts,
                            conditions, ds, features)
        rows.append({"anchor_weight": w, **{m: row.get(m) for m in (*METRICS, *REALISM)}})
        print(f"    anchor weight {w:g}: pearson_delta {row.get('pearson_delta'):.3f}, "
              f"energy distance {row.get('energy_distance'):.3f}", flush=True)
    return rows


def _model_scores(pargs, bench, model_dir: Path, parts, conditions, ds: Dataset, features) -> dict:
    """One model folder's prediction of the held-out conditions, scored alone (no baselines)."""
    from perturbdiff.evaluation import evaluate

    pred, _ = _predict(pargs, bench, model_dir, parts["control"], conditions, features=features)
    ev = evaluate(pred, parts["real"], parts["train"], perturbation_key=ds.perturbation_key,
                  context_key=ds.context_key, control_label=ds.control_label, model_name="perturbdiff",
                  baselines=None, seed=pargs.seed, plots=False)
    return _scores(ev.aggregate)["perturbdiff"]


def _curve(run_dir: Path, bench, parts, conditions, pargs, ds: Dataset, features, final: dict) -> list[dict]:
    """The model's target metrics at every interval export (``--curve N``), then ``final`` (the run's
    own scores of its last export): how the score moves with the training budget. Read on the
    held-out cells, so it measures a budget; it is not a way to pick one for a user (that would
    train on the test set)."""
    keys = ("pearson_delta", "energy_distance", "mae")
    curve = []
    for export in sorted((run_dir / "model_run" / "exports").glob("step-*")):
        row = _model_scores(pargs, bench, export, parts, conditions, ds, features)
        curve.append({"step": int(export.name.split("-")[1]), **{m: row.get(m) for m in keys}})
        print(f"    curve: step {curve[-1]['step']}: pearson_delta {row.get('pearson_delta'):.3f}, "
              f"energy distance {row.get('energy_distance'):.3f}", flush=True)
    return [*curve, {"step": None, **{m: final.get(m) for m in keys}}]


def _settings(args) -> dict:
    return {"config": str(Path(args.config).resolve().relative_to(REPO)) if Path(args.config).resolve().is_relative_to(REPO)
            else str(args.config), "steps": args.steps, "preset": args.preset, "override": list(args.override),
            "sample_steps": args.sample_steps, "num_populations": args.num_populations, "anchor_weight": ANCHOR_WEIGHT,
            **({"curve": args.curve} if args.curve else {}),
            **({"anchor_weights": list(args.anchor_weights)} if args.anchor_weights else {})}


# --------------------------------------------------------------------------- scoreboard
def scoreboard(results: list[dict]) -> dict:
    """Per dataset: mean ± sd over (fold, seed) of every method's metrics, and the beats-baseline flags."""
    board = {}
    for name in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == name]
        methods = list(dict.fromkeys(m for r in runs for m in r["scores"]))
        table = {}
        for m in methods:
            table[m] = {}
            for metric in (*METRICS, *REALISM):
                vals = [r["scores"][m].get(metric) for r in runs if m in r["scores"]]
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                table[m][metric] = ({"mean": round(float(np.mean(vals)), 4), "sd": round(float(np.std(vals)), 4),
                                     "n": len(vals)} if vals else None)
        beats = {}
        for b in (b for b in BASELINES if b in table):  # perturbdiff.baselines' names
            beats[b] = {}
            for metric, better in METRICS.items():
                mine, theirs = table["perturbdiff"][metric], table[b][metric]
                beats[b][metric] = (None if mine is None or theirs is None else
                                    bool(mine["mean"] > theirs["mean"] if better == "max" else mine["mean"] < theirs["mean"]))
        target = all(beats[b][m] for b in beats for m in TARGETS if beats[b][m] is not None)
        board[name] = {"folds": sorted({r["fold"] for r in runs}), "seeds": sorted({r["seed"] for r in runs}),
                       "runs": len(runs), "training_cells": sorted({r["training_cells"] for r in runs}),
                       "train_s_mean": round(float(np.mean([r["timings_s"]["train"] for r in runs])), 1),
                       "methods": table, "beats": beats, "beats_every_baseline_on_targets": target}
    return board


def _fmt(cell) -> str:
    return "–" if cell is None else (f"{cell['mean']:.3f}" + (f"±{cell['sd']:.3f}" if cell["n"] > 1 else ""))


def format_board(board: dict) -> str:
    lines = []
    for name, b in board.items():
        methods = list(b["methods"])
        lines.append(f"## {name}: folds {b['folds']} x seeds {b['seeds']} ({b['runs']} runs, "
                     f"{'/'.join(map(str, b['training_cells']))} training cells, {b['train_s_mean']:.0f} s training per run)")
        header = ["metric", *methods, "beats"]
        rows = []
        for metric, better in (*METRICS.items(), *((r, "") for r in REALISM)):
            beaten = [bl for bl in b["beats"] if b["beats"][bl].get(metric)] if metric in METRICS else []
            lost = [bl for bl in b["beats"] if b["beats"][bl].get(metric) is False] if metric in METRICS else []
            verdict = "" if metric not in METRICS else ("all" if not lost and beaten else
                                                         (f"loses to {', '.join(lost)}" if lost else "–"))
            rows.append([metric + {"max": " ↑", "min": " ↓"}.get(better, ""),
                         *(_fmt(b["methods"][m][metric]) for m in methods), verdict])
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, ["-" * w for w in widths], *rows]]
        lines.append(f"beats every baseline on {' and '.join(TARGETS)}: {'yes' if b['beats_every_baseline_on_targets'] else 'NO'}")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), choices=sorted(datasets()))
    p.add_argument("--folds", nargs="+", type=int, help="fold indices (default: every fold of each dataset)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the config's train.max_steps)")
    p.add_argument("--preset", help="model size preset (default: the config's)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="finetuning config (default: the user's default)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps (default: %(default)s)")
    p.add_argument("--num-populations", type=int, default=1)
    p.add_argument("--curve", type=int, metavar="N", help="also score an export every N steps (a learning curve per run)")
    p.add_argument("--anchor-weights", nargs="+", type=float, metavar="W",
                   help="also score each run's model with these anchor weights (predict's anchor_weight)")
    p.add_argument("--launcher", default=shlex.quote(sys.executable), help='e.g. "accelerate launch --num_processes 8"')
    p.add_argument("--output-dir", default="runs/suite")
    p.add_argument("--overwrite", action="store_true", help="rerun finished runs whose settings differ")
    p.add_argument("--features", nargs="+", default=list(FEATURE_SOURCES), choices=FEATURE_SOURCES,
                   help="feature sources for datasets of genetic perturbations, each a row of the scoreboard "
                   f"(go needs {GO_ANNOTATIONS}, or PERTURBDIFF_GO_ANNOTATIONS: see the README's feature tables)")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.steps is None:
        from perturbdiff.train.config import load_train_config

        args.steps = load_train_config(args.config, args.override).train.max_steps
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from perturbdiff.files import atomic_json

    all_ds = datasets()
    results = []
    plan = []
    for name in args.datasets:
        ds = all_ds[name]
        if ds.missing:
            print(f"{name}: skipped: {ds.missing}", flush=True)
            continue
        folds = args.folds if args.folds is not None else range(len(ds.folds))
        bad = [f for f in folds if not 0 <= f < len(ds.folds)]
        if bad:
            raise SystemExit(f"--folds {bad}: {name} has folds 0..{len(ds.folds) - 1}")
        sources = [None]
        if ds.features:
            sources = [src for src in args.features if src != "go" or GO_ANNOTATIONS.is_file()]
            if "go" in args.features and "go" not in sources:
                print(f"{name}: GO features skipped: {GO_ANNOTATIONS} not found (set PERTURBDIFF_GO_ANNOTATIONS)", flush=True)
        plan += [(ds, src, f, s) for src in sources for f in folds for s in args.seeds]
    screens = {}
    for i, (ds, source, fold, seed) in enumerate(plan, 1):
        name = _variant_name(ds, source)
        path = out / name / f"fold{fold}" / f"seed{seed}" / "result.json"
        if path.exists():
            done = json.loads(path.read_text())
            if done.get("settings") == _settings(args):
                print(f"[{i}/{len(plan)}] {name} fold {fold} seed {seed}: done earlier ({path})", flush=True)
                results.append(done)
                continue
            if not args.overwrite:
                raise SystemExit(f"{path} was run with other settings ({done.get('settings')}); use another "
                                 "--output-dir, or --overwrite to rerun it")
        print(f"[{i}/{len(plan)}] {name} fold {fold} {ds.folds[fold]} seed {seed}", flush=True)
        if ds.name not in screens:
            screens[ds.name] = ds.load()
        result = run_one(ds, screens[ds.name], fold, seed, args, out, source)
        atomic_json(path, result)
        results.append(result)
        pd_, ed = (result["scores"]["perturbdiff"].get(k) for k in ("pearson_delta", "energy_distance"))
        add = result["scores"].get("additive_shift", {})
        print(f"    pearson_delta {pd_} (additive shift {add.get('pearson_delta')}), energy distance {ed} "
              f"(additive shift {add.get('energy_distance')}); {result['timings_s']['total']:.0f} s", flush=True)
    board = {"settings": _settings(args), "seeds": args.seeds, "datasets": scoreboard(results)}
    atomic_json(out / "scoreboard.json", board)
    print()
    print(format_board(board["datasets"]))
    print(json.dumps(board, indent=1))
    return board


if __name__ == "__main__":
    main()
