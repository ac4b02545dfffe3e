"""The training step and the set sampler (perturbdiff.objective)."""

import pytest
import torch

import perturbdiff as pdiff
from conftest import make_inputs


def test_sample_sets_with_zero_guidance_equals_conditional(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, B=2, m=6)
    cond = {k: inputs[k] for k in ("control", "perturbation", "context", "batch", "dose", "perturbation_features")}
    diff = pdiff.GaussianDiffusion.from_config(tiny_config)
    run = lambda w: pdiff.sample_sets(tiny_model, diff, num_steps=8, guidance_scale=w,  # noqa: E731
                                   generator=torch.Generator().manual_seed(0), **cond)
    base = run(0.0)
    assert base.shape == (2, 6, tiny_config.num_genes) and (base >= 0).all()
    torch.testing.assert_close(run(0.0), base)  # deterministic DDIM given the seed
    assert not torch.allclose(run(2.0), base)  # guidance does act
    # The guided sampler's denoiser, with w=0 forced through the guided branch, is conditional:
    calls = []

    def denoise(x_t, t, sc, guided):
        calls.append(guided)
        return tiny_model(x_t, t, self_cond=sc, **cond)

    direct = diff.sample(denoise, base.shape, num_steps=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(direct, base, rtol=1e-5, atol=1e-5)
    assert not any(calls)


def test_sample_sets_argument_errors(tiny_model):
    with pytest.raises(ValueError, match="needs control sets or both"):
        pdiff.sample_sets(tiny_model, num_sets=2)
    with pytest.raises(ValueError, match="disagree with the control sets"):
        pdiff.sample_sets(tiny_model, control=torch.rand(2, 3, 12), num_cells=4)
    with pytest.raises(ValueError, match="sampler"):
        pdiff.sample_sets(tiny_model, num_sets=1, num_cells=2, sampler="euler", num_steps=2)


def test_training_step_is_reproducible_and_objectives_differ(tiny_config):
    torch.manual_seed(0)
    model = pdiff.PerturbDiffModel(tiny_config)
    diff = pdiff.GaussianDiffusion.from_config(tiny_config)
    inputs = make_inputs(tiny_config, B=4, m=5)
    batch = {"x0": inputs["self_cond"], "control": inputs["control"], "perturbation": inputs["perturbation"]}
    run = lambda obj, seed=0: pdiff.training_step(model, diff, batch, obj, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b = run(pdiff.CONDITIONAL), run(pdiff.CONDITIONAL)
    assert a["loss"].item() == b["loss"].item() and torch.isfinite(a["loss"])
    assert run(pdiff.CONDITIONAL, seed=1)["loss"].item() != a["loss"].item()
    marginal = run(pdiff.MARGINAL)  # no control stream needed
    assert torch.isfinite(marginal["loss"])
    a["loss"].backward()
    assert model.x_embed.weight.grad is not None
    with pytest.raises(ValueError, match="needs a 'control' set"):
        pdiff.training_step(model, diff, {"x0": batch["x0"]}, pdiff.CONDITIONAL)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        pdiff.Objective(cond_drop_prob=1.5)
