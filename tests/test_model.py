import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

import perturbdiff as pd
from conftest import make_inputs


def test_forward_shape_and_non_negative(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    out = tiny_model(**inputs)
    assert out.shape == inputs["x_t"].shape
    assert (out >= 0).all()


def test_fresh_model_has_zero_adaln_modulation(tiny_config):
    model = pd.PerturbDiffModel(tiny_config)
    mods = [(n, p) for n, p in model.named_parameters() if "adaLN_modulation" in n]
    assert len(mods) == 2 * (2 * tiny_config.num_layers + 1)  # weight+bias per stream per block + final
    for name, p in mods:
        assert torch.count_nonzero(p) == 0, name
    # the control residual starts at one (the control mean); the other layers are not all zero
    gate = model.final_layer.GATE_GAIN * model.final_layer.control_gate
    torch.testing.assert_close(gate, torch.ones_like(gate))
    assert torch.count_nonzero(model.x_embed.weight) > 0


def test_save_and_load_give_identical_outputs(tiny_model, tiny_config, tmp_path):
    inputs = make_inputs(tiny_config)
    expected = tiny_model(**inputs)
    tiny_model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "config.json" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "perturbdiff"
    for loader in (pd.PerturbDiffModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, pd.PerturbDiffModel)
        torch.testing.assert_close(loaded(**inputs), expected, rtol=0, atol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), pd.PerturbDiffConfig)


def test_unpaired_model_is_equivariant_to_cell_order_and_invariant_to_control_order(tiny_config):
    # (a paired model's cell i goes with control cell i: see test_paired_control_...)
    tiny_model = pd.PerturbDiffModel(pd.PerturbDiffConfig(**{**tiny_config.to_dict(), "paired_control": False})).eval()
    inputs = make_inputs(tiny_config, m=9)
    out = tiny_model(**inputs)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    permuted = dict(inputs, x_t=inputs["x_t"][:, perm], self_cond=inputs["self_cond"][:, perm])
    torch.testing.assert_close(tiny_model(**permuted), out[:, perm], rtol=1e-5, atol=1e-5)
    shuffled_control = dict(inputs, control=inputs["control"][:, perm.flip(0)])
    torch.testing.assert_close(tiny_model(**shuffled_control), out, rtol=1e-5, atol=1e-5)


def test_conditioning_changes_the_output(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    out = tiny_model(**inputs)
    for key, other in [("perturbation", (inputs["perturbation"] + 1) % 4), ("control", inputs["control"] * 2),
                       ("dose", inputs["dose"] + 5), ("perturbation_features", -inputs["perturbation_features"])]:
        assert not torch.allclose(tiny_model(**dict(inputs, **{key: other})), out), key


def test_masks_match_their_explicit_forms(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    B = inputs["x_t"].shape[0]
    # A hidden control stream equals running without one.
    no_control = dict(inputs, control=None)
    masked = tiny_model(**inputs, control_mask=torch.zeros(B, dtype=torch.bool))
    torch.testing.assert_close(masked, tiny_model(**no_control), rtol=1e-5, atol=1e-5)
    # Dropped covariates equal null ids with no dose or features.
    dropped = tiny_model(**inputs, drop_covariates=torch.ones(B, dtype=torch.bool))
    null = dict(inputs, perturbation=None, context=None, batch=None, dose=None, perturbation_features=None)
    torch.testing.assert_close(dropped, tiny_model(**null), rtol=1e-6, atol=1e-6)
    # Per-set masks act per set.
    mixed = tiny_model(**inputs, drop_covariates=torch.tensor([True] + [False] * (B - 1)))
    torch.testing.assert_close(mixed[1:], tiny_model(**inputs)[1:])
    torch.testing.assert_close(mixed[:1], dropped[:1])


def test_bad_inputs_raise_clear_value_errors(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, B=2, m=5)
    G = tiny_config.num_genes
    with pytest.raises(ValueError, match=f"x_t has {G + 1} genes but the model takes {G}"):
        tiny_model(**dict(inputs, x_t=torch.randn(2, 5, G + 1), self_cond=None, control=None))
    with pytest.raises(ValueError, match="control set shape .* must match the perturbed set"):
        tiny_model(**dict(inputs, control=torch.rand(2, 4, G)))
    with pytest.raises(ValueError, match="self_cond shape"):
        tiny_model(**dict(inputs, self_cond=torch.rand(2, 6, G)))
    with pytest.raises(ValueError, match=r"perturbation ids must be in \[0, 3\]"):
        tiny_model(**dict(inputs, perturbation=torch.tensor([1, 4])))
    with pytest.raises(ValueError, match="perturbation_features must be"):
        tiny_model(**dict(inputs, perturbation_features=torch.randn(2, 3)))
    with pytest.raises(ValueError, match=r"x_t must be \[sets, cells, genes\]"):
        tiny_model(**dict(inputs, x_t=torch.randn(5, G)))
    no_dose = pd.PerturbDiffModel(pd.PerturbDiffConfig.from_preset("debug", num_genes=G, use_dose=False))
    with pytest.raises(ValueError, match="use_dose=False"):
        no_dose(inputs["x_t"], inputs["timestep"], dose=inputs["dose"])


def test_one_backward_pass_reaches_the_embeddings(tiny_model, tiny_config):
    tiny_model.train()
    out = tiny_model(**make_inputs(tiny_config))
    out.square().mean().backward()
    for name in ("x_embed.weight", "c_embed.weight", "covariate_embedder.perturbation.weight",
                 "covariate_embedder.features.fc1.weight", "final_layer.linear.weight"):
        grad = dict(tiny_model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_unpaired_control_residual_adds_the_gated_control_mean(tiny_config):
    inputs = make_inputs(tiny_config)
    linear_model = pd.PerturbDiffModel(pd.PerturbDiffConfig(
        **{**tiny_config.to_dict(), "output_activation": "none", "paired_control": False})).eval()
    with_gate = linear_model(**inputs)
    with torch.no_grad():
        gate = linear_model.final_layer.control_gate.clone()
        linear_model.final_layer.control_gate.zero_()
    without = linear_model(**inputs)
    expected = (linear_model.final_layer.GATE_GAIN * gate * inputs["control"].mean(1)).unsqueeze(1)
    torch.testing.assert_close(with_gate - without, expected.expand_as(without), rtol=1e-4, atol=1e-5)
    off = pd.PerturbDiffModel(pd.PerturbDiffConfig.from_preset("debug", num_genes=12, control_residual=False))
    assert off.final_layer.control_gate is None


def test_control_residual_init_sets_the_starting_gate(tiny_config):
    model = pd.PerturbDiffModel(pd.PerturbDiffConfig(**{**tiny_config.to_dict(), "control_residual_init": 0.0}))
    assert torch.count_nonzero(model.final_layer.control_gate) == 0


def test_context_conditioning_off_ignores_context_and_batch_ids(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    other = dict(inputs, context=(inputs["context"] + 1) % 3, batch=(inputs["batch"] + 1) % 3)
    assert not torch.allclose(tiny_model(**other), tiny_model(**inputs))  # on (the default): ids matter
    config = pd.PerturbDiffConfig(**{**tiny_config.to_dict(), "context_conditioning": False})
    blind = pd.PerturbDiffModel(config).eval()
    blind.load_state_dict(tiny_model.state_dict())
    out = blind(**inputs)
    torch.testing.assert_close(blind(**other), out, rtol=0, atol=0)
    # ... while the perturbation and the control set still condition it
    assert not torch.allclose(blind(**dict(inputs, perturbation=(inputs["perturbation"] + 1) % 4)), out)
    assert not torch.allclose(blind(**dict(inputs, control=inputs["control"] * 2)), out)


def test_paired_control_adds_each_cells_own_control_cell(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, m=9)
    config = pd.PerturbDiffConfig(**{**tiny_config.to_dict(), "paired_control": True, "output_activation": "none"})
    paired = pd.PerturbDiffModel(config).eval()
    with_gate = paired(**inputs)
    with torch.no_grad():
        gate = paired.final_layer.control_gate.clone()
        paired.final_layer.control_gate.zero_()
    without = paired(**inputs)
    # the residual is cell i's own control cell (gate 1 at the start), not the set's mean
    torch.testing.assert_close(with_gate - without, paired.final_layer.GATE_GAIN * gate * inputs["control"],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(paired.final_layer.GATE_GAIN * gate, torch.ones_like(gate))
    # permuting the cells and their control cells together permutes the output; permuting the
    # control cells alone changes which cell each generated cell is paired with
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    both = dict(inputs, x_t=inputs["x_t"][:, perm], self_cond=inputs["self_cond"][:, perm], control=inputs["control"][:, perm])
    torch.testing.assert_close(paired(**both), without[:, perm], rtol=1e-5, atol=1e-5)
    alone = dict(inputs, control=inputs["control"][:, perm])
    assert not torch.allclose(paired(**alone), without, atol=1e-4)
    # a hidden control stream hides the paired cell too: the output no longer depends on it
    hide = torch.tensor([False, True, True])
    a = paired(**dict(inputs, control_mask=hide))
    b = paired(**dict(inputs, control_mask=hide, control=inputs["control"] * 3))
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[1:], b[1:])
