"""It learns: a debug model trained for a few hundred CPU steps on a task where perturbations
change both the mean and the spread of expression samples populations that are closer to the
real ones than the control set and than the control set shifted by the true mean change."""

import torch

import perturbdiff as pdiff

G, M, K = 24, 32, 4
SIGMA_CONTROL = 0.1
SPREAD = torch.tensor([0.2, 3.0, 0.3, 2.5])  # per-perturbation change of the spread


def make_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 0.3 + 0.4 * torch.rand(G, generator=g)
    shift = torch.zeros(K, G)
    for k in range(K):
        genes = torch.randperm(G, generator=g)[:8]
        shift[k, genes] = 0.25 * torch.sign(torch.randn(8, generator=g))

    def cells(k, n, gen):  # k = -1: control
        z = torch.randn(n, G, generator=gen)
        if k < 0:
            return (mu + SIGMA_CONTROL * z).clamp_min(0)
        return (mu + shift[k] + SIGMA_CONTROL * SPREAD[k] * z).clamp_min(0)

    return cells


def test_debug_model_learns_mean_and_spread_of_perturbations():
    cells = make_task()
    torch.manual_seed(0)
    config = pdiff.PerturbDiffConfig.from_preset("debug", num_genes=G, perturbation_names=[f"p{k}" for k in range(K)])
    model = pdiff.PerturbDiffModel(config)
    diff = pdiff.GaussianDiffusion.from_config(config)
    steps, B = 600, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ks = torch.randint(0, K, (B,), generator=g)
        batch = {
            "x0": torch.stack([cells(int(k), M, g) for k in ks]),
            "control": torch.stack([cells(-1, M, g) for _ in ks]),
            "perturbation": ks + 1,
        }
        out = pdiff.training_step(model, diff, batch, pdiff.CONDITIONAL, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
        losses.append(out["loss"].item())
    assert sum(losses[-50:]) < 0.2 * sum(losses[:50])

    eg = torch.Generator().manual_seed(2)
    for k in range(K):
        real = cells(k, 256, eg)
        control = torch.stack([cells(-1, M, eg) for _ in range(8)])  # 8 sets of M cells
        pred = pdiff.sample_sets(model, diff, control=control, perturbation=torch.full((8,), k + 1),
                              num_steps=50, generator=eg).reshape(-1, G)
        control = control.reshape(-1, G)
        mean_shifted = control + (real.mean(0) - control.mean(0))
        ed_model = pdiff.energy_distance(pred, real).item()
        ed_control = pdiff.energy_distance(control, real).item()
        ed_shift = pdiff.energy_distance(mean_shifted, real).item()
        assert ed_model < ed_control, (k, ed_model, ed_control)
        assert ed_model < ed_shift, (k, ed_model, ed_shift)


def test_paired_model_carries_an_unseen_cell_types_identity_over_from_its_controls():
    """Trained on three cell types' response, a paired_control model predicts a fourth type's
    response from that type's control cells: its own expression profile stays, the response is
    added to it."""
    g = torch.Generator().manual_seed(0)
    mu = 0.1 + 0.9 * torch.rand(4, G, generator=g)  # four cell types' profiles; type 3 is held out
    response = torch.arange(12, 20)
    shift = torch.zeros(G)
    shift[response] = 0.3

    def cells(kind, perturbed, n, gen):
        return (mu[kind] + (shift if perturbed else 0) + SIGMA_CONTROL * torch.randn(n, G, generator=gen)).clamp_min(0)

    torch.manual_seed(0)
    config = pdiff.PerturbDiffConfig.from_preset("debug", num_genes=G, perturbation_names=["p"],
                                              context_names=["A", "B", "C", "D"], paired_control=True)
    model = pdiff.PerturbDiffModel(config)
    diff = pdiff.GaussianDiffusion.from_config(config)
    steps, B = 300, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        kinds = torch.randint(0, 3, (B,), generator=g)  # only types 0-2 are ever seen perturbed
        batch = {"x0": torch.stack([cells(int(k), True, M, g) for k in kinds]),
                 "control": torch.stack([cells(int(k), False, M, g) for k in kinds]),
                 "perturbation": torch.ones(B, dtype=torch.long), "context": kinds + 1}
        out = pdiff.training_step(model, diff, batch, pdiff.CONDITIONAL, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()

    eg = torch.Generator().manual_seed(2)
    control = torch.stack([cells(3, False, M, eg) for _ in range(8)])
    pred = pdiff.sample_sets(model, diff, control=control, perturbation=torch.ones(8, dtype=torch.long),
                          context=torch.full((8,), 4), num_steps=20, generator=eg).reshape(-1, G)
    real = cells(3, True, 256, eg)
    change = pred.mean(0) - control.reshape(-1, G).mean(0)
    nearest = min(range(3), key=lambda k: float((mu[k] - mu[3]).abs().sum()))
    assert (pred.mean(0) - real.mean(0)).abs().max() < 0.2  # the held-out type's own profile
    assert (change[response] - 0.3).abs().max() < 0.1  # with the response added
    ed = pdiff.energy_distance(pred, real)
    assert ed < 0.5 * pdiff.energy_distance(control.reshape(-1, G), real)
    assert ed < 0.5 * pdiff.energy_distance(cells(nearest, True, 256, eg), real)  # not the nearest seen type
