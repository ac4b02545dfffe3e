"""Shared protocol of the real-data hold-out benchmarks (kang_holdout.py, perturbench_holdout.py).

One run, end to end through the project's own pieces:

1. the screen (an AnnData) is built into an atlas (`perturbdiff.data.build_atlas`);
2. the split is the paper's: held-out contexts ∩ held-out perturbations are the test groups
   (`SplitSpec.held_out`), the same split for training and for evaluation
   (`perturbdiff.data.splits.split_for_evaluation` cuts the real / train / control AnnData);
3. `pretrain/run.py` pretrains a model on the marginal objective on every control cell and the
   training split's perturbed cells; `finetune/run.py` trains the conditional model from scratch
   and finetuned from that export (each in its own process, so `--launcher "accelerate launch ..."`
   scales a stage to several GPUs unchanged);
4. `PerturbDiffPipeline.predict` predicts every held-out condition from its context's control cells;
5. `evaluate` scores each model beside the baselines (every held-out condition is one condition, so
   the discrimination score ranks among all of them); a table and JSON are printed and written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from perturbdiff.evaluation import HEADLINE_METRICS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "configs"

# The benchmark's target: the model beats every baseline on these.
TARGET_METRICS = ("pearson_delta", "overlap_at_N", "discrimination_score_l1", "energy_distance")
# (metric, "max" | "min"): rows of the printed table: the targets first, then evaluate's other
# headline metrics, then the other discrimination distances.
TABLE_METRICS = (
    tuple((m, b) for t in TARGET_METRICS for m, b in HEADLINE_METRICS if m == t)
    + tuple((m, b) for m, b in HEADLINE_METRICS if m not in TARGET_METRICS)
    + (("discrimination_score_l2", "max"), ("discrimination_score_cosine", "max"))
)
MODELS = ("scratch", "finetuned")


@dataclass
class Benchmark:
    """A screen and its hold-out split.

    ``load()`` returns the whole screen as an AnnData (raw counts, or log1p with ``input_log1p``)
    whose obs has ``perturbation_key`` / ``context_key`` (and ``dataset_key`` if given).
    """

    name: str
    load: object  # () -> AnnData
    perturbation_key: str
    control_label: str
    context_key: str
    heldout_contexts: list
    heldout_perturbations: list
    dataset_key: str | None = None
    dataset_name: str | None = None
    input_log1p: bool = False
    pretrain_config: Path = None
    finetune_config: Path = None
    defaults: dict = field(default_factory=dict)  # default flag values of this benchmark


# --------------------------------------------------------------------------- command line
def parser(bench: Benchmark, description: str) -> argparse.ArgumentParser:
    # Defaults: the CPU budget of docs/benchmarks.md (Kang: about 15 minutes on 2 cores).
    d = {"steps": 1500, "pretrain_steps": 800, "preset": "small", "set_size": 64, "lr": None,
         "sample_steps": 20, "guidance_scale": 0.0, "num_populations": 1, **bench.defaults}
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=f"runs/{bench.name}", help="where atlases, models, predictions and "
                   "results go (default: %(default)s; runs/ is git-ignored)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps of the conditional stage "
                   "(scratch and finetuning) (default: %(default)s)")
    p.add_argument("--pretrain-steps", type=int, default=d["pretrain_steps"], help="marginal pretraining steps "
                   "(default: %(default)s)")
    p.add_argument("--preset", default=d["preset"], help="model size preset: debug, small, base, large (default: %(default)s)")
    p.add_argument("--set-size", type=int, default=d["set_size"], help="cells per set in training and prediction "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="sets per micro-batch (default: the config's)")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate of all stages (default: the config's)")
    p.add_argument("--heldout-contexts", nargs="+", default=bench.heldout_contexts)
    p.add_argument("--heldout-perturbations", nargs="+", default=bench.heldout_perturbations)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to train and score")
    p.add_argument("--sample-steps", type=int, default=d["sample_steps"], help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=d["guidance_scale"],
                   help="classifier-free guidance w (0: conditional only; -1: covariates dropped) (default: %(default)s)")
    p.add_argument("--num-populations", type=int, default=d["num_populations"],
                   help="predicted populations per condition (energy distance averages them) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)}",
                   help='command that runs the training scripts, e.g. "accelerate launch --num_processes 8" '
                   "(default: this Python)")
    p.add_argument("--pretrain-config", default=str(bench.pretrain_config))
    p.add_argument("--finetune-config", default=str(bench.finetune_config))
    p.add_argument("--pretrain-override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides of the pretraining stage (e.g. optim.lr=1e-3)")
    p.add_argument("--finetune-override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides of both conditional stages (e.g. train.mmd_weight=2)")
    p.add_argument("--reuse", action="store_true", help="reuse models already in --output-dir (re-predict and "
                   "re-score only: for sampling settings)")
    p.add_argument("--json", help="also write the results JSON here (it is always written to OUTPUT/results.json)")
    return p


# --------------------------------------------------------------------------- stages
def _run(cmd: list[str], log: Path) -> float:
    """Run a training script, its output to ``log`` (and the tail to stdout on failure); wall seconds."""
    t0 = time.time()
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"command failed ({proc.returncode}); last lines of {log}:\n{tail}")
    return time.time() - t0


def _train(args, bench, stage: str, atlas: Path, out: Path) -> tuple[Path, float]:
    """One training stage through pretrain/run.py or finetune/run.py; returns (export, seconds)."""
    model_dir = out / stage / "model"
    if args.reuse and (model_dir / "config.json").exists():
        print(f"{stage}: reusing {model_dir}", flush=True)
        return model_dir, 0.0
    script = "pretrain/run.py" if stage == "pretrain" else "finetune/run.py"
    config = args.pretrain_config if stage == "pretrain" else args.finetune_config
    steps = args.pretrain_steps if stage == "pretrain" else args.steps
    cmd = shlex.split(args.launcher) + [
        script, "--config", str(Path(config).resolve()), "--atlas", str(atlas.resolve()),
        "--output-dir", str((out / stage).resolve()), "--max-steps", str(steps), "--seed", str(args.seed),
        "--heldout-contexts", *args.heldout_contexts, "--heldout-perturbations", *args.heldout_perturbations,
        "--overwrite",  # a benchmark rerun replaces its own earlier stage (train.log is written beside it)
    ]
    if stage == "finetuned":
        cmd += ["--base", str((out / "pretrain" / "model").resolve())]
    else:
        cmd += ["--preset", args.preset]
    overrides = [f"data.set_size={args.set_size}"]
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.lr:
        overrides.append(f"optim.lr={args.lr}")
    overrides += args.pretrain_override if stage == "pretrain" else args.finetune_override
    (out / stage).mkdir(parents=True, exist_ok=True)
    seconds = _run(cmd + overrides, out / stage / "train.log")
    print(f"{stage}: {steps} steps in {seconds:.0f} s -> {model_dir}", flush=True)
    return model_dir, seconds


def _final_loss(stage_dir: Path) -> dict:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tail = rows[-5:]
    return {k: float(np.mean([r[k] for r in tail])) for k in ("loss", "mmd", "mse") if tail and k in tail[0]}


def _conditions(real, bench) -> pd.DataFrame:
    obs = real.obs
    held = obs[obs[bench.perturbation_key].astype(str) != bench.control_label]
    pairs = held[[bench.perturbation_key, bench.context_key]].astype(str).drop_duplicates()
    return pd.DataFrame({"perturbation": pairs[bench.perturbation_key].to_numpy(),
                         "context": pairs[bench.context_key].to_numpy()}).sort_values(["context", "perturbation"])


def _predict(args, bench, model_dir: Path, control, conditions: pd.DataFrame, features=None):
    from perturbdiff.pipeline import PerturbDiffPipeline

    pipe = PerturbDiffPipeline.from_pretrained(model_dir)
    conds = conditions.copy()
    # Without a batch column the atlas stores the batch "NA", which the model knows: give it, as the
    # model has seen the null batch only with every covariate dropped.
    if "NA" in pipe.config.batch_names:
        conds["batch"] = "NA"
        control = control.copy()
        control.obs["batch"] = "NA"
    t0 = time.time()
    pred = pipe.predict(control, conds, perturbation_key=bench.perturbation_key, context_key=bench.context_key,
                        batch_key="batch", control_label=bench.control_label, set_size=args.set_size,
                        num_populations=args.num_populations, num_steps=args.sample_steps,
                        guidance_scale=args.guidance_scale, seed=args.seed, progress=False, perturbation_features=features,
                        **({"anchor_weight": args.anchor_weight} if getattr(args, "anchor_weight", None) is not None else {}))
    return pred, time.time() - t0


# --------------------------------------------------------------------------- results
def _table(aggregate: pd.DataFrame, models: list[str]) -> str:
    agg = aggregate.set_index("method")
    methods = list(agg.index)
    baselines = [m for m in methods if m not in models]
    rows = []
    header = ["metric"] + methods + ["beats all baselines"]
    for metric, better in TABLE_METRICS:
        if metric not in agg.columns:
            continue
        vals = agg[metric]
        cells = [metric + (" ↑" if better == "max" else " ↓")]
        finite = vals[np.isfinite(vals.astype(float))]
        best = (finite.max() if better == "max" else finite.min()) if len(finite) else None
        for m in methods:
            v = float(vals[m])
            cells.append("–" if not math.isfinite(v) else (f"*{v:.4g}" if v == best else f"{v:.4g}"))
        wins = [m for m in models if m in agg.index and _beats(agg, m, baselines, metric, better)]
        cells.append(", ".join(wins) or "no")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _beats(agg, model, baselines, metric, better) -> bool:
    v = float(agg.loc[model, metric])
    if not math.isfinite(v):
        return False
    others = [float(agg.loc[b, metric]) for b in baselines if math.isfinite(float(agg.loc[b, metric]))]
    return all(v > o if better == "max" else v < o for o in others)


def _json_safe(v):
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else round(float(v), 6)
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


# --------------------------------------------------------------------------- main
def run(bench: Benchmark, argv=None, description: str = "") -> dict:
    args = parser(bench, description).parse_args(argv)
    t_start = time.time()

    from perturbdiff.data import SplitSpec, build_atlas
    from perturbdiff.data.splits import split_for_evaluation
    from perturbdiff.evaluation import evaluate

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 1. data and split
    t0 = time.time()
    screen = bench.load()
    if args.set_size < 2:
        raise SystemExit("--set-size must be at least 2")
    spec = SplitSpec.held_out(args.heldout_contexts, args.heldout_perturbations)
    parts = split_for_evaluation(screen, spec, perturbation_key=bench.perturbation_key, context_key=bench.context_key,
                                 control_label=bench.control_label, dataset=bench.dataset_name,
                                 dataset_key=bench.dataset_key)
    conditions = _conditions(parts["real"], bench)
    atlas = out / "atlas.zarr"
    if not (args.reuse and atlas.exists()):
        build_atlas(screen, atlas, perturbation_key=bench.perturbation_key, control_label=bench.control_label,
                    context_key=bench.context_key, dataset_key=bench.dataset_key, dataset_name=bench.dataset_name,
                    input_log1p=bench.input_log1p, seed=args.seed, overwrite=True, progress=False)
    timings["data"] = time.time() - t0
    print(f"{bench.name}: {screen.n_obs} cells x {screen.n_vars} genes; {len(conditions)} held-out conditions "
          f"({parts['real'].n_obs - parts['control'].n_obs} cells), {parts['train'].n_obs} training cells", flush=True)

    # 2. training
    models = {}
    if "finetuned" in args.models:
        _, timings["pretrain"] = _train(args, bench, "pretrain", atlas, out)
    for name in args.models:
        models[name], timings[f"train_{name}"] = _train(args, bench, name, atlas, out)

    # 3. predict and evaluate
    results, per_condition, aggregate = {}, [], None
    for i, (name, model_dir) in enumerate(models.items()):
        pred, timings[f"predict_{name}"] = _predict(args, bench, model_dir, parts["control"], conditions)
        pred.write_h5ad(out / f"pred_{name}.h5ad")
        t0 = time.time()
        ev = evaluate(pred, parts["real"], parts["train"], perturbation_key=bench.perturbation_key,
                      context_key=bench.context_key, control_label=bench.control_label, model_name=name,
                      baselines="auto" if i == 0 else None, seed=args.seed, outdir=out / f"eval_{name}",
                      plots=i == 0)
        timings[f"evaluate_{name}"] = time.time() - t0
        aggregate = ev.aggregate if aggregate is None else pd.concat([ev.aggregate[ev.aggregate["method"] == name], aggregate])
        per_condition.append(ev.per_condition)
    timings["total"] = time.time() - t_start
    per_condition = pd.concat(per_condition, ignore_index=True)
    names = list(models)
    order = names + [m for m in aggregate["method"] if m not in names]
    aggregate = aggregate.set_index("method").loc[order].reset_index()
    aggregate.to_csv(out / "metrics_aggregate.csv", index=False)
    per_condition.to_csv(out / "metrics_per_condition.csv", index=False)

    baselines = [m for m in order if m not in names]
    agg = aggregate.set_index("method")
    target = {m: {metric: _beats(agg, m, baselines, metric, dict(TABLE_METRICS)[metric]) for metric in TARGET_METRICS}
              for m in names}
    results = {
        "benchmark": bench.name,
        "heldout_contexts": args.heldout_contexts,
        "heldout_perturbations": args.heldout_perturbations,
        "conditions": [f"{p} | {c}" for p, c in conditions.itertuples(index=False)],
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "train_loss_end": {n: _final_loss(out / n) for n in (["pretrain"] if "finetuned" in names else []) + names},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "metrics": {m: {c: _json_safe(v) for c, v in row.items() if c != "method"} for m, row in
                    zip(aggregate["method"], aggregate.to_dict("records"))},
        "per_condition": {
            m: {f"{r['perturbation']} | {r['context']}": {k: _json_safe(r[k]) for k, _ in TABLE_METRICS[:4] if k in r}
                for r in g.to_dict("records")}
            for m, g in per_condition.groupby("method", sort=False)
        },
        "target_met": {m: all(v.values()) for m, v in target.items()},
        "beats_every_baseline": target,
    }
    text = json.dumps(results, indent=2)
    (out / "results.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    print()
    print(f"{bench.name}: {len(conditions)} held-out conditions; mean over conditions ('*' best; last column: "
          f"models better than every baseline)")
    print(_table(aggregate, names))
    print()
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print()
    print(text)
    return results
