"""Prediction: a tiny real model saved to disk, predicting from synthetic control counts."""

import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import perturbdiff as pdiff
from perturbdiff.cli import main
from perturbdiff.conditions import condition_rngs, make_conditions, read_conditions
from perturbdiff.pipeline import PerturbDiffPipeline

GENES = [f"gene{i}" for i in range(16)]
STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = pdiff.PerturbDiffConfig.from_preset(
        "debug", gene_names=GENES, perturbation_names=["control", "IFNB", "TNF"],
        context_names=["T cell", "monocyte"], batch_names=["donor1", "donor2"],
    )
    torch.manual_seed(0)
    model = pdiff.PerturbDiffModel(config)
    with torch.no_grad():  # adaLN-Zero ignores the conditioning at init; give it a say
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(model_dir):
    return PerturbDiffPipeline.from_pretrained(model_dir, device="cpu")


def make_control(seed=0, n_per_group=13, sparse=True):
    """NB counts for the model's genes (in another order) plus 4 genes the model does not know.

    Groups: controls of (T cell, donor1), (T cell, donor2), (monocyte, donor1), and some IFNB cells
    that must not be used as controls.
    """
    rng = np.random.default_rng(seed)
    genes = GENES[::-1] + ["extra1", "extra2", "extra3", "extra4"]
    groups = [("control", "T cell", "donor1"), ("control", "T cell", "donor2"),
              ("control", "monocyte", "donor1"), ("IFNB", "T cell", "donor1")]
    mu = rng.gamma(2.0, 3.0, len(genes))
    X = rng.negative_binomial(3, 3 / (3 + mu), size=(n_per_group * len(groups), len(genes))).astype(np.float32)
    obs = pd.DataFrame([g for g in groups for _ in range(n_per_group)], columns=["perturbation", "context", "batch"])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(sp.csr_matrix(X) if sparse else X, obs=obs, var=pd.DataFrame(index=genes))


def predict(pipe, control, **kw):
    kw = {"num_steps": STEPS, "set_size": 8, "progress": False, **kw}
    return pipe.predict(control, **kw)


# --------------------------------------------------------------------------- output
def test_output_anndata(pipe):
    control = make_control()
    conds = pd.DataFrame({"perturbation": ["IFNB", "TNF"], "context": ["T cell", "monocyte"], "batch": ["donor2", None]})
    out = predict(pipe, control, conditions=conds, num_populations=2)
    # IFNB|T cell|donor2 uses the 13 donor2 T-cell controls; TNF|monocyte the 13 monocyte ones;
    # 13 cells in sets of 8 = 2 sets, the second padded and trimmed.
    assert out.shape == (2 * 13 * 2, len(GENES))
    assert list(out.var_names) == GENES
    assert list(out.obs.columns) == ["perturbation", "context", "batch", "dose", "population"]
    first = out.obs.iloc[0]
    assert (first["perturbation"], first["context"], first["batch"]) == ("IFNB", "T cell", "donor2")
    assert out.obs["batch"].isna().sum() == 26
    assert sorted(out.obs["population"].unique()) == [0, 1]
    assert out.obs_names.is_unique
    X = out.X
    assert X.dtype == np.float32 and np.isfinite(X).all() and (X >= 0).all()
    meta = out.uns["perturbdiff"]
    assert meta["expression"] == "log1p(counts / total * 10000)" and meta["model_scale"] == 10.0
    assert meta["input_space"] == "counts" and meta["num_steps"] == STEPS
    table = meta["conditions"]
    assert table["num_control_cells"].tolist() == [13, 13]
    assert table["control_source"].astype(str).tolist() == ["context+batch", "context"]
    assert table["num_sets"].tolist() == [2, 2]
    # The K populations are independent draws.
    rows = (out.obs["perturbation"] == "IFNB").to_numpy()
    pop0 = X[rows & (out.obs["population"] == 0).to_numpy()]
    pop1 = X[rows & (out.obs["population"] == 1).to_numpy()]
    assert pop0.shape == pop1.shape and not np.allclose(pop0, pop1)


def test_output_is_model_output_times_scale(pipe):
    """One set, no padding: X is sample_sets on the model-normalised controls, times the scale."""
    control = make_control(n_per_group=8, sparse=False)
    out = predict(pipe, control, perturbation="TNF", context="monocyte", set_size=8, integer_counts=False)
    cfg = pipe.config
    ctrl = control[(control.obs["context"] == "monocyte") & (control.obs["perturbation"] == "control")]
    # Totals over all 20 genes of the data, then the model's genes in the model's order.
    normed = pdiff.normalize_counts(ctrl.X, cfg.norm)[:, [list(ctrl.var_names).index(g) for g in GENES]]
    _, gen = condition_rngs(0, ("TNF", "monocyte", None, float("nan")))
    # The control stream is order-free, so the pipeline's shuffle of the 8 cells does not matter.
    expected = pdiff.sample_sets(
        pipe.model, control=torch.from_numpy(normed)[None], perturbation=cfg.encode("perturbation", "TNF"),
        context=cfg.encode("context", "monocyte"), batch=torch.zeros(1, dtype=torch.long), dose=torch.zeros(1),
        num_steps=STEPS, generator=gen,
    )[0].numpy() * cfg.norm.scale
    # Values above log1p(target_sum) (every count in one gene) are impossible and clipped; the
    # untrained model produces some.
    ceiling = np.log1p(cfg.norm.target_sum)
    assert out.uns["perturbdiff"]["num_clipped_values"] == int((expected > ceiling).sum()) > 0
    np.testing.assert_allclose(out.X, np.minimum(expected, ceiling), rtol=1e-4, atol=1e-4)


def test_seed_determinism_and_condition_independence(pipe):
    control = make_control()
    a = predict(pipe, control, perturbation=["IFNB", "TNF"], context="T cell", seed=3)
    b = predict(pipe, control, perturbation=["IFNB", "TNF"], context="T cell", seed=3)
    c = predict(pipe, control, perturbation=["IFNB", "TNF"], context="T cell", seed=4)
    alone = predict(pipe, control, perturbation="TNF", context="T cell", seed=3)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.allclose(a.X, c.X)
    # A condition's prediction does not depend on the other rows of the table.
    np.testing.assert_allclose(a.X[(a.obs["perturbation"] == "TNF").to_numpy()], alone.X, rtol=1e-5, atol=1e-5)


def test_cells_per_condition_and_batch_fallback(pipe):
    control = make_control()
    with pytest.warns(UserWarning, match="using the context's control cells from all batches"):
        out = predict(pipe, control, perturbation="IFNB", context="monocyte", batch="donor2",
                      cells_per_condition=30, num_populations=3)
    assert out.n_obs == 30 * 3
    table = out.uns["perturbdiff"]["conditions"]
    assert table["control_source"].astype(str).tolist() == ["context"]
    assert table["num_control_cells"].tolist() == [13]


def test_log1p_input_matches_counts(pipe):
    """log1p-normalised controls holding every gene give the same prediction as their counts."""
    control = make_control(sparse=False)
    logged = control.copy()
    totals = logged.X.sum(1, keepdims=True)
    logged.X = np.log1p(logged.X / totals * 1e6)  # another target sum: rescaled to the model's
    a = predict(pipe, control, perturbation="IFNB", context="T cell")
    b = predict(pipe, logged, perturbation="IFNB", context="T cell")
    np.testing.assert_array_equal(a.layers["counts"], b.layers["counts"])  # the counts are recovered from log1p
    assert b.uns["perturbdiff"]["input_space"] == "log1p"
    assert np.isclose(b.uns["perturbdiff"]["input_target_sum"], 1e6, rtol=1e-3)
    np.testing.assert_allclose(a.X, b.X, atol=2e-3)


def test_allow_missing_genes(pipe):
    control = make_control()[:, 3:].copy()  # drops gene15, gene14, gene13
    with pytest.raises(ValueError, match=r"13 of the model's 16 genes .* 3 missing .*allow_missing_genes"):
        predict(pipe, control, perturbation="IFNB", context="T cell")
    with pytest.warns(UserWarning, match="filling them with zeros"):
        out = predict(pipe, control, perturbation="IFNB", context="T cell", allow_missing_genes=True)
    assert out.var["missing_in_control"].sum() == 3 and out.uns["perturbdiff"]["num_missing_genes"] == 3
    with pytest.raises(ValueError, match="too few to predict from"):
        predict(pipe, make_control()[:, 10:].copy(), perturbation="IFNB", context="T cell", allow_missing_genes=True)


def test_gene_key_hint(pipe):
    control = make_control()
    control.var["symbol"] = control.var_names
    control.var_names = [f"ENSG{i}" for i in range(control.n_vars)]
    with pytest.raises(ValueError, match=r"0 of the model's 16 genes.*var column 'symbol' matches more"):
        predict(pipe, control, perturbation="IFNB", context="T cell")
    out = predict(pipe, control, perturbation="IFNB", context="T cell", gene_key="symbol")
    assert list(out.var_names) == GENES


# --------------------------------------------------------------------------- bad input
def _with_X(control, X):
    control = control.copy()
    control.X = X
    return control


BAD_INPUTS = {
    "unknown perturbation": (dict(perturbation="KRAS", context="T cell"), None,
                             r"unknown perturbation\(s\) \['KRAS'\] and no features .*knows 3: control, IFNB, TNF"),
    "unknown context": (dict(perturbation="IFNB", context="B cell"), None, r"unknown context name\(s\) \['B cell'\]"),
    "unknown batch": (dict(perturbation="IFNB", context="T cell", batch="donor9"), None, r"unknown batch"),
    "declared log1p on counts": (dict(perturbation="IFNB", context="T cell", input_space="log1p"), None,
                                 r"input_space='log1p' but .* integer-valued .* raw counts"),
    "declared counts on log1p": (dict(perturbation="IFNB", context="T cell", input_space="counts"),
                                 lambda c: _with_X(c, np.log1p(c.X.toarray())), r"input_space='counts' but .* non-integer"),
    "non-finite": (dict(perturbation="IFNB", context="T cell"),
                   lambda c: _with_X(c, np.where(np.arange(c.n_vars) == 2, np.nan, c.X.toarray())), r"non-finite"),
    "negative": (dict(perturbation="IFNB", context="T cell"),
                 lambda c: _with_X(c, c.X.toarray() - 1.5), r"negative values"),
    "not log, not counts": (dict(perturbation="IFNB", context="T cell"),
                            lambda c: _with_X(c, c.X.toarray() * 37.3), r"neither raw counts .* nor log1p"),
    "empty condition": (dict(perturbation="IFNB", context="monocyte"),
                        lambda c: c[c.obs["context"] != "monocyte"].copy(),
                        r"no control cells for context\(s\) \['monocyte'\] .*contexts with control cells: \['T cell'\]"),
    "no control label": (dict(perturbation="IFNB", context="T cell", control_label="ctrl"), None,
                         r"no control cells: obs\['perturbation'\] has no 'ctrl'"),
    "missing obs key": (dict(perturbation="IFNB", context="T cell", context_key="cell_type"), None,
                        r"context_key 'cell_type' is not an obs column"),
    "table and flags": (dict(perturbation="IFNB", context="T cell", conditions=[{"perturbation": "IFNB", "context": "T cell"}]),
                        None, r"either a conditions table or"),
    "bad table": (dict(conditions=[{"perturbation": "IFNB", "cell_type": "T cell"}]), None,
                  r"missing \['context'\]; unknown \['cell_type'\]"),
    "dose for no-dose": (dict(perturbation="IFNB", context="T cell", dose=-1.0), None, r"doses must be >= 0"),
    "features for featureless model": (dict(perturbation="IFNB", context="T cell", perturbation_features={"IFNB": [1.0]}),
                                       None, r"the model takes none"),
    "bad set size": (dict(perturbation="IFNB", context="T cell", set_size=0), None, r"set_size must be >= 1"),
    "integer counts from log1p of non-counts": (
        dict(perturbation="IFNB", context="T cell"),
        lambda c: _with_X(c, np.log1p(np.random.default_rng(0).gamma(1.0, 3.0, c.shape))),
        r"integer_counts=True needs each control cell's library size.*integer_counts=False \(--no-integer-counts\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_errors(pipe, case):
    kwargs, transform, message = BAD_INPUTS[case]
    control = make_control()
    if transform is not None:
        control = transform(control)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            predict(pipe, control, **kwargs)


@pytest.mark.parametrize("space", ["counts", "log1p"])
def test_the_input_space_layer_puts_each_cell_at_its_control_cells_library_size(model_dir, space):
    """A paired model whose head adds nothing to its control cell predicts the control cell itself;
    the input-space layer then gives back that control cell's own values (its counts, or its log1p)."""
    model = pdiff.PerturbDiffModel.from_pretrained(model_dir)
    config = pdiff.PerturbDiffConfig(**{**model.config.to_dict(), "paired_control": True})
    paired = pdiff.PerturbDiffModel(config)
    with torch.no_grad():
        paired.final_layer.linear.weight.zero_()
        paired.final_layer.linear.bias.zero_()
    pipe = PerturbDiffPipeline(paired, device="cpu")
    control = make_control(sparse=False)
    if space == "log1p":
        control.X = np.log1p(control.X / control.X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    out = predict(pipe, control, perturbation="TNF", context="monocyte")
    assert out.uns["perturbdiff"]["input_space_layer"].startswith(space)
    source = control[(control.obs["context"] == "monocyte").to_numpy()][:, GENES].X
    layer = out.layers["input_space"]
    for row in layer:  # every predicted cell is one of the control cells, in the control data's own values
        assert np.abs(source - row).max(1).min() < 1e-3 * max(1.0, float(row.max()))


def test_integer_counts_give_back_the_control_cells_of_a_model_that_changes_nothing(model_dir):
    """A paired model whose head adds nothing predicts each control cell itself: integer counts give
    back exactly that cell's counts (layers["counts"]), and X normalises them over all its genes."""
    model = pdiff.PerturbDiffModel.from_pretrained(model_dir)
    paired = pdiff.PerturbDiffModel(pdiff.PerturbDiffConfig(**{**model.config.to_dict(), "paired_control": True}))
    with torch.no_grad():
        paired.final_layer.linear.weight.zero_()
        paired.final_layer.linear.bias.zero_()
    control = make_control(sparse=False)
    out = predict(PerturbDiffPipeline(paired, device="cpu"), control, perturbation="TNF", context="monocyte")
    assert out.uns["perturbdiff"]["integer_counts"]
    mono = control[(control.obs["context"] == "monocyte").to_numpy()]
    source = mono[:, GENES].X
    for row in out.layers["counts"]:
        assert np.abs(source - row).max(1).min() == 0  # one of the control cells, count for count
    normed = np.log1p(mono.X / mono.X.sum(1, keepdims=True) * 1e4)[:, [list(mono.var_names).index(g) for g in GENES]]
    for row in out.X:
        assert np.abs(normed - row).max(1).min() < 1e-4


def test_integer_counts_of_any_model_look_sequenced(pipe):
    """Whatever the (untrained) model predicts, each cell is integer counts normalised at one total:
    zero where the count is zero, else k times one count's worth, nothing in between."""
    control = make_control()
    out = predict(pipe, control, perturbation=["IFNB", "TNF"], context="T cell")
    counts = out.layers["counts"]
    assert np.array_equal(counts, np.round(counts)) and (counts >= 0).all() and counts.sum() > 0
    X = out.X.astype(np.float64)
    assert np.array_equal(X == 0, counts == 0)
    per_count = np.where(counts > 0, np.expm1(X) / np.maximum(counts, 1), np.nan)  # one count's worth, per cell
    spread = np.nanmax(per_count, 1) / np.nanmin(per_count, 1)
    np.testing.assert_allclose(spread[np.isfinite(spread)], 1.0, rtol=1e-4)
    assert (np.nanmin(per_count, 1) <= 1e4 / counts.sum(1) * (1 + 1e-4)).all()  # the total includes the extra genes
    continuous = predict(pipe, control, perturbation=["IFNB", "TNF"], context="T cell", integer_counts=False)
    assert "counts" not in continuous.layers and not continuous.uns["perturbdiff"]["integer_counts"]
    assert continuous.uns["perturbdiff"]["input_space_layer"].startswith("counts: expm1(X)")


def test_cells_per_condition_come_from_the_table(pipe):
    control = make_control()
    conds = pd.DataFrame({"perturbation": ["IFNB", "TNF", "TNF"], "context": ["T cell", "monocyte", "T cell"],
                          "num_cells": [5, "", 3]})
    out = predict(pipe, control, conditions=conds, cells_per_condition=4)
    table = out.uns["perturbdiff"]["conditions"]
    assert table["num_cells"].tolist() == [5, 4, 3]  # a row's own count, else the global one
    with pytest.raises(ValueError, match="num_cells '2.5' is not a whole number >= 1"):
        predict(pipe, control, conditions=conds.assign(num_cells=["2.5", 1, 1]))
    assert out.n_obs == 5 + 4 + 3


def test_conditions_helpers(tmp_path):
    table = make_conditions(["IFNB", "TNF"], ["T cell", "monocyte"], dose=[1.0, 10.0])
    assert len(table) == 8 and list(table.columns) == ["perturbation", "context", "batch", "dose", "num_cells"]
    path = tmp_path / "conds.tsv"
    path.write_text("perturbation\tcontext\tbatch\tdose\nNA\tT cell\t\t\nIFNB\tmonocyte\tdonor1\t2.5\n")
    read = read_conditions(path)
    assert read["perturbation"].tolist() == ["NA", "IFNB"]  # the gene NA is a name, not missing
    assert read["batch"].tolist() == [None, "donor1"] and np.isnan(read["dose"][0]) and read["dose"][1] == 2.5
    path.write_text("perturbation,context\nIFNB,T cell\nIFNB,T cell\n")
    with pytest.raises(ValueError, match="duplicated conditions"):
        read_conditions(path.rename(tmp_path / "conds.csv"))


# --------------------------------------------------------------------------- command line
def test_cli_predict(model_dir, tmp_path):
    control = make_control()
    control.obs = control.obs.rename(columns={"context": "cell_type"})
    control.write_h5ad(tmp_path / "control.h5ad")
    (tmp_path / "conditions.csv").write_text("perturbation,context,batch\nIFNB,T cell,donor1\nTNF,monocyte,\n")
    out = tmp_path / "out" / "pred.h5ad"
    cmd = [sys.executable, "-m", "perturbdiff.cli", "predict", str(model_dir), "--control", str(tmp_path / "control.h5ad"),
           "--conditions", str(tmp_path / "conditions.csv"), "--context-key", "cell_type", "--out", str(out),
           "--steps", "2", "--set-size", "8", "--num-populations", "2", "--seed", "1", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote 52 predicted cells x 16 genes (2 conditions, 2 population(s) each)" in run.stdout
    pred = ad.read_h5ad(out)
    assert pred.shape == (52, 16) and list(pred.var_names) == GENES
    assert pred.uns["perturbdiff"]["seed"] == 1
    assert [p.name for p in out.parent.iterdir()] == ["pred.h5ad"]  # no temporary left behind


def test_cli_predict_error(model_dir, tmp_path, capsys):
    make_control().write_h5ad(tmp_path / "control.h5ad")
    code = main(["predict", str(model_dir), "--control", str(tmp_path / "control.h5ad"), "--out", str(tmp_path / "p.h5ad"),
                 "--perturbation", "KRAS", "--context", "T cell", "--steps", "2"])
    assert code == 2
    assert "perturbdiff predict: error: unknown perturbation(s) ['KRAS']" in capsys.readouterr().err
    assert not (tmp_path / "p.h5ad").exists()


def test_a_feature_model_predicts_unseen_perturbations_from_their_features(tmp_path):
    config = pdiff.PerturbDiffConfig.from_preset(
        "debug", gene_names=GENES, perturbation_names=["control", "IFNB", "TNF"],
        context_names=["T cell", "monocyte"], batch_names=["donor1", "donor2"], perturbation_feature_dim=3,
        trained_perturbations=["IFNB"],  # TNF is in the vocabulary but was held out
    )
    torch.manual_seed(0)
    model = pdiff.PerturbDiffModel(config)
    table = pd.DataFrame([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0]], index=["IFNB", "TNF", "KRAS"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.normal_(0, 0.05)
        model.covariate_embedder.feature_table[2:] = torch.tensor(table.loc[["IFNB", "TNF"]].to_numpy())  # as trained
    model.save_pretrained(tmp_path / "model")
    pipe = PerturbDiffPipeline.from_pretrained(tmp_path / "model", device="cpu")
    control = make_control()
    out = predict(pipe, control, perturbation=["KRAS", "IFNB+TNF", "IFNB", "TNF"], context="T cell", batch="donor1",
                  perturbation_features=table, seed=1)
    # said, not silent: TNF had no training cells, KRAS and the combination are outside the vocabulary
    assert out.uns["perturbdiff"]["unseen_perturbations"] == ["IFNB+TNF", "KRAS", "TNF"]
    # a combination is its parts' sum: the same cells as a perturbation whose row is that sum
    summed = pd.DataFrame([[1.0, 1.0, 0]], index=["IFNB+TNF"])
    again = predict(pipe, control, perturbation="IFNB+TNF", context="T cell", batch="donor1",
                    perturbation_features=summed, seed=1)
    np.testing.assert_allclose(out[out.obs["perturbation"] == "IFNB+TNF"].X, again.X, rtol=1e-5, atol=1e-5)
    kras, ifnb = (out[out.obs["perturbation"] == p].X for p in ("KRAS", "IFNB"))
    assert not np.allclose(kras, ifnb)
    # the vocabulary's rows travel with the model: no table needed for them, the same cells
    own = predict(pipe, control, perturbation="IFNB", context="T cell", batch="donor1", seed=1)
    np.testing.assert_allclose(own.X, ifnb, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"has none for \['KRAS'\]: give a feature table"):
        predict(pipe, control, perturbation="KRAS", context="T cell")
    other = table.copy()
    other.loc["IFNB"] = [0.5, 0.5, 0]  # a table from another source
    with pytest.raises(ValueError, match=r"differ from the rows the model was trained with for 1 of 2 .*IFNB"):
        predict(pipe, control, perturbation="KRAS", context="T cell", perturbation_features=other)
    with pytest.raises(ValueError, match=r"have no features in the perturbation features: MYC, KRAS\+MYC \(no MYC\)"):
        predict(pipe, control, perturbation=["MYC", "KRAS+MYC"], context="T cell", perturbation_features=table)
    with pytest.raises(ValueError, match=r"have 2 values per perturbation, the model takes 3"):
        predict(pipe, control, perturbation="KRAS", context="T cell", perturbation_features=table.iloc[:, :2])


def test_population_spread_says_how_far_the_predicted_populations_differ(pipe):
    control = make_control()
    out = predict(pipe, control, perturbation=["IFNB", "TNF"], context="T cell", num_populations=3, seed=2)
    table = out.uns["perturbdiff"]["conditions"]
    sd = out.varm["population_sd"]
    assert sd.shape == (len(GENES), 2)
    for j, p in enumerate(["IFNB", "TNF"]):
        cells = out[out.obs["perturbation"] == p]
        means = np.stack([np.asarray(cells[cells.obs["population"] == k].X, dtype=np.float64).mean(0) for k in range(3)])
        np.testing.assert_allclose(sd[:, j], means.std(0, ddof=1), rtol=1e-4, atol=1e-6)
        assert table["population_spread"].iat[j] == pytest.approx(np.sqrt(np.mean(means.std(0, ddof=1) ** 2)), rel=1e-4)
        assert table["population_noise"].iat[j] > 0
    single = predict(pipe, control, perturbation="IFNB", context="T cell")
    assert "population_sd" not in single.varm and np.isnan(single.uns["perturbdiff"]["conditions"]["population_spread"]).all()


def test_a_model_with_a_hidden_batch_takes_the_batch_only_to_pick_control_cells(tmp_path):
    """hidden_covariates=["batch"]: the model has no batch vocabulary; a condition's batch picks
    that batch's control cells and reaches the model as the null id (no unknown-name error)."""
    config = pdiff.PerturbDiffConfig.from_preset(
        "debug", gene_names=GENES, perturbation_names=["control", "IFNB"], context_names=["T cell", "monocyte"],
        hidden_covariates=["batch"], set_noise=1.0)
    assert config.batch_names == [] and config.hidden_covariates == ["batch"]
    torch.manual_seed(0)
    pdiff.PerturbDiffModel(config).save_pretrained(tmp_path / "m")
    hidden = PerturbDiffPipeline.from_pretrained(tmp_path / "m", device="cpu")
    assert hidden.config.hidden_covariates == ["batch"] and hidden.diffusion.set_noise == 1.0
    out = predict(hidden, make_control(), perturbation="IFNB", context="T cell", batch=["donor1", "donor2"],
                  num_populations=2, cells_per_condition=20)
    table = out.uns["perturbdiff"]["conditions"]
    assert list(table["control_source"].astype(str)) == ["context+batch", "context+batch"]
    assert np.isfinite(out.X).all() and out.n_obs == 2 * 2 * 20
    with pytest.raises(ValueError, match="cannot be hidden"):
        pdiff.PerturbDiffConfig(num_genes=4, hidden_covariates=["perturbation"])
