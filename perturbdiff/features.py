"""Perturbation feature tables: what a model knows of a perturbation besides its name.

A *feature table* has one row per perturbation name and one float column per feature (``f0`` ...
``f{F-1}``); on disk it is a CSV (or ``.tsv`` / ``.parquet``) whose first column, ``perturbation``,
holds the names. Training takes one with ``data.perturbation_features`` and `perturbdiff predict`
with ``--perturbation-features``; a perturbation the model never saw is predicted from its row.

Sources (each a function here and a ``perturbdiff features`` command):

- ``go``: genetic perturbations from Gene Ontology. A gene's vector is its GO-term membership,
  propagated up the ontology (a gene in a term is in every ancestor term), weighted by inverse
  term frequency, rows scaled to unit length and reduced by a truncated SVD over every annotated
  gene (so a target the screen never perturbed shares the space). Annotations come from the human
  annotation SQLite of Bioconductor's ``org.Hs.eg.db`` (Debian ships it:
  ``apt-get download r-bioc-org.hs.eg.db``, ``dpkg-deb -x``; its ``go_*_all`` tables are already
  propagated) or from a standard GAF file with an OBO ontology to propagate over.
- ``coexpression``: a gene's loadings on the top principal components of control cells (an atlas
  or ``.h5ad``), for any gene the data measured.
- ``model``: a gene's row of a trained PerturbDiff model's output projection, reduced by SVD.
- ``morgan``: drugs, Morgan fingerprints of their SMILES (needs RDKit: ``pip install rdkit``).

Combinations: a name ``A+B`` that has no row of its own gets the sum of its parts' rows
(`compose`), so a double perturbation's features say which singles it combines.
"""

from __future__ import annotations

import gzip
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["COMBINATION_SEP", "parts", "as_table", "check_table", "read_table", "write_table", "compose", "go_annotations", "go_features",
           "coexpression_features", "model_gene_features", "morgan_features"]

COMBINATION_SEP = "+"
_ASPECTS = {"bp": "P", "mf": "F", "cc": "C"}


# --------------------------------------------------------------------------- table format
def read_table(path) -> pd.DataFrame:
    """A feature table from CSV / TSV / parquet: index = perturbation names, float columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"perturbation feature table {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = pd.read_parquet(path)
        df = df.set_index("perturbation" if "perturbation" in df.columns else df.columns[0])
    else:
        df = pd.read_csv(path, sep="\t" if suffix in (".tsv", ".tab") else ",", index_col=0)
    df.index = df.index.astype(str)
    return check_table(df, str(path))


def check_table(df: pd.DataFrame, where: str = "the feature table") -> pd.DataFrame:
    """Float features, unique names, finite values; errors name the table and the problem."""
    if df.shape[1] == 0:
        raise ValueError(f"{where}: no feature columns (expected a name column, then one column per feature)")
    if df.index.has_duplicates:
        raise ValueError(f"{where}: perturbations listed twice: {sorted(set(df.index[df.index.duplicated()]))[:10]}")
    try:
        values = df.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as err:
        bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        raise ValueError(f"{where}: feature columns must be numbers; not numeric: {bad[:10]}") from err
    if not np.isfinite(values).all():
        rows = df.index[~np.isfinite(values).all(1)]
        raise ValueError(f"{where}: non-finite features for {list(rows[:10])}")
    return pd.DataFrame(values, index=df.index.astype(str), columns=[str(c) for c in df.columns])


def as_table(features, dim: int | None = None, what: str = "the perturbation features") -> pd.DataFrame:
    """A checked feature table (`check_table`) from a DataFrame indexed by name or a mapping name ->
    vector; with ``dim``, every row must have that many values (the model's width)."""
    if not isinstance(features, pd.DataFrame):
        items = {str(k): np.asarray(v, dtype=np.float32).ravel() for k, v in features.items()}
        width = dim if dim is not None else next((v.size for v in items.values()), 0)
        for name, v in items.items():
            if v.size != width:
                raise ValueError(f"perturbation features for {name!r} have {v.size} values, "
                                 + (f"the model takes {dim}" if dim is not None else f"other rows {width}"))
        features = pd.DataFrame(np.stack(list(items.values())) if items else np.zeros((0, width)), index=list(items))
    table = check_table(features, what)
    if dim is not None and table.shape[1] != dim:
        raise ValueError(f"{what} have {table.shape[1]} values per perturbation, the model takes {dim}")
    return table


def write_table(df: pd.DataFrame, path) -> Path:
    """Write a feature table atomically (a temporary file, then rename); the format follows the suffix."""
    path = Path(path)
    check_table(df, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    out = df.copy()
    out.index.name = "perturbation"
    try:
        if path.suffix.lower() == ".parquet":
            out.reset_index().to_parquet(tmp, index=False)
        else:
            out.to_csv(tmp, sep="\t" if path.suffix.lower() in (".tsv", ".tab") else ",", float_format="%.6g")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def parts(name: str, sep: str = COMBINATION_SEP) -> list[str]:
    """The single perturbations of a combination ``A+B`` (``[name]`` for a single one)."""
    return [p.strip() for p in str(name).split(sep)] if sep in str(name) else [str(name)]


def compose(names: Iterable[str], table: pd.DataFrame, *, sep: str = COMBINATION_SEP,
            what: str = "the feature table") -> pd.DataFrame:
    """Rows for ``names``: a name's own row, or for ``A+B`` without one, the sum of its parts' rows.

    A name (or a part of a combination) without a row is an error that lists every such name.
    """
    names = list(dict.fromkeys(str(n) for n in names))
    rows, missing = [], []
    for name in names:
        if name in table.index:
            rows.append(table.loc[name].to_numpy(np.float32))
            continue
        singles = parts(name, sep)
        absent = [p for p in singles if p not in table.index]
        if absent:
            missing.append(name if len(singles) == 1 else f"{name} (no {', '.join(absent)})")
            continue
        rows.append(table.loc[singles].to_numpy(np.float32).sum(0))
    if missing:
        raise ValueError(f"{len(missing)} perturbation(s) have no features in {what}: {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
    return pd.DataFrame(np.stack(rows) if rows else np.zeros((0, table.shape[1]), np.float32),
                        index=pd.Index(names, name="perturbation"), columns=table.columns)


# --------------------------------------------------------------------------- Gene Ontology
def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _obo_parents(path: Path) -> dict[str, set[str]]:
    """GO term -> its parents (``is_a`` and ``part_of``) from an OBO file."""
    parents, term, in_term = {}, None, False
    with _open_text(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                in_term, term = line == "[Term]", None
            elif in_term and line.startswith("id:"):
                term = line[3:].strip()
                parents.setdefault(term, set())
            elif in_term and term and line.startswith("is_a:"):
                parents[term].add(line[5:].split("!")[0].strip())
            elif in_term and term and line.startswith("relationship: part_of"):
                parents[term].add(line.split()[2])
    return parents


def _ancestors(term: str, parents: Mapping[str, set[str]], memo: dict) -> frozenset:
    if term in memo:
        return memo[term]
    memo[term] = frozenset()  # a cycle (malformed ontology) stops here
    out = {term}
    for p in parents.get(term, ()):
        out |= _ancestors(p, parents, memo)
    memo[term] = frozenset(out)
    return memo[term]


def go_annotations(source, *, ontology=None,
                   aspects: Sequence[str] = ("bp", "mf", "cc")) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Gene symbol -> its GO terms, propagated to every ancestor term; and alias -> symbol.

    Args:
        source: ``org.Hs.eg.sqlite`` (Bioconductor's annotation database: its propagated
            ``go_*_all`` tables are read) or a GAF file (``.gaf`` / ``.gaf.gz``; ``NOT``
            annotations are skipped).
        ontology: for a GAF, the OBO file (``go-basic.obo``) to propagate over; without it the
            GAF's direct annotations are used as they are.
        aspects: which ontologies: ``bp`` (biological process), ``mf``, ``cc``.

    Aliases (the SQLite's ``alias`` table, the GAF's synonym column) that name exactly one
    annotated gene and are not a symbol themselves map to it, so an older name in a screen still
    finds its gene.
    """
    source = Path(source)
    unknown = [a for a in aspects if a not in _ASPECTS]
    if unknown:
        raise ValueError(f"unknown GO aspect(s) {unknown}; choose from {sorted(_ASPECTS)}")
    if not source.exists():
        raise FileNotFoundError(f"GO annotation source {source} does not exist")
    with open(source, "rb") as f:
        is_sqlite = f.read(16) == b"SQLite format 3\x00"
    genes: dict[str, set[str]] = {}
    aliases: dict[str, set[str]] = {}
    if is_sqlite:
        con = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            need = {"gene_info", *(f"go_{a}_all" for a in aspects)}
            if not need <= tables:
                raise ValueError(f"{source} is not an org.*.eg.db annotation SQLite (tables {sorted(need - tables)} missing)")
            for a in aspects:
                for sym, term in con.execute(f"select g.symbol, t.go_id from go_{a}_all t join gene_info g on g._id = t._id"):
                    genes.setdefault(sym, set()).add(term)
            if "alias" in tables:
                for sym, alias in con.execute("select g.symbol, a.alias_symbol from alias a join gene_info g on g._id = a._id"):
                    aliases.setdefault(alias, set()).add(sym)
        finally:
            con.close()
    else:
        want = {_ASPECTS[a] for a in aspects}
        with _open_text(source) as f:
            for n, line in enumerate(f, 1):
                if line.startswith("!") or not line.strip():
                    continue
                cols = line.rstrip("\n").split("\t")
                if len(cols) < 9 or not cols[4].startswith("GO:"):
                    raise ValueError(f"{source} line {n}: not a GAF annotation line (need >= 9 tab-separated columns, "
                                     f"column 5 a GO id), got {line[:80]!r}")
                if "NOT" in cols[3].split("|") or cols[8] not in want:
                    continue
                genes.setdefault(cols[2], set()).add(cols[4])
                for alias in (cols[10].split("|") if len(cols) > 10 and cols[10] else []):
                    aliases.setdefault(alias, set()).add(cols[2])
        if ontology is not None:
            parents, memo = _obo_parents(Path(ontology)), {}
            genes = {g: set().union(*(_ancestors(t, parents, memo) for t in terms)) for g, terms in genes.items()}
    if not genes:
        raise ValueError(f"{source}: no GO annotations for aspects {list(aspects)}")
    # an alias that names exactly one annotated gene and is not itself a symbol
    unique = {a: next(iter(s)) for a, s in aliases.items() if a not in genes and len(s) == 1 and next(iter(s)) in genes}
    return genes, unique


def _svd_rows(M: sp.csr_matrix, dim: int, seed: int = 0) -> np.ndarray:
    """Rows of M projected on its top ``dim`` right singular vectors (U S), signs fixed."""
    from scipy.sparse.linalg import svds

    k = min(dim, min(M.shape) - 1)
    if k < 1:
        raise ValueError(f"too little data for {dim} features: matrix of shape {M.shape}")
    u, s, vt = svds(M.astype(np.float64), k=k, random_state=seed)
    order = np.argsort(-s)
    u, s, vt = u[:, order], s[order], vt[order]
    signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(1)])  # deterministic orientation
    out = (u * s) * signs
    if k < dim:  # pad: the table's width is what the user asked for
        out = np.concatenate([out, np.zeros((len(out), dim - k))], axis=1)
    return out.astype(np.float32)


def go_features(source, *, dim: int = 64, ontology=None, aspects: Sequence[str] = ("bp", "mf", "cc"),
                min_genes: int = 5, max_share: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """A feature table over every annotated gene from GO term membership (see the module docstring).

    Terms annotating fewer than ``min_genes`` genes or more than ``max_share`` of them (the
    ontology's roots) are left out; the SVD runs over every annotated gene.
    """
    genes, aliases = go_annotations(source, ontology=ontology, aspects=aspects)
    names = sorted(genes)
    terms = pd.Index(sorted({t for ts in genes.values() for t in ts}))
    rows = np.repeat(np.arange(len(names)), [len(genes[g]) for g in names])
    cols = terms.get_indexer([t for g in names for t in sorted(genes[g])])
    M = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(terms)))
    df = np.asarray(M.sum(0)).ravel()
    keep = (df >= min_genes) & (df <= max_share * len(names))
    if not keep.any():
        raise ValueError(f"{source}: no GO term annotates between {min_genes} genes and {max_share:.0%} of genes")
    M = M[:, keep] @ sp.diags(np.log(len(names) / df[keep]))  # inverse term frequency
    norms = np.sqrt(np.asarray(M.multiply(M).sum(1)).ravel())
    has = norms > 0
    M = sp.diags(1.0 / norms[has]) @ M[has]
    names = [n for n, h in zip(names, has) if h]
    table = pd.DataFrame(_svd_rows(M.tocsr(), dim, seed), index=pd.Index(names, name="perturbation"),
                         columns=[f"f{i}" for i in range(dim)])
    alias = {a: g for a, g in aliases.items() if g in table.index}
    extra = table.loc[list(alias.values())].set_axis(pd.Index(list(alias), name="perturbation"))
    return pd.concat([table, extra])


# --------------------------------------------------------------------------- from data and models
def coexpression_features(source, *, dim: int = 32, control_label: str | None = None,
                          perturbation_key: str = "perturbation", max_cells: int = 20000, seed: int = 0) -> pd.DataFrame:
    """Genes' loadings on the top principal components of control cells (log1p-normalised).

    Args:
        source: an atlas (its control groups are read) or an ``.h5ad`` (cells whose
            ``perturbation_key`` is ``control_label``; every cell when the column is absent).
    """
    from .expression import Normalization, detect_input_space, to_model_space

    source = Path(source)
    rng = np.random.default_rng(seed)
    if source.suffix == ".h5ad":
        import anndata as ad

        adata = ad.read_h5ad(source)
        if perturbation_key in adata.obs:
            if control_label is None:
                raise ValueError(f"{source}: give the control label of obs[{perturbation_key!r}] (--control-label)")
            adata = adata[adata.obs[perturbation_key].astype(str) == str(control_label)]
            if adata.n_obs == 0:
                raise ValueError(f"{source}: no cells with {perturbation_key} == {control_label!r}")
        X = adata.X[np.sort(rng.choice(adata.n_obs, min(max_cells, adata.n_obs), replace=False))]
        space = detect_input_space(X, what=f"{source} X")
        genes = list(adata.var_names.astype(str))
    else:
        from .data import Atlas

        atlas = Atlas(source)
        ctrl = atlas.groups[atlas.groups["is_control"]]
        if ctrl.empty:
            raise ValueError(f"atlas {source} has no control cells")
        # each control group's first rows (the builder shuffles cells within groups), in proportion
        sizes = (ctrl["stop"] - ctrl["start"]).to_numpy()
        take = np.maximum(1, np.floor(sizes * min(1.0, max_cells / sizes.sum()))).astype(int)
        blocks = [atlas.read_rows(int(a), int(a) + int(n)) for a, n in zip(ctrl["start"], take)]
        X = sp.vstack([sp.csr_matrix((d, i, ip), shape=(len(ip) - 1, atlas.num_genes)) for ip, i, d in blocks])
        space = "counts"
        genes = list(map(str, atlas.gene_names))
    values, _ = to_model_space(X, np.arange(X.shape[1]), space, Normalization(target_sum=1e4, log1p=True, scale=1.0))
    values = values - values.mean(0, keepdims=True)
    # a gene's vector: its loadings on the cells' principal axes (the right singular vectors of cells x genes)
    table = _svd_rows(sp.csr_matrix(values.T), dim, seed)
    return pd.DataFrame(table, index=pd.Index(genes, name="perturbation"), columns=[f"f{i}" for i in range(dim)])


def model_gene_features(model_dir, *, dim: int = 32, seed: int = 0) -> pd.DataFrame:
    """Genes' rows of a trained model's output projection (``final_layer.linear.weight`` [G, d]), by SVD."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    weights, config = model_dir / "model.safetensors", model_dir / "config.json"
    if not weights.exists() or not config.exists():
        raise FileNotFoundError(f"{model_dir} is not a PerturbDiff model folder (config.json + model.safetensors)")
    import json

    genes = json.loads(config.read_text()).get("gene_names")
    W = load_file(weights)["final_layer.linear.weight"].float().numpy()  # [G, d]
    if not genes or len(genes) != len(W):
        raise ValueError(f"{model_dir}: config.json's gene_names do not match the output projection ({len(W)} rows)")
    table = _svd_rows(sp.csr_matrix(W - W.mean(0, keepdims=True)), dim, seed)
    return pd.DataFrame(table, index=pd.Index(genes, name="perturbation"), columns=[f"f{i}" for i in range(dim)])


def morgan_features(smiles: Mapping[str, str], *, radius: int = 2, bits: int = 1024) -> pd.DataFrame:
    """Morgan (ECFP-like) fingerprints of drugs from their SMILES, one bit per column (needs RDKit)."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError as err:
        raise ImportError("Morgan fingerprints need RDKit: pip install rdkit") from err
    RDLogger.DisableLog("rdApp.*")
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    rows, bad = [], []
    for name, s in smiles.items():
        mol = Chem.MolFromSmiles(str(s)) if isinstance(s, str) and s.strip() else None
        if mol is None:
            bad.append(f"{name} ({s!r})")
            continue
        rows.append(np.asarray(gen.GetFingerprintAsNumPy(mol), dtype=np.float32))
    if bad:
        raise ValueError(f"{len(bad)} SMILES could not be parsed: {', '.join(bad[:10])}")
    return pd.DataFrame(np.stack(rows), index=pd.Index(list(smiles), name="perturbation"),
                        columns=[f"f{i}" for i in range(bits)])


# --------------------------------------------------------------------------- command line
def _screen_names(path: Path, perturbation_key: str, control_label: str | None) -> list[str]:
    """Every perturbation of a screen (``.h5ad`` obs column or an atlas's groups), controls left out."""
    if path.suffix == ".h5ad":
        import anndata as ad

        obs = ad.read_h5ad(path, backed="r").obs
        if perturbation_key not in obs:
            raise ValueError(f"{path}: no obs column {perturbation_key!r} (columns: {', '.join(map(str, obs.columns))})")
        names = obs[perturbation_key].astype(str).unique().tolist()
        if control_label is None:
            raise ValueError(f"{path}: give --control-label (the value of {perturbation_key!r} that marks control cells)")
        if control_label not in names:
            raise ValueError(f"{path}: control label {control_label!r} is not a value of {perturbation_key!r}")
        return sorted(n for n in names if n != control_label)
    from .data import Atlas

    groups = Atlas(path).groups
    return sorted(groups.loc[~groups["is_control"], "perturbation"].astype(str).unique())


def run_command(args) -> int:
    if args.source == "go":
        table = go_features(args.annotations, dim=args.dim, ontology=args.ontology, aspects=args.aspects)
        what = f"GO annotations {args.annotations}"
    elif args.source == "coexpression":
        table = coexpression_features(args.data, dim=args.dim, control_label=args.control_label,
                                      perturbation_key=args.perturbation_key)
        what = f"the control cells of {args.data}"
    elif args.source == "model":
        table = model_gene_features(args.model, dim=args.dim)
        what = f"the model {args.model}"
    else:
        smiles_path = Path(args.smiles)
        if not smiles_path.exists():
            raise FileNotFoundError(f"SMILES table {smiles_path} does not exist")
        smiles = pd.read_csv(smiles_path, sep="\t" if smiles_path.suffix.lower() in (".tsv", ".tab") else ",")
        if smiles.shape[1] < 2:
            raise ValueError(f"{smiles_path}: need two columns, perturbation name then SMILES")
        table = morgan_features(dict(zip(smiles.iloc[:, 0].astype(str), smiles.iloc[:, 1])), radius=args.radius,
                                bits=args.bits)
        what = f"SMILES table {smiles_path}"
    names = list(args.names or [])
    if args.names_from:
        names += _screen_names(Path(args.names_from), args.perturbation_key, args.control_label)
    if names:
        table = compose(names, table, what=what)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    write_table(table, out)
    print(f"wrote features of {len(table):,} perturbation(s) x {table.shape[1]} to {out} (from {what})")
    return 0


def add_parser(sub) -> None:
    from .cli import ShowDefaults

    p = sub.add_parser("features", help="build perturbation feature tables (GO, co-expression, a model, SMILES)",
                       description="Write a perturbation feature table (one row per perturbation name, columns "
                       "f0..f{F-1}; CSV / TSV / parquet by suffix) for training (data.perturbation_features) "
                       "and for predicting perturbations a model never saw (--perturbation-features).",
                       formatter_class=ShowDefaults)
    p.add_argument("source", choices=["go", "coexpression", "model", "morgan"], help="where the features come from")
    p.add_argument("-o", "--out", required=True, help="output table (.csv, .tsv or .parquet)")
    p.add_argument("--dim", type=int, default=64, help="features per perturbation (go, coexpression, model)")
    p.add_argument("--annotations", help="go: org.Hs.eg.sqlite (Bioconductor org.Hs.eg.db) or a GAF file")
    p.add_argument("--ontology", help="go with a GAF: the OBO ontology (go-basic.obo) to propagate annotations over")
    p.add_argument("--aspects", nargs="+", default=["bp", "mf", "cc"], choices=sorted(_ASPECTS), help="go: ontologies")
    p.add_argument("--data", help="coexpression: an atlas or .h5ad whose control cells are used")
    p.add_argument("--model", help="model: a trained PerturbDiff model folder")
    p.add_argument("--smiles", help="morgan: CSV/TSV of perturbation name, SMILES")
    p.add_argument("--radius", type=int, default=2, help="morgan: fingerprint radius")
    p.add_argument("--bits", type=int, default=1024, help="morgan: fingerprint length")
    p.add_argument("--names", nargs="+", help="only these perturbations (A+B: the sum of A's and B's rows)")
    p.add_argument("--names-from", help="only the perturbations of this screen (.h5ad or atlas), controls left out")
    p.add_argument("--perturbation-key", default="perturbation", help="obs column of perturbations (.h5ad)")
    p.add_argument("--control-label", help="the control value of --perturbation-key")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output table")
    p.set_defaults(func=_checked)


def _checked(args) -> int:
    need = {"go": "annotations", "coexpression": "data", "model": "model", "morgan": "smiles"}[args.source]
    if getattr(args, need) is None:
        raise ValueError(f"features {args.source} needs --{need}")
    if args.dim < 1:
        raise ValueError(f"--dim must be >= 1, got {args.dim}")
    return run_command(args)
