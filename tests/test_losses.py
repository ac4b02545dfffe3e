import itertools

import pytest
import torch

import perturbdiff as pdiff


def direct_energy_distance(x, y):
    """O(m^2) loops over cell pairs: 2 E|X-Y| - E|X-X'| - E|Y-Y'|."""
    mean = lambda a, b: sum(torch.linalg.norm(p - q) for p, q in itertools.product(a, b)) / (len(a) * len(b))  # noqa: E731
    return 2 * mean(x, y) - mean(x, x) - mean(y, y)


def test_energy_distance_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 6, 4, generator=g, dtype=torch.float64), torch.rand(3, 5, 4, generator=g, dtype=torch.float64) + 0.3
    ed = pdiff.energy_distance(x, y)
    assert ed.shape == (3,)
    for b in range(3):
        assert ed[b].item() == pytest.approx(direct_energy_distance(x[b], y[b]).item(), rel=1e-5, abs=1e-6)
    # unbatched form
    assert pdiff.energy_distance(x[0], y[0]).item() == pytest.approx(ed[0].item(), rel=1e-6)


def test_energy_distance_zero_for_identical_positive_for_different():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 16, 10, generator=g, dtype=torch.float64)
    assert pdiff.energy_distance(x, x).abs().max() < 1e-10
    assert pdiff.energy_distance(x, x[:, torch.randperm(16)]).abs().max() < 1e-10  # order-free
    # float32 at a realistic gene count: round-off stays far below a real difference
    x32 = torch.rand(4, 64, 2000, generator=g)
    assert pdiff.energy_distance(x32, x32).abs().max() < 0.01 * pdiff.energy_distance(x32, x32 + 0.01).min()
    assert (pdiff.energy_distance(x, x + 0.1) > 1e-3).all()
    assert (pdiff.energy_distance(x, x * 2.0) > 1e-3).all()  # same shape, different spread


def test_energy_distance_gradient_is_finite_at_identical_sets():
    x = torch.rand(2, 8, 5, requires_grad=True)
    pdiff.energy_distance(x, x.detach().clone()).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bf16_agrees_with_fp32():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(4, 32, 200, generator=g), torch.rand(4, 32, 200, generator=g) * 1.2
    ed32 = pdiff.energy_distance(x, y)
    ed16 = pdiff.energy_distance(x.bfloat16(), y.bfloat16())
    assert ed16.dtype == torch.float32
    torch.testing.assert_close(ed16, ed32, rtol=0.05, atol=5e-3)
    out = pdiff.set_loss(x.bfloat16(), y.bfloat16())
    assert out["loss"].item() == pytest.approx((ed32.mean() + (x - y).pow(2).mean()).item(), rel=0.03)


def test_set_loss_weights_and_shape_check():
    x, y = torch.rand(2, 4, 3), torch.rand(2, 4, 3)
    out = pdiff.set_loss(x, y, mmd_weight=2.0, mse_weight=0.5)
    assert out["loss"].item() == pytest.approx(2 * out["mmd"].item() + 0.5 * out["mse"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="prediction shape"):
        pdiff.set_loss(x, y[:, :3])
