import numpy as np
import pytest

import perturbdiff as pdiff


def test_presets_have_the_papers_base_size():
    cfg = pdiff.PerturbDiffConfig.from_preset("base", num_genes=2000)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (512, 8, 8)
    for name in ("debug", "small", "base", "large"):
        assert pdiff.PerturbDiffConfig.from_preset(name, num_genes=10).hidden_size == pdiff.MODEL_PRESETS[name]["hidden_size"]
    with pytest.raises(ValueError, match="unknown preset"):
        pdiff.PerturbDiffConfig.from_preset("huge", num_genes=10)


def test_names_in_ids_inside(tiny_config):
    ids = tiny_config.encode("perturbation", ["IFNB", None, "control"])
    assert ids.tolist() == [2, pdiff.NULL_ID, 1]
    assert tiny_config.decode("perturbation", ids) == ["IFNB", None, "control"]
    assert tiny_config.num_ids("context") == 3


def test_unknown_covariate_name_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match=r"unknown perturbation name\(s\) \['IL6'\].*knows 3: control, IFNB, TNF"):
        tiny_config.encode("perturbation", ["IFNB", "IL6"])
    with pytest.raises(ValueError, match="unknown covariate"):
        tiny_config.encode("plate", ["p1"])


def test_gene_mismatch_reports_shared_and_missing(tiny_config):
    tiny_config.check_genes([f"gene{i}" for i in range(12)])
    with pytest.raises(ValueError, match="data has 11 genes, model 12; 10 shared, 2 of the model's genes missing"):
        tiny_config.check_genes([f"gene{i}" for i in range(10)] + ["XIST"])
    with pytest.raises(ValueError, match="another order"):
        tiny_config.check_genes([f"gene{i}" for i in reversed(range(12))])


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="gene_names or num_genes"):
        pdiff.PerturbDiffConfig()
    with pytest.raises(ValueError, match="num_genes=3 but gene_names has 2"):
        pdiff.PerturbDiffConfig(gene_names=["a", "b"], num_genes=3)
    with pytest.raises(ValueError, match="duplicates"):
        pdiff.PerturbDiffConfig(gene_names=["a", "a"])
    with pytest.raises(ValueError, match="beta_schedule"):
        pdiff.PerturbDiffConfig(num_genes=3, beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="divisible"):
        pdiff.PerturbDiffConfig(num_genes=3, hidden_size=30, num_heads=4)


def test_config_round_trips_through_json(tiny_config, tmp_path):
    tiny_config.save_pretrained(tmp_path)
    loaded = pdiff.PerturbDiffConfig.from_pretrained(tmp_path)
    assert loaded.gene_names == tiny_config.gene_names
    assert loaded.perturbation_names == tiny_config.perturbation_names
    assert loaded.norm == pdiff.Normalization(target_sum=1e4, log1p=True, scale=10.0)


def test_gene_max_is_checked_and_gives_the_sampling_ceiling(tiny_config):
    G = tiny_config.num_genes
    config = pdiff.PerturbDiffConfig(**{**tiny_config.to_dict(), "gene_max": [1.0] * G})
    ceiling = config.sample_ceiling()
    assert len(ceiling) == G and ceiling[0] == pytest.approx(1.0 + np.log(2) / 10.0)  # log 2 in the model's space
    assert tiny_config.sample_ceiling() is None  # not recorded: no ceiling
    for bad in ([1.0] * (G - 1), [float("nan")] * G, [-1.0] * G):
        with pytest.raises(ValueError, match="gene_max must be"):
            pdiff.PerturbDiffConfig(**{**tiny_config.to_dict(), "gene_max": bad})
