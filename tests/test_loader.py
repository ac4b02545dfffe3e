"""The streaming cell-set loader: batch format, normalisation, sharding, determinism, resumption,
modes, splits, mixing and the shared gene vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff.data.builder import build_atlas
from perturbdiff.data.loader import CellSetDataset
from perturbdiff.data.splits import SplitSpec
from perturbdiff.data.store import Atlas
from perturbdiff.data.synthetic import BUILD_COLUMNS, make_synthetic_adata
from perturbdiff.data.vocab import atlas_vocabularies, gene_vocabulary
from perturbdiff.expression import Normalization, normalize_counts

SMALL = dict(chunk_elems=1024, shard_chunks=4, block_cells=700, progress=False)
M, B = 16, 4


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory):
    adata = make_synthetic_adata(num_cells=1500, num_genes=60, num_contexts=3, num_perturbations=4, seed=0)
    return build_atlas(adata, tmp_path_factory.mktemp("a") / "a.zarr", dataset_name="syn", **BUILD_COLUMNS, **SMALL)


@pytest.fixture(scope="module")
def dense(atlas_path):
    """The atlas's raw counts, dense, in atlas row order (fine for a test-sized atlas)."""
    atlas = Atlas(atlas_path)
    ip, ix, d = atlas.read_rows(0, atlas.num_cells)
    X = np.zeros((atlas.num_cells, atlas.num_genes), np.float32)
    X[np.repeat(np.arange(atlas.num_cells), np.diff(ip)), ix] = d
    return X


def _batches(ds, **kw):
    return list(ds.loader(**kw)) if kw else list(ds)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _row_keys(rows: np.ndarray) -> set:
    return {r.tobytes() for r in np.round(rows, 4).astype(np.float32)}


def test_batch_format_and_vocabularies(atlas_path):
    ds = CellSetDataset(atlas_path, set_size=M, batch_size=B)
    batch = next(iter(ds))
    assert set(batch) == {"x0", "control", "perturbation", "context", "batch", "dose", "group"}
    G = Atlas(atlas_path).num_genes
    assert batch["x0"].shape == batch["control"].shape == (B, M, G)
    assert batch["x0"].dtype == batch["control"].dtype == torch.float32
    for key in ("perturbation", "context", "batch", "group"):
        assert batch[key].shape == (B,) and batch[key].dtype == torch.int64
    assert batch["dose"].dtype == torch.float32
    vocab = atlas_vocabularies(atlas_path)
    assert ds.perturbation_names == vocab["perturbation"] and "control" in vocab["perturbation"]
    groups = Atlas(atlas_path).groups
    for i, g in enumerate(batch["group"].tolist()):
        row = groups.iloc[g]
        assert vocab["perturbation"][batch["perturbation"][i] - 1] == row["perturbation"] != "control"
        assert vocab["context"][batch["context"][i] - 1] == row["context"]
        assert vocab["batch"][batch["batch"][i] - 1] == row["batch"]
        assert batch["dose"][i] == pytest.approx(row["dose"])
    assert len(ds) == len(list(ds))


def test_given_vocabulary_and_unknown_names(atlas_path):
    groups = Atlas(atlas_path).groups
    contexts = sorted(groups["context"].unique()) + ["other"]
    ds = CellSetDataset(atlas_path, set_size=M, batch_size=B, context_names=contexts[::-1], seed=1)
    for batch in ds:  # ids follow the given vocabulary's order
        for g, c in zip(batch["group"].tolist(), batch["context"].tolist()):
            assert contexts[::-1][c - 1] == groups["context"].iat[g]
    with pytest.raises(ValueError, match=r"unknown context name\(s\) \['celltype0'.*knows 2: celltype1, other"):
        CellSetDataset(atlas_path, set_size=M, batch_size=B, context_names=["celltype1", "other"], seed=1)


def test_sets_are_normalised_group_cells_with_matched_controls(atlas_path, dense):
    norm = Normalization(target_sum=1e4, log1p=True, scale=10.0)
    ds = CellSetDataset(atlas_path, set_size=M, batch_size=B, normalization=norm, seed=3)
    groups = Atlas(atlas_path).groups
    reference = normalize_counts(dense, norm)  # whole-row totals, as the loader uses
    for k, batch in enumerate(list(ds)[:8]):
        for i, (g, rows) in enumerate(zip(batch["group"].tolist(), ds.batch_rows(k))):
            row = groups.iloc[g]
            assert rows["group"] == g
            np.testing.assert_allclose(batch["x0"][i].numpy(), reference[rows["x0"]], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(batch["control"][i].numpy(), reference[rows["control"]], rtol=1e-5, atol=1e-6)
            assert ((rows["x0"] >= row["start"]) & (rows["x0"] < row["stop"])).all()  # cells of its group
            n = row["stop"] - row["start"]
            if n >= M:  # one contiguous window (wrapping at the group's end), no repeats
                assert len(set(rows["x0"].tolist())) == M
                assert (np.diff(rows["x0"]) == 1).sum() >= M - 2
            else:  # short group: all of its cells, padded by resampling
                assert set(rows["x0"].tolist()) == set(range(row["start"], row["stop"]))
            ctrl = groups[(groups["is_control"]) & (groups["context"] == row["context"]) & (groups["batch"] == row["batch"])]
            assert len(ctrl) == 1  # control set: the same (dataset, context, batch) pool
            assert ((rows["control"] >= ctrl["start"].iat[0]) & (rows["control"] < ctrl["stop"].iat[0])).all()


@pytest.mark.parametrize("hidden", ["batch", "context"])
def test_hidden_covariates_keep_sets_within_one_group_but_tell_the_model_nothing(atlas_path, hidden):
    """hidden_covariates: every set still comes from one group with that group's own controls,
    and its id of the hidden covariate is the null id (the model learns how populations vary
    across batches / contexts); the batches are otherwise the same."""
    groups = Atlas(atlas_path).groups
    assert groups[hidden].nunique() > 1
    told = CellSetDataset(atlas_path, set_size=M, batch_size=B, seed=3)
    quiet = CellSetDataset(atlas_path, set_size=M, batch_size=B, seed=3, hidden_covariates=[hidden])
    assert getattr(quiet, f"{hidden}_names") == [] and getattr(told, f"{hidden}_names")
    seen = set()
    for k, (a, b) in enumerate(zip(list(told)[:6], list(quiet)[:6])):
        assert (a[hidden] > 0).all() and (b[hidden] == 0).all()
        assert _same({key: v for key, v in a.items() if key != hidden}, {key: v for key, v in b.items() if key != hidden})
        for g, rows in zip(b["group"].tolist(), quiet.batch_rows(k)):
            row = groups.iloc[g]
            seen.add(row[hidden])
            ctrl = groups[(groups["is_control"]) & (groups["context"] == row["context"]) & (groups["batch"] == row["batch"])]
            assert ((rows["control"] >= ctrl["start"].iat[0]) & (rows["control"] < ctrl["stop"].iat[0])).all()
    assert len(seen) > 1
    with pytest.raises(ValueError, match="perturbation.*cannot be hidden"):
        CellSetDataset(atlas_path, set_size=M, batch_size=B, hidden_covariates=["perturbation"])


def test_an_epoch_covers_every_cell_of_each_group(atlas_path, dense):
    ds = CellSetDataset(atlas_path, set_size=M, batch_size=B, seed=0)
    groups = Atlas(atlas_path).groups
    seen: dict[int, list] = {}
    for batch in ds:
        for g, x in zip(batch["group"].tolist(), batch["x0"].numpy()):
            seen.setdefault(g, []).append(x)
    reference = normalize_counts(dense, Normalization())
    perturbed = groups.index[~groups["is_control"]].astype(int)
    assert sorted(seen) == sorted(perturbed)
    for g, sets in seen.items():
        row = groups.iloc[g]
        n = row["stop"] - row["start"]
        assert len(sets) == -(-n // M)  # ceil(n / m) sets per group per epoch
        assert _row_keys(np.concatenate(sets)) == _row_keys(reference[row["start"] : row["stop"]])


def test_deterministic_in_seed_and_epoch(atlas_path):
    make = lambda seed: CellSetDataset(atlas_path, set_size=M, batch_size=B, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    first = _batches(a)
    assert all(_same(x, y) for x, y in zip(first, _batches(b)))
    a.set_epoch(1)
    assert not all(_same(x, y) for x, y in zip(first, _batches(a)))
    assert not all(_same(x, y) for x, y in zip(first, _batches(make(1))))
    a.set_epoch(0)
    assert all(_same(x, y) for x, y in zip(first, _batches(a)))


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_and_workers_are_disjoint_and_complete(atlas_path, drop_last):
    world = 3
    ranks = [CellSetDataset(atlas_path, set_size=M, batch_size=B, rank=r, world_size=world, drop_last=drop_last,
                            return_set_ids=True, seed=5) for r in range(world)]
    per_rank = [_batches(ds) for ds in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])  # same step count on every rank
    ids = np.concatenate([b["set_id"].numpy() for batches in per_rank for b in batches])
    total = ranks[0].num_sets
    if drop_last:
        assert len(ids) == len(set(ids.tolist())) and len(ids) == total // (world * B) * world * B
        assert all(b["x0"].shape[0] == B for batches in per_rank for b in batches)
    else:
        assert set(ids.tolist()) == set(range(total))  # every set, padding repeats only a few
        assert len(ids) - total < world
    # DataLoader workers: same batches, same order, as without workers
    with_workers = _batches(ranks[1], num_workers=2)
    assert len(with_workers) == len(per_rank[1]) and all(_same(x, y) for x, y in zip(per_rank[1], with_workers))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_dict(atlas_path, num_workers):
    make = lambda: CellSetDataset(atlas_path, set_size=M, batch_size=B, seed=7, world_size=2, rank=1)  # noqa: E731
    full = make()
    full.set_epoch(2)
    expected = _batches(full)
    run = make()
    run.set_epoch(2)
    loader = run.loader(num_workers=num_workers)
    consumed = []
    for batch in loader:
        consumed.append(batch)
        if len(consumed) == 5:
            break
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 5
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a training loop does on resume: the saved position is kept
    rest = _batches(resumed, num_workers=num_workers) if num_workers else _batches(resumed)
    assert len(consumed) + len(rest) == len(expected)
    assert all(_same(x, y) for x, y in zip(consumed + rest, expected))
    other = CellSetDataset(atlas_path, set_size=M, batch_size=B + 1, seed=7, world_size=2, rank=1)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_marginal_mode(atlas_path):
    ds = CellSetDataset(atlas_path, set_size=M, batch_size=B, mode="marginal")
    batches = list(ds)
    assert "control" not in batches[0]
    groups = Atlas(atlas_path).groups
    seen = {g for b in batches for g in b["group"].tolist()}
    assert seen == set(range(len(groups)))  # every group, controls included
    assert all((b["perturbation"] == 0).all() and (b["dose"] == 0).all() for b in batches)


def test_split_held_out_context_x_perturbation(atlas_path, tmp_path):
    groups = Atlas(atlas_path).groups
    spec = SplitSpec.held_out(["celltype2"], ["PERT1", "PERT3"])
    toml = tmp_path / "split.toml"
    toml.write_text(
        '[datasets]\nsyn = "a.zarr"\n\n[training]\nsyn = "train"\n\n[zeroshot]\n\n'
        '[fewshot]\n[fewshot."syn.celltype2"]\ntest = ["PERT1", "PERT3"]\n'
    )
    held = {i for i, r in groups.iterrows() if r["context"] == "celltype2" and r["perturbation"] in ("PERT1", "PERT3")}
    held = {int(i) for i in held}
    for source in (spec, toml, SplitSpec.load(toml)):
        train = {g for b in CellSetDataset(atlas_path, set_size=M, batch_size=B, held_out=source) for g in b["group"].tolist()}
        test = {g for b in CellSetDataset(atlas_path, set_size=M, batch_size=B, held_out=source, split="test") for g in b["group"].tolist()}
        assert test == held and not train & held
        # the held-out perturbations are trained in other contexts, the held-out context with others
        assert {groups["perturbation"].iat[g] for g in train} >= {"PERT1", "PERT3"}
        assert "celltype2" in {groups["context"].iat[g] for g in train}
    assert SplitSpec.from_dict(__import__("tomllib").loads(spec.to_toml())) == spec
    with pytest.raises(ValueError, match="selects no groups"):
        CellSetDataset(atlas_path, set_size=M, batch_size=B, held_out=spec, split="val")
    with pytest.raises(ValueError, match="selects no groups"):  # without a split everything is train
        CellSetDataset(atlas_path, set_size=M, batch_size=B, split="test")


def test_zeroshot_context_and_marginal_split(atlas_path):
    spec = SplitSpec.from_dict({"zeroshot": {"syn.celltype0": "test"}})
    groups = Atlas(atlas_path).groups
    train = CellSetDataset(atlas_path, set_size=M, batch_size=B, held_out=spec, mode="marginal")
    seen = {groups["context"].iat[g] for b in train for g in b["group"].tolist()}
    assert seen == {"celltype1", "celltype2"}  # marginal pretraining never sees the held-out context


@pytest.fixture(scope="module")
def two_atlases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    a = make_synthetic_adata(num_cells=1200, num_genes=60, seed=1)
    b = make_synthetic_adata(num_cells=600, num_genes=60, seed=2)
    a = a[:, a.var_names[:40]].copy()  # genes 0-39
    b = b[:, b.var_names[20:]].copy()  # genes 20-59
    pa = build_atlas(a, folder / "a.zarr", dataset_name="A", n_top_genes=25, **BUILD_COLUMNS, **SMALL)
    pb = build_atlas(b, folder / "b.zarr", dataset_name="B", n_top_genes=25, **BUILD_COLUMNS, **SMALL)
    return pa, pb


def test_gene_vocabulary_union_and_absent_genes(two_atlases):
    pa, pb = two_atlases
    hv = [set(Atlas(p).gene_names[Atlas(p).var["highly_variable"].to_numpy()]) for p in (pa, pb)]
    assert all(len(h) == 25 for h in hv)
    vocab = gene_vocabulary([pa, pb])
    assert set(vocab) == hv[0] | hv[1] and len(vocab) == len(set(vocab))
    every = gene_vocabulary([pa, pb], all_genes=True)  # finetuning's default: no gene left out
    assert every == [f"GENE{i:04d}" for i in range(60)] and set(vocab) < set(every)
    assert set(gene_vocabulary([pa, pb], n_top_genes=5)) < set(vocab)
    genes = [f"GENE{i:04d}" for i in range(60)]
    ds = CellSetDataset([pa, pb], set_size=M, batch_size=B, gene_names=genes, mode="marginal")
    absent_a = set(ds.absent_genes[str(pa)])
    assert absent_a == set(genes[40:]) and set(ds.absent_genes[str(pb)]) == set(genes[:20])
    assert ds.gene_presence.sum(1).tolist() == [40, 40]
    offset = len(Atlas(pa).groups)
    for batch in ds:
        for g, x in zip(batch["group"].tolist(), batch["x0"]):
            missing = slice(40, 60) if g < offset else slice(0, 20)
            assert (x[:, missing] == 0).all()  # absent genes are zero
    # a user gene list with an atlas measuring none of it is refused
    with pytest.raises(ValueError, match="none of the"):
        gene_vocabulary([pa, pb], genes=genes[:10])


def test_mixing_weights(two_atlases):
    pa, pb = two_atlases
    offset = len(Atlas(pa).groups)
    natural = CellSetDataset([pa, pb], set_size=M, batch_size=B, mode="marginal", return_set_ids=True)
    ids = [g for b in natural for g in b["group"].tolist()]
    n_a = sum(g < offset for g in ids)
    assert n_a > 1.5 * (len(ids) - n_a)  # unweighted: in proportion to size (1200 vs 600 cells)
    for w in ([1.0, 3.0], [1.0, 0.0]):
        ds = CellSetDataset([pa, pb], set_size=M, batch_size=B, mode="marginal", weights=w, return_set_ids=True)
        ids = [g for b in ds for g in b["group"].tolist()]
        share_b = sum(g >= offset for g in ids) / len(ids)
        assert share_b == pytest.approx(w[1] / sum(w), abs=0.02)
        sids = [s for b in ds for s in b["set_id"].tolist()]
        assert len(sids) == len(set(sids)) == ds.num_sets


def test_control_fallback_to_another_batch(tmp_path):
    adata = make_synthetic_adata(num_cells=1500, num_genes=60, seed=4)
    drop = (adata.obs["batch"] == "batch1") & (adata.obs["perturbation"] == "control") & (adata.obs["cell_type"] == "celltype0")
    path = build_atlas(adata[~drop].copy(), tmp_path / "f.zarr", **BUILD_COLUMNS, **SMALL)
    groups = Atlas(path).groups
    ds = CellSetDataset(path, set_size=M, batch_size=B)
    pools = ds.sources[0].controls
    for g, (cands, _) in pools.items():
        row = groups.iloc[g]
        ctx = groups.iloc[cands]
        assert (ctx["is_control"]).all() and (ctx["context"] == row["context"]).all()
        if row["context"] == "celltype0" and row["batch"] == "batch1":
            assert set(ctx["batch"]) == {"batch0"}  # fallback: same context, other batch
        else:
            assert list(ctx["batch"]) == [row["batch"]]
    assert sum(1 for _ in ds) == len(ds)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sparse_batches_densify_to_the_dense_batches(atlas_path, two_atlases, num_workers):
    from perturbdiff.data.sparse import SparseSets, densify

    for atlases, mode in ((atlas_path, "conditional"), (list(two_atlases), "marginal")):  # identity and mapped genes
        kw = dict(set_size=M, batch_size=B, mode=mode, seed=3)
        dense_batches = _batches(CellSetDataset(atlases, **kw))
        sparse_batches = _batches(CellSetDataset(atlases, sparse=True, **kw), **({"num_workers": num_workers} if num_workers else {}))
        assert len(sparse_batches) == len(dense_batches) > 0
        for s, d in zip(sparse_batches, dense_batches):
            assert isinstance(s["x0"], SparseSets) and s["x0"].shape == tuple(d["x0"].shape)
            assert s["x0"].values.numel() < d["x0"].numel()  # sparse: only the non-zeros travel
            assert (s["x0"].values != 0).float().mean() > 0.5
            assert ("control" in s) == ("control" in d) == (mode == "conditional")
            assert _same(densify(s), d)



def test_batches_carry_each_sets_perturbation_features(atlas_path):
    ds = CellSetDataset(atlas_path, set_size=M, batch_size=B)
    feats = np.random.default_rng(0).normal(size=(len(ds.perturbation_names) + 1, 3)).astype(np.float32)
    with_features = CellSetDataset(atlas_path, set_size=M, batch_size=B, perturbation_features=feats)
    for batch in list(with_features)[:4]:
        np.testing.assert_array_equal(batch["perturbation_features"].numpy(), feats[batch["perturbation"].numpy()])
    assert "perturbation_features" not in next(iter(ds))
    with pytest.raises(ValueError, match=r"perturbation_features must be \[\d+ perturbation ids, F\]"):
        CellSetDataset(atlas_path, set_size=M, batch_size=B, perturbation_features=feats[:-1])
    with pytest.raises(ValueError, match="need mode='conditional'"):
        CellSetDataset(atlas_path, set_size=M, batch_size=B, mode="marginal", perturbation_features=feats)


def test_gene_maxima_cover_training_and_control_cells_but_no_held_out_group(atlas_path, dense):
    norm = Normalization(target_sum=1e4, log1p=True, scale=10.0)
    spec = SplitSpec.held_out(["celltype2"], ["PERT1"])
    ds = CellSetDataset(atlas_path, set_size=M, batch_size=B, normalization=norm, held_out=spec)
    maxima, cells = ds.gene_maxima()
    groups = Atlas(atlas_path).groups
    held = np.zeros(len(dense), dtype=bool)
    for _, g in groups.iterrows():
        held[g["start"]:g["stop"]] = g["context"] == "celltype2" and g["perturbation"] == "PERT1"
    reference = normalize_counts(dense, norm)
    np.testing.assert_allclose(maxima, reference[~held].max(0), rtol=1e-5)
    assert cells == (~held).sum()  # every other cell of this small atlas
    assert (reference[held].max(0) > maxima + 1e-6).any()  # the held-out cells would have raised some
