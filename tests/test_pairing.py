"""Optimal-transport pairing of control cells (perturbdiff.data.pairing) and the loader that pairs."""

from itertools import permutations

import pytest
import torch

from perturbdiff.data import CellSetDataset, make_synthetic_atlas
from perturbdiff.data.pairing import pair_control_sets, pair_order


def test_pair_control_sets_matches_each_perturbed_cell_to_its_optimal_control_cell():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 5, 8, generator=g)
    shifted = x0 + 0.05 * torch.randn(2, 5, 8, generator=g)  # each cell's control is itself, nearly
    perm = torch.tensor([3, 0, 4, 1, 2])
    paired = pair_control_sets(x0, shifted[:, perm])
    torch.testing.assert_close(paired, shifted)  # the shuffle is undone
    control = torch.rand(2, 5, 8, generator=g)  # unrelated sets: no assignment costs less
    paired = pair_control_sets(x0, control)
    cost = lambda c: float((x0[0] - c).pow(2).sum())  # noqa: E731
    best = min(cost(control[0][list(p)]) for p in permutations(range(5)))
    assert abs(cost(paired[0]) - best) < 1e-5
    assert sorted(paired[1].sum(-1).tolist()) == pytest.approx(sorted(control[1].sum(-1).tolist()))  # a reordering


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    return make_synthetic_atlas(tmp_path_factory.mktemp("pairing") / "a.zarr", num_cells=1500, num_genes=40)


def test_the_loader_pairs_control_sets_in_dense_and_sparse_batches(atlas):
    from perturbdiff.data import densify

    common = dict(set_size=12, batch_size=3, seed=0)
    plain = next(iter(CellSetDataset(atlas, **common)))
    dense = next(iter(CellSetDataset(atlas, pair_controls=True, **common)))
    sparse = densify(next(iter(CellSetDataset(atlas, pair_controls=True, sparse=True, **common))))
    torch.testing.assert_close(dense["x0"], plain["x0"])  # targets are untouched
    torch.testing.assert_close(sparse["control"], dense["control"])  # both batch kinds pair alike
    torch.testing.assert_close(sparse["x0"], dense["x0"])
    # the paired control set is the unpaired one reordered by the assignment
    order = pair_order(plain["x0"], plain["control"])
    torch.testing.assert_close(dense["control"], torch.stack([c[o] for c, o in zip(plain["control"], torch.from_numpy(order))]))
    assert not torch.equal(dense["control"], plain["control"])
    cost = lambda c: float((dense["x0"] - c).pow(2).sum())  # noqa: E731
    assert cost(dense["control"]) < cost(plain["control"])
    with pytest.raises(ValueError, match="pair_controls needs mode='conditional'"):
        CellSetDataset(atlas, pair_controls=True, mode="marginal", **common)
    with pytest.raises(ValueError, match="one shape"):
        pair_order(torch.zeros(1, 3, 2), torch.zeros(1, 4, 2))
