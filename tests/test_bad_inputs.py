"""The bad-input catalogue: every case is an early error of a named type whose message names the
problem (file, option, column, gene, value), or, for runs, a non-zero exit that leaves earlier work
intact. Nothing here may end with a silently wrong result and exit 0."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import perturbdiff as pdiff
from perturbdiff.data import Atlas, CellSetDataset, SplitSpec, build_atlas, make_synthetic_adata, make_synthetic_atlas
from perturbdiff.data.splits import check_held_out_names
from perturbdiff.data.store import AtlasCorruptError, AtlasIncompleteError
from perturbdiff.data.synthetic import BUILD_COLUMNS
from perturbdiff.expression import detect_input_space, gene_columns
from perturbdiff.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pretrain" / "configs" / "tiny.yaml"


# =========================================================================== run configuration
@pytest.mark.parametrize("overrides, error, match", [
    (["train.learning_rate=1"], ValueError, r"unknown config key\(s\) \['train.learning_rate'\]"),
    (["data.set_size=abc"], ValueError, r"config key data.set_size must be a int .*got 'abc'"),
    (["data.batch_size=2.5"], ValueError, r"config key data.batch_size must be a int .*got 2.5"),
    (["train.max_steps=-5"], ValueError, r"train.max_steps must be >= 1, got -5"),
    (["optim.lr=0"], ValueError, r"optim.lr must be > 0"),
    (["optim.lr=.nan"], ValueError, r"optim.lr must be a finite number"),
    (["data.val_fraction=1.5"], ValueError, r"data.val_fraction must be in \[0, 1\)"),
    (["train.objective=joint"], ValueError, r"train.objective must be 'marginal' or 'conditional', got 'joint'"),
    (["train.cond_drop_prob=2"], ValueError, r"train.cond_drop_prob must be a number in \[0, 1\], got 2"),
    (["train.mmd_weight=-1"], ValueError, r"train.mmd_weight must be a number >= 0"),
    (["resume=true", "overwrite=true"], ValueError, r"--resume continues the run .* --overwrite replaces it"),
    (["model.new_genes=keep"], ValueError, r"model.new_genes must be 'add' or 'drop', got 'keep'"),
    (["data.sparse_batches=maybe"], ValueError, r"data.sparse_batches must be true, false or 'auto', got 'maybe'"),
    (["optim.betas=[0.9]"], ValueError, r"optim.betas must be two numbers"),
    (["data.set_size"], ValueError, r"override 'data.set_size' must look like key.sub=value"),
    (["model.min_shared_genes=2"], ValueError, r"model.min_shared_genes must be in \[0, 1\]"),
    (["data=3"], ValueError, r"config section data must be a mapping"),
    (["data.genes=0"], ValueError, r"data.genes must be 'hvg', 'all', a number >= 1 or a gene list file, got 0"),
    (["data.genes=[a, b]"], ValueError, r"config key data.genes must be one of \['int', 'str'\]"),
])
def test_config_values(overrides, error, match):
    with pytest.raises(error, match=match):
        load_train_config(TINY, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml does not exist"):
        load_train_config(tmp_path / "nope.yaml")


# =========================================================================== expression and genes
@pytest.mark.parametrize("X, declared, match", [
    (np.array([[1.0, -2.0]]), "auto", r"has negative values \(min -2\)"),
    (np.array([[1.0, np.nan]]), "auto", r"has 1 non-finite values"),
    (np.zeros((2, 2)), "auto", r"is all zeros"),
    (np.array([[1.0, 3.0]]), "log1p", r"input_space='log1p' but .* looks like raw counts"),
    (np.array([[0.5, 1.7]]), "counts", r"input_space='counts' but .* looks log1p-normalised"),
    (np.array([[0.5, 170.3]]), "auto", r"neither raw counts .* nor log1p-normalised"),
    (np.array([[1.0]]), "zscore", r"input_space must be one of"),
])
def test_expression_spaces(X, declared, match):
    with pytest.raises(ValueError, match=match):
        detect_input_space(X, declared)


def test_duplicated_genes_among_the_models_genes():
    with pytest.raises(ValueError, match=r"duplicated gene names among the model's genes: \['CD3D'\]"):
        gene_columns(["CD3D", "LYZ", "CD3D"], ["CD3D", "LYZ"], what="the control data")


# =========================================================================== model and sampling
def test_model_config_errors(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        pdiff.PerturbDiffConfig.from_preset("huge", num_genes=3)
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        pdiff.PerturbDiffConfig(num_genes=3, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="context_conditioning was removed"):
        pdiff.PerturbDiffConfig(num_genes=3, context_conditioning=False)
    with pytest.raises(ValueError, match=r"unknown perturbation name\(s\) \['IFNG'\] \(the model knows 3: control, IFNB, TNF"):
        tiny_config.encode("perturbation", ["IFNG"])


def test_a_config_edited_to_add_layers_does_not_load_random_weights(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_layers": config["num_layers"] + 1}))
    with pytest.raises(ValueError, match=r"saved weights do not match its config.json \(missing_keys: \['blocks.2"):
        pdiff.PerturbDiffModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved weights do not match"):
        pdiff.PerturbDiffPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(eta=-1.0), "eta must be a finite number >= 0"),
    (dict(num_steps=0), r"num_steps must be an integer in \[1, 1000\]"),
    (dict(sampler="euler"), "sampler must be 'ddim' or 'ddpm'"),
])
def test_sampling_settings(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pdiff.sample_sets(tiny_model, num_sets=1, num_cells=2, **{"num_steps": 2, **kwargs})


# =========================================================================== atlases
@pytest.fixture(scope="module")
def screen():
    return make_synthetic_adata(num_cells=600, num_genes=30, num_contexts=2, num_perturbations=3, seed=0)


def _build(adata, path, **kw):
    return build_atlas(adata, path, progress=False, **{**BUILD_COLUMNS, **kw})


def test_builder_column_and_label_errors(screen, tmp_path):
    with pytest.raises(ValueError, match=r"obs has no column 'celltype' \(--context-key\); columns present: .*'cell_type'"):
        _build(screen, tmp_path / "a.zarr", context_key="celltype")
    with pytest.raises(ValueError, match=r"control label 'DMSO' \(--control-label\) not found .*'control'"):
        _build(screen, tmp_path / "b.zarr", control_label="DMSO")


def test_builder_value_errors(screen, tmp_path):
    neg = screen.copy()
    neg.X = neg.X.toarray() if sp.issparse(neg.X) else neg.X.copy()
    neg.X[3, 2] = -1
    with pytest.raises(ValueError, match=r"X has negative values \(first in cell 'cell0*3'\)"):
        _build(neg, tmp_path / "neg.zarr")
    huge = screen.copy()
    dense = np.log1p(np.asarray(huge.X.toarray() if sp.issparse(huge.X) else huge.X, dtype=np.float32))
    dense[5, 1] = 800.0  # expm1 overflows: inf after the inversion
    huge.X = dense
    with pytest.raises(ValueError, match=r"non-finite values after inverting log1p .*'cell0*5'"):
        _build(huge, tmp_path / "huge.zarr", input_log1p=True)
    mixed = screen.copy()
    X = np.asarray(mixed.X.toarray() if sp.issparse(mixed.X) else mixed.X, dtype=np.float32)
    X[300:] = np.log1p(X[300:])  # half counts, half log1p
    mixed.X = X
    with pytest.raises(ValueError, match="X mixes integer count cells .* with non-integer cells"):
        _build(mixed, tmp_path / "mixed.zarr", block_cells=128)
    estimated = screen.copy()  # non-integer values above any log1p value: e.g. estimated counts
    E = np.asarray(estimated.X.toarray() if sp.issparse(estimated.X) else estimated.X, dtype=np.float32) * 30.5
    E[:300] = np.round(E[:300])
    E[:, 0] = 40.5  # every cell non-empty, with a fractional value above 20 in the others
    E[:300, 0] = 40
    estimated.X = E
    with pytest.raises(ValueError, match="X mixes integer count cells .* with non-integer cells"):
        _build(estimated, tmp_path / "estimated.zarr", block_cells=128)
    last_empty = screen.copy()  # a zero-count cell ending a block is fine
    Z = np.asarray(last_empty.X.toarray() if sp.issparse(last_empty.X) else last_empty.X, dtype=np.float32)
    Z[-1] = 0
    last_empty.X = Z
    _build(last_empty, tmp_path / "ok.zarr", block_cells=128)
    shutil.rmtree(tmp_path / "ok.zarr")
    assert not any(p.name.endswith(".zarr") for p in tmp_path.iterdir())  # nothing that looks like an atlas is left


def test_builder_file_errors(tmp_path):
    (tmp_path / "empty.h5ad").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.h5ad is not a readable .h5ad file"):
        build_atlas(tmp_path / "empty.h5ad", tmp_path / "e.zarr", progress=False)
    adata = make_synthetic_adata(num_cells=200, num_genes=20, seed=1)
    adata.write_h5ad(tmp_path / "full.h5ad")
    data = (tmp_path / "full.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cut.h5ad is not a readable .h5ad file .*truncated"):
        build_atlas(tmp_path / "cut.h5ad", tmp_path / "c.zarr", progress=False, **BUILD_COLUMNS)
    with pytest.raises(FileNotFoundError, match="nowhere.h5ad does not exist"):
        build_atlas(tmp_path / "nowhere.h5ad", tmp_path / "n.zarr", progress=False)


@pytest.fixture()
def atlas_copy(tmp_path):
    return make_synthetic_atlas(tmp_path / "a.zarr", num_cells=600, num_genes=20)


def test_incomplete_atlas(atlas_copy):
    import zarr

    root = zarr.open_group(str(atlas_copy), mode="r+")
    meta = dict(root.attrs)["perturbdiff"]
    root.attrs["perturbdiff"] = {**meta, "complete": False}
    with pytest.raises(AtlasIncompleteError, match="is incomplete: its build did not finish"):
        Atlas(atlas_copy)


def test_atlas_with_a_lost_var_index_chunk(atlas_copy):
    """A lost chunk of var/_index reads as fill values: it used to open, validate and train a 1-gene model."""
    chunks = [p for p in (atlas_copy / "var").rglob("*") if p.is_file() and "_index" in str(p) and p.parent.name == "c"]
    assert chunks
    for c in chunks:
        c.unlink()
    with pytest.raises(AtlasCorruptError, match="var holds .* gene names .* the var index is damaged"):
        Atlas(atlas_copy)


def test_atlas_with_overlapping_group_ranges(atlas_copy):
    import zarr

    root = zarr.open_group(str(atlas_copy), mode="r+")
    from anndata.io import read_elem, write_elem

    groups = read_elem(root["uns/perturbdiff_groups"]) if "uns/perturbdiff_groups" in root else None
    if groups is None:  # find the group index wherever the store keeps it
        from perturbdiff.data import store

        path = store._GROUPS_PATH
        groups = read_elem(root[path])
    else:
        path = "uns/perturbdiff_groups"
    groups = groups.copy()
    groups.loc[groups.index[1], "start"] = int(groups["start"].iloc[1]) - 5  # overlaps group 0
    write_elem(root, path, groups)
    with pytest.raises(AtlasCorruptError, match="the group index is damaged"):
        Atlas(atlas_copy)


# =========================================================================== splits and the loader
def test_split_and_loader_errors(tmp_path):
    atlas = Atlas(make_synthetic_atlas(tmp_path / "a.zarr", num_cells=600, num_genes=20))
    with pytest.raises(ValueError, match=r"\['celltype9'\] match nothing in the data \(known, 3: celltype0"):
        check_held_out_names(["celltype9"], ["PERT1"], [atlas])
    with pytest.raises(ValueError, match=r"unknown context name\(s\) \['celltype0'"):
        CellSetDataset(atlas, set_size=8, batch_size=2, context_names=["celltype1", "celltype2"])
    with pytest.raises(ValueError, match="pair_controls needs mode='conditional'"):
        CellSetDataset(atlas, set_size=8, batch_size=2, mode="marginal", pair_controls=True)
    with pytest.raises(FileNotFoundError, match="split file .*none.toml does not exist"):
        SplitSpec.load(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text('[holdout]\n"x" = "test"\n')
    with pytest.raises(ValueError, match=r"split file: unknown sections \['holdout'\]"):
        SplitSpec.load(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match=r"unknown split 'eval'"):
        SplitSpec.from_dict({"zeroshot": {"celltype0": "eval"}})
    with pytest.warns(UserWarning, match=r"of the cells in the 'train' sets are resampled"):
        CellSetDataset(atlas, set_size=4096, batch_size=1)


# =========================================================================== prediction
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    genes = [f"GENE{i:04d}" for i in range(20)]
    config = pdiff.PerturbDiffConfig.from_preset("debug", gene_names=genes, perturbation_names=["control", "PERT1"],
                                                 context_names=["celltype0"], batch_names=["NA"])
    folder = tmp_path_factory.mktemp("model")
    pdiff.PerturbDiffModel(config).save_pretrained(folder)
    return pdiff.PerturbDiffPipeline.from_pretrained(folder, device="cpu"), genes


def _controls(genes, n=12, seed=0):
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"perturbation": "control", "cell_type": "celltype0"}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(rng.poisson(3, (n, len(genes))).astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))


@pytest.mark.parametrize("kwargs, match", [
    (dict(perturbation="PERT9", context="celltype0"), r"unknown perturbation\(s\) \['PERT9'\] and no features"),
    (dict(perturbation="PERT1", context="celltype7"), r"unknown context name\(s\) \['celltype7'\]"),
    (dict(perturbation="PERT1", context="celltype0", context_key="tissue"), r"context_key 'tissue' is not an obs column"),
    (dict(perturbation="PERT1", context="celltype0", control_label="DMSO"), r"no control cells: obs\['perturbation'\] has no 'DMSO'"),
    (dict(perturbation="PERT1", context="celltype0", input_space="log1p"), r"input_space='log1p' but .* raw counts"),
    (dict(perturbation="PERT1", context="celltype0", set_size=0), r"set_size must be >= 1, got 0"),
    (dict(perturbation="PERT1", context="celltype0", gene_key="symbol"), r"gene_key 'symbol' is not a var column"),
    (dict(conditions=pd.DataFrame({"perturbation": ["PERT1"], "context": ["celltype0"], "num_cells": [2.5]})),
     r"num_cells 2.5 is not a whole number >= 1"),
    (dict(conditions=pd.DataFrame({"perturbation": ["PERT1"], "cell": ["celltype0"]})), r"missing \['context'\]"),
])
def test_prediction_errors(pipe, kwargs, match):
    model, genes = pipe
    with pytest.raises(ValueError, match=match):
        model.predict(_controls(genes), context_key=kwargs.pop("context_key", "cell_type"), num_steps=2,
                      progress=False, **kwargs)


def test_prediction_with_most_genes_missing(pipe):
    model, genes = pipe
    control = _controls(genes)[:, genes[:5]].copy()
    with pytest.raises(ValueError, match=r"5 of the model's 20 genes are in the control data .*allow_missing_genes"):
        model.predict(control, perturbation="PERT1", context="celltype0", context_key="cell_type", progress=False)
    with pytest.raises(ValueError, match=r"too few to predict from \(at least 50% must match\)"):
        model.predict(control, perturbation="PERT1", context="celltype0", context_key="cell_type",
                      allow_missing_genes=True, progress=False)


# =========================================================================== runs (the real entry script)
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    e = dict(os.environ, PERTURBDIFF_CACHE=str(cache), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", "from perturbdiff.data import ensure_default_atlas; ensure_default_atlas()"],
                   env=e, check=True, timeout=300)
    return e


def run(env, out, *args):
    cmd = [sys.executable, str(ROOT / "pretrain" / "run.py"), "--config", str(TINY), "--output-dir", str(out), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def losses(out) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_diverging_run_exits_non_zero_and_exports_nothing(env, tmp_path):
    proc = run(env, tmp_path, "optim.lr=1e30")
    assert proc.returncode == 2
    assert "error: training diverged: non-finite loss or gradient at step 2" in proc.stderr
    assert "no export was written" in proc.stderr
    assert not (tmp_path / "model").exists()
    assert all(v is None or np.isfinite(v) for v in losses(tmp_path).values())


@pytest.mark.slow
def test_a_used_output_dir_is_refused_and_left_as_it_was(env, tmp_path):
    assert run(env, tmp_path).returncode == 0
    before = _files(tmp_path)
    proc = run(env, tmp_path, "--seed", "3")
    assert proc.returncode == 2 and f"output directory {tmp_path} holds an earlier run" in proc.stderr
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    proc = run(env, tmp_path, "--resume", "optim.lr=0.5")
    assert proc.returncode == 2 and "config differs from the run" in proc.stderr and "optim.lr=0.001 -> 0.5" in proc.stderr
    assert _files(tmp_path) == before  # byte for byte
    assert run(env, tmp_path, "--overwrite", "--seed", "3").returncode == 0
    assert losses(tmp_path)[1] != json.loads(before["metrics.jsonl"].decode().splitlines()[0])["loss"]
    proc = run(env, tmp_path / "missing", "--atlas", str(tmp_path / "nope.zarr"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("nope.zarr does not exist (build one "
                                                                                   "with `perturbdiff atlas build`)")


class _Payload:
    """A pickle that, when loaded, writes a marker file: what a planted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


@pytest.mark.slow
def test_damaged_or_planted_checkpoints_are_skipped_and_the_run_resumes_exactly(env, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["train.save_every=2", "train.keep_last=3"]
    assert run(env, full, *common).returncode == 0
    assert run(env, split, *common, "train.stop_after_steps=4").returncode == 0
    ckpts = sorted((split / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    ema = ckpts[-1] / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the newest checkpoint
    ema.write_bytes(bytes(data))
    marker = tmp_path / "payload-ran"
    proc = run(env, split, *common, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipping checkpoint {ckpts[-1]}: ema.safetensors does not match its checksum" in proc.stdout, proc.stdout
    assert f"resumed from {ckpts[0]} at step 2" in proc.stdout
    assert losses(split) == pytest.approx(losses(full), rel=1e-6)  # the uninterrupted run's losses
    # a planted pickle in every checkpoint: nothing is loaded, nothing runs
    assert (split / "checkpoints" / ".damaged-step-00000004").is_dir()  # moved aside, kept, no longer counted
    planted = sorted(p for p in (split / "checkpoints").iterdir() if p.name.startswith("step-"))
    for ckpt in planted:
        (ckpt / "optimizer.bin").write_bytes(pickle.dumps(_Payload(marker)))
    proc = run(env, split, *common, "--resume", "train.max_steps=8")
    assert not marker.exists()
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("--resume: skipping checkpoint")]
    assert len(skipped) == len(planted) == 3 and all("optimizer.bin" in line for line in skipped)
    assert "no intact checkpoint" in proc.stdout
    assert sorted(losses(split)) == list(range(1, 9))  # started again from step 0: no step logged twice


@pytest.mark.slow
def test_a_full_disk_is_reported_and_leaves_no_partial_checkpoint(env, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:  # needs root (as on CI); elsewhere there is no small disk to fill
        pytest.skip(f"cannot mount a 2 MiB tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        proc = run(env, small / "run")
        assert proc.returncode == 2
        assert "error: no space left on the device writing checkpoint" in proc.stderr
        assert "the partial checkpoint was removed" in proc.stderr
        assert list((small / "run" / "checkpoints").iterdir()) == []  # no partial folder filling the disk
        assert not (small / "run" / "model").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)
