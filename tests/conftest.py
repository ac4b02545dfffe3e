import pytest
import torch

import perturbdiff as pdiff


@pytest.fixture
def tiny_config():
    return pdiff.PerturbDiffConfig.from_preset(
        "debug",
        gene_names=[f"gene{i}" for i in range(12)],
        perturbation_names=["control", "IFNB", "TNF"],
        context_names=["T cell", "monocyte"],
        batch_names=["donor1", "donor2"],
        perturbation_feature_dim=5,
    )


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    model = pdiff.PerturbDiffModel(tiny_config).eval()
    # adaLN-Zero makes a fresh model ignore its conditioning; give the modulation weights values
    # so that tests of conditioning, invariance and save/load exercise every path.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.normal_(0, 0.05)
            if "control_gate" in name:  # the control residual, the same for every gene in a fresh model
                p.normal_(0, 0.02)
    return model


def make_inputs(config, B=3, m=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = config.num_genes
    return dict(
        x_t=torch.randn(B, m, G, generator=g),
        timestep=torch.randint(0, 1000, (B,), generator=g),
        self_cond=torch.rand(B, m, G, generator=g),
        control=torch.rand(B, m, G, generator=g),
        perturbation=torch.randint(0, config.num_ids("perturbation"), (B,), generator=g),
        context=torch.randint(0, config.num_ids("context"), (B,), generator=g),
        batch=torch.randint(0, config.num_ids("batch"), (B,), generator=g),
        dose=torch.rand(B, generator=g) * 10,
        perturbation_features=torch.randn(B, config.perturbation_feature_dim, generator=g),
    )
