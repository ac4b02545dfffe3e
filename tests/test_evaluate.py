"""Evaluation on small synthetic screens where the right answer is known."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("cell_eval")

from perturbdiff.cli import main  # noqa: E402
from perturbdiff.evaluation import BASELINES, evaluate  # noqa: E402

HELD_OUT = [("A", "T"), ("B", "T"), ("C", "M")]


def synthetic_screen(n_genes=30, n_cells=40, seed=0):
    """NB counts for 3 contexts x (control + 4 perturbations); effects are shared across contexts
    (so the additive baseline is good) on top of context-specific baselines."""
    rng = np.random.default_rng(seed)
    contexts, perts = ("T", "M", "B"), ("A", "B", "C", "D")
    base = {c: rng.gamma(2, 2, n_genes) for c in contexts}
    effect = {p: np.where(rng.random(n_genes) < 0.3, rng.normal(0, 1.5, n_genes), 0.0) for p in perts}
    effect["control"] = np.zeros(n_genes)
    X, obs = [], []
    for c in contexts:
        for p in ("control", *perts):
            mu = base[c] * np.exp(effect[p])
            X.append(rng.negative_binomial(5, 5 / (5 + mu), size=(n_cells, n_genes)))
            obs += [(p, c)] * n_cells
    obs = pd.DataFrame(obs, columns=["perturbation", "cell_type"], index=[f"cell{i}" for i in range(len(obs))])
    return ad.AnnData(np.concatenate(X).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


def log1p_normalise(adata):
    out = adata.copy()
    out.X = np.log1p(out.X / out.X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def split():
    screen = synthetic_screen()
    key = list(zip(screen.obs["perturbation"], screen.obs["cell_type"]))
    held = np.array([k in HELD_OUT for k in key])
    held_ctrl = ((screen.obs["perturbation"] == "control") & screen.obs["cell_type"].isin(["T", "M"])).to_numpy()
    real = screen[held | held_ctrl].copy()
    train = screen[~held].copy()
    truth = log1p_normalise(real[real.obs["perturbation"] != "control"])
    truth.obs = truth.obs.rename(columns={"cell_type": "context"})  # as `perturbdiff predict` writes it
    # A "prediction" that is each condition's control cells, labelled as the condition.
    blocks = []
    for p, c in HELD_OUT:
        ctrl = log1p_normalise(real[(real.obs["perturbation"] == "control") & (real.obs["cell_type"] == c)])
        ctrl.obs = pd.DataFrame({"perturbation": p, "context": c}, index=[f"{p}{c}{i}" for i in range(ctrl.n_obs)])
        blocks.append(ctrl)
    as_control = ad.concat(blocks)
    return real, train, truth, as_control


def run(pred, real, train, **kw):
    kw = {"context_key": "cell_type", "plots": False, "num_threads": 1, **kw}
    return evaluate(pred, real, train, **kw)


def test_truth_is_perfect_and_control_is_worse(split, tmp_path):
    real, train, truth, as_control = split
    good = run(truth, real, train, outdir=tmp_path, plots=True)
    agg = good.aggregate.set_index("method")
    assert list(agg.index) == ["PerturbDiff", *BASELINES[:5]] and (agg["num_conditions"] == 3).all()
    model = agg.loc["PerturbDiff"]
    assert model["pearson_delta"] == pytest.approx(1.0)
    assert model["r2_delta"] == pytest.approx(1.0) and model["mse"] == pytest.approx(0.0, abs=1e-10)
    assert model["energy_distance"] == pytest.approx(0.0, abs=1e-4)
    assert model["discrimination_score_l1"] == 1.0 and model["overlap_at_N"] == 1.0
    # the truth looks sequenced: its own zeros, totals of the normalised space, no value beyond the real ones
    assert model["zero_fraction_gap"] == 0 and model["above_real_max"] == 0
    assert model["total_ratio"] == pytest.approx(1.0, rel=1e-3)
    # Baselines: the additive shift (effects are shared across contexts) beats the control.
    assert agg.loc["additive_shift", "pearson_delta"] > 0.5
    assert agg.loc["additive_shift", "energy_distance"] < agg.loc["control_mean", "energy_distance"]
    assert np.isnan(agg.loc["control_mean", "pearson_delta"])  # a zero predicted shift has no correlation

    bad = run(as_control, real, train, baselines=[]).aggregate.set_index("method").loc["PerturbDiff"]
    assert bad["energy_distance"] > model["energy_distance"] + 0.1
    assert bad["mse"] > model["mse"] and bad["overlap_at_N"] < model["overlap_at_N"]
    assert not bad["pearson_delta"] >= model["pearson_delta"] - 0.5  # NaN or far below
    # The control-as-prediction equals the control_mean baseline.
    assert bad["energy_distance"] == pytest.approx(agg.loc["control_mean", "energy_distance"], rel=1e-6)

    # cells no sequencer produces: tiny values where real cells have zeros, one gene far above its maximum
    fake = truth.copy()
    X = np.asarray(fake.X, dtype=np.float32)
    X[X == 0] = 1e-3
    X[0, 0] = X[:, 0].max() + 3
    fake.X = X
    unreal = run(fake, real, train, baselines=[]).aggregate.set_index("method").loc["PerturbDiff"]
    assert unreal["zero_fraction_gap"] == pytest.approx(float((np.asarray(truth.X) == 0).mean())) and unreal["above_real_max"] > 0 and unreal["total_ratio"] > 1.0

    # Files: CSVs, markdown summary, PNG plots.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["mean_shift.png", "metrics.png", "metrics_aggregate.csv", "metrics_per_condition.csv",
                     "pca.png", "summary.md"]
    per_condition = pd.read_csv(tmp_path / "metrics_per_condition.csv")
    assert len(per_condition) == 3 * (1 + len(BASELINES[:5]))  # no combinations, no features: the five
    assert {"method", "perturbation", "context", "pearson_delta", "energy_distance", "fallback"} <= set(per_condition.columns)
    summary = (tmp_path / "summary.md").read_text()
    assert "| pearson_delta ↑ | **1** |" in summary and "additive_shift" in summary
    for png in ("mean_shift.png", "pca.png", "metrics.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_populations_and_counts_input(split, tmp_path):
    real, train, truth, _ = split
    # Two predicted populations: population 0 is the truth, population 1 the truth shifted.
    shifted = truth.copy()
    shifted.X = shifted.X + 0.5
    shifted.obs_names = [f"s{i}" for i in range(shifted.n_obs)]
    pred = ad.concat([truth, shifted])
    pred.obs["population"] = [0] * truth.n_obs + [1] * truth.n_obs
    result = run(pred, real, None, baselines=None, profile="minimal")  # real is raw counts: normalised here
    row = result.aggregate.set_index("method").loc["PerturbDiff"]
    assert row["pearson_delta"] == pytest.approx(1.0)  # population 0 is scored by cell-eval
    per = result.per_condition
    assert (per["num_populations"] == 2).all() and (per["energy_distance_sd"] > 0).all()
    pooled = run(pred, real, None, baselines=None, profile="minimal", population="all")
    assert (pooled.per_condition["num_pred_cells"] == 2 * per["num_pred_cells"]).all()
    # several populations: a plot of how far their means differ (here 0.5 on every gene)
    plotted = run(pred, real, None, baselines=None, profile="minimal", outdir=tmp_path, plots=True)
    assert plotted.files["population_spread_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_controls_from_train_and_fallback(split):
    real, train, truth, _ = split
    real_no_ctrl = real[real.obs["perturbation"] != "control"].copy()
    train_no_a = train[train.obs["perturbation"] != "A"].copy()  # A is then seen in no context
    with pytest.warns(UserWarning, match=r"baseline additive_shift: no training data to form it for \[\('A', 'T'\)\]"):
        result = run(truth, real_no_ctrl, train_no_a, baselines=["control_mean", "additive_shift"], profile="minimal")
    per = result.per_condition
    assert (per["control_source"] == "train").all()
    fell_back = per[per["fallback"]]
    assert fell_back[["method", "perturbation", "context"]].values.tolist() == [["additive_shift", "A", "T"]]


def test_errors(split):
    real, train, truth, _ = split
    with pytest.raises(ValueError, match=r"need the training data"):
        run(truth, real, None, baselines=["additive_shift"])
    with pytest.raises(ValueError, match=r"unknown baseline"):
        run(truth, real, train, baselines=["mean"])
    other = truth.copy()
    other.obs["perturbation"] = "Z"
    with pytest.raises(ValueError, match=r"no condition \(perturbation, context\) is in both"):
        run(other, real, train)
    with pytest.raises(ValueError, match=r"real: 5 of the prediction's 30 genes are missing"):
        run(truth, real[:, 5:].copy(), train)
    with pytest.raises(ValueError, match=r"no control cells \('control'\) for context 'M'"):
        run(truth, real[real.obs["perturbation"] != "control"].copy(), None, baselines=None)
    with pytest.raises(ValueError, match=r"population 3 not in the prediction"):
        run(truth, real, train, population=3)


def test_cli_evaluate(split, tmp_path, capsys):
    real, train, truth, _ = split
    for name, adata in (("pred", truth), ("real", real), ("train", train)):
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad"),
                 "--train", str(tmp_path / "train.h5ad"), "--out", str(out), "--context-key", "cell_type",
                 "--baselines", "control_mean", "additive_shift", "--profile", "vcc", "--num-threads", "1", "--no-plots"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| metric | PerturbDiff | control_mean | additive_shift |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["metrics_aggregate.csv", "metrics_per_condition.csv", "summary.md"]
    missing = ["evaluate", "--pred", str(tmp_path / "nope.h5ad"), "--real", str(tmp_path / "real.h5ad"), "--out", str(out)]
    assert main(missing) == 2


def test_split_for_evaluation_matches_the_training_split():
    from perturbdiff.data import SplitSpec
    from perturbdiff.data.splits import split_for_evaluation

    screen = synthetic_screen(n_genes=8, n_cells=5)
    spec = SplitSpec.held_out(["T", "M"], ["A", "B"])
    parts = split_for_evaluation(screen, spec, context_key="cell_type")
    pairs = lambda a: set(zip(a.obs["perturbation"], a.obs["cell_type"]))  # noqa: E731
    held = {("A", "T"), ("B", "T"), ("A", "M"), ("B", "M")}
    assert pairs(parts["real"]) == held | {("control", "T"), ("control", "M")}
    assert pairs(parts["control"]) == {("control", "T"), ("control", "M")}
    assert not pairs(parts["train"]) & held
    assert pairs(parts["train"]) | held == pairs(screen)  # controls stay in train: they are the control pool
    assert parts["real"].n_obs == 6 * 5 and parts["train"].n_obs == screen.n_obs - 4 * 5
    # a split file's dict with a dataset prefix, and the errors
    by_dict = split_for_evaluation(screen, {"fewshot": {"scr.B": {"test": ["C"]}}}, context_key="cell_type",
                                   dataset="scr")
    assert pairs(by_dict["real"]) == {("C", "B"), ("control", "B")}
    with pytest.raises(ValueError, match="no perturbed cell"):
        split_for_evaluation(screen, {"fewshot": {"other.B": {"test": ["C"]}}}, context_key="cell_type", dataset="scr")
    with pytest.raises(ValueError, match="no column 'context'"):
        split_for_evaluation(screen, spec)


def test_one_condition_has_no_discrimination_score_and_the_summary_says_why(split, tmp_path):
    real, train, truth, _ = split
    p, c = HELD_OUT[0]
    one = truth[(truth.obs["perturbation"] == p).to_numpy() & (truth.obs["context"] == c).to_numpy()].copy()
    result = run(one, real, train, outdir=tmp_path, plots=True, baselines=["control_mean"])
    agg = result.aggregate.set_index("method")
    assert agg["num_conditions"].tolist() == [1, 1]
    assert np.isnan(agg.loc["PerturbDiff", "discrimination_score_l1"])  # not a trivial 1
    assert "one condition only: the discrimination score (a rank among conditions) is not defined" in result.summary
    assert result.summary.count("discrimination") == 2  # the table row and one note, not two notes
    assert (tmp_path / "metrics.png").stat().st_size > 0



def test_baselines_for_perturbations_never_trained_on():
    # training cells in one context: control, A, B, C; each perturbation shifts one gene
    from perturbdiff.baselines import baseline_cells, train_stats

    G = 4
    ctrl = np.ones((5, G))
    shifted = {"A": [1, 0, 0, 0], "B": [0, 2, 0, 0], "C": [0, 0, 3, 0]}
    X = np.concatenate([ctrl] + [ctrl + np.array(v, float) for v in shifted.values()])
    pert = np.repeat(["control", "A", "B", "C"], 5)
    train = train_stats(X, pert, np.repeat("K562", len(X)))
    controls = {"K562": ctrl.astype(np.float32)}
    conds = [("A+B", "K562"), ("A+D", "K562"), ("D", "K562")]
    cells, fallback = baseline_cells("additive_combination", conds, controls, train, "control")
    np.testing.assert_allclose(cells[("A+B", "K562")].mean(0), [2, 3, 1, 1])  # the parts' effects added
    assert fallback == {("A+B", "K562"): False, ("A+D", "K562"): True, ("D", "K562"): True}  # D never trained
    features = {"A": np.array([1.0, 0]), "B": np.array([0, 1.0]), "C": np.array([-1.0, 0]), "D": np.array([0.2, 0.9])}
    cells, fallback = baseline_cells("nearest_neighbour", [("D", "K562")], controls, train, "control", features)
    np.testing.assert_allclose(cells[("D", "K562")].mean(0), [1, 3, 1, 1])  # D's closest is B (cosine)
    with pytest.raises(ValueError, match="needs perturbation features"):
        baseline_cells("nearest_neighbour", [("D", "K562")], controls, train, "control")
