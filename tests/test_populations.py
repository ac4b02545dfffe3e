"""K populations from the training replicates' measured deviations (perturbdiff.baselines.population_offsets)."""

from __future__ import annotations

import numpy as np
import pytest

from perturbdiff.baselines import load_stats, population_offsets, save_stats


def _replicates(tau: float, noise: float, *, R=6, n=200, G=300, perts=("A", "B"), contexts=("c1", "c2"), seed=0):
    """(perturbation, context, batch) -> (sum, sum of squares, n) of cells drawn around a response that
    varies between batches by tau per gene, cells with sd ``noise``; controls per (context, batch)."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in contexts:
        base = rng.normal(2, 0.5, G)
        for b in range(R):
            groups = {"control": base + rng.normal(0, 0.3, G)}  # the batch moves controls too
            for q in perts:
                groups[q] = groups["control"] + 1.0 + rng.normal(0, tau, G)  # the hidden effect on the response
            for q, mu in groups.items():
                cells = mu + rng.normal(0, noise, (n, G))
                out[("screen", q, c, 0.0, f"b{b}", q == "control")] = (cells.sum(0), (cells**2).sum(0), n)
    return out


@pytest.mark.parametrize("tau", [0.3, 0.0])
def test_offsets_carry_the_between_replicate_variance_and_nothing_else(tau):
    reps = _replicates(tau, noise=1.0)
    pops = population_offsets(reps, ["batch"])
    assert pops["offsets"].shape == (2 * 2 * 6, 300) and set(pops["perturbations"]) == {"A", "B"}
    measured = float((pops["offsets"] ** 2).mean())
    if tau:
        assert measured == pytest.approx(tau**2, rel=0.2)  # the raw deviations carry tau^2 (5/6) + noise 0.01
        assert float(pops["between"].mean()) == pytest.approx(tau**2, rel=0.2)
    else:
        assert measured < 0.1 * 0.3**2  # the sampling noise of the group means is removed
        # and with a few cells per group, where the noise is most of what the deviations show
        small = population_offsets(_replicates(0.0, noise=1.0, n=30), ["batch"])
        # (under a tenth of the sampling variance of one group mean, 1 / 30; a few genes pass by chance)
        assert float((small["offsets"] ** 2).mean()) < 0.1 / 30 and (small["between"] > 0).mean() < 0.05
        assert population_offsets(_replicates(0.0, noise=1.0, n=10), ["batch"]) is None  # noise not known: none
    # replicates of two datasets that reuse the batch names are not mixed into one
    two = {**reps, **{("other", *k[1:]): v for k, v in _replicates(tau, noise=1.0, seed=1).items()}}
    assert population_offsets(two, ["batch"])["offsets"].shape[0] == 2 * pops["offsets"].shape[0]
    # a context hidden: replicates are the contexts (batches visible): conditions (A, b) of 2 contexts
    assert population_offsets(reps, ["context"])["offsets"].shape[0] == 2 * 6 * 2
    # a single replicate per condition: nothing measured
    assert population_offsets({k: v for k, v in reps.items() if k[4] == "b0"}, ["batch"]) is None


def test_offsets_travel_in_the_stats_file(tmp_path):
    reps = _replicates(0.3, noise=1.0, G=20)
    pops = population_offsets(reps, ["batch"])
    stats = {"sums": {("A", "c1"): np.ones(20)}, "counts": {("A", "c1"): 2}, "populations": pops}
    save_stats(tmp_path, stats)
    back = load_stats(tmp_path)["populations"]
    assert np.array_equal(back["offsets"], pops["offsets"]) and back["perturbations"] == pops["perturbations"]
    assert back["hidden"] == ["batch"]
    save_stats(tmp_path, {k: v for k, v in stats.items() if k != "populations"})
    assert "populations" not in load_stats(tmp_path)


def test_populations_take_the_replicates_spread_not_the_samplers():
    """`_draw_populations`: a sampler whose K populations differ by a large shared effect comes out
    differing by the drawn replicate deviations plus its cells' sampling noise, and not at all
    beyond that noise when the replicates do not differ."""
    from types import SimpleNamespace

    from perturbdiff.pipeline import PerturbDiffPipeline

    rng = np.random.default_rng(0)
    K, n, G, tau = 400, 64, 50, 0.2
    sampler_effect = rng.normal(0, 1.0, (K, 1, G))  # the uncalibrated spread of the sampler's populations
    values = (5.0 + sampler_effect + rng.normal(0, 0.5, (K, n, G))).astype(np.float32)
    noise = 0.5**2 / n

    def between(out):
        return float((out.mean(1).var(0, ddof=1) - out.var(1, ddof=1).mean(0) / n).mean())

    for scale in (tau, 0.0):
        pops = {"offsets": rng.normal(0, 1, (30, G)).astype(np.float32) * scale, "perturbations": ["A"] * 30, "hidden": ["batch"]}
        out, source = PerturbDiffPipeline._draw_populations(SimpleNamespace(populations=pops), values.copy(), "A", np.random.default_rng(1))
        assert source == "A (30)"
        assert abs(between(out) - scale**2) < 0.25 * tau**2 + 3 * noise  # the replicates' variance, not the sampler's (1.0)
        assert np.allclose(out.mean((0, 1)), values.mean((0, 1)), atol=0.05)  # the condition's mean stays
    # an unknown perturbation draws from every perturbation's deviations
    pops["perturbations"] = ["B"] * 30
    assert PerturbDiffPipeline._draw_populations(SimpleNamespace(populations=pops), values[:3], "A", rng)[1] == "all (30)"


def test_population_moves_on_sparse_genes_stay_bounded():
    """Genes most cells do not express: no value grows past a drawn deviation, nothing goes negative,
    and the condition's mean moves by no more than the clip at 0 takes off negative moves."""
    from types import SimpleNamespace

    from perturbdiff.pipeline import PerturbDiffPipeline

    rng = np.random.default_rng(2)
    K, n, G = 8, 64, 40
    values = (rng.random((K, n, G)) < 0.1) * rng.gamma(2.0, 0.5, (K, n, G))  # 90 % zeros
    values = values.astype(np.float32)
    pops = {"offsets": rng.normal(0, 0.5, (6, G)).astype(np.float32), "perturbations": ["A"] * 6, "hidden": ["batch"]}
    out, _ = PerturbDiffPipeline._draw_populations(SimpleNamespace(populations=pops), values.copy(), "A", rng)
    assert out.min() >= 0
    assert out.max() <= values.max() + 2 * np.abs(pops["offsets"]).max() + values.mean(1).std(0).max() * 2
    assert np.abs(out.mean((0, 1)) - values.mean((0, 1))).max() < 0.5  # the clip takes off part of negative moves only
