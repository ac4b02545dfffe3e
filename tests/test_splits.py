"""Splits (perturbdiff.data.splits): held-out cells are never trained on, whatever the validation settings."""

from __future__ import annotations

import pytest

from perturbdiff.data import Atlas, CellSetDataset, SplitSpec, make_synthetic_atlas, with_validation_groups
from perturbdiff.data.splits import check_held_out_names, split_counts


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    return Atlas(make_synthetic_atlas(tmp_path_factory.mktemp("splits") / "a.zarr", num_cells=2000, num_genes=30,
                                      num_contexts=3, num_perturbations=6))


def _groups(ds) -> set:
    return {g for b in ds for g in b["group"].tolist()}


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_validation_groups_never_move_test_groups_into_training(atlas, fraction):
    """The leak: validation rules keyed "dataset.context" hid the user's test rule keyed
    "context" (first match won), so the held-out sets were trained on."""
    groups = atlas.groups
    held_ctx, held_perts = "celltype1", ["PERT1", "PERT2", "PERT4"]
    spec = with_validation_groups(SplitSpec.held_out([held_ctx], held_perts), [atlas], fraction, seed=0)
    assert any(key.startswith("synthetic.") for key in spec.fewshot)  # validation rules were added
    test = {i for i, (_, r) in enumerate(groups.iterrows()) if r["context"] == held_ctx and r["perturbation"] in held_perts
            and not r["is_control"]}
    common = dict(set_size=16, batch_size=2, held_out=spec)
    trained = _groups(CellSetDataset([atlas], split="train", **common))
    validated = _groups(CellSetDataset([atlas], split="val", **common))
    assert trained and not trained & test and not validated & test
    assert _groups(CellSetDataset([atlas], split="test", **common)) == test
    counts = split_counts(spec, [atlas], 16)
    assert counts["test"]["groups"] == len(test) and counts["val"]["groups"] == len(validated)
    assert counts["train"]["groups"] == len(trained)


def test_a_held_out_name_that_matches_nothing_is_an_error(atlas):
    check_held_out_names(["celltype1"], ["PERT1"], [atlas])
    with pytest.raises(ValueError, match=r"--heldout-contexts / data.heldout_contexts: \['CellType1'\] match nothing .*celltype0"):
        check_held_out_names(["CellType1"], ["PERT1"], [atlas])
    with pytest.raises(ValueError, match=r"heldout_perturbations: \['pert1'\] match nothing"):
        check_held_out_names(["celltype1"], ["pert1"], [atlas])


def test_validation_never_takes_a_contexts_only_response(tmp_path, atlas):
    """One drug in several patients (the glioblastoma screen's shape): holding out a (patient, drug)
    pair for the validation loss would remove that patient's whole response from training."""
    one_drug = Atlas(make_synthetic_atlas(tmp_path / "one.zarr", num_cells=600, num_genes=10, num_contexts=5,
                                          num_perturbations=1))
    spec = SplitSpec.held_out(["celltype0"], ["PERT0"])
    assert with_validation_groups(spec, [one_drug], 0.5, seed=0) is spec
    # on a full grid every context and perturbation keeps a trained pair, whatever the fraction
    for seed in range(5):
        spec = with_validation_groups(None, [atlas], 0.6, seed=seed)
        val = [(key, p) for key, parts in spec.fewshot.items() for p in parts["val"]]
        assert val
        g = atlas.groups[~atlas.groups["is_control"]]
        trained = {(f"synthetic.{c}", str(p)) for c, p in zip(g["context"], g["perturbation"])} - set(val)
        assert {c for c, _ in trained} == {f"synthetic.{c}" for c in g["context"]}
        assert {p for _, p in trained} == {str(p) for p in g["perturbation"]}
