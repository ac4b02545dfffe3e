import pytest
import torch

import perturbdiff as pdiff
from perturbdiff.adapt import adapt_model, extend_vocabulary


def test_extend_vocabulary_keeps_base_ids():
    assert extend_vocabulary(["a", "b"], ["c", "b", "d", "c"]) == ["a", "b", "c", "d"]


def test_adapted_model_keeps_what_the_base_knows(tiny_model, tiny_config):
    base_genes = tiny_config.gene_names
    # new order, two base genes dropped, three new genes
    genes = list(reversed(base_genes[2:])) + ["NEW1", "NEW2", "NEW3"]
    perts = extend_vocabulary(tiny_config.perturbation_names, ["IL6", "TNF"])
    model, report = adapt_model(tiny_model, gene_names=genes, perturbation_names=perts)
    model.eval()
    assert report["genes"] == {"shared": 10, "new": 3, "dropped": 2}
    assert report["perturbation"] == {"shared": 3, "new": 1, "dropped": 0}
    assert model.config.gene_names == genes and model.config.perturbation_names == perts

    g = torch.Generator().manual_seed(0)
    B, m = 2, 5
    x_base = torch.randn(B, m, 12, generator=g)
    x_base[..., :2] = 0  # the dropped genes carry nothing
    sc = torch.rand(B, m, 12, generator=g)
    sc[..., :2] = 0
    ctrl = torch.rand(B, m, 12, generator=g)
    ctrl[..., :2] = 0
    idx = torch.tensor([base_genes.index(x) for x in genes[:10]])

    def to_new(t):  # base gene order -> new order, new genes zero
        return torch.cat([t[..., idx], torch.zeros(B, m, 3)], dim=-1)

    cond = dict(perturbation=tiny_config.encode("perturbation", ["IFNB", "TNF"]), context=torch.tensor([1, 2]),
                batch=torch.tensor([0, 1]), dose=torch.tensor([1.0, 3.0]), perturbation_features=torch.randn(B, 5, generator=g))
    t = torch.tensor([10, 500])
    expected = tiny_model(x_base, t, self_cond=sc, control=ctrl, **cond)[..., idx]
    got = model(to_new(x_base), t, self_cond=to_new(sc), control=to_new(ctrl), **cond)[..., :10]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the new perturbation has its own (new) embedding
    new_id = model.config.encode("perturbation", ["IL6"])
    assert not torch.equal(model.covariate_embedder.perturbation.weight[new_id], model.covariate_embedder.perturbation.weight[0:1])


def test_adapt_refuses_disjoint_genes(tiny_model):
    with pytest.raises(ValueError, match="shares no gene"):
        adapt_model(tiny_model, gene_names=["X1", "X2"])


def test_finetuning_overrides_behaviour_but_not_sizes(tiny_model, tiny_config, tmp_path):
    from perturbdiff.adapt import adapt_pretrained

    tiny_model.save_pretrained(tmp_path / "base")
    vocab = {"gene_names": tiny_config.gene_names, "perturbation_names": ["control", "IL6"],
             "context_names": ["B cell"], "batch_names": []}
    model = adapt_pretrained(tmp_path / "base", **vocab, overrides={"paired_control": True}, log=lambda _: None)
    assert model.config.paired_control and model.config.num_layers == tiny_config.num_layers
    assert model.config.perturbation_names == ["control", "IFNB", "TNF", "IL6"]  # base ids first, then new names
    with pytest.raises(ValueError, match=r"\['num_layers'\] cannot change a base model"):
        adapt_pretrained(tmp_path / "base", **vocab, overrides={"num_layers": 4, "paired_control": True})
    with pytest.raises(ValueError, match="context_conditioning was removed"):
        pdiff.PerturbDiffConfig(num_genes=3, context_conditioning=False)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        adapt_pretrained(tmp_path / "nowhere", **vocab)


def test_finetuning_can_switch_paired_control_on_and_keeps_it(tiny_model, tiny_config, tmp_path):
    from perturbdiff.adapt import adapt_pretrained

    tiny_model.save_pretrained(tmp_path / "base")
    vocab = {"gene_names": tiny_config.gene_names, "perturbation_names": ["control"],
             "context_names": [], "batch_names": []}
    model = adapt_pretrained(tmp_path / "base", **vocab, overrides={"paired_control": True}, log=lambda _: None)
    assert model.config.paired_control and model.pair_embed is not None  # a new module, freshly initialised
    torch.testing.assert_close(model.x_embed.weight, tiny_model.x_embed.weight)  # the rest is carried over
    # a paired model's pair_embed columns follow their genes into a new gene order
    model.save_pretrained(tmp_path / "paired")
    reordered, _ = adapt_model(model, gene_names=list(reversed(tiny_config.gene_names)))
    torch.testing.assert_close(reordered.pair_embed.weight, model.pair_embed.weight.flip(1))
    # ... and switching it off again drops the module
    assert adapt_pretrained(tmp_path / "paired", **vocab, overrides={"paired_control": False},
                            log=lambda _: None).pair_embed is None


def test_finetuning_carries_the_additive_pathway_over_for_shared_perturbations_and_genes(tiny_config):
    config = pdiff.PerturbDiffConfig(**{**tiny_config.to_dict(), "perturbation_shift": True})
    base = pdiff.PerturbDiffModel(config)
    with torch.no_grad():
        base.perturbation_shift.weight[1:] = torch.randn(config.num_ids("perturbation") - 1, config.num_genes)
    genes = list(reversed(tiny_config.gene_names[2:])) + ["NEW1"]
    model, _ = adapt_model(base, gene_names=genes, perturbation_names=["TNF", "IL6"])
    new, old = model.perturbation_shift.weight, base.perturbation_shift.weight
    cols = [tiny_config.gene_names.index(g) for g in genes[:-1]]
    torch.testing.assert_close(new[1, :-1], old[config.encode("perturbation", ["TNF"])[0], cols])  # TNF, shared genes
    assert new[1, -1] == 0 and (new[2] == 0).all() and (new[0] == 0).all()  # a new gene, a new perturbation, null
    plain, _ = adapt_model(pdiff.PerturbDiffModel(tiny_config), overrides={"perturbation_shift": True})
    assert plain.perturbation_shift.weight.abs().sum() == 0  # switched on when finetuning: starts at zero
