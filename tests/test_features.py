"""Perturbation feature tables: GO (an org.Hs.eg-style SQLite and a GAF + OBO the tests write),
co-expression, a model's gene rows, Morgan fingerprints; the combination rule, missing names,
the command line and the table format."""

import sqlite3
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from perturbdiff import features as F
from perturbdiff.data.synthetic import make_synthetic_adata

# two families of genes: A1..A4 share "kinase" terms, B1..B4 share "transcription" terms; C1 both
FAMILIES = {"A": ["GO:1", "GO:11", "GO:111"], "B": ["GO:2", "GO:21", "GO:211"]}


def _annotations():
    genes = {f"{f}{i}": set(terms[: 1 + i % 3]) | {terms[0]} for f, terms in FAMILIES.items() for i in range(1, 5)}
    genes["C1"] = {"GO:1", "GO:2"}
    for k in range(30):  # background genes so that no family term is a root-like term
        genes[f"Z{k}"] = {f"GO:9{k % 6}"}
    return genes


@pytest.fixture(scope="module")
def org_sqlite(tmp_path_factory):
    """A tiny database with the tables of Bioconductor's org.Hs.eg.sqlite that the builder reads."""
    path = tmp_path_factory.mktemp("go") / "org.Hs.eg.sqlite"
    con = sqlite3.connect(path)
    con.execute("create table gene_info (_id integer, gene_name text, symbol text)")
    con.execute("create table alias (_id integer, alias_symbol text)")
    for aspect in ("bp", "mf", "cc"):
        con.execute(f"create table go_{aspect}_all (_id integer, go_id text, evidence text)")
    for i, (gene, terms) in enumerate(sorted(_annotations().items()), 1):
        con.execute("insert into gene_info values (?, ?, ?)", (i, gene.lower(), gene))
        for t in sorted(terms):
            con.execute("insert into go_bp_all values (?, ?, 'IEA')", (i, t))
        if gene == "A1":
            con.execute("insert into alias values (?, 'OLDA1')", (i,))
    con.commit()
    con.close()
    return path


def test_go_features_place_genes_that_share_terms_together(org_sqlite):
    table = F.go_features(org_sqlite, dim=10, min_genes=2, max_share=0.5)
    assert table.shape[1] == 10 and list(table.columns) == [f"f{i}" for i in range(10)]
    X = table.loc[["A1", "A2", "B1", "B2"]].to_numpy()
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    sim = X @ X.T
    assert sim[0, 1] > 0.8 and sim[2, 3] > 0.8 and abs(sim[0, 2]) < 0.3  # same family close, other far
    np.testing.assert_array_equal(table.loc["OLDA1"], table.loc["A1"])  # an alias finds its gene
    again = F.go_features(org_sqlite, dim=10, min_genes=2, max_share=0.5)
    pd.testing.assert_frame_equal(table, again)  # deterministic (signs fixed)


def test_gaf_annotations_are_propagated_up_the_ontology(tmp_path):
    obo = tmp_path / "go.obo"
    obo.write_text("format-version: 1.2\n\n[Term]\nid: GO:1\nname: root\n\n[Term]\nid: GO:11\nis_a: GO:1 ! root\n\n"
                   "[Term]\nid: GO:111\nrelationship: part_of GO:11 ! mid\n\n[Typedef]\nid: part_of\n")
    gaf = tmp_path / "goa.gaf"
    rows = ["!gaf-version: 2.2",
            "UniProtKB\tP1\tA1\t\tGO:111\tPMID:1\tIDA\t\tP\tgene a1\tOLDA1\tprotein\ttaxon:9606\t20200101\tGO",
            "UniProtKB\tP2\tB1\tNOT\tGO:11\tPMID:1\tIDA\t\tP\tgene b1\t\tprotein\ttaxon:9606\t20200101\tGO",
            "UniProtKB\tP2\tB1\t\tGO:2\tPMID:1\tIDA\t\tF\tgene b1\t\tprotein\ttaxon:9606\t20200101\tGO"]
    gaf.write_text("\n".join(rows) + "\n")
    genes, aliases = F.go_annotations(gaf, ontology=obo)
    assert genes["A1"] == {"GO:111", "GO:11", "GO:1"} and aliases == {"OLDA1": "A1"}
    assert genes["B1"] == {"GO:2"}  # the NOT annotation is skipped; GO:2 is molecular function
    assert F.go_annotations(gaf, aspects=["bp"])[0] == {"A1": {"GO:111"}}  # no ontology: direct only
    bad = tmp_path / "bad.gaf"
    bad.write_text("UniProtKB\tP1\tA1\n")
    with pytest.raises(ValueError, match="bad.gaf line 1: not a GAF annotation line"):
        F.go_annotations(bad)
    with pytest.raises(ValueError, match="unknown GO aspect"):
        F.go_annotations(gaf, aspects=["xx"])


def test_combinations_sum_their_parts_and_missing_names_are_listed():
    table = pd.DataFrame([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]], index=["A", "B", "A+C"], columns=["f0", "f1"])
    out = F.compose(["A+B", "A", "A+C"], table)
    np.testing.assert_array_equal(out.loc["A+B"], [1.0, 2.0])
    np.testing.assert_array_equal(out.loc["A+C"], [5.0, 5.0])  # a combination with its own row keeps it
    with pytest.raises(ValueError, match=r"2 perturbation\(s\) have no features in the feature table: D, B\+E \(no E\)"):
        F.compose(["A", "D", "B+E"], table)


def test_tables_round_trip_atomically_and_bad_tables_are_named(tmp_path):
    table = pd.DataFrame(np.arange(6, dtype=np.float32).reshape(3, 2), index=["A", "B", "C"], columns=["f0", "f1"])
    for suffix in (".csv", ".tsv", ".parquet"):
        path = F.write_table(table, tmp_path / f"t{suffix}")
        back = F.read_table(path)
        pd.testing.assert_frame_equal(back, table, check_names=False)
        assert back.index.tolist() == ["A", "B", "C"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.parquet", "t.tsv"]  # no temporaries left
    (tmp_path / "dup.csv").write_text("perturbation,f0\nA,1\nA,2\n")
    with pytest.raises(ValueError, match=r"dup.csv: perturbations listed twice: \['A'\]"):
        F.read_table(tmp_path / "dup.csv")
    (tmp_path / "text.csv").write_text("perturbation,f0\nA,x\n")
    with pytest.raises(ValueError, match=r"text.csv: feature columns must be numbers; not numeric: \['f0'\]"):
        F.read_table(tmp_path / "text.csv")
    (tmp_path / "nan.csv").write_text("perturbation,f0\nA,nan\n")
    with pytest.raises(ValueError, match=r"nan.csv: non-finite features for \['A'\]"):
        F.read_table(tmp_path / "nan.csv")


def test_coexpression_model_and_morgan_features(tmp_path, tiny_model):
    adata = make_synthetic_adata(num_cells=400, num_genes=40, num_contexts=2, num_perturbations=2, seed=1)
    adata.write_h5ad(tmp_path / "screen.h5ad")
    co = F.coexpression_features(tmp_path / "screen.h5ad", dim=5, control_label="control")
    assert co.shape == (40, 5) and co.index.tolist() == list(adata.var_names) and np.isfinite(co.to_numpy()).all()
    with pytest.raises(ValueError, match="control label"):
        F.coexpression_features(tmp_path / "screen.h5ad", dim=5)
    tiny_model.save_pretrained(tmp_path / "model")
    mod = F.model_gene_features(tmp_path / "model", dim=3)
    assert mod.shape == (tiny_model.config.num_genes, 3) and mod.index.tolist() == tiny_model.config.gene_names
    fp = F.morgan_features({"aspirin": "CC(=O)Oc1ccccc1C(=O)O", "ethanol": "CCO"}, bits=256)
    assert fp.shape == (2, 256) and set(np.unique(fp.to_numpy())) <= {0.0, 1.0} and fp.loc["aspirin"].sum() > fp.loc["ethanol"].sum()
    with pytest.raises(ValueError, match=r"1 SMILES could not be parsed: bad \('C\(\('\)"):
        F.morgan_features({"bad": "C(("})


def test_features_command_writes_a_table_for_a_screen(tmp_path, org_sqlite):
    screen = make_synthetic_adata(num_cells=200, num_genes=20, num_contexts=1, num_perturbations=2, seed=0)
    screen.obs["perturbation"] = screen.obs["perturbation"].astype(str).replace({"PERT0": "A1", "PERT1": "B1+A2"})
    screen.write_h5ad(tmp_path / "screen.h5ad")
    out = tmp_path / "go.csv"
    cmd = [sys.executable, "-m", "perturbdiff.cli", "features", "go", "--annotations", str(org_sqlite), "--dim", "3",
           "--names-from", str(tmp_path / "screen.h5ad"), "--control-label", "control", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote features of 2 perturbation(s) x 3" in proc.stdout
    table = F.read_table(out)
    assert table.index.tolist() == ["A1", "B1+A2"]
    full = F.go_features(org_sqlite, dim=3)
    np.testing.assert_allclose(table.loc["B1+A2"], full.loc["B1"] + full.loc["A2"], rtol=1e-5, atol=1e-6)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr  # an earlier table is kept
    missing = cmd[:-2] + ["--names", "NOPE", "-o", str(tmp_path / "other.csv")]
    proc = subprocess.run(missing, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "have no features" in proc.stderr and "NOPE" in proc.stderr
    assert not (tmp_path / "other.csv").exists()
