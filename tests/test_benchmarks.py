import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kang_decompose import context_means, decompose  # noqa: E402


def _screen(rng, genes=40, cells=60):
    profiles = {c: rng.uniform(0, 3, genes) for c in ("T", "DC", "NK")}
    responses = {c: rng.normal(0, 1, genes) for c in profiles}
    blocks, obs = [], []
    for c, prof in profiles.items():
        for p, shift in (("ctrl", 0.0), ("stim", responses[c])):
            blocks.append(np.clip(prof + shift + rng.normal(0, 0.1, (cells, genes)), 0, 10))
            obs += [(p, c)] * cells
    obs = pd.DataFrame(obs, columns=["condition", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    expressed = np.expm1(np.concatenate(blocks))  # log1p-normalised as a screen ships it: totals 1e4
    X = np.log1p(expressed / expressed.sum(1, keepdims=True) * 1e4)
    screen = ad.AnnData(X.astype(np.float32), obs=obs)
    screen.var_names = [f"g{i}" for i in range(genes)]
    return screen


def _pred(screen, source):
    cells = screen[(screen.obs.cell_type == source) & (screen.obs.condition == "stim")]
    pred = ad.AnnData(cells.X.copy(), obs=pd.DataFrame({"context": "NK"}, index=[f"p{i}" for i in range(cells.n_obs)]))
    pred.var_names = screen.var_names
    return pred


@pytest.mark.parametrize("source, real, on_t", [("NK", 1.0, 0.0), ("T", 0.0, 1.0)])
def test_decompose_attributes_a_prediction_to_the_profile_it_copies(source, real, on_t):
    """Predicting NK's real stimulated cells puts all weight on the real shift; predicting T's
    stimulated cells for NK (identity lost) puts it on T."""
    screen = _screen(np.random.default_rng(0))
    pred = _pred(screen, source)
    means = context_means(screen, pred.var_names.to_numpy(), perturbation_key="condition", context_key="cell_type",
                          control_label="ctrl")
    out = decompose(pred, means, ["NK"], top=3)["NK"]
    assert out["coef_real_shift"] == pytest.approx(real, abs=0.05)
    assert out["coef_stimulated_training_type"]["T"] == pytest.approx(on_t, abs=0.05)
    assert abs(out["coef_stimulated_training_type"]["DC"]) < 0.05
    assert (out["pearson_delta"] > 0.99) == (source == "NK")
    assert len(out["largest_errors"]) == 3


def test_suite_smoke_run_scores_a_fold_resumes_and_refuses_other_settings(tmp_path, capsys):
    """One fold of the benchmark suite end to end (the built-in synthetic screen, a debug budget):
    the scoreboard has the model, every baseline and the split-half ceiling, beats-baseline flags
    that follow from its numbers, and a rerun reuses the finished run instead of training again."""
    import json

    import suite

    argv = ["--datasets", "synthetic", "--seeds", "0", "--steps", "4", "--preset", "debug",
            "--sample-steps", "2", "--output-dir", str(tmp_path)]
    board = suite.main(argv)
    entry = board["datasets"]["synthetic"]
    assert set(entry["methods"]) == {"perturbdiff", *suite.BASELINES[:5], suite.CEILING}  # no combinations, no features
    assert entry["runs"] == 1 and entry["folds"] == [0] and entry["seeds"] == [0]
    for baseline, flags in entry["beats"].items():
        for metric, better in suite.METRICS.items():
            mine, theirs = entry["methods"]["perturbdiff"][metric], entry["methods"][baseline][metric]
            if mine is None or theirs is None:
                assert flags[metric] is None
            else:
                assert flags[metric] == (mine["mean"] > theirs["mean"] if better == "max" else mine["mean"] < theirs["mean"])
    # the ceiling is the real cells against themselves: far closer than the untrained model
    assert entry["methods"][suite.CEILING]["energy_distance"]["mean"] < entry["methods"]["perturbdiff"]["energy_distance"]["mean"]
    assert json.loads((tmp_path / "scoreboard.json").read_text())["datasets"]["synthetic"]["beats"] == entry["beats"]
    out = capsys.readouterr().out
    assert "## synthetic" in out and "beats every baseline on pearson_delta and energy_distance" in out
    suite.main(argv)
    assert "done earlier" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="was run with other settings"):
        suite.main(argv[:-2] + ["--steps", "5", "--output-dir", str(tmp_path)])


def test_suite_runs_a_genetic_screen_once_per_feature_source(tmp_path, monkeypatch):
    """A dataset of genetic perturbations is scored per feature source: with GO features (from an
    annotation SQLite the test writes) the model trains on the table and the nearest-neighbour
    baseline joins; without, it is the floor."""
    import dataclasses
    import sqlite3

    import suite

    db = tmp_path / "org.Hs.eg.sqlite"
    con = sqlite3.connect(db)
    con.execute("create table gene_info (_id integer, gene_name text, symbol text)")
    for aspect in ("bp", "mf", "cc"):
        con.execute(f"create table go_{aspect}_all (_id integer, go_id text, evidence text)")
    genes = [f"PERT{i}" for i in range(4)] + [f"Z{k}" for k in range(60)]
    for i, gene in enumerate(genes):
        con.execute("insert into gene_info values (?, ?, ?)", (i + 1, gene, gene))
        for term in ([f"GO:9{i}", f"GO:9{i + 4}"] if gene.startswith("PERT") else [f"GO:9{i % 8}"]):
            con.execute("insert into go_bp_all values (?, ?, 'IEA')", (i, term))
    con.commit()
    con.close()
    monkeypatch.setattr(suite, "GO_ANNOTATIONS", db)
    base = suite.datasets()
    monkeypatch.setattr(suite, "datasets", lambda: {**base, "synthetic": dataclasses.replace(base["synthetic"], features=True)})
    board = suite.main(["--datasets", "synthetic", "--seeds", "0", "--steps", "3", "--preset", "debug",
                        "--sample-steps", "2", "--output-dir", str(tmp_path / "out")])["datasets"]
    assert set(board) == {"synthetic[go]", "synthetic[none]"}
    assert "nearest_neighbour" in board["synthetic[go]"]["methods"]
    assert "nearest_neighbour" not in board["synthetic[none]"]["methods"]
    command = (tmp_path / "out" / "synthetic[go]" / "fold0" / "seed0" / "train_command.json").read_text()
    assert "--perturbation-features" in command and "features_go.csv" in command
    assert "--perturbation-features" not in (tmp_path / "out" / "synthetic[none]" / "fold0" / "seed0" / "train_command.json").read_text()


def test_population_calibration_on_synthetic_replicates(tmp_path):
    """benchmarks/populations.py --dataset synthetic end to end, the fast version (a debug model,
    100 steps, 16 populations): the real between-replicate variance is there with the hidden effect
    on and nearly gone with it off (the generator's switch); the K predicted populations vary as
    much as the real replicates (ratio within 0.5-2) with it on, and collapse with it off."""
    import json
    import math

    import populations

    doc = populations.main(["--dataset", "synthetic", "--steps", "100", "--num-populations", "16", "--sample-steps", "5",
                            "--override", "model.preset=debug", "--output-dir", str(tmp_path)])
    on, off = doc["response_spread=0.5"], doc["response_spread=0"]
    assert on["real_between"] > 5 * off["real_between"] > 0
    assert 0.5 <= on["ratio"] <= 2.0  # measured 0.70
    assert off["pred_between"] < 0.3 * on["real_between"]  # measured 0.05
    for part in (on, off):
        assert len(part["conditions"]) == 6 and all(c["batches"] == 6 for c in part["conditions"])
        assert all(math.isfinite(c["pred_between"]) for c in part["conditions"]) and math.isfinite(part["ratio"])
    saved = json.loads((tmp_path / "populations_synthetic.json").read_text())
    assert saved["response_spread=0.5"]["ratio"] == on["ratio"]
    # the trained model carries the replicates' deviations its K populations draw (2 cell types x 3 perturbations x 6 batches)
    from perturbdiff.baselines import load_stats

    pops = load_stats(tmp_path / "synthetic" / "spread0.5" / "seed0" / "model_run" / "model")["populations"]
    assert pops["offsets"].shape[0] == 36 and pops["hidden"] == ["batch"]


def test_atlas_reads_smoke_run_reads_the_same_values_with_every_reader(tmp_path, capsys):
    import atlas_reads

    doc = atlas_reads.main(["--cells", "3000", "--genes", "50", "--set-size", "64", "--sets", "5", "--batches", "1",
                            "--workdir", str(tmp_path)])
    for place in ("local", "s3"):
        # own and zarr (and zarrs, where installed) read byte-identical windows
        assert doc[place]["same_values_read"] is True
        assert doc[place]["own"]["nnz"] > 0 and doc[place]["own"]["sha256"] == doc[place]["zarr"]["sha256"]
    assert 0 < doc["s3"]["own"]["requests_per_set"] <= 4  # indptr, indices, data (+ a window across shards)
