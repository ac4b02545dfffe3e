"""The atlas builder: ``.h5ad`` files, AnnData objects or Tahoe-layout parquet → one grouped Zarr atlas.

The build streams in two passes and never loads X:

1. obs only: map the user's columns onto the standard ones (dataset, context, perturbation, dose,
   batch), validate them (columns exist, the control label exists, every context with perturbed
   cells has controls), and compute each cell's group and its destination row by sorting cell
   *indices* by group.
2. X in blocks of ``block_cells`` destination rows: read the needed input rows in contiguous windows,
   validate the counts (non-negative, finite; or invert a declared log1p), shuffle cells within the
   block (so that any contiguous window of a group is a random subset of it), accumulate per-gene
   statistics for the highly-variable-gene flags, and append the block to the store.

Memory is bounded by the block size plus a few bytes of metadata per cell (group codes and the
sort order), never by X. The store is written to a temporary sibling and renamed into place only
once complete (see `AtlasWriter`).

The module is longer than most (~630 lines): the two passes, their validation and the block
reader share state that would only be passed around if split.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..expression import INTEGER_TOL, LOG1P_MAX, log1p_to_counts, row_sums
from .sources import name_bytes, open_sources
from .remote import as_location, location_name, scratch_path
from .store import GROUP_KEYS, AtlasWriter

__all__ = ["build_atlas", "ensure_atlas", "highly_variable_genes"]

_NA = "NA"
_STATS_TARGET = 1e4  # per-cell total used for the gene statistics behind the HVG flags


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("perturbdiff")
    except Exception:
        return "unknown"


def _show(values, limit: int = 30) -> str:
    values = [str(v) for v in values]
    more = f" ... (+{len(values) - limit} more)" if len(values) > limit else ""
    return "[" + ", ".join(repr(v) for v in values[:limit]) + "]" + more


def _categorical(values, *, missing: str | None, what: str, source: str) -> pd.Categorical:
    """A column as a categorical of strings; missing values become ``missing`` or raise."""
    cat = values if isinstance(values, pd.Categorical) else pd.Categorical(values)
    names = [str(c) for c in cat.categories]
    if len(set(names)) != len(names):  # e.g. the number 1 and the text "1": one name, two values
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{source}: the {what} column holds values that differ only in type ({clash[:5]}, as "
                         "numbers and as text); make the column one type")
    cat = cat.rename_categories(names) if len(cat.categories) else cat
    if (cat.codes < 0).any():
        if missing is None:
            raise ValueError(f"{source}: {(cat.codes < 0).sum()} cells have no value in the {what} column")
        if missing not in cat.categories:
            cat = cat.add_categories([missing])
        cat = cat.fillna(missing)
    return cat


def _column(src, key: str | None, *, role: str, flag: str, default: str, missing: str | None):
    if key is None:
        return pd.Categorical.from_codes(np.zeros(src.num_cells, dtype=np.int8), categories=[default])
    if key not in src.obs_columns:
        raise ValueError(f"{src.name}: obs has no column '{key}' ({flag}); columns present: {_show(src.obs_columns, 200)}")
    return _categorical(src.obs_column(key), missing=missing, what=f"{role} ('{key}')", source=src.name)


def _dose(src, key: str | None) -> np.ndarray:
    if key is None:
        return np.zeros(src.num_cells, dtype=np.float64)
    if key not in src.obs_columns:
        raise ValueError(f"{src.name}: obs has no column '{key}' (--dose-key); columns present: {_show(src.obs_columns, 200)}")
    raw = pd.Series(np.asarray(src.obs_column(key), dtype=object))
    num = pd.to_numeric(raw, errors="coerce")
    bad = num.isna() & raw.notna()
    if bad.any():
        raise ValueError(f"{src.name}: dose column '{key}' has non-numeric values, e.g. {_show(raw[bad].unique()[:5])}")
    return num.fillna(0.0).to_numpy(dtype=np.float64)  # controls often have no dose: 0


def _union_codes(cats: list[pd.Categorical]) -> tuple[list[np.ndarray], list[str]]:
    """Per input, its column's codes in the sorted union of every input's values (int32)."""
    names = sorted(set().union(*[set(c.categories) for c in cats]))
    index = pd.Index(names)
    return [index.get_indexer(c.categories).astype(np.int32)[c.codes] for c in cats], names


def _smallest_int(limit: int):
    """The smallest signed integer dtype holding 0 .. limit."""
    return next(t for t in (np.int8, np.int16, np.int32, np.int64) if limit <= np.iinfo(t).max)


_FNV_OFFSET, _FNV_PRIME = np.uint64(14695981039346656037), np.uint64(1099511628211)


def _fnv1a(names: np.ndarray, start=_FNV_OFFSET) -> np.ndarray:
    """64-bit FNV-1a of each ``S`` name, continuing from ``start`` (so ``_fnv1a(b, _fnv1a(a))`` hashes
    ``a + b``); the padding NULs of the ``S`` dtype are skipped, so the width does not matter."""
    names = np.ascontiguousarray(names)
    width = names.dtype.itemsize
    h = np.full(len(names), start, dtype=np.uint64)
    if len(names) == 0:
        return h
    raw = names.view(np.uint8).reshape(len(names), width)
    for j in range(width):
        c = raw[:, j].astype(np.uint64)
        h = np.where(c != 0, (h ^ c) * _FNV_PRIME, h)
    return h


class _CellNames:
    """Every input's cell names as UTF-8 bytes, checked unique and read back in any row order.

    Uniqueness is checked on 64-bit hashes (8 bytes per cell, sorted in place; a repeated hash is
    confirmed on the names themselves), never by sorting the names; names that repeat across inputs
    (barcodes) are qualified with their input's name ("part003:AAAC-1") as they are read, never
    stored twice.
    """

    _CHUNK = 1 << 20

    def __init__(self, sources):
        self.names = [name_bytes(s) for s in sources]
        self.offsets = np.concatenate([[0], np.cumsum([len(n) for n in self.names])]).astype(np.int64)
        self.sources = [s.name for s in sources]
        self.tags = None
        if self._duplicate() is None:
            return
        self.tags = [((s.path.stem if s.path is not None else s.name) + ":").encode() for s in sources]
        dup = self._duplicate()
        if dup is not None:
            name, s = dup
            raise ValueError(f"{self.sources[s]}: cell name {name!r} occurs more than once; make obs_names "
                             "unique first (e.g. adata.obs_names_make_unique())")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _hashes(self) -> np.ndarray:
        out = np.empty(len(self), dtype=np.uint64)
        for s, names in enumerate(self.names):
            start = _fnv1a(np.array([self.tags[s]]))[0] if self.tags else _FNV_OFFSET
            for a in range(0, len(names), self._CHUNK):
                b = min(a + self._CHUNK, len(names))
                out[self.offsets[s] + a : self.offsets[s] + b] = _fnv1a(names[a:b], start)
        return out

    def _duplicate(self):
        """A (name, input) that occurs twice, or None."""
        h = self._hashes()
        h.sort()
        suspects = np.unique(h[1:][h[1:] == h[:-1]])
        del h
        if not len(suspects):
            return None
        h = self._hashes()
        for value in suspects:  # almost always the first is a real repeat (64-bit collisions: ~n^2 / 2^65)
            rows = np.flatnonzero(h == value)
            names = self.take(rows)
            _, first, count = np.unique(names, return_index=True, return_counts=True)
            if (count > 1).any():
                row = rows[first[np.argmax(count > 1)]]
                s = int(np.searchsorted(self.offsets, row, side="right") - 1)
                return self.names[s][row - self.offsets[s]].decode("utf-8", "replace"), s
        return None

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The names of the given (global) rows, qualified when they repeat across inputs."""
        rows = np.asarray(rows, dtype=np.int64)
        src = np.searchsorted(self.offsets, rows, side="right") - 1
        parts = []
        for s in np.unique(src):
            sel = np.flatnonzero(src == s)
            values = self.names[s][rows[sel] - self.offsets[s]]
            parts.append((sel, np.char.add(self.tags[s], values) if self.tags else values))
        width = max([v.dtype.itemsize for _, v in parts], default=1)
        out = np.empty(len(rows), dtype=f"S{width}")
        for sel, values in parts:
            out[sel] = values
        return out


class _InRowOrder:
    """``names`` read in the atlas's row order, a slice at a time (what `AtlasWriter.finish` takes)."""

    def __init__(self, names: _CellNames, order: np.ndarray):
        self.names, self.order = names, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, window: slice) -> np.ndarray:
        return self.names.take(self.order[window])


def highly_variable_genes(mean: np.ndarray, var: np.ndarray, n_top: int) -> tuple[np.ndarray, np.ndarray]:
    """Seurat-flavour HVG selection from per-gene mean/variance of total-normalised expression.

    Dispersion var/mean is log-transformed and z-scored within 20 bins of log1p(mean); the ``n_top``
    genes with the highest normalised dispersion are flagged. Returns (dispersion_norm, flags).
    """
    g = len(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.where(mean > 0, var / np.maximum(mean, 1e-12), np.nan)
        disp[disp == 0] = np.nan
        disp = np.log(disp)
    bins = pd.cut(np.log1p(mean), bins=20)
    df = pd.DataFrame({"d": disp, "bin": bins})
    stats = df.groupby("bin", observed=False)["d"].agg(["mean", "std"])
    mu = stats["mean"].reindex(bins).to_numpy()
    sd = stats["std"].reindex(bins).to_numpy()
    single = np.isnan(sd)  # a bin with one gene: scanpy's convention gives it normalised dispersion 1
    sd = np.where(single, np.where(np.isnan(mu), 1.0, np.abs(mu) + 1e-12), sd)
    mu = np.where(single, 0.0, mu)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = (disp - mu) / np.where(sd > 0, sd, np.nan)
    score = np.nan_to_num(norm, nan=-np.inf)
    top = np.argsort(-score, kind="stable")[:n_top]
    flags = np.zeros(g, dtype=bool)
    flags[top[np.isfinite(score[top])]] = True
    if g <= n_top:  # fewer genes than asked for: keep them all
        flags[:] = True
    return np.nan_to_num(norm, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32), flags


class _CountsCleaner:
    """Validates one source's blocks and brings them into the atlas's gene order and count space.

    Every block is checked after any conversion: values finite and non-negative, and (counts input)
    integral; non-integer cells are counted over the whole source, and a source that mixes integer
    count cells with log1p-like cells is refused.
    """

    def __init__(self, src, gene_map: np.ndarray | None, input_log1p: bool, obs_names: np.ndarray):
        self.src = src
        self.gene_map = gene_map
        self.input_log1p = input_log1p
        self.obs_names = obs_names
        # totals over the blocks added so far (`add_counts`), and the counts of blocks cleaned here
        # since the last `take_counts` (a parallel build cleans in worker processes)
        self.non_integer_cells = 0
        self.integer_cells = 0
        self.max_value = 0.0
        self._pending = [0, 0, 0.0]

    def _check_finite(self, m: sp.csr_matrix, rows: np.ndarray, after: str = "") -> None:
        d = m.data
        bad = ~np.isfinite(d) | (d < 0)
        if bad.any():
            row = int(np.searchsorted(m.indptr, np.flatnonzero(bad)[0], side="right") - 1)
            kind = "non-finite" if not np.isfinite(d[bad]).all() else "negative"
            raise ValueError(
                f"{self.src.name}: X has {kind} values{after} (first in cell {self.obs_names[rows[row]].decode()!r}); raw, "
                "non-negative counts are expected (declare log1p-normalised input with input_log1p=True / --input-log1p)"
            )

    def __call__(self, m: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix(m, dtype=np.float32)
        m.sum_duplicates()
        self._check_finite(m, rows)
        if self.input_log1p:
            m = self._invert_log1p(m)
            self._check_finite(m, rows, after=" after inverting log1p (values too large for log1p-normalised data)")
        else:
            self._check_integral(m, rows)
        if self.gene_map is not None:
            m.indices = self.gene_map[m.indices].astype(np.int32)
            m.has_sorted_indices = False
            m.sort_indices()
        m.eliminate_zeros()
        return m

    def _check_integral(self, m: sp.csr_matrix, rows: np.ndarray) -> None:
        """Counts input: classify each non-empty cell by `detect_input_space`'s rule (integral within
        its tolerance); a source mixing integral and non-integer cells is refused at once, and
        `report` refuses a non-integer source whose values all stay below LOG1P_MAX (log1p data),
        so that the builder and prediction read one matrix the same way."""
        nonempty = np.diff(m.indptr) > 0
        fractional = row_sums(m.indptr, (np.abs(m.data - np.round(m.data)) >= INTEGER_TOL).astype(np.float32)) > 0
        p = self._pending
        if m.nnz:
            p[2] = max(p[2], float(m.data.max()))
        p[0] += int(fractional.sum())
        p[1] += int((nonempty & ~fractional).sum())
        example = self.obs_names[rows[int(np.argmax(fractional))]].decode() if fractional.any() else None
        self._check_mixed(self.non_integer_cells + p[0], self.integer_cells + p[1], example)

    def _check_mixed(self, non_integer: int, integer: int, example: str | None) -> None:
        if non_integer and integer:
            example = f" (e.g. {example!r})" if example else ""
            raise ValueError(
                f"{self.src.name}: X mixes integer count cells ({integer} so far) with non-integer cells "
                f"({non_integer}{example}): one matrix must hold one kind of values (raw counts, or log1p "
                "with --input-log1p)")

    def take_counts(self) -> tuple:
        """The cell counts of the blocks cleaned here since the last call."""
        out, self._pending = tuple(self._pending), [0, 0, 0.0]
        return out

    def add_counts(self, counts: tuple) -> None:
        """Add a block's counts (in build order) to the totals; refuse a source that mixes kinds."""
        self.non_integer_cells += counts[0]
        self.integer_cells += counts[1]
        self.max_value = max(self.max_value, counts[2])
        self._check_mixed(self.non_integer_cells, self.integer_cells, None)

    def _invert_log1p(self, m: sp.csr_matrix) -> sp.csr_matrix:
        counts, non_integer = log1p_to_counts(m)
        self._pending[0] += non_integer
        return counts

    def report(self) -> None:
        """After the last block: refuse undeclared log1p data; warn with the true number of cells whose
        values were stored as not integral."""
        if self.non_integer_cells and not self.input_log1p and self.max_value < LOG1P_MAX:
            raise ValueError(
                f"{self.src.name}: X looks log1p-normalised (non-integer values, all below {LOG1P_MAX:g}; max "
                f"{self.max_value:.3g}): pass input_log1p=True (--input-log1p) to recover its counts, or give raw "
                "counts; stored as it is, it would be normalised twice")
        if self.non_integer_cells and not self.input_log1p:
            warnings.warn(f"{self.src.name}: X has non-integer values (above any log1p value) in all "
                          f"{self.non_integer_cells} cells, e.g. estimated counts; stored as given", stacklevel=3)
        elif self.non_integer_cells:
            warnings.warn(f"{self.src.name}: counts of {self.non_integer_cells} cells could not be recovered as integers "
                          "from the log1p values; stored rescaled so their smallest value is 1", stacklevel=3)


def build_atlas(
    inputs,
    output,
    *,
    perturbation_key: str | None = "perturbation",
    control_label: str = "control",
    context_key: str | None = None,
    batch_key: str | None = None,
    dose_key: str | None = None,
    dataset_key: str | None = None,
    dataset_name: str | None = None,
    layer: str | None = None,
    gene_key: str | None = None,
    input_log1p: bool = False,
    genes_column: str = "genes",
    expressions_column: str = "expressions",
    gene_metadata=None,
    gene_id_column: str = "token_id",
    gene_name_column: str = "gene_symbol",
    obs_names_key: str | None = None,
    obs_filter: str | None = None,
    soma_measurement: str = "RNA",
    n_top_genes: int = 2000,
    block_cells: int = 16384,
    workers: int | None = None,
    chunk_elems: int = 32768,
    shard_chunks: int = 128,
    codec: str = "zstd",
    seed: int = 0,
    overwrite: bool = False,
    append: bool = False,
    progress: bool = True,
) -> Path:
    """Build a grouped Zarr atlas from ``.h5ad`` files, folders of them, AnnData objects or parquet.

    Args:
        inputs: a path or a list of paths (``.h5ad``, ``.parquet`` or folders of them) or AnnData objects.
        output: the atlas to write (``*.zarr``): a path or an object-store URI (``s3://bucket/x.zarr``).
        perturbation_key: obs column with the perturbation; None for an unperturbed atlas (every cell
            is then labelled ``control_label`` and counts as a control).
        control_label: the perturbation label of control cells (must occur; every (dataset, context)
            with perturbed cells must have controls).
        context_key, batch_key: obs columns for the context (cell type / line) and batch; None gives "NA".
        dose_key: numeric obs column with the dose (missing → 0); None gives dose 0.
        dataset_key: obs column naming the dataset; else ``dataset_name``; else each file's stem.
        layer: read counts from ``layers[layer]`` or ``raw`` (``"raw"``) instead of X.
        gene_key: var column with gene names (default: var's index). Names must be unique, and every
            input must have the same gene set (in any order).
        input_log1p: X holds ``log1p`` of total-normalised counts; counts are recovered per cell as
            ``expm1(x)`` rescaled so the row is integral with the smallest possible minimum (exact
            for UMI profiles whose counts have no common factor, i.e. virtually all); cells that stay
            non-integral are kept rescaled and counted in the store's metadata.
        genes_column, expressions_column, gene_metadata, gene_id_column, gene_name_column,
            obs_names_key: parquet (Tahoe-100M layout) options, see `ParquetSource`.
        obs_filter, soma_measurement: for ``soma://`` inputs (TileDB-SOMA / CELLxGENE Census), the obs
            value filter (e.g. ``"is_primary_data == True and tissue_general == 'blood'"``) and the
            measurement; see `SomaSource`. ``layer`` names the SOMA X layer, ``gene_key`` its var column.
        n_top_genes: how many highly variable genes to flag in ``var["highly_variable"]``.
        block_cells: cells per streamed block (bounds the builder's memory).
        workers: processes that read, clean and sort blocks while this one writes (None: the cores,
            at most 8; 1: all in this process). The atlas is identical whatever the number. Inputs other
            than ``.h5ad`` and AnnData, unless bucketed, are read in this process.
        chunk_elems, shard_chunks: Zarr chunking of X (values per chunk, chunks per shard file).
        codec: Blosc compressor of X: "zstd" (compact) or "lz4" (decodes faster, ~1.8x larger).
        seed: seed of the within-group shuffle.
        overwrite: replace an existing atlas at ``output``.
        append: add the inputs to the existing local atlas at ``output`` as new datasets, without
            rewriting its X (see `perturbdiff.data.append`); ``n_top_genes`` is then the atlas's.
        progress: show a progress bar.

    Returns:
        The path of the complete atlas.
    """
    if append:
        options = {k: v for k, v in locals().items()
                   if k not in ("inputs", "output", "append", "overwrite", "progress", "n_top_genes")}
        if overwrite:
            raise ValueError("append=True (--append) adds to the atlas at the output; it cannot also overwrite it")
        from .append import append_to_atlas

        return append_to_atlas(output, inputs, progress=progress, **options)
    from tqdm.auto import tqdm

    output = as_location(output)
    parquet_options = dict(
        genes_column=genes_column,
        expressions_column=expressions_column,
        gene_metadata=gene_metadata,
        gene_id_column=gene_id_column,
        gene_name_column=gene_name_column,
        obs_names_key=obs_names_key,
    )
    sources = open_sources(inputs, layer=layer, gene_key=gene_key, parquet_options=parquet_options,
                           soma_options={"measurement": soma_measurement, "obs_filter": obs_filter})
    spool = None
    try:
        # ---- pass 1: obs → groups and destination rows ------------------------------------------
        # A few bytes per cell: each input's columns as compact categoricals, then one int64 group key,
        # then int32 group ids and destination order; the cell names as bytes (`_CellNames`).
        cols = {k: [] for k in ("dataset", "context", "perturbation", "batch")}
        doses = []  # per input: (its distinct doses, each cell's index into them)
        for i, src in enumerate(sources):
            if dataset_key is not None:
                cols["dataset"].append(
                    _column(src, dataset_key, role="dataset", flag="--dataset-key", default="", missing=None)
                )
            else:
                default = dataset_name or (src.path.stem if src.path is not None else getattr(src, "stem", f"dataset{i}"))
                cols["dataset"].append(pd.Categorical.from_codes(np.zeros(src.num_cells, np.int8), categories=[default]))
            cols["context"].append(_column(src, context_key, role="context", flag="--context-key", default=_NA, missing=_NA))
            cols["batch"].append(_column(src, batch_key, role="batch", flag="--batch-key", default=_NA, missing=_NA))
            cols["perturbation"].append(
                _column(src, perturbation_key, role="perturbation", flag="--perturbation-key", default=control_label, missing=None)
            )
            values, inverse = np.unique(_dose(src, dose_key), return_inverse=True)
            doses.append((values, inverse.astype(np.int32)))
        n_total = sum(s.num_cells for s in sources)
        if n_total == 0:
            raise ValueError("the inputs have no cells")
        names = _CellNames(sources)  # names are checked before X is read: a repeat fails in seconds

        codes, cats = {}, {}
        for k, parts in cols.items():
            codes[k], cats[k] = _union_codes(parts)
        del cols
        if control_label not in cats["perturbation"]:
            raise ValueError(
                f"control label {control_label!r} (--control-label) not found in perturbation column "
                f"'{perturbation_key}'; labels seen: {_show(cats['perturbation'])}"
            )
        cats["dose"] = np.unique(np.concatenate([v for v, _ in doses]))
        codes["dose"] = [np.searchsorted(cats["dose"], v).astype(np.int32)[inv] for v, inv in doses]
        del doses
        sizes = [len(cats[k]) for k in GROUP_KEYS]
        if np.prod([float(s) for s in sizes]) >= 2.0**62:
            raise ValueError("too many distinct covariate values to index groups")
        src_offsets = np.concatenate([[0], np.cumsum([s.num_cells for s in sources])]).astype(np.int64)
        key = np.zeros(n_total, dtype=np.int64)
        for k, size in zip(GROUP_KEYS, sizes):
            for i, c in enumerate(codes.pop(k)):
                part = key[src_offsets[i] : src_offsets[i + 1]]
                part *= size
                part += c
        del part  # a view of key: it would keep key alive
        group_keys, gid = _group_ids(key, int(np.prod([float(s) for s in sizes])))  # sorted = lexicographic by names
        del key
        parts, rest = {}, group_keys.copy()
        for k, size in zip(reversed(GROUP_KEYS), reversed(sizes)):
            parts[k], rest = rest % size, rest // size
        counts = np.bincount(gid, minlength=len(group_keys))
        control_code = cats["perturbation"].index(control_label)
        is_control = parts["perturbation"] == control_code
        starts = np.concatenate([[0], np.cumsum(counts)])
        groups = pd.DataFrame(
            {
                "dataset": np.asarray(cats["dataset"], dtype=object)[parts["dataset"]],
                "context": np.asarray(cats["context"], dtype=object)[parts["context"]],
                "perturbation": np.asarray(cats["perturbation"], dtype=object)[parts["perturbation"]],
                "dose": cats["dose"][parts["dose"]].astype(np.float64),
                "batch": np.asarray(cats["batch"], dtype=object)[parts["batch"]],
                "is_control": is_control,
                "start": starts[:-1].astype(np.int64),
                "stop": starts[1:].astype(np.int64),
            }
        )
        groups.index = groups.index.astype(str)
        _check_controls(groups, control_label)

        # ---- genes ------------------------------------------------------------------------------
        gene_names = None
        gene_maps = []
        for src in sources:
            g = src.gene_names()
            dup = pd.Index(g)[pd.Index(g).duplicated()]
            if len(dup):
                raise ValueError(
                    f"{src.name}: gene names are not unique ({len(dup)} duplicates, e.g. {_show(dup.unique()[:5])}); "
                    "use --gene-key to pick a unique var column (e.g. Ensembl ids)"
                )
            if gene_names is None:
                gene_names = g
                gene_maps.append(None)
                continue
            if len(g) != len(gene_names) or set(g) != set(gene_names):
                missing = len(set(gene_names) - set(g))
                extra = len(set(g) - set(gene_names))
                raise ValueError(
                    f"{src.name}: its genes differ from {sources[0].name}'s ({missing} missing, {extra} extra); "
                    "inputs of one atlas must share their genes - build separate atlases and let the loader map "
                    "them into a shared vocabulary"
                )
            gene_maps.append(None if np.array_equal(g, gene_names) else pd.Index(gene_names).get_indexer(g).astype(np.int32))
        num_genes = len(gene_names)

        # ---- pass 2: X in blocks of destination rows ----------------------------------------------
        cleaners = [_CountsCleaner(s, gm, input_log1p, nm) for s, gm, nm in zip(sources, gene_maps, names.names)]
        # Destination order: by group, then shuffled within each group's part of each block, so that a
        # contiguous window of a group is a random subset of it.
        index_type = np.int32 if n_total < 2**31 else np.int64
        final_cells = np.argsort(gid.astype(np.uint16) if len(groups) <= 1 << 16 else gid, kind="stable").astype(index_type)
        rng = np.random.default_rng(seed)
        for a in range(0, n_total, block_cells):
            cells = final_cells[a : a + block_cells]
            final_cells[a : a + block_cells] = cells[np.lexsort((rng.random(len(cells)), gid[cells]))]
        del gid
        src_of_row = np.empty(n_total, dtype=_smallest_int(len(sources)))
        for a in range(0, n_total, _CellNames._CHUNK):
            src_of_row[a : a + _CellNames._CHUNK] = np.searchsorted(src_offsets, final_cells[a : a + _CellNames._CHUNK], side="right") - 1
        spooled = _scattered_sources(sources, final_cells, src_of_row, src_offsets, block_cells)
        totals = np.empty(n_total, dtype=np.float32)
        g_sum = np.zeros(num_genes)
        g_sq = np.zeros(num_genes)
        g_n = np.zeros(num_genes, dtype=np.int64)
        with AtlasWriter(
            output, num_genes=num_genes, chunk_elems=chunk_elems, shard_chunks=shard_chunks, codec=codec, overwrite=overwrite
        ) as writer:
            if spooled:
                spool = _Spool(scratch_path(writer.location, f"spool-{writer.run_id}"))
                dest = np.empty(n_total, dtype=index_type)
                dest[final_cells] = np.arange(n_total, dtype=index_type)
                for s in sorted(spooled):
                    src = sources[s]
                    starts = range(0, src.num_cells, block_cells)
                    n_workers = _build_workers(workers, [src.kind], len(starts))
                    bar = tqdm(total=src.num_cells, unit="cell", unit_scale=True, disable=not progress,
                               desc=f"bucket {Path(src.name).name}" + (f" ({n_workers} processes)" if n_workers > 1 else ""))
                    bucket = functools.partial(_bucket, src, cleaners[s], dest[src_offsets[s] : src_offsets[s] + src.num_cells],
                                               spool, block_cells)
                    for n_rows, kinds in _ordered_map(bucket, starts, n_workers, sources):
                        cleaners[s].add_counts(kinds)
                        bar.update(n_rows)
                    bar.close()
                del dest
            blocks = _Blocks(sources, cleaners, final_cells, src_of_row, src_offsets, spooled, spool, block_cells, num_genes)
            n_workers = _build_workers(workers, [s.kind for i, s in enumerate(sources) if i not in spooled],
                                       -(-n_total // block_cells))
            bar = tqdm(total=n_total, unit="cell", unit_scale=True, disable=not progress,
                       desc=f"build {location_name(output)}" + (f" ({n_workers} processes)" if n_workers > 1 else ""))
            for a, indptr, indices, data, block_totals, stats, kinds in blocks.run(n_workers):
                for c, n in zip(cleaners, kinds):
                    c.add_counts(n)
                totals[a : a + len(block_totals)] = block_totals
                for acc, part in zip((g_sum, g_sq, g_n), stats):
                    acc += part
                writer.append(indptr, indices, data)
                bar.update(len(block_totals))
            bar.close()
            if spool is not None:
                spool.close()
            for c in cleaners:
                c.report()

            var_df = gene_table(g_sum, g_sq, g_n, n_total, n_top_genes,
                                pd.Index(np.asarray(gene_names, dtype=object).astype(str), name=None))
            group_of_row = np.repeat(np.arange(len(groups), dtype=np.int32), counts)
            # the obs columns are made one at a time as they are written (`AtlasWriter.finish`)
            obs = {
                k: (lambda k=k: pd.Categorical.from_codes(parts[k].astype(_smallest_int(len(cats[k])))[group_of_row],
                                                          categories=list(cats[k])))
                for k in ("dataset", "context", "perturbation", "batch")
            }
            obs["dose"] = lambda: groups["dose"].to_numpy().astype(np.float32)[group_of_row]
            obs["is_control"] = lambda: is_control[group_of_row]
            obs["total_counts"] = totals
            obs["group"] = group_of_row
            metadata = {
                "perturbdiff_version": _version(),
                "control_label": control_label,
                "columns": {
                    "perturbation": perturbation_key,
                    "context": context_key,
                    "batch": batch_key,
                    "dose": dose_key,
                    "dataset": dataset_key,
                    "dataset_name": dataset_name,
                },
                "sources": [
                    {
                        "name": s.name,
                        "kind": s.kind,
                        "layer": s.layer,
                        "num_cells": int(s.num_cells),
                        "input_transform": "log1p" if input_log1p else "counts",
                        "non_integer_cells": int(c.non_integer_cells),
                    }
                    for s, c in zip(sources, cleaners)
                ],
                "build": {"block_cells": block_cells, "seed": seed, "n_top_genes": n_top_genes, "codec": codec},
            }
            return writer.finish(obs=obs, obs_names=_InRowOrder(names, final_cells), var=var_df, groups=groups, metadata=metadata)
    finally:
        for s in sources:
            s.close()
        if spool is not None:
            spool.close()


def gene_table(g_sum, g_sq, g_n, n_cells: int, n_top_genes: int, index: pd.Index) -> pd.DataFrame:
    """The atlas's var table from per-gene sums, sums of squares and non-zero counts over ``n_cells``
    cells: mean, (unbiased) variance, normalised dispersion and the highly variable flags."""
    mean = g_sum / n_cells
    var = np.maximum(g_sq / n_cells - mean**2, 0.0) * (n_cells / max(n_cells - 1, 1))
    disp_norm, hv = highly_variable_genes(mean, var, n_top_genes)
    return pd.DataFrame({"n_cells": g_n, "mean": mean.astype(np.float32), "variance": var.astype(np.float32),
                         "dispersion_norm": disp_norm, "highly_variable": hv}, index=index)


def _build_workers(workers: int | None, kinds, num_blocks: int) -> int:
    """How many processes work on ``num_blocks`` blocks read from inputs of these ``kinds``:
    ``workers`` (None: the machine's cores, at most 8), at most half the blocks, and 1 (this
    process) without ``fork`` or for inputs other than ``.h5ad`` / AnnData (the parquet, SOMA and
    streaming readers hold thread pools or a stream position that a fork does not carry over)."""
    import multiprocessing

    n = min(os.cpu_count() or 1, 8) if workers is None else int(workers)
    if n < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    n = min(n, num_blocks // 2)  # at least two blocks per process
    if n <= 1 or "fork" not in multiprocessing.get_all_start_methods() or any(k not in ("h5ad", "anndata") for k in kinds):
        return 1
    return n


# The work of a parallel step, for the forked processes (set before the pool forks, read there).
_JOB = None


def _reopen_sources() -> None:
    for src in _JOB[1]:
        if src.kind == "h5ad":
            src.reopen()  # its own HDF5 handle: the parent closed its handles before forking


def _call(item):
    return _JOB[0](item)


def _ordered_map(fn, items, workers: int, sources):
    """``map(fn, items)`` in this process (workers = 1) or in ``workers`` forked processes, results
    in order, at most two items per process in flight (memory stays bounded). A worker killed
    mid-way (e.g. by the OOM killer) raises BrokenProcessPool here instead of leaving its item
    pending forever (why an executor, not multiprocessing.Pool)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _JOB
    for src in sources:
        if src.kind == "h5ad":
            src.close()  # HDF5 handles are not shared across a fork: each process opens its own
    _JOB = (fn, sources)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_reopen_sources)
    try:
        pending, todo = collections.deque(), iter(items)
        for item in todo:
            pending.append(pool.submit(_call, item))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_call, nxt))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOB = None
        for src in sources:
            if src.kind == "h5ad":
                src.reopen()  # this process reads it again (a later step, or the next parallel one)


def _bucket(src, cleaner, dest, spool, block_cells: int, r0: int):
    """The bucket pass on one window of an input's rows: read, clean, and append each row to the
    spool bucket of its destination block; returns the rows done and the cleaner's counts."""
    rows = np.arange(r0, min(r0 + block_cells, src.num_cells))
    m = cleaner(src.read_rows(rows), rows)
    d = dest[rows]
    blk = d // block_cells
    for bid in np.unique(blk):
        sel = np.flatnonzero(blk == bid)
        spool.write(int(bid), d[sel] % block_cells, m[sel])
    return len(rows), cleaner.take_counts()


class _Blocks:
    """Pass 2's work on one block of destination rows: read each input's rows (or the block's spool
    bucket), clean them, put them in destination order, sort the indices, and the block's per-gene
    sums. The same function runs in this process or in forked processes (`run`); the builder adds the
    blocks' sums and counts in block order, so a parallel build equals a serial one byte for byte."""

    def __init__(self, sources, cleaners, final_cells, src_of_row, src_offsets, spooled, spool, block_cells, num_genes):
        self.sources, self.cleaners = sources, cleaners
        self.final_cells, self.src_of_row, self.src_offsets = final_cells, src_of_row, src_offsets
        self.spooled, self.spool = spooled, spool
        self.block_cells, self.num_genes = block_cells, num_genes

    def prepare(self, a: int):
        b = min(a + self.block_cells, len(self.final_cells))
        cells, src_of = self.final_cells[a:b], self.src_of_row[a:b]
        mats, placed = [], []
        for s in np.unique(src_of):
            if s in self.spooled:
                continue
            pos = np.flatnonzero(src_of == s)
            rows = cells[pos] - self.src_offsets[s]
            o = np.argsort(rows, kind="stable")
            mats.append(self.cleaners[s](self.sources[s].read_rows(rows[o]), rows[o]))
            placed.append(pos[o])
        if self.spool is not None:
            pos, m = self.spool.read(a // self.block_cells, self.num_genes)
            if len(pos):
                mats.append(m)
                placed.append(pos)
        block = mats[0] if len(mats) == 1 else sp.vstack(mats, format="csr")
        inverse = np.empty(b - a, dtype=np.int64)
        inverse[np.concatenate(placed)] = np.arange(b - a)
        if not np.array_equal(inverse, np.arange(b - a)):
            block = block[inverse]
        block.sort_indices()
        stats = (np.zeros(self.num_genes), np.zeros(self.num_genes), np.zeros(self.num_genes, dtype=np.int64))
        totals = _accumulate_gene_stats(block, *stats)
        counts = [c.take_counts() for c in self.cleaners]
        return a, block.indptr, block.indices, block.data, totals, stats, counts

    def run(self, workers: int):
        """The prepared blocks in order, from this process or ``workers`` forked ones."""
        return _ordered_map(self.prepare, range(0, len(self.final_cells), self.block_cells), workers, self.sources)


def _accumulate_gene_stats(block: sp.csr_matrix, g_sum, g_sq, g_n, rows_per_step: int = 4096) -> np.ndarray:
    """Add a block's per-gene sums (of total-normalised values) in place; return the per-cell totals.

    Works through the block in slices of rows so that its float64 temporaries stay small.
    """
    totals = np.zeros(block.shape[0], dtype=np.float64)
    G = len(g_sum)
    for r0 in range(0, block.shape[0], rows_per_step):
        r1 = min(r0 + rows_per_step, block.shape[0])
        a, b = block.indptr[r0], block.indptr[r1]
        lens = np.diff(block.indptr[r0 : r1 + 1])
        data, idx = block.data[a:b], block.indices[a:b]
        tot = np.bincount(np.repeat(np.arange(r1 - r0), lens), weights=data, minlength=r1 - r0)
        totals[r0:r1] = tot
        scale = np.divide(_STATS_TARGET, tot, out=np.zeros_like(tot), where=tot > 0)
        v = data * np.repeat(scale, lens)
        g_sum += np.bincount(idx, weights=v, minlength=G)
        g_sq += np.bincount(idx, weights=v * v, minlength=G)
        g_n += np.bincount(idx, minlength=G)
    return totals.astype(np.float32)


# A source whose rows, in destination order, come in windows shorter than this on average is read
# sequentially once into on-disk buckets (an external sort) instead of window by window.
_MIN_MEAN_WINDOW = 32


def _scattered_sources(sources, final_cells: np.ndarray, src_of: np.ndarray, offsets: np.ndarray, block_cells: int) -> set:
    """Sources that window-by-window reading would read almost row by row (counted block by block,
    as pass 2 reads them: each input's rows of a block, ascending, split where they jump)."""
    from .sources import MAX_GAP

    n_src = len(sources)
    windows = np.zeros(n_src, dtype=np.int64)
    for a in range(0, len(final_cells), block_cells):
        src = src_of[a : a + block_cells].astype(np.int64)
        rows = final_cells[a : a + block_cells] - offsets[src]
        o = np.lexsort((rows, src))
        src, rows = src[o], rows[o]
        first = np.concatenate([[True], (np.diff(src) != 0) | (np.diff(rows) > MAX_GAP)])
        windows += np.bincount(src[first], minlength=n_src)
    cells = np.array([s.num_cells for s in sources])
    out = set()
    for s, src in enumerate(sources):
        if src.kind == "anndata":  # in memory: random access is cheap
            continue
        if src.kind == "datasets":  # a stream reads forward only: always bucketed through the spool
            out.add(s)
            continue
        if cells[s] and cells[s] / windows[s] < _MIN_MEAN_WINDOW:
            out.add(s)
    return out


def _group_ids(key: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(key, return_inverse=True)`` with int32 ids, by a lookup table when the key space
    is small (no sort of the cells, no int64 inverse)."""
    if num_keys <= 1 << 24:
        present = np.zeros(num_keys, dtype=bool)
        present[key] = True
        group_keys = np.flatnonzero(present)
        lookup = np.zeros(num_keys, dtype=np.int32)
        lookup[group_keys] = np.arange(len(group_keys), dtype=np.int32)
        return group_keys, lookup[key]
    group_keys, gid = np.unique(key, return_inverse=True)
    return group_keys, gid.astype(np.int32)


class _Spool:
    """Rows bucketed on disk by destination block: one append-only file of CSR records per block."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True)

    def write(self, block: int, positions: np.ndarray, m: sp.csr_matrix) -> None:
        # one file per (block, process): parallel bucketing never appends to another process's file
        with open(self.folder / f"{block}.{os.getpid()}.bin", "ab") as f:
            f.write(np.array([len(positions), m.nnz], dtype=np.int64).tobytes())
            f.write(np.asarray(positions, dtype=np.int64).tobytes())
            f.write(np.diff(m.indptr).astype(np.int64).tobytes())
            f.write(m.indices.astype(np.int32).tobytes())
            f.write(m.data.astype(np.float32).tobytes())

    def read(self, block: int, num_genes: int) -> tuple[np.ndarray, sp.csr_matrix]:
        paths = sorted(self.folder.glob(f"{block}.*.bin"))
        if not paths:
            return np.zeros(0, dtype=np.int64), sp.csr_matrix((0, num_genes), dtype=np.float32)
        buf = b"".join(path.read_bytes() for path in paths)  # record order does not matter: rows carry positions
        for path in paths:
            path.unlink()  # each bucket is read once: free the disk as the build goes
        pos, lens, idx, dat, off = [], [], [], [], 0
        while off < len(buf):
            n, nnz = np.frombuffer(buf, dtype=np.int64, count=2, offset=off)
            off += 16
            for store, dtype, count in ((pos, np.int64, n), (lens, np.int64, n), (idx, np.int32, nnz), (dat, np.float32, nnz)):
                store.append(np.frombuffer(buf, dtype=dtype, count=int(count), offset=off))
                off += int(count) * np.dtype(dtype).itemsize
        lens = np.concatenate(lens)
        indptr = np.concatenate([[0], np.cumsum(lens)])
        m = sp.csr_matrix((np.concatenate(dat), np.concatenate(idx), indptr), shape=(len(lens), num_genes))
        return np.concatenate(pos), m

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _check_controls(groups: pd.DataFrame, control_label: str) -> None:
    by = groups.groupby(["dataset", "context"], sort=True)["is_control"]
    has_ctrl = by.any()
    has_pert = (~groups["is_control"]).groupby([groups["dataset"], groups["context"]], sort=True).any()
    lacking = has_pert & ~has_ctrl
    if lacking.any():
        where = [f"{d}/{c}" for d, c in lacking[lacking].index]
        raise ValueError(
            f"no control cells (label {control_label!r}) in {len(where)} (dataset/context) with perturbed cells: "
            f"{_show(where)}; every context with perturbed cells needs its controls"
        )


def ensure_atlas(path, built_dir, *, progress: bool = True, log=print, changed: str = "rebuild", **build_kwargs):
    """An atlas to train on from ``path``: an atlas as it is (local, or an object-store URI), or an
    ``.h5ad`` built once into ``built_dir``.

    ``built_dir/<stem>.zarr`` is reused when it is complete and was built from this very input with
    these ``build_atlas`` arguments (``<stem>.source.json`` records the file's path, size and
    modification time and the arguments). Otherwise it is (re)built, or, with ``changed="error"``
    (a resumed run, which must go on with the data it started with), refused naming the input.
    """
    import json

    from ..files import atomic_json
    from .store import Atlas, AtlasError

    location = as_location(path)
    if not isinstance(location, Path):  # an object store: an atlas as it is (Atlas checks it)
        if str(location).endswith(".h5ad"):
            raise ValueError(f"{location}: an .h5ad in an object store is not read directly; build an atlas from a "
                             f"local copy (`perturbdiff atlas build COPY.h5ad -o {str(location)[:-5]}.zarr`) and "
                             "train on that")
        return str(location)
    path = location
    if not path.exists():
        raise FileNotFoundError(f"atlas {path} does not exist (build one with `perturbdiff atlas build`)")
    if path.suffix != ".h5ad":
        return path
    built = Path(built_dir) / f"{path.stem}.zarr"
    record = Path(built_dir) / f"{path.stem}.source.json"
    stat = path.stat()
    source = json.loads(json.dumps({"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                    "build": build_kwargs}, default=str))
    if built.exists():
        try:
            Atlas(built)
            if record.is_file() and json.loads(record.read_text()) == source:
                return built
            if changed == "error":
                raise ValueError(f"{path} changed since this run built its atlas {built} (or was built with other column "
                                 "flags): a resumed run must go on with the data it started with; start a new run "
                                 "(--overwrite or another --output-dir)")
            log(f"{path} is not the input {built} was built from (or the column flags differ): rebuilding it")
        except AtlasError:
            pass
    log(f"building atlas {built} from {path}")
    build_atlas(path, built, overwrite=True, progress=progress, **build_kwargs)
    atomic_json(record, source)
    return built
