"""Appending a source to an existing atlas: the same cells as a build of both, X not rewritten, atomic."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbdiff.data.builder import build_atlas
from perturbdiff.data.loader import CellSetDataset
from perturbdiff.data.store import Atlas
from perturbdiff.data.synthetic import BUILD_COLUMNS, make_synthetic_adata

SMALL = dict(chunk_elems=1024, shard_chunks=4, block_cells=700, progress=False)
COLUMNS = {k: v for k, v in BUILD_COLUMNS.items() if k != "control_label"}


def _sources():
    a = make_synthetic_adata(num_cells=1500, num_genes=60, seed=0)
    b = make_synthetic_adata(num_cells=1200, num_genes=60, seed=1)
    b = b[:, b.var_names[::-1]].copy()  # same genes, another order
    b.obs["perturbation"] = b.obs["perturbation"].astype(str).replace("control", "ctrl")  # another control label
    b.obs["cell_type"] = b.obs["cell_type"].astype(str).replace("celltype0", "monocyte")  # a new context
    b.obs_names = [f"{n}" if i % 2 else f"b{i}" for i, n in enumerate(b.obs_names)]  # half the names repeat a's
    return a, b


def _files(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in path.rglob("*") if p.is_file()}


def _backup(path: Path, to: Path) -> None:
    """Hard links to every file: a later write into one of the atlas's files shows here."""
    for p in path.rglob("*"):
        if p.is_file():
            (to / p.relative_to(path)).parent.mkdir(parents=True, exist_ok=True)
            os.link(p, to / p.relative_to(path))


def test_append_equals_a_build_of_both_and_rewrites_no_x_shard(tmp_path):
    a, b = _sources()
    path = build_atlas(a, tmp_path / "corpus.zarr", dataset_name="a", **COLUMNS, **SMALL)
    before = _files(path)
    _backup(path, tmp_path / "backup")
    build_atlas(b, path, dataset_name="b", control_label="ctrl", append=True, **COLUMNS, **SMALL)

    # the old files were never written: the hard links still hold the old bytes
    assert _files(tmp_path / "backup") == before
    # X is not rewritten: every old shard file but the last of each array is the same file (inode)
    after = _files(path)
    for name in ("data", "indices"):  # (indptr: one shard of 1M cells here)
        shards = sorted((k for k in before if k.startswith(f"X/{name}/c/")), key=lambda k: int(k.rsplit("/", 1)[1]))
        assert len(shards) >= 4
        assert all(after[k][0] == before[k][0] for k in shards[:-1])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".corpus.zarr")]  # no scratch left

    # the same cells as one build of both inputs (control label renamed to the corpus's)
    b2 = b[:, a.var_names].copy()
    b2.obs["perturbation"] = b2.obs["perturbation"].replace("ctrl", "control")
    a.obs["ds"], b2.obs["ds"] = "a", "b"
    b2.obs_names = [f"b:{n}" for n in b2.obs_names]
    both = build_atlas([a, b2], tmp_path / "both.zarr", dataset_key="ds", **BUILD_COLUMNS, **SMALL)
    grown, ref = ad.read_zarr(path), ad.read_zarr(both)
    assert grown.obs_names.is_unique and set(grown.obs_names) == set(ref.obs_names)
    assert grown[grown.obs["dataset"] == "b"].obs_names.str.startswith("b:").all()  # a repeated name: qualified
    ref = ref[grown.obs_names]
    assert np.array_equal(grown.X.toarray(), ref.X.toarray())
    for col in ("dataset", "context", "perturbation", "batch", "dose", "is_control", "total_counts"):
        assert (grown.obs[col].astype(str).to_numpy() == ref.obs[col].astype(str).to_numpy()).all(), col
    assert np.allclose(grown.var["mean"], ref.var["mean"], rtol=1e-5)
    assert np.allclose(grown.var["variance"], ref.var["variance"], rtol=1e-4)
    assert (grown.var["n_cells"] == ref.var["n_cells"]).all()
    assert (grown.var["highly_variable"] == ref.var["highly_variable"]).all()

    atlas = Atlas(path)
    atlas.validate()
    g, obs = atlas.groups, atlas.read_obs()
    assert len(g) == len(Atlas(both).groups) and not g.duplicated(["dataset", "context", "perturbation", "dose", "batch"]).any()
    for _, row in g.iterrows():  # every group one contiguous row range, obs agreeing with it
        block = obs.iloc[row["start"] : row["stop"]]
        for key in ("dataset", "context", "perturbation", "batch"):
            assert (block[key].astype(str) == row[key]).all()
    assert (obs["group"].to_numpy() == np.repeat(np.arange(len(g)), (g["stop"] - g["start"]).to_numpy())).all()
    meta = atlas.metadata
    assert meta["appended"][0]["cells"] == b.n_obs and meta["appended"][0]["first_row"] == a.n_obs
    assert len(meta["sources"]) == 2 and meta["control_label"] == "control"
    # the loader reads the grown atlas: sets of the new context come from the new cells
    ds = CellSetDataset(path, set_size=16, batch_size=4)
    assert "monocyte" in ds.context_names
    assert next(iter(ds))["x0"].shape[:2] == (4, 16)


def test_append_refusals_leave_the_atlas_as_it_was(tmp_path, monkeypatch):
    a, b = _sources()
    path = build_atlas(a, tmp_path / "corpus.zarr", dataset_name="a", **COLUMNS, **SMALL)
    before = _files(path)
    kw = dict(append=True, control_label="ctrl", **COLUMNS, **SMALL)
    with pytest.raises(ValueError, match="already has dataset"):
        build_atlas(b, path, dataset_name="a", **kw)
    with pytest.raises(ValueError, match="genes differ"):
        build_atlas(b[:, :50].copy(), path, dataset_name="b", **kw)
    with pytest.raises(ValueError, match="object store is not supported"):
        build_atlas(b, "s3://bucket/corpus.zarr", dataset_name="b", **kw)
    with pytest.raises(ValueError, match="cannot also overwrite"):
        build_atlas(b, path, dataset_name="b", overwrite=True, **kw)

    import perturbdiff.data.append as append

    def fail(*args, **kwargs):  # called once X and the obs columns were written in the partial folder
        raise RuntimeError("disk full")

    monkeypatch.setattr(append, "_new_names", fail)
    # and zarr writing into existing files in place (as zarr < 3.1.3 did), not via a new file
    import zarr.storage._local as local

    def in_place(path, value, exclusive=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb" if exclusive else "wb") as f:
            return f.write(value.as_buffer_like())

    monkeypatch.setattr(local, "_put", in_place)
    with pytest.raises(RuntimeError, match="disk full"):
        build_atlas(b, path, dataset_name="b", **kw)
    assert _files(path) == before and Atlas(path).num_cells == a.n_obs
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".corpus.zarr")]

    import fcntl

    with open(tmp_path / ".corpus.zarr.lock", "a") as held:  # another append is running
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another append"):
            build_atlas(b, path, dataset_name="c", **kw)
    assert _files(path) == before


def test_cli_append(tmp_path, capsys):
    from perturbdiff.cli import main

    a, b = _sources()
    a.write_h5ad(tmp_path / "first.h5ad")
    b.write_h5ad(tmp_path / "second.h5ad")
    out = tmp_path / "corpus.zarr"
    cols = ["--perturbation-key", "perturbation", "--context-key", "cell_type", "--batch-key", "batch", "--quiet"]
    assert main(["atlas", "build", str(tmp_path / "first.h5ad"), "-o", str(out), *cols]) == 0
    assert main(["atlas", "build", str(tmp_path / "second.h5ad"), "-o", str(out), "--append", "--control-label", "ctrl", *cols]) == 0
    atlas = Atlas(out)
    assert atlas.num_cells == a.n_obs + b.n_obs and set(atlas.groups["dataset"]) == {"first", "second"}
    capsys.readouterr()
    assert main(["atlas", "build", str(tmp_path / "second.h5ad"), "-o", str(out), "--append", "--control-label", "ctrl", *cols]) == 2
    assert "already has dataset(s) ['second']" in capsys.readouterr().err


def test_append_widens_category_codes(tmp_path):
    """More perturbations than the stored codes' type holds (int8: 127): the codes are rewritten wider."""
    rng = np.random.default_rng(0)

    def screen(perts, name):
        labels = np.repeat(["control", *perts], 3)
        x = sp.csr_matrix(rng.poisson(2.0, (len(labels), 20)).astype(np.float32))
        a = ad.AnnData(x, obs=pd.DataFrame({"perturbation": labels}, index=[f"{name}{i}" for i in range(len(labels))]))
        a.var_names = [f"g{j}" for j in range(20)]
        return a

    path = build_atlas(screen([f"P{i}" for i in range(100)], "a"), tmp_path / "c.zarr", dataset_name="a", progress=False)
    build_atlas(screen([f"Q{i}" for i in range(60)], "b"), path, dataset_name="b", append=True, progress=False)
    grown = ad.read_zarr(path)
    assert grown.obs["perturbation"].cat.codes.dtype == np.int16
    names = grown.obs_names.str[0].to_numpy()
    labels = grown.obs["perturbation"].astype(str).to_numpy()
    assert set(labels[names == "a"]) == {"control", *[f"P{i}" for i in range(100)]}
    assert set(labels[names == "b"]) == {"control", *[f"Q{i}" for i in range(60)]}
    Atlas(path).validate()
