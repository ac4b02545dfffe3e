"""End-to-end runs of the real entry script (``pretrain/run.py``) with a tiny config: one process,
two processes with DDP over gloo, and DeepSpeed ZeRO-2 / ZeRO-3; resume identity; bad input."""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModel

import perturbdiff as pdiff

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "pretrain" / "run.py"
TINY = ROOT / "pretrain" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An environment whose built-in synthetic atlas lives in a fresh cache, built once here."""
    cache = tmp_path_factory.mktemp("cache")
    e = dict(os.environ, PERTURBDIFF_CACHE=str(cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    subprocess.run([sys.executable, "-c", "from perturbdiff.data import ensure_default_atlas; ensure_default_atlas()"],
                   env=e, check=True, timeout=300)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(env, out, *args, processes=1, timeout=600, check=True):
    if processes == 1:
        cmd = [sys.executable, str(RUN)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(RUN)]
    cmd += ["--config", str(TINY), "--output-dir", str(out), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def check_export(out, steps: int):
    export = Path(out) / "model"
    names = sorted(p.name for p in export.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"], names
    model = AutoModel.from_pretrained(export)
    assert isinstance(model, pdiff.PerturbDiffModel)
    # config.json carries what prediction needs: genes, normalisation, the training set size
    saved = json.loads((export / "config.json").read_text())
    assert saved["gene_names"] == model.config.gene_names and len(saved["gene_names"]) == model.config.num_genes
    assert saved["set_size"] == 16 and saved["normalization"] == {"target_sum": 1e4, "log1p": True, "scale": 10.0}
    card = (export / "README.md").read_text()
    assert f"steps: {steps}" in card and "objective: marginal" in card and "val_loss" in card
    sets = pdiff.sample_sets(model, num_sets=2, num_cells=8, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert sets.shape == (2, 8, model.config.num_genes) and torch.isfinite(sets).all() and (sets >= 0).all()
    # ... and each gene's training range, which sampling keeps to
    assert len(saved["gene_max"]) == model.config.num_genes and max(saved["gene_max"]) > 0
    assert (sets <= torch.tensor(model.config.sample_ceiling()) + 1e-6).all()
    return model


def test_single_process_run_writes_export_checkpoints_and_logs(env, tmp_path):
    proc = launch(env, tmp_path, "train.tracker=tensorboard")
    assert list((tmp_path / "logs").rglob("events.out.tfevents*")), "no TensorBoard event file"
    assert "cells per optimizer step" in proc.stdout and "export:" in proc.stdout
    m = metrics(tmp_path)
    assert sorted(m) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m.values())
    assert "val_loss" in m[3] and "val_loss" in m[6] and "cells_per_s" in m[6]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-00000003", "step-00000006"]  # keep_last: 2, no temporary folders left
    assert (tmp_path / "checkpoints" / "step-00000006" / "COMPLETE").exists()
    check_export(tmp_path, steps=6)
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    assert cfg["train"]["max_steps"] == 6 and cfg["model"]["preset"] == "debug"


def test_resumed_run_continues_with_identical_losses(env, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    proc = launch(env, full, "train.save_every=2", "optim.grad_accum=2")
    assert "2 sets x 16 cells x 2 accumulation x 1 processes = 64 cells per optimizer step" in proc.stdout
    proc = launch(env, split, "train.save_every=2", "train.stop_after_steps=3", "optim.grad_accum=2")
    assert "continue with --resume" in proc.stdout
    assert not (split / "model").exists()
    assert max(metrics(split)) == 3
    proc = launch(env, split, "train.save_every=2", "optim.grad_accum=2", "--resume")
    assert "resumed from" in proc.stdout and "step-00000003" in proc.stdout
    a, b = metrics(full), metrics(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
    sa = pdiff.PerturbDiffModel.from_pretrained(full / "model").state_dict()
    sb = pdiff.PerturbDiffModel.from_pretrained(split / "model").state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_sparse_batches_train_exactly_like_dense_ones(env, tmp_path):
    # sparse batches (the default on a GPU) are densified on the device: the run is the dense run
    quick = ("train.max_steps=3", "train.val_every=0", "train.save_every=0")
    launch(env, tmp_path / "dense", "data.sparse_batches=false", *quick)
    launch(env, tmp_path / "sparse", "data.sparse_batches=true", *quick)
    a, b = metrics(tmp_path / "dense"), metrics(tmp_path / "sparse")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(a[s]["loss"] == b[s]["loss"] for s in a), (a, b)
    proc = launch(env, tmp_path / "bad", "data.sparse_batches=often", *quick, check=False)
    assert proc.returncode != 0 and "data.sparse_batches must be true, false or 'auto'" in proc.stderr


def test_bad_input_fails_early_with_clear_errors(env, tmp_path):
    proc = launch(env, tmp_path / "a", "--atlas", str(tmp_path / "missing.zarr"), check=False)
    assert proc.returncode != 0 and "missing.zarr does not exist" in proc.stderr
    proc = launch(env, tmp_path / "b", "train.learning_rate=1", check=False)
    assert proc.returncode != 0 and "unknown config key(s) ['train.learning_rate']" in proc.stderr
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 2}}))
    proc = launch(env, tmp_path / "c", "--deepspeed", str(bad_ds), check=False)
    assert proc.returncode != 0 and "train_micro_batch_size_per_gpu=7 contradicts the run's train_micro_batch_size_per_gpu=2" in proc.stderr


@pytest.mark.slow
def test_two_processes_ddp_see_disjoint_sets(env, tmp_path):
    proc = launch(env, tmp_path, "train.record_sets=true", processes=2)
    assert "2 process(es)" in proc.stdout and "64 cells per optimizer step" in proc.stdout
    seen = {}
    for rank in (0, 1):
        rows = [json.loads(x) for x in (tmp_path / "sets" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert len(rows) == 6
        seen[rank] = [s for r in rows for s in r["sets"]]
        assert len(seen[rank]) == len(set(seen[rank])) == 12  # 6 steps x 2 sets, none twice
    assert not set(seen[0]) & set(seen[1])
    check_export(tmp_path, steps=6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_runs_and_resumes(env, tmp_path, stage):
    ds = str(ROOT / "ds_configs" / f"zero{stage}.json")
    full, split = tmp_path / "full", tmp_path / "split"
    proc = launch(env, full, "--deepspeed", ds, processes=2)
    assert f"DeepSpeed ZeRO-{stage}" in proc.stdout
    model = check_export(full, steps=6)
    launch(env, split, "--deepspeed", ds, "train.stop_after_steps=3", processes=2)
    launch(env, split, "--deepspeed", ds, "--resume", processes=2)
    a, b = metrics(full), metrics(split)
    for step in range(1, 7):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=1e-7), step
    assert model.config.num_genes > 0
    if stage == 2:  # DeepSpeed unpickles its model states: a planted payload must never be loaded
        marker = tmp_path / "payload-ran"
        states = sorted((split / "checkpoints").rglob("mp_rank_00_model_states.pt"))
        assert states
        for f in states:
            f.write_bytes(pickle.dumps(_Payload(marker)))
        proc = launch(env, split, "--deepspeed", ds, "--resume", "train.max_steps=7", processes=2)
        assert not marker.exists()
        assert proc.stdout.count("--resume: skipping checkpoint") == len(states) and "no intact checkpoint" in proc.stdout


class _Payload:
    """A pickle that, when loaded, writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


FINETUNE = ROOT / "finetune" / "run.py"
FT_TINY = ROOT / "finetune" / "configs" / "tiny.yaml"


def test_finetune_from_a_pretrained_export_on_an_h5ad_screen(env, tmp_path):
    from perturbdiff.data import make_synthetic_adata

    base = tmp_path / "pre"
    launch(env, base)
    # a new screen: other genes partly, other column names, a new cell type and perturbation names
    screen = make_synthetic_adata(num_cells=1500, num_genes=220, num_contexts=2, num_perturbations=3, seed=5)
    screen.obs = screen.obs.rename(columns={"perturbation": "drug", "cell_type": "line", "batch": "plate"})
    screen.obs["drug"] = screen.obs["drug"].astype(str).replace({"control": "DMSO"})
    screen.obs["line"] = screen.obs["line"].astype(str).replace({"celltype1": "A549"})
    h5ad = tmp_path / "screen.h5ad"
    screen.write_h5ad(h5ad)
    out = tmp_path / "ft"
    cmd = [sys.executable, str(FINETUNE), "--config", str(FT_TINY), "--output-dir", str(out), "--base", str(base / "model"),
           "--screen", str(h5ad), "--perturbation-key", "drug", "--control-label", "DMSO", "--context-key", "line",
           "--batch-key", "plate", "model.overrides.perturbation_shift=true",
           "--heldout-contexts", "A549", "--heldout-perturbations", "PERT1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "conditional training" in proc.stdout and "genes 200 kept" in proc.stdout
    assert (out / "atlases" / "screen.zarr").exists()
    base_model = pdiff.PerturbDiffModel.from_pretrained(base / "model")
    model = pdiff.PerturbDiffModel.from_pretrained(out / "model")
    c = model.config
    assert c.gene_names[:200] == base_model.config.gene_names  # base genes first, same ids
    assert len(c.gene_names) > 200  # the screen's own genes were added
    assert c.context_names[: len(base_model.config.context_names)] == base_model.config.context_names
    assert "A549" in c.context_names and "DMSO" in c.perturbation_names and "PERT1" in c.perturbation_names
    # the additive pathway was switched on for the base and learned its rows (the null row stays zero)
    shift = model.perturbation_shift.weight
    assert shift[c.encode("perturbation", ["PERT1"])[0]].abs().sum() > 0  # trained in another line
    assert (shift[0] == 0).all()
    card = (out / "model" / "README.md").read_text()
    assert "objective: conditional" in card and "base model: pre/model" in card and "screen.h5ad" in card
    # the training means travel with the export (prediction's anchor): never the held-out pair's
    # cells, always the controls of its context, each the mean of the pair's cells in the model's space
    from perturbdiff.baselines import load_stats

    stats = load_stats(out / "model")
    assert ("PERT1", "A549") not in stats["counts"] and ("DMSO", "A549") in stats["counts"]
    X = screen.X.toarray() if hasattr(screen.X, "toarray") else np.asarray(screen.X)
    normed = pdiff.normalize_counts(X, c.norm)
    cols = [list(screen.var_names).index(g) for g in c.gene_names]
    for key in (("PERT1", "celltype0"), ("DMSO", "A549")):
        rows = ((screen.obs["drug"] == key[0]) & (screen.obs["line"] == key[1])).to_numpy()
        assert stats["counts"][key] == rows.sum()
        np.testing.assert_allclose(stats["sums"][key] / stats["counts"][key], normed[rows][:, cols].mean(0), atol=1e-5)
    ctrl = torch.rand(2, 8, c.num_genes)
    sets = pdiff.sample_sets(model, control=ctrl, perturbation=c.encode("perturbation", ["PERT1", "PERT1"]),
                          context=c.encode("context", ["A549", "A549"]), num_steps=4)
    assert sets.shape == ctrl.shape and torch.isfinite(sets).all()

    # a column that the screen does not have fails early, naming the columns present
    bad = [sys.executable, str(FINETUNE), "--config", str(FT_TINY), "--output-dir", str(tmp_path / "bad"),
           "--base", str(base / "model"), "--screen", str(h5ad), "--perturbation-key", "compound"]
    proc = subprocess.run(bad, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "compound" in proc.stderr and "drug" in proc.stderr


def test_finetune_with_perturbation_features_predicts_a_perturbation_never_trained(env, tmp_path):
    from perturbdiff.data import make_synthetic_adata
    from perturbdiff.features import write_table
    from perturbdiff.pipeline import PerturbDiffPipeline

    screen = make_synthetic_adata(num_cells=900, num_genes=30, num_contexts=2, num_perturbations=3, seed=2)
    h5ad = tmp_path / "screen.h5ad"
    screen.write_h5ad(h5ad)
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(4, 6)), index=["PERT0", "PERT1", "PERT2", "NEWP"])
    write_table(table, tmp_path / "features.csv")
    write_table(table.drop(index="PERT2"), tmp_path / "partial.csv")
    base = [sys.executable, str(FINETUNE), "--config", str(FT_TINY), "--screen", str(h5ad), "--context-key", "cell_type"]
    held = ["--heldout-contexts", "celltype0", "celltype1", "--heldout-perturbations", "PERT1"]  # PERT1 entirely
    proc = subprocess.run([*base, "--output-dir", str(tmp_path / "bad"), "--perturbation-features", str(tmp_path / "partial.csv"), *held],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "1 perturbation(s) have no features in data.perturbation_features" in proc.stderr
    assert "PERT2" in proc.stderr and not (tmp_path / "bad" / "model").exists()
    out = tmp_path / "ft"
    proc = subprocess.run([*base, "--output-dir", str(out), "--perturbation-features", str(tmp_path / "features.csv"), *held],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "perturbation features: 6 per perturbation for 3 perturbation(s)" in proc.stdout
    assert "features.csv" in (out / "model" / "README.md").read_text()
    pipe = PerturbDiffPipeline.from_pretrained(out / "model")
    c = pipe.config
    assert c.perturbation_feature_dim == 6 and c.trained_perturbations == ["PERT0", "PERT2"]
    # the training rows travel with the weights, by perturbation id
    stored = pipe.model.covariate_embedder.feature_table.numpy()
    for name in ("PERT0", "PERT1", "PERT2"):
        np.testing.assert_allclose(stored[int(c.encode("perturbation", [name])[0])], table.loc[name], rtol=1e-5)
    control = screen[screen.obs["perturbation"] == "control"].copy()
    pred = pipe.predict(control, perturbation=["PERT1", "NEWP"], context="celltype0", perturbation_features=table,
                        context_key="cell_type", num_steps=2, progress=False)
    assert pred.uns["perturbdiff"]["unseen_perturbations"] == ["NEWP", "PERT1"]  # PERT1 was held out entirely
    assert np.isfinite(pred.X).all() and set(pred.obs["perturbation"]) == {"PERT1", "NEWP"}
    # a feature model trained without a table would learn ids and predict from untrained features
    proc = subprocess.run([*base, "--output-dir", str(tmp_path / "nofeat"), "model.overrides.perturbation_feature_dim=6", *held],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "takes 6 perturbation features" in proc.stderr and "no table was given" in proc.stderr
