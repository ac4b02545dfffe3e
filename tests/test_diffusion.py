import pytest
import torch

import perturbdiff as pd
from conftest import make_inputs


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_are_monotone_and_noisy_at_T(schedule):
    diff = pd.GaussianDiffusion(1000, schedule)
    ab = diff.alphas_cumprod
    assert ab.shape == (1000,) and (ab[1:] < ab[:-1]).all()
    assert ab[0] > 0.99 and ab[-1] < 1e-3


def test_add_noise_one_level_per_set():
    diff = pd.GaussianDiffusion()
    x0, noise = torch.ones(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([0, 999])
    x_t = diff.add_noise(x0, noise, t)
    ab = diff.alphas_cumprod[t].float()
    torch.testing.assert_close(x_t[1], ab[1].sqrt() * x0[1] + (1 - ab[1]).sqrt() * noise[1])
    torch.testing.assert_close(diff.x0_from_eps(x_t, t, noise), x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(diff.eps_from_x0(x_t, t, x0), noise, rtol=1e-3, atol=1e-3)


def test_respaced_timesteps_start_from_pure_noise():
    diff = pd.GaussianDiffusion()
    ts = diff.timesteps(100)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 100 and ts == sorted(ts, reverse=True)
    assert diff.timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="num_steps"):
        diff.timesteps(0)


def test_samplers_recover_x0_from_an_exact_denoiser():
    diff = pd.GaussianDiffusion(1000, "linear")
    target = torch.rand(2, 5, 3)
    oracle = lambda x_t, t, sc, guided: target  # noqa: E731
    for sampler, eta in [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)]:
        out = diff.sample(oracle, target.shape, num_steps=20, sampler=sampler, eta=eta,
                          generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-4)


def test_ddim_with_eta_one_is_the_ddpm_posterior():
    diff = pd.GaussianDiffusion()
    x_t, x0, noise = torch.randn(2, 4, 3), torch.rand(2, 4, 3), torch.randn(2, 4, 3)
    for t, t_prev in [(999, 899), (500, 490), (10, 0)]:
        torch.testing.assert_close(diff.ddim_step(x_t, t, t_prev, x0, eta=1.0, noise=noise),
                                   diff.ddpm_step(x_t, t, t_prev, x0, noise=noise), rtol=1e-3, atol=2e-4)
    # eta = 0 is deterministic: the noise does not enter
    a = diff.ddim_step(x_t, 500, 490, x0, eta=0.0)
    torch.testing.assert_close(a, diff.ddim_step(x_t, 500, 490, x0, eta=0.0, noise=noise * 9))


def test_guidance_is_the_papers_eps_combination():
    diff = pd.GaussianDiffusion()
    x_t, xc, xu = torch.randn(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 3, 4)
    t = torch.tensor([300, 700])
    assert pd.apply_guidance(xc, xu, 0.0) is xc
    w = 1.5
    eps = (1 + w) * diff.eps_from_x0(x_t, t, xc) - w * diff.eps_from_x0(x_t, t, xu)
    torch.testing.assert_close(pd.apply_guidance(xc, xu, w), diff.x0_from_eps(x_t, t, eps), rtol=1e-4, atol=1e-4)


def test_sample_sets_with_zero_guidance_equals_conditional(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, B=2, m=6)
    cond = {k: inputs[k] for k in ("control", "perturbation", "context", "batch", "dose", "perturbation_features")}
    diff = pd.GaussianDiffusion.from_config(tiny_config)
    run = lambda w: pd.sample_sets(tiny_model, diff, num_steps=8, guidance_scale=w,  # noqa: E731
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
        pd.sample_sets(tiny_model, num_sets=2)
    with pytest.raises(ValueError, match="disagree with the control sets"):
        pd.sample_sets(tiny_model, control=torch.rand(2, 3, 12), num_cells=4)
    with pytest.raises(ValueError, match="sampler"):
        pd.sample_sets(tiny_model, num_sets=1, num_cells=2, sampler="euler", num_steps=2)


def test_training_step_is_reproducible_and_objectives_differ(tiny_config):
    torch.manual_seed(0)
    model = pd.PerturbDiffModel(tiny_config)
    diff = pd.GaussianDiffusion.from_config(tiny_config)
    inputs = make_inputs(tiny_config, B=4, m=5)
    batch = {"x0": inputs["self_cond"], "control": inputs["control"], "perturbation": inputs["perturbation"]}
    run = lambda obj, seed=0: pd.training_step(model, diff, batch, obj, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b = run(pd.CONDITIONAL), run(pd.CONDITIONAL)
    assert a["loss"].item() == b["loss"].item() and torch.isfinite(a["loss"])
    assert run(pd.CONDITIONAL, seed=1)["loss"].item() != a["loss"].item()
    marginal = run(pd.MARGINAL)  # no control stream needed
    assert torch.isfinite(marginal["loss"])
    a["loss"].backward()
    assert model.x_embed.weight.grad is not None
    with pytest.raises(ValueError, match="needs a 'control' set"):
        pd.training_step(model, diff, {"x0": batch["x0"]}, pd.CONDITIONAL)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        pd.Objective(cond_drop_prob=1.5)


def test_gene_scale_augment_scales_a_set_and_its_controls_alike(tiny_config):
    from perturbdiff.training import scale_genes

    x0, control = torch.rand(4, 6, 9) + 0.1, torch.rand(4, 6, 9) + 0.1
    a, c = scale_genes(x0, control, 0.5, torch.Generator().manual_seed(0))
    fa, fc = a / x0, c / control
    torch.testing.assert_close(fa, fc)  # the set and its control set get the same factor
    torch.testing.assert_close(fa, fa[:, :1].expand_as(fa))  # one factor per gene for every cell of a set
    assert not torch.allclose(fa[0], fa[1]) and not torch.allclose(fa[0, 0, :1], fa[0, 0, 1:2])
    assert scale_genes(x0, None, 0.5)[1] is None  # marginal sets have no control set

    torch.manual_seed(0)
    model = pd.PerturbDiffModel(tiny_config)
    diff = pd.GaussianDiffusion.from_config(tiny_config)
    inputs = make_inputs(tiny_config, B=4, m=5)
    batch = {"x0": inputs["self_cond"], "control": inputs["control"]}
    run = lambda obj: pd.training_step(model, diff, batch, obj, generator=torch.Generator().manual_seed(0))["loss"].item()  # noqa: E731
    augmented = pd.Objective(gene_scale_augment=0.5)
    assert run(augmented) == run(augmented) != run(pd.CONDITIONAL)
    with pytest.raises(ValueError, match="gene_scale_augment"):
        pd.Objective(gene_scale_augment=-0.1)


def test_strength_starts_from_the_noised_init_sets():
    diff = pd.GaussianDiffusion(1000, "cosine")
    init = torch.rand(2, 16, 32) * 3
    seen = []

    def denoise(x_t, t, self_cond, guided):
        seen.append((int(t[0]), x_t.clone()))
        return init  # an exact denoiser for these sets

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    out = diff.sample(denoise, tuple(init.shape), num_steps=10, init=init, strength=0.5,
                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, init)
    assert [t for t, _ in seen] == diff.timesteps(10, start=500) and seen[0][0] == 500 == diff.start_step(0.5)
    ab = diff._abar(torch.tensor([500]), init).flatten()[0]
    assert abs(seen[0][1].mean() - ab.sqrt() * init.mean()) < 0.1  # x_500 = sqrt(abar) init + noise
    assert corr(seen[0][1], init) > 0.5
    seen.clear()
    diff.sample(denoise, tuple(init.shape), num_steps=10, generator=torch.Generator().manual_seed(0))
    assert seen[0][0] == 999 and abs(corr(seen[0][1], init)) < 0.1  # strength 1: pure noise
    with pytest.raises(ValueError, match="strength must be in"):
        diff.start_step(0.0)
    with pytest.raises(ValueError, match="needs init sets"):
        diff.sample(denoise, tuple(init.shape), num_steps=5, strength=0.5)
    with pytest.raises(ValueError, match="pass control sets"):
        pd.sample_sets(torch.nn.Linear(1, 1), num_sets=1, num_cells=2, strength=0.5)


def test_pair_cells_matches_each_perturbed_cell_to_its_optimal_control_cell():
    from itertools import permutations

    from perturbdiff.training import pair_cells

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 5, 8, generator=g)
    shifted = x0 + 0.05 * torch.randn(2, 5, 8, generator=g)  # each cell's control is itself, nearly
    perm = torch.tensor([3, 0, 4, 1, 2])
    paired = pair_cells(x0, shifted[:, perm])
    torch.testing.assert_close(paired, shifted)  # the shuffle is undone
    control = torch.rand(2, 5, 8, generator=g)  # unrelated sets: no assignment costs less
    paired = pair_cells(x0, control)
    cost = lambda c: float((x0[0] - c).pow(2).sum())  # noqa: E731
    best = min(cost(control[0][list(p)]) for p in permutations(range(5)))
    assert abs(cost(paired[0]) - best) < 1e-5
    assert sorted(paired[1].sum(-1).tolist()) == pytest.approx(sorted(control[1].sum(-1).tolist()))  # a reordering
