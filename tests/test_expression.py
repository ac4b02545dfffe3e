"""Expression spaces (perturbdiff.expression): every accepted input lands in the training space."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbdiff.expression import (
    Normalization,
    decode_counts,
    detect_input_space,
    gene_columns,
    log1p_to_counts,
    normalize_counts,
    normalize_csr,
    to_model_space,
)

NORM = Normalization()  # log1p(counts / total * 1e4) / 10


def _counts(seed=0, cells=40, genes=60):
    rng = np.random.default_rng(seed)
    mu = rng.gamma(1.5, 2.0, genes)
    X = rng.negative_binomial(2, 2 / (2 + mu * rng.uniform(0.5, 2.0, (cells, 1))), size=(cells, genes))
    X[:, 0] += 1  # no empty cell
    return X.astype(np.float32)


def _log1p(counts, target=1e4):
    return np.log1p(counts / counts.sum(1, keepdims=True) * target).astype(np.float32)


def test_detect_input_space():
    counts = np.array([[0, 3, 10], [5, 0, 1]], dtype=np.float32)
    assert detect_input_space(counts) == "counts"
    assert detect_input_space(sp.csr_matrix(np.log1p(counts))) == "log1p"
    assert detect_input_space(np.log1p(counts), "log1p") == "log1p"
    with pytest.raises(ValueError, match="all zeros"):
        detect_input_space(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="real expression has 1 non-finite"):
        detect_input_space(np.array([[1.0, np.inf]]), what="real expression")
    with pytest.raises(ValueError, match="it looks like raw counts"):
        detect_input_space(counts, "log1p")
    with pytest.raises(ValueError, match="negative values"):
        detect_input_space(-counts)


def test_log1p_over_a_larger_gene_set_lands_where_its_counts_land():
    """PerturBench's case: log1p normalised over the whole transcriptome, a gene subset kept. The
    model's space normalises each cell over the genes it has, as training on an atlas built from
    the same file does; taking the log1p values as they are would be a different space."""
    counts = _counts()
    keep = np.arange(0, 60, 3)  # 20 of 60 genes
    subset_log1p = _log1p(counts)[:, keep]  # normalised over all 60 genes, then subset
    cols = np.arange(len(keep))
    from_log1p, totals = to_model_space(subset_log1p, cols, "log1p", NORM)
    from_counts, count_totals = to_model_space(counts[:, keep], cols, "counts", NORM)
    np.testing.assert_allclose(from_log1p, from_counts, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(from_counts, normalize_counts(counts[:, keep], NORM), rtol=1e-5, atol=1e-6)
    assert np.ptp(totals) > 100  # the subset's expm1 totals vary per cell (not 1e4)
    np.testing.assert_allclose(count_totals, counts[:, keep].sum(1))
    # ... and it is not the log1p values taken as they are (12x too small in linear terms here)
    assert not np.allclose(from_log1p, subset_log1p / NORM.scale, atol=1e-2)


def test_the_loader_the_pipeline_and_evaluation_share_one_space(tmp_path):
    """An .h5ad of log1p values over a gene subset: the atlas built from it (recovered counts),
    prediction's control pool and evaluation's matrix hold the same values for the same cells."""
    import perturbdiff as pdiff
    from perturbdiff.data import Atlas, build_atlas
    from perturbdiff.evaluation import log1p_matrix

    counts = _counts(1, cells=30, genes=45)
    keep = np.arange(0, 45, 3)
    genes = [f"g{i}" for i in keep]
    obs = pd.DataFrame({"perturbation": ["control"] * 30}, index=[f"c{i}" for i in range(30)])
    screen = ad.AnnData(sp.csr_matrix(_log1p(counts)[:, keep]), obs=obs, var=pd.DataFrame(index=genes))
    screen.write_h5ad(tmp_path / "screen.h5ad")
    build_atlas(tmp_path / "screen.h5ad", tmp_path / "a.zarr", input_log1p=True, progress=False)
    atlas = Atlas(tmp_path / "a.zarr")
    rows = atlas.read_rows(0, atlas.num_cells)  # (indptr, indices, data) of recovered counts
    loader_values = sp.csr_matrix((normalize_csr(rows[0], rows[2], NORM), rows[1], rows[0]),
                                  shape=(atlas.num_cells, len(genes))).toarray()
    config = pdiff.PerturbDiffConfig.from_preset("debug", gene_names=genes, perturbation_names=["control", "x"])
    pipe = pdiff.PerturbDiffPipeline(pdiff.PerturbDiffModel(config), device="cpu")
    pool, info = pipe._control_pool(screen, perturbation_key=None, context_key=None, batch_key=None,
                                    control_label=None, gene_key=None, layer=None, input_space="auto",
                                    allow_missing_genes=False)
    assert info["input_space"] == "log1p"
    # the atlas shuffles cells within groups: compare the sorted per-cell profiles
    key = lambda M: M[np.lexsort(np.round(M, 4).T[::-1])]  # noqa: E731
    np.testing.assert_allclose(key(pool["X"]), key(loader_values), rtol=1e-4, atol=1e-5)
    evaluated = log1p_matrix(screen, genes, 1e4, "real")
    np.testing.assert_allclose(evaluated / NORM.scale, pool["X"], rtol=1e-4, atol=1e-5)


def test_count_recovery_and_gene_columns():
    counts = _counts(2, cells=10, genes=12)
    recovered, non_integer = log1p_to_counts(sp.csr_matrix(_log1p(counts, target=3e4)))
    assert non_integer == 0
    np.testing.assert_array_equal(recovered.toarray(), counts)
    assert gene_columns(["a", "b", "c"], ["c", "x", "a"]).tolist() == [2, -1, 0]
    with pytest.raises(ValueError, match=r"the data has duplicated gene names among the model's genes: \['a'\]"):
        gene_columns(["a", "b", "a"], ["a"])
    gene_columns(["a", "b", "b"], ["a"])  # duplicates outside the vocabulary do not matter


def test_decode_counts_puts_cells_on_their_count_lattice_without_bias():
    """Integer counts at each cell's library size; unbiased; a lattice point is kept as it is."""
    rng = np.random.default_rng(0)
    counts = _counts(cells=200, genes=30)
    library = counts.sum(1) * rng.uniform(0.5, 2.0, len(counts))  # some other library size per cell
    values = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4 * rng.uniform(0.6, 1.4, counts.shape))
    out_counts, normed = decode_counts(values.astype(np.float32), library, 1e4, np.random.default_rng(1))
    assert np.array_equal(out_counts, np.round(out_counts)) and (out_counts >= 0).all()
    expected = np.expm1(values) * library[:, None] / 1e4
    assert (np.abs(out_counts - expected) < 1).all()  # each value goes to a neighbouring integer
    # unbiased in log space: the lattice values average to the predicted values
    lattice_values = np.log1p(out_counts * 1e4 / library[:, None])
    step = np.log1p((np.floor(expected) + 1) * 1e4 / library[:, None]) - np.log1p(np.floor(expected) * 1e4 / library[:, None])
    assert abs(lattice_values.mean() - values.mean()) < 4 * np.sqrt((step**2 / 4).mean() / values.size)
    # normalised again over the cell's own counts: totals are exactly the target sum, and no
    # non-zero value is below one count's worth at the cell's new total
    np.testing.assert_allclose(np.expm1(normed.astype(np.float64)).sum(1), 1e4, rtol=1e-4)
    one_count = np.log1p(1e4 / out_counts.sum(1, keepdims=True))
    assert (normed[normed > 0] >= np.broadcast_to(one_count, normed.shape)[normed > 0] * (1 - 1e-5)).all()
    # a cell already on its lattice comes back unchanged
    lattice = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    same, _ = decode_counts(lattice, counts.sum(1), 1e4, np.random.default_rng(2))
    assert np.array_equal(same, counts)
    # counts outside the predicted genes count in the total
    _, partial = decode_counts(lattice[:, :10], counts.sum(1), 1e4, np.random.default_rng(2),
                               outside=counts[:, 10:].sum(1))
    np.testing.assert_allclose(partial, lattice[:, :10], atol=1e-4)
