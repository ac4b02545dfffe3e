import pytest
import torch

import perturbdiff as pdiff


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_are_monotone_and_noisy_at_T(schedule):
    diff = pdiff.GaussianDiffusion(1000, schedule)
    ab = diff.alphas_cumprod
    assert ab.shape == (1000,) and (ab[1:] < ab[:-1]).all()
    assert ab[0] > 0.99 and ab[-1] < 1e-3


def test_add_noise_one_level_per_set():
    diff = pdiff.GaussianDiffusion()
    x0, noise = torch.ones(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([0, 999])
    x_t = diff.add_noise(x0, noise, t)
    ab = diff.alphas_cumprod[t].float()
    torch.testing.assert_close(x_t[1], ab[1].sqrt() * x0[1] + (1 - ab[1]).sqrt() * noise[1])
    torch.testing.assert_close(diff.x0_from_eps(x_t, t, noise), x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(diff.eps_from_x0(x_t, t, x0), noise, rtol=1e-3, atol=1e-3)


def test_respaced_timesteps_start_from_pure_noise():
    diff = pdiff.GaussianDiffusion()
    ts = diff.timesteps(100)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 100 and ts == sorted(ts, reverse=True)
    assert diff.timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="num_steps"):
        diff.timesteps(0)


def test_samplers_recover_x0_from_an_exact_denoiser():
    diff = pdiff.GaussianDiffusion(1000, "linear")
    target = torch.rand(2, 5, 3)
    oracle = lambda x_t, t, sc, guided: target  # noqa: E731
    for sampler, eta in [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)]:
        out = diff.sample(oracle, target.shape, num_steps=20, sampler=sampler, eta=eta,
                          generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-4)


def test_ddim_with_eta_one_is_the_ddpm_posterior():
    diff = pdiff.GaussianDiffusion()
    x_t, x0, noise = torch.randn(2, 4, 3), torch.rand(2, 4, 3), torch.randn(2, 4, 3)
    for t, t_prev in [(999, 899), (500, 490), (10, 0)]:
        torch.testing.assert_close(diff.ddim_step(x_t, t, t_prev, x0, eta=1.0, noise=noise),
                                   diff.ddpm_step(x_t, t, t_prev, x0, noise=noise), rtol=1e-3, atol=2e-4)
    # eta = 0 is deterministic: the noise does not enter
    a = diff.ddim_step(x_t, 500, 490, x0, eta=0.0)
    torch.testing.assert_close(a, diff.ddim_step(x_t, 500, 490, x0, eta=0.0, noise=noise * 9))


def test_guidance_is_the_papers_eps_combination():
    diff = pdiff.GaussianDiffusion()
    x_t, xc, xu = torch.randn(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 3, 4)
    t = torch.tensor([300, 700])
    assert pdiff.apply_guidance(xc, xu, 0.0) is xc
    w = 1.5
    eps = (1 + w) * diff.eps_from_x0(x_t, t, xc) - w * diff.eps_from_x0(x_t, t, xu)
    torch.testing.assert_close(pdiff.apply_guidance(xc, xu, w), diff.x0_from_eps(x_t, t, eps), rtol=1e-4, atol=1e-4)


def test_sampling_keeps_estimates_within_a_per_gene_ceiling():
    # a denoiser that always overshoots: the ceiling holds every x_0 estimate and the result
    d = pdiff.GaussianDiffusion(100)
    ceiling = torch.tensor([0.5, 1.0, 2.0])
    seen = []

    def denoise(x, t, self_cond, guided):
        if self_cond is not None:
            seen.append(self_cond.clone())
        return torch.full_like(x, 5.0)

    out = d.sample(denoise, (2, 4, 3), num_steps=5, clamp_max=ceiling, generator=torch.Generator().manual_seed(0))
    assert (out <= ceiling + 1e-6).all() and torch.allclose(out, ceiling.expand_as(out), atol=1e-4)
    assert all((s <= ceiling + 1e-6).all() for s in seen)  # the estimates fed back were clamped
    free = d.sample(denoise, (2, 4, 3), num_steps=5, generator=torch.Generator().manual_seed(0))
    assert free.max() > 4


def test_set_noise_shares_part_of_each_sets_noise_and_keeps_unit_variance():
    """set_noise s: each element stays N(0, 1) but a set's cells share a part, so the set mean's
    variance is (s^2 + 1/m) / (1 + s^2) instead of 1/m; s = 0 is plain randn (same draws)."""
    B, m, G = 400, 32, 50
    plain = pdiff.GaussianDiffusion().noise((B, m, G), torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn((B, m, G), generator=torch.Generator().manual_seed(0)))
    s = 1.0
    eps = pdiff.GaussianDiffusion(set_noise=s).noise((B, m, G), torch.Generator().manual_seed(0))
    assert abs(eps.var().item() - 1.0) < 0.02
    for x, want in ((plain, 1 / m), (eps, (s**2 + 1 / m) / (1 + s**2))):
        got = x.mean(1).var().item()
        assert abs(got - want) < 0.1 * want, (got, want)
    config = pdiff.PerturbDiffConfig(num_genes=G, set_noise=s)
    assert pdiff.GaussianDiffusion.from_config(config).set_noise == s
    with pytest.raises(ValueError, match="set_noise"):
        pdiff.PerturbDiffConfig(num_genes=G, set_noise=-1)


def test_given_shared_noise_ties_sets_into_one_population():
    """noise(shared=u): the per-set part is u, so sets given the same row share it exactly."""
    diff = pdiff.GaussianDiffusion(set_noise=2.0)
    u = torch.randn(1, 1, 6).expand(3, 1, 6)
    eps = diff.noise((3, 5, 6), torch.Generator().manual_seed(0), shared=u)
    e = torch.randn((3, 5, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eps, (e + 2.0 * u) / 5**0.5)
