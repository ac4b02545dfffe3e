"""The anchor: one rule over the training means, and prediction's blend toward it."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import perturbdiff as pdiff
from perturbdiff.baselines import STATS_FILE, Anchor, additive_effect, load_stats, save_stats, train_stats
from perturbdiff.pipeline import PerturbDiffPipeline, anchor_cells

G = 40


def stats_of(means: dict, n: int = 50) -> dict:
    """`train_stats`' format from exact group means (each group n cells)."""
    return {"sums": {k: np.asarray(v, np.float64) * n for k, v in means.items()}, "counts": {k: n for k in means}}


def test_one_perturbation_in_contexts_seen_only_with_controls_is_the_additive_shift():
    rng = np.random.default_rng(0)
    means = {}
    for c in ("B", "T", "NK", "Mono"):
        means[("ctrl", c)] = rng.gamma(2, 1, G)
        means[("stim", c)] = means[("ctrl", c)] + rng.normal(0, 1, G)
    held = means.pop(("stim", "NK"))
    stats = stats_of(means)
    anchor = Anchor(stats, "ctrl")
    np.testing.assert_allclose(anchor.effect("stim", "NK"), additive_effect(stats, "stim", "ctrl"), atol=1e-10)
    np.testing.assert_allclose(anchor.effect("stim", "T"), means[("stim", "T")] - means[("ctrl", "T")], atol=1e-10)
    assert held is not None and anchor.rho is None  # no perturbation in two contexts: nothing to shrink with


@pytest.mark.parametrize("repeat", [True, False])
def test_a_perturbations_deviation_counts_as_far_as_it_repeats_across_contexts(repeat):
    """Context effects shared by every perturbation of a line, plus per-perturbation deviations that
    either repeat in every line (the two-way additive model holds: λ = 1) or are noise (λ = 0: the
    context mean)."""
    rng = np.random.default_rng(1)
    lines, perts = ["A172", "T98G", "U87MG"], [f"K{i}" for i in range(8)]
    context = {c: rng.normal(0, 1, G) for c in lines}
    own = {q: rng.normal(0, 1, G) for q in perts}
    means = {}
    for c in lines:
        means[("control", c)] = rng.gamma(2, 1, G)
        for q in perts:
            dev = own[q] if repeat else rng.normal(0, 1, G)
            means[(q, c)] = means[("control", c)] + context[c] + dev
    truth = means.pop(("K0", "A172")) - means[("control", "A172")]
    anchor = Anchor(stats_of(means), "control")
    effect = anchor.effect("K0", "A172")
    others = [means[(q, "A172")] - means[("control", "A172")] for q in perts[1:]]
    context_mean = np.mean(others, axis=0)
    if repeat:
        assert anchor.rho > 0.95 and anchor.shrinkage(2) > 0.95
        assert np.corrcoef(effect, truth)[0, 1] > 0.97
    else:
        assert anchor.rho < 0.2 and anchor.shrinkage(2) < 0.35
        # close to the context mean, far from the additive shift (the noise of other lines)
        add = np.mean([means[("K0", c)] - means[("control", c)] for c in lines[1:]], axis=0)
        assert np.linalg.norm(effect - context_mean) < 0.5 * np.linalg.norm(add - context_mean)


def test_combinations_add_their_parts_and_unseen_perturbations_get_the_context_effect():
    rng = np.random.default_rng(2)
    means = {("control", "K562"): rng.gamma(2, 1, G)}
    for q in ("A", "B", "C"):
        means[(q, "K562")] = means[("control", "K562")] + rng.normal(0, 1, G)
    anchor = Anchor(stats_of(means), "control")
    e = {q: means[(q, "K562")] - means[("control", "K562")] for q in "ABC"}
    np.testing.assert_allclose(anchor.effect("A+B", "K562"), e["A"] + e["B"], atol=1e-10)
    np.testing.assert_allclose(anchor.effect("NEW", "K562"), (e["A"] + e["B"] + e["C"]) / 3, atol=1e-10)
    assert Anchor(stats_of({("control", "K562"): means[("control", "K562")]}), "control").effect("A", "K562") is None


def test_the_anchor_baseline_is_scored_beside_the_others():
    rng = np.random.default_rng(3)
    X = rng.gamma(2, 1, (60, G))
    pert = np.repeat(["control", "stim"], 30)
    ctx = np.tile(["T", "B"], 30)
    train = train_stats(X, pert, ctx)
    cells, fallback = pdiff.baselines.baseline_cells("anchor", [("stim", "NK")], {"NK": X[:5]}, train, "control")
    add, _ = pdiff.baselines.baseline_cells("additive_shift", [("stim", "NK")], {"NK": X[:5]}, train, "control")
    np.testing.assert_allclose(cells[("stim", "NK")], add[("stim", "NK")], atol=1e-5)
    assert fallback == {("stim", "NK"): False}


def test_stats_file_round_trip_and_damage(tmp_path):
    rng = np.random.default_rng(4)
    stats = stats_of({("control", "T"): rng.random(G), ("IFNB", "T"): rng.random(G)}, n=7)
    save_stats(tmp_path, stats)
    back = load_stats(tmp_path)
    assert back["counts"] == stats["counts"]
    for k in stats["sums"]:
        np.testing.assert_allclose(back["sums"][k], stats["sums"][k], rtol=1e-6)
    assert load_stats(tmp_path / "absent") is None
    from safetensors.numpy import save_file

    save_file({"means": np.full((2, G), np.nan, np.float32), "counts": np.ones(2, np.int64)}, str(tmp_path / STATS_FILE),
              metadata={"pairs": '[["control", "T"], ["IFNB", "T"]]'})
    with pytest.raises(ValueError, match="damaged"):
        load_stats(tmp_path)


# --------------------------------------------------------------------------- prediction
GENES = [f"gene{i}" for i in range(12)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny model saved twice: without training means, and with means in which IFNB raises
    gene0..3 in the two training contexts (the anchor for a third context). Its head is zeroed, so
    the network gives back each cell's paired control cell (every value positive)."""
    config = pdiff.PerturbDiffConfig.from_preset(
        "debug", gene_names=GENES, perturbation_names=["control", "IFNB"], context_names=["T", "B", "NK"],
        batch_names=["NA"], paired_control=True)
    torch.manual_seed(0)
    model = pdiff.PerturbDiffModel(config)
    with torch.no_grad():
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.zero_()
    plain, anchored = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("anchored")
    model.save_pretrained(plain)
    model.save_pretrained(anchored)
    shift = np.r_[np.full(4, 0.15), np.zeros(len(GENES) - 4)]  # model space: log1p / 10
    base = np.full(len(GENES), 0.5)
    save_stats(anchored, stats_of({("control", "T"): base, ("IFNB", "T"): base + shift,
                                   ("control", "B"): base, ("IFNB", "B"): base + shift}))
    return plain, anchored, shift


def _control(seed=0, n=40):
    rng = np.random.default_rng(seed)
    X = rng.negative_binomial(4, 4 / (4 + 30.0), size=(n, len(GENES))).astype(np.float32) + 1
    obs = pd.DataFrame({"perturbation": "control", "context": "NK", "batch": "NA"}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=GENES))


def test_prediction_moves_the_mean_response_toward_the_anchor(folders):
    plain, anchored, shift = folders
    control = _control()
    kw = dict(perturbation="IFNB", context="NK", num_steps=2, set_size=8, progress=False, integer_counts=False)
    net = PerturbDiffPipeline.from_pretrained(plain, device="cpu").predict(control, **kw)
    assert net.uns["perturbdiff"]["anchor"].startswith("none") and net.uns["perturbdiff"]["anchor_weight"] == 0.0
    pipe = PerturbDiffPipeline.from_pretrained(anchored, device="cpu")
    same = pipe.predict(control, anchor_weight=0.0, **kw)
    np.testing.assert_array_equal(same.X, net.X)  # weight 0: the network's cells
    full = pipe.predict(control, anchor_weight=1.0, **kw)
    half = pipe.predict(control, anchor_weight=0.5, **kw)
    assert full.uns["perturbdiff"]["anchor_weight"] == 1.0
    assert full.uns["perturbdiff"]["conditions"]["anchored"].tolist() == [True]
    ctrl_mean = pdiff.normalize_counts(control.X.toarray(), pipe.config.norm).mean(0) * pipe.config.norm.scale
    # genes where no cell was clipped at zero: the mean response is the anchor's (x the scale), half way at 0.5
    ok = (np.asarray(full.X) > 0).all(0) & (np.asarray(half.X) > 0).all(0) & (np.asarray(net.X) > 0).all(0)
    assert ok.all()
    target = shift * pipe.config.norm.scale
    got = np.asarray(full.X).mean(0) - ctrl_mean
    np.testing.assert_allclose(got[ok], target[ok], atol=1e-4)
    mid = np.asarray(half.X).mean(0) - ctrl_mean
    own = np.asarray(net.X).mean(0) - ctrl_mean
    np.testing.assert_allclose(mid[ok], (own[ok] + target[ok]) / 2, atol=1e-4)
    # this network gives back each cell's control cell, so the blend keeps the control cells' spread
    np.testing.assert_allclose(np.asarray(full.X)[:, ok].std(0), np.asarray(net.X)[:, ok].std(0), rtol=1e-3)
    with pytest.raises(ValueError, match="anchor_weight must be in"):
        pipe.predict(control, anchor_weight=1.5, **kw)


def test_anchor_cells_blend_each_cells_change_and_keep_the_populations_apart():
    rng = np.random.default_rng(5)
    K, n = 3, 200
    controls = rng.gamma(4, 1, (K, n, G)).astype(np.float32) + 2
    values = controls + rng.normal(0, 1, (K, n, G)).astype(np.float32) + np.arange(K)[:, None, None] * 0.5 + 1
    effect = rng.normal(0, 0.5, G)
    w = 0.75
    out = anchor_cells(values, controls, effect, w)
    assert (out > 0).all()  # nothing was clipped: the identities below are exact
    response = lambda x: x.mean((0, 1)) - controls.mean((0, 1))  # noqa: E731
    np.testing.assert_allclose(response(out), (1 - w) * response(values) + w * effect, atol=1e-4)
    pops = lambda x: x.mean(1) - x.mean((0, 1))  # noqa: E731  [K, G]: each population's departure
    # the network's population differences stay whole (plus w of the control draws' own)
    np.testing.assert_allclose(pops(out), pops(values) + w * pops(controls), atol=1e-4)
    np.testing.assert_allclose(anchor_cells(values[:1], controls[:1], effect, 1.0), np.maximum(controls[:1] + effect, 0), atol=1e-5)
    np.testing.assert_array_equal(anchor_cells(values, controls, effect, 0.0), np.maximum(values, 0))
