import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

import perturbdiff as pdiff
from conftest import make_inputs


def test_forward_shape_and_non_negative(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    out = tiny_model(**inputs)
    assert out.shape == inputs["x_t"].shape
    assert (out >= 0).all()


def test_fresh_model_has_zero_adaln_modulation(tiny_config):
    model = pdiff.PerturbDiffModel(tiny_config)
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
    for loader in (pdiff.PerturbDiffModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, pdiff.PerturbDiffModel)
        torch.testing.assert_close(loaded(**inputs), expected, rtol=0, atol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), pdiff.PerturbDiffConfig)


def test_unpaired_model_is_equivariant_to_cell_order_and_invariant_to_control_order(tiny_config):
    # (a paired model's cell i goes with control cell i: see test_paired_control_...)
    tiny_model = pdiff.PerturbDiffModel(pdiff.PerturbDiffConfig(**{**tiny_config.to_dict(), "paired_control": False})).eval()
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
    for key, other in [("control", inputs["control"] * 2), ("dose", inputs["dose"] + 5),
                       ("perturbation_features", -inputs["perturbation_features"])]:
        assert not torch.allclose(tiny_model(**dict(inputs, **{key: other})), out), key
    # with features a perturbation is known by them alone: its id (null for one never seen) does not matter
    other_ids = dict(inputs, perturbation=(inputs["perturbation"] + 1) % 4)
    torch.testing.assert_close(tiny_model(**other_ids), out)
    without = dict(inputs, perturbation_features=None)
    assert not torch.allclose(tiny_model(**dict(without, perturbation=other_ids["perturbation"])), tiny_model(**without))


def test_masks_match_their_explicit_forms(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    B = inputs["x_t"].shape[0]
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
    no_dose = pdiff.PerturbDiffModel(pdiff.PerturbDiffConfig.from_preset("debug", num_genes=G, use_dose=False))
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
    linear_model = pdiff.PerturbDiffModel(pdiff.PerturbDiffConfig(
        **{**tiny_config.to_dict(), "output_activation": "none", "paired_control": False})).eval()
    with_gate = linear_model(**inputs)
    with torch.no_grad():
        gate = linear_model.final_layer.control_gate.clone()
        linear_model.final_layer.control_gate.zero_()
    without = linear_model(**inputs)
    expected = (linear_model.final_layer.GATE_GAIN * gate * inputs["control"].mean(1)).unsqueeze(1)
    torch.testing.assert_close(with_gate - without, expected.expand_as(without), rtol=1e-4, atol=1e-5)
    off = pdiff.PerturbDiffModel(pdiff.PerturbDiffConfig.from_preset("debug", num_genes=12, control_residual=False))
    assert off.final_layer.control_gate is None


def test_the_control_gate_starts_at_one_and_removed_options_are_refused(tiny_config):
    model = pdiff.PerturbDiffModel(tiny_config)
    gain = model.final_layer.GATE_GAIN
    torch.testing.assert_close(gain * model.final_layer.control_gate, torch.ones(tiny_config.num_genes))
    # options the measurements rejected are gone; a stored config asking for them fails loudly
    for name, value in (("context_conditioning", False), ("control_residual_init", 0.0)):
        with pytest.raises(ValueError, match=f"{name} was removed"):
            pdiff.PerturbDiffConfig(**{**tiny_config.to_dict(), name: value})
    kept = pdiff.PerturbDiffConfig(**{**tiny_config.to_dict(), "context_conditioning": True})  # the behaviour that stayed
    assert not hasattr(kept, "context_conditioning")


# The keys and shapes of a saved model (a 1-layer debug model over 3 genes, paired, with dose and
# 2 feature dims): a rename or a reshape of a parameter breaks every export, so it must fail here.
STATE_DICT_CONTRACT = {
    "x_embed.weight": (64, 6), "x_embed.bias": (64,), "c_embed.weight": (64, 3), "c_embed.bias": (64,),
    "pair_embed.weight": (64, 3), "pair_embed.bias": (64,),
    "t_embedder.mlp.0.weight": (64, 256), "t_embedder.mlp.0.bias": (64,),
    "t_embedder.mlp.2.weight": (64, 64), "t_embedder.mlp.2.bias": (64,),
    "covariate_embedder.perturbation.weight": (3, 64), "covariate_embedder.feature_table": (3, 2),
    "covariate_embedder.context.weight": (1, 64),
    "covariate_embedder.batch.weight": (1, 64),
    "covariate_embedder.dose.fc1.weight": (64, 1), "covariate_embedder.dose.fc1.bias": (64,),
    "covariate_embedder.dose.fc2.weight": (64, 64), "covariate_embedder.dose.fc2.bias": (64,),
    "covariate_embedder.features.fc1.weight": (64, 2), "covariate_embedder.features.fc1.bias": (64,),
    "covariate_embedder.features.fc2.weight": (64, 64), "covariate_embedder.features.fc2.bias": (64,),
    **{f"blocks.0.{s}.{k}": shape for s in ("x", "c") for k, shape in {
        "qkv.weight": (192, 64), "qkv.bias": (192,), "q_norm.weight": (16,), "k_norm.weight": (16,),
        "proj.weight": (64, 64), "proj.bias": (64,), "mlp.fc1.weight": (256, 64), "mlp.fc1.bias": (256,),
        "mlp.fc2.weight": (64, 256), "mlp.fc2.bias": (64,),
        "adaLN_modulation.1.weight": (384, 64), "adaLN_modulation.1.bias": (384,)}.items()},
    "final_layer.control_gate": (3,), "final_layer.linear.weight": (3, 64), "final_layer.linear.bias": (3,),
    "final_layer.adaLN_modulation.1.weight": (128, 64), "final_layer.adaLN_modulation.1.bias": (128,),
}


def test_saved_models_keep_the_state_dict_key_contract(tmp_path):
    from safetensors import safe_open

    config = pdiff.PerturbDiffConfig.from_preset("debug", gene_names=["a", "b", "c"], perturbation_names=["control", "x"],
                                                 num_layers=1, paired_control=True, perturbation_feature_dim=2)
    pdiff.PerturbDiffModel(config).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert saved == STATE_DICT_CONTRACT


def test_paired_control_adds_each_cells_own_control_cell(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, m=9)
    config = pdiff.PerturbDiffConfig(**{**tiny_config.to_dict(), "paired_control": True, "output_activation": "none"})
    paired = pdiff.PerturbDiffModel(config).eval()
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


def test_the_additive_pathway_adds_one_shift_per_perturbation_and_none_for_null_or_dropped(tiny_config):
    config = pdiff.PerturbDiffConfig(**{**tiny_config.to_dict(), "perturbation_shift": True, "output_activation": "none"})
    model = pdiff.PerturbDiffModel(config).eval()
    assert model.perturbation_shift.weight.abs().sum() == 0  # starts at "no change"
    inputs = make_inputs(config, B=3)
    inputs["perturbation"] = torch.tensor([0, 2, 3])  # null, IFNB, TNF
    before = model(**inputs)
    with torch.no_grad():
        model.perturbation_shift.weight[1:] = torch.randn(3, config.num_genes)
    after = model(**inputs)
    gain = model.final_layer.GATE_GAIN
    torch.testing.assert_close(after - before, gain * model.perturbation_shift.weight[[0, 2, 3]][:, None].expand_as(before))
    assert torch.equal(after[0], before[0])  # the null perturbation has no shift
    dropped = model(**inputs, drop_covariates=torch.tensor([False, True, False]))
    torch.testing.assert_close(dropped[1], model(**{**inputs, "perturbation": torch.tensor([0, 0, 0])},
                                                 drop_covariates=torch.tensor([False, True, False]))[1])
    no_control = {k: v for k, v in inputs.items() if k != "control"}
    with torch.no_grad():
        model.perturbation_shift.weight.zero_()
    plain = model(**no_control)
    with torch.no_grad():
        model.perturbation_shift.weight[1:] = 1.0
    torch.testing.assert_close(model(**no_control), plain)  # a change from a control set only: none without one
