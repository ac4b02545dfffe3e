"""Input readers for the atlas builder: ``.h5ad`` files (read backed, row windows at a time),
in-memory AnnData objects, and Hugging Face ``datasets`` parquet in the Tahoe-100M layout.

Every source exposes the same small interface: ``num_cells``, ``obs_columns``, ``obs_column(name)``,
``obs_names()``, ``gene_names()`` and ``read_rows(rows)``, which returns the given (ascending) rows as
a float32 CSR matrix (`name_bytes` gives a source's cell names as UTF-8 bytes, in chunks where the
source can). ``read_rows`` reads contiguous windows of rows, so that when the input is
already roughly grouped the builder reads it sequentially; scattered rows cost more reads, never more
memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["H5adSource", "AnnDataSource", "ParquetSource", "SomaSource", "StreamingSource", "open_sources", "row_windows",
           "name_bytes"]

# Rows further apart than this are read as separate windows; closer ones share a read (at most
# MAX_GAP unneeded rows are read per needed row, which bounds the waste).
MAX_GAP = 4
# Rows per window read, so a window's transient memory is bounded whatever the input's size.
MAX_WINDOW_ROWS = 8192
# Dense inputs are read in windows of at most this many bytes.
DENSE_WINDOW_BYTES = 64 << 20


def row_windows(rows: np.ndarray, max_gap: int = MAX_GAP, max_rows: int = MAX_WINDOW_ROWS):
    """Split ascending row numbers into windows ``(first, last, positions)`` read with one read each."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > max_gap) + 1
    out = []
    for seg in np.split(np.arange(len(rows)), breaks):
        # further split long segments so each read stays bounded
        for i in range(0, len(seg), max_rows):
            pos = seg[i : i + max_rows]
            out.append((int(rows[pos[0]]), int(rows[pos[-1]]), pos))
    return out


def _csr(data, indices, indptr, shape) -> sp.csr_matrix:
    m = sp.csr_matrix((np.asarray(data, dtype=np.float32), np.asarray(indices), np.asarray(indptr)), shape=shape)
    return m


def compact_names(names) -> np.ndarray:
    """Cell names as UTF-8 bytes in a numpy ``S`` array (a few bytes per cell instead of a Python string)."""
    return np.char.encode(np.asarray(names, dtype=object).astype(str), "utf-8")


# Names decoded into Python strings at a time by `name_bytes` (a source of 20M cells never holds
# 20M Python strings).
NAME_CHUNK = 1 << 20


def name_bytes(src) -> np.ndarray:
    """A source's cell names as UTF-8 bytes (``S``): in chunks where it can (`H5adSource`), else whole."""
    chunked = getattr(src, "obs_name_chunks", None)
    parts = [compact_names(c) for c in chunked()] if chunked is not None else [compact_names(src.obs_names())]
    if not parts:
        return np.zeros(0, dtype="S1")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _as_str(values) -> np.ndarray:
    """Object array of str; missing values become None."""
    s = pd.Series(values)
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(object)
    mask = s.isna().to_numpy()
    out = s.astype(str).to_numpy(dtype=object)
    out[mask] = None
    return out


class H5adSource:
    """An ``.h5ad`` file read backed through h5py: obs columns one by one, X in row windows.

    Args:
        path: the file.
        layer: None for ``X``, ``"raw"`` for ``raw/X`` (with ``raw/var``), or a ``layers`` key.
        gene_key: a var column holding the gene names (default: var's index).
    """

    kind = "h5ad"

    def __init__(self, path, *, layer: str | None = None, gene_key: str | None = None):
        import h5py

        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"input {self.path} does not exist")
        # A large chunk cache makes scattered row reads from compressed files hit decoded chunks.
        try:
            self.file = h5py.File(self.path, "r", rdcc_nbytes=16 << 20, rdcc_nslots=10007)
        except OSError as err:
            raise ValueError(f"input {self.path} is not a readable .h5ad file (empty, truncated or not HDF5): {err}") from None
        f = self.file
        if layer in (None, "X"):
            xkey, vkey = "X", "var"
        elif layer == "raw":
            xkey, vkey = "raw/X", "raw/var"
        else:
            xkey, vkey = f"layers/{layer}", "var"
        if xkey not in f:
            present = ["X"] + (["raw"] if "raw" in f else []) + [f"layers/{k}" for k in f.get("layers", {})]
            raise ValueError(f"{self.name}: no matrix '{xkey}' (layer={layer!r}); matrices present: {present}")
        self.layer = layer
        self._vkey = vkey
        self._gene_key = gene_key
        X = f[xkey]
        enc = X.attrs.get("encoding-type", X.attrs.get("h5sparse_format", "array"))
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if isinstance(X, h5py.Group):
            if enc in ("csc_matrix", "csc"):
                raise ValueError(
                    f"{self.name}: '{xkey}' is stored as CSC, which cannot be read cell by cell in bounded memory; "
                    "convert it to CSR first (e.g. adata.X = adata.X.tocsr(); adata.write_h5ad(...))"
                )
            self.sparse = True
            self._indptr, self._indices, self._data = X["indptr"], X["indices"], X["data"]
            shape = X.attrs["shape"]
            self.num_cells, self.num_genes = int(shape[0]), int(shape[1])
        else:
            self.sparse = False
            self._X = X
            self.num_cells, self.num_genes = (int(v) for v in X.shape)
        self._obs = f["obs"]

    # -- obs / var ---------------------------------------------------------------------------------

    @property
    def obs_columns(self) -> list[str]:
        order = self._obs.attrs.get("column-order", [])
        return [str(c) for c in order] if len(order) else [k for k in self._obs.keys() if k != self._index_key()]

    def _index_key(self) -> str:
        return str(self._obs.attrs.get("_index", "_index"))

    def obs_column(self, name: str):
        from anndata.io import read_elem

        return read_elem(self._obs[name])

    def obs_names(self) -> np.ndarray:
        from anndata.io import read_elem

        return _as_str(read_elem(self._obs[self._index_key()]))

    def obs_name_chunks(self):
        """The cell names in chunks of `NAME_CHUNK` (an index stored as a plain string array; any
        other encoding is read whole)."""
        import h5py

        index = self._obs[self._index_key()]
        if not isinstance(index, h5py.Dataset) or index.dtype.kind not in "OSU":
            yield self.obs_names()
            return
        strings = index.asstr() if index.dtype.kind in "OS" else index
        for a in range(0, self.num_cells, NAME_CHUNK):
            yield _as_str(strings[a : a + NAME_CHUNK])

    def gene_names(self) -> np.ndarray:
        from anndata.io import read_elem

        var = self.file[self._vkey]
        key = self._gene_key or str(var.attrs.get("_index", "_index"))
        if key not in var:
            cols = [str(c) for c in var.attrs.get("column-order", [])]
            raise ValueError(f"{self.name}: var has no column '{key}' (--gene-key); columns present: {cols}")
        return _as_str(read_elem(var[key]))

    # -- X -----------------------------------------------------------------------------------------

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        parts = []
        for first, last, pos in row_windows(rows):
            local = rows[pos] - first
            if self.sparse:
                ip = self._indptr[first : last + 2].astype(np.int64)
                a, b = int(ip[0]), int(ip[-1])
                m = _csr(self._data[a:b], self._indices[a:b], ip - a, (last - first + 1, self.num_genes))
                parts.append(m[local] if len(local) != last - first + 1 else m)
            else:
                step = max(1, DENSE_WINDOW_BYTES // (4 * max(self.num_genes, 1)))
                for i in range(0, len(local), step):
                    sub = local[i : i + step]
                    block = np.asarray(self._X[first + sub[0] : first + sub[-1] + 1], dtype=np.float32)
                    parts.append(sp.csr_matrix(block[sub - sub[0]]))
        if not parts:
            return sp.csr_matrix((0, self.num_genes), dtype=np.float32)
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def close(self) -> None:
        self.file.close()

    def reopen(self) -> None:
        """Open the file again (a forked build process opens its own HDF5 handle)."""
        self.__init__(self.path, layer=self.layer, gene_key=self._gene_key)


class AnnDataSource:
    """An AnnData object in memory (used by the synthetic recipe and by Python callers)."""

    kind = "anndata"

    def __init__(self, adata, *, name: str = "adata", layer: str | None = None, gene_key: str | None = None):
        self.adata = adata
        self.name = name
        self.path = None
        if layer in (None, "X"):
            X, var = adata.X, adata.var
        elif layer == "raw":
            if adata.raw is None:
                raise ValueError(f"{name}: layer='raw' but the AnnData has no .raw")
            X, var = adata.raw.X, adata.raw.var
        else:
            if layer not in adata.layers:
                raise ValueError(f"{name}: no layer '{layer}'; layers present: {list(adata.layers)}")
            X, var = adata.layers[layer], adata.var
        self.layer = layer
        self._X = X
        self._var = var
        self._gene_key = gene_key
        self.num_cells, self.num_genes = X.shape
        self.sparse = sp.issparse(X)

    @property
    def obs_columns(self) -> list[str]:
        return [str(c) for c in self.adata.obs.columns]

    def obs_column(self, name: str):
        return self.adata.obs[name].to_numpy() if not isinstance(self.adata.obs[name].dtype, pd.CategoricalDtype) else self.adata.obs[name].array

    def obs_names(self) -> np.ndarray:
        return _as_str(self.adata.obs_names)

    def gene_names(self) -> np.ndarray:
        if self._gene_key is None:
            return _as_str(self._var.index)
        if self._gene_key not in self._var.columns:
            raise ValueError(f"{self.name}: var has no column '{self._gene_key}' (--gene-key); columns present: {list(self._var.columns)}")
        return _as_str(self._var[self._gene_key])

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        X = self._X[rows]
        return sp.csr_matrix(X, dtype=np.float32) if not sp.isspmatrix_csr(X) or X.dtype != np.float32 else X

    def close(self) -> None:
        pass


class _ListLayout:
    """What the Tahoe-layout sources share: one row per cell with a gene-id list, a parallel
    expression list and metadata columns; the metadata columns are obs, the cells' default names
    are ``"<stem>:<row>"``."""

    def _list_columns(self, names: list[str], genes_column: str, expressions_column: str, obs_names_key) -> None:
        for col, flag in ((genes_column, "--genes-column"), (expressions_column, "--expressions-column")):
            if col not in names:
                raise ValueError(f"{self.name}: no column '{col}' ({flag}); columns present: {names}")
        self._genes_col, self._expr_col = genes_column, expressions_column
        self._columns = [c for c in names if c not in (genes_column, expressions_column)]
        self._obs_names_key = obs_names_key

    @property
    def obs_columns(self) -> list[str]:
        return list(self._columns)

    def obs_names(self) -> np.ndarray:
        if self._obs_names_key is not None:
            if self._obs_names_key not in self._columns:
                raise ValueError(f"{self.name}: no column '{self._obs_names_key}'; columns present: {self._columns}")
            return _as_str(self.obs_column(self._obs_names_key))
        return np.array([f"{self.stem}:{i}" for i in range(self.num_cells)], dtype=object)

    def gene_names(self) -> np.ndarray:
        return self._gene_names


class ParquetSource(_ListLayout):
    """Hugging Face ``datasets`` parquet in the Tahoe-100M layout: one row per cell with a list of gene
    ids, a parallel list of expression values, and metadata columns (drug, cell_line_id, plate, ...).

    Tahoe-100M prefixes each cell's lists with a CLS token whose expression is negative (-2); a
    negative *first* value is dropped as that token, any other negative value is invalid input.
    Gene ids are looked up in ``gene_metadata`` (a parquet/CSV table with ``gene_id_column`` and
    ``gene_name_column``, e.g. Tahoe's ``metadata/gene_metadata.parquet`` with ``token_id`` and
    ``gene_symbol`` or ``ensembl_id``); without it the gene names are the ids themselves.

    Args:
        path: a ``.parquet`` file.
        genes_column, expressions_column: the two list columns.
        obs_names_key: a column with unique cell ids (default: ``"<file stem>:<row>"``).
    """

    kind = "parquet"

    def __init__(
        self,
        path,
        *,
        genes_column: str = "genes",
        expressions_column: str = "expressions",
        gene_metadata=None,
        gene_id_column: str = "token_id",
        gene_name_column: str = "gene_symbol",
        obs_names_key: str | None = None,
    ):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.name, self.stem = str(self.path), self.path.stem
        if not self.path.is_file():
            raise FileNotFoundError(f"input {self.path} does not exist")
        self.layer = None
        self.file = pq.ParquetFile(self.path)
        self._list_columns(list(self.file.schema_arrow.names), genes_column, expressions_column, obs_names_key)
        self.num_cells = self.file.metadata.num_rows
        rg_rows = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self._rg_start = np.concatenate([[0], np.cumsum(rg_rows)]).astype(np.int64)
        self._cache: tuple[int, sp.csr_matrix] | None = None
        max_id = -1
        if gene_metadata is None:
            for batch in self.file.iter_batches(columns=[genes_column], batch_size=65536):
                max_id = _largest_id(batch.column(0), max_id)
        self._lookup, self._gene_names = _gene_lookup(gene_metadata, gene_id_column, gene_name_column, max_id)
        self.num_genes = len(self._gene_names)
        self.sparse = True

    def obs_column(self, name: str):
        return self.file.read(columns=[name]).column(0).to_pandas().to_numpy()

    def _row_group(self, i: int) -> sp.csr_matrix:
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        table = self.file.read_row_group(i, columns=[self._genes_col, self._expr_col])
        m = _lists_to_csr(table.column(0), table.column(1), self._lookup, self.num_genes,
                          where=self.name, first_row=int(self._rg_start[i]), columns=(self._genes_col, self._expr_col))
        self._cache = (i, m)
        return m

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        parts = []
        rg = np.searchsorted(self._rg_start, rows, side="right") - 1
        for i in np.unique(rg):
            sel = rows[rg == i] - self._rg_start[i]
            parts.append(self._row_group(int(i))[sel])
        if not parts:
            return sp.csr_matrix((0, self.num_genes), dtype=np.float32)
        return sp.vstack(parts, format="csr")

    def close(self) -> None:
        self._cache = None


class StreamingSource(_ListLayout):
    """A Hugging Face ``datasets`` source in the Tahoe-100M layout, read as a stream, never whole.

    ``spec`` is a Hub dataset id (``tahoebio/Tahoe-100M``), a local folder or file pattern of parquet
    that `datasets.load_dataset` reads, or a `datasets.IterableDataset` / `datasets.Dataset` object.
    It is opened with ``streaming=True``, so a 100M-row source is read batch by batch: one pass over
    the metadata columns (kept in memory as the builder's obs, a few bytes per cell) and one ordered
    pass over the gene/expression lists, which the builder buckets into its on-disk spool (see
    `perturbdiff.data.builder`). Rows are as in `ParquetSource` (the leading CLS token dropped, gene
    ids named through ``gene_metadata``; without it, the ids are the names and an extra pass over the
    gene lists finds the largest id).

    Args:
        spec: the dataset (see above).
        split: the split to read (``"train"``; Tahoe-100M has only that).
        data_dir: a sub-folder of the dataset (e.g. ``"data"``), passed to `datasets.load_dataset`.
        batch_rows: rows per streamed batch.
        other arguments: as `ParquetSource`.
    """

    kind = "datasets"

    def __init__(self, spec, *, split: str = "train", data_dir: str | None = None, genes_column: str = "genes",
                 expressions_column: str = "expressions", gene_metadata=None, gene_id_column: str = "token_id",
                 gene_name_column: str = "gene_symbol", obs_names_key: str | None = None, batch_rows: int = 65536):
        import datasets

        if isinstance(spec, (datasets.IterableDataset, datasets.Dataset)):
            ds, self.name = spec, f"datasets:{getattr(spec.info, 'dataset_name', None) or 'dataset'}"
            if isinstance(ds, datasets.Dataset):
                ds = ds.to_iterable_dataset()
        else:
            self.name = f"hf://{spec}"
            try:
                ds = datasets.load_dataset(str(spec), split=split, data_dir=data_dir, streaming=True)
            except Exception as err:
                raise ValueError(f"{self.name}: cannot open it as a Hugging Face dataset (split {split!r}): "
                                 f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
        self.path, self.layer, self.sparse = None, None, True
        self.stem = self.name.rstrip("/").rsplit("/", 1)[-1]  # the default dataset name
        self.ds, self.batch_rows = ds, int(batch_rows)
        self._list_columns(list(ds.column_names or ds.features or []), genes_column, expressions_column, obs_names_key)
        # The metadata pass: every non-list column, batch by batch (and the largest gene id if needed).
        parts: dict[str, list] = {c: [] for c in self._columns}
        max_id, n = -1, 0
        scan = self._columns + ([] if gene_metadata is not None else [genes_column])
        for batch in self._batches(scan):
            for c in self._columns:
                parts[c].append(pd.Categorical(batch.column(c).to_pandas()) if _is_text(batch.column(c)) else
                                batch.column(c).to_numpy(zero_copy_only=False))
            if gene_metadata is None:
                max_id = _largest_id(batch.column(genes_column), max_id)
            n += batch.num_rows
        self.num_cells = n
        self._obs = {c: _concat(v) for c, v in parts.items()}
        self._lookup, self._gene_names = _gene_lookup(gene_metadata, gene_id_column, gene_name_column, max_id)
        self.num_genes = len(self._gene_names)
        self._stream = None  # (iterator, next row, pending CSR rows)

    def _batches(self, columns):
        it = self.ds.select_columns(list(columns)).with_format("arrow").iter(batch_size=self.batch_rows)
        try:
            yield from it
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def obs_column(self, name: str):
        return self._obs[name]

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Consecutive rows, in order: a stream reads forward (the builder's spool pass reads so)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sp.csr_matrix((0, self.num_genes), dtype=np.float32)
        if np.any(np.diff(rows) != 1):
            raise ValueError(f"{self.name}: a streamed source is read in consecutive rows")
        if self._stream is None or self._stream[1] > rows[0]:
            self._stream = [self._batches([self._genes_col, self._expr_col]), 0, None]
        it, pos, pending = self._stream
        out = []
        need_from, need_to = int(rows[0]), int(rows[-1]) + 1
        while pos < need_to:
            if pending is None:
                batch = next(it, None)
                if batch is None:
                    raise ValueError(f"{self.name}: the stream ended at row {pos}, before row {need_to - 1}")
                pending = _lists_to_csr(batch.column(0), batch.column(1), self._lookup, self.num_genes, where=self.name,
                                        first_row=pos, columns=(self._genes_col, self._expr_col))
            a, b = max(need_from - pos, 0), min(need_to - pos, pending.shape[0])
            if b > a:
                out.append(pending[a:b])
            if need_to - pos >= pending.shape[0]:
                pos, pending = pos + pending.shape[0], None
            else:
                pending, pos = pending[need_to - pos :], need_to
        self._stream = [it, pos, pending]
        return out[0] if len(out) == 1 else sp.vstack(out, format="csr")

    def close(self) -> None:
        self._stream = None


class SomaSource:
    """A TileDB-SOMA experiment (the CELLxGENE Census format), optionally filtered on obs.

    The filter is a SOMA ``value_filter`` on obs, the query a user writes against the Census (e.g.
    ``is_primary_data == True and tissue_general == 'blood'``). Only the matching cells' joinids are
    held (8 bytes a cell); obs columns are read one at a time for those cells, and X in row windows
    by joinid, so memory stays bounded by the builder's block size.

    Args:
        uri: the experiment (a local path or any URI tiledbsoma opens, e.g. ``s3://``).
        measurement: the measurement holding the RNA data (``"RNA"``).
        layer: the X layer (default: ``"raw"`` if present, else ``"data"``, else the only one).
        obs_filter: the obs value filter (None: every cell).
        gene_key: the var column with gene names (default: ``var_id``, else ``feature_name``).
    """

    kind = "soma"

    def __init__(self, uri: str, *, measurement: str = "RNA", layer: str | None = None,
                 obs_filter: str | None = None, gene_key: str | None = None):
        try:
            import tiledbsoma
        except ImportError as err:
            raise ValueError(f"soma://{uri}: reading TileDB-SOMA needs the soma extra: pip install 'perturbdiff[soma]'") from err
        self.uri, self.name, self.path, self.sparse = str(uri), f"soma://{uri}", None, True
        self.stem = self.uri.rstrip("/").rsplit("/", 1)[-1]
        if not tiledbsoma.Experiment.exists(self.uri):
            raise FileNotFoundError(f"input {self.name}: no SOMA experiment there")
        self.exp = tiledbsoma.Experiment.open(self.uri)
        if measurement not in self.exp.ms:
            raise ValueError(f"{self.name}: no measurement {measurement!r}; measurements: {list(self.exp.ms.keys())}")
        ms = self.exp.ms[measurement]
        layers = list(ms.X.keys())
        if layer is None:
            layer = next((name for name in ("raw", "data") if name in layers), layers[0] if len(layers) == 1 else None)
            if layer is None:
                raise ValueError(f"{self.name}: several X layers {layers}; choose one with --layer")
        elif layer not in layers:
            raise ValueError(f"{self.name}: no X layer {layer!r} (--layer); layers: {layers}")
        self.layer, self._X = layer, ms.X[layer]
        try:
            query = self.exp.axis_query(measurement, obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter))
            self._joinids = np.sort(query.obs_joinids().to_numpy().astype(np.int64))
        except Exception as err:
            raise ValueError(f"{self.name}: querying obs with the filter {obs_filter!r} failed (a filter that does not "
                             f"parse or names no obs column fails here): {str(err).splitlines()[0]}") from err
        self.num_cells = len(self._joinids)
        if self.num_cells == 0:
            raise ValueError(f"{self.name}: the obs filter {obs_filter!r} matches no cells")
        self._columns = [c for c in self.exp.obs.schema.names if c not in ("soma_joinid", "obs_id")]
        var = ms.var.read().concat().to_pandas()
        key = gene_key or next((c for c in ("var_id", "feature_name") if c in var.columns), None)
        if key not in var.columns:
            raise ValueError(f"{self.name}: var has no column {key!r} (--gene-key); columns: {list(var.columns)}")
        self._gene_names = _as_str(var[key])
        var_ids = var["soma_joinid"].to_numpy().astype(np.int64)
        self._var_lookup = np.full(int(var_ids.max()) + 1, -1, dtype=np.int64)
        self._var_lookup[var_ids] = np.arange(len(var_ids))
        self.num_genes = len(var_ids)

    @property
    def obs_columns(self) -> list[str]:
        return list(self._columns)

    def _obs(self, name: str) -> np.ndarray:
        out = []
        step = 1 << 20
        for a in range(0, self.num_cells, step):
            ids = self._joinids[a : a + step]
            t = self.exp.obs.read(coords=(ids,), column_names=["soma_joinid", name]).concat().to_pandas()
            out.append(t.set_index("soma_joinid")[name].reindex(ids).to_numpy())
        return np.concatenate(out)

    def obs_column(self, name: str):
        return self._obs(name)

    def obs_names(self) -> np.ndarray:
        if "obs_id" in self.exp.obs.schema.names:
            return _as_str(self._obs("obs_id"))
        return np.array([f"{self.stem}:{j}" for j in self._joinids], dtype=object)

    def gene_names(self) -> np.ndarray:
        return self._gene_names

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64)
        parts = []
        for first, last, pos in row_windows(rows, max_gap=1 << 30):  # one windowed read per bounded block
            ids = self._joinids[rows[pos]]
            t = self._X.read(coords=(ids, slice(None))).tables().concat()
            r = np.searchsorted(ids, t.column("soma_dim_0").to_numpy())
            c = self._var_lookup[t.column("soma_dim_1").to_numpy()]
            m = sp.csr_matrix((t.column("soma_data").to_numpy().astype(np.float32), (r, c)), shape=(len(ids), self.num_genes))
            m.sum_duplicates()
            parts.append(m)
        if not parts:
            return sp.csr_matrix((0, self.num_genes), dtype=np.float32)
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def close(self) -> None:
        self.exp.close()


def _is_text(column) -> bool:
    import pyarrow as pa

    t = column.type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)


def _concat(parts: list):
    if parts and isinstance(parts[0], pd.Categorical):
        return pd.api.types.union_categoricals(parts)  # text columns stay categorical: bytes per cell
    return np.concatenate(parts) if parts else np.zeros(0)


def _largest_id(genes, current: int) -> int:
    """The larger of ``current`` and the largest id in a list column (pyarrow list array or chunks)."""
    import pyarrow as pa

    if isinstance(genes, pa.ChunkedArray):
        genes = genes.combine_chunks()
    values = genes.values.to_numpy(zero_copy_only=False)
    return max(current, int(values.max())) if len(values) else current


def _gene_lookup(gene_metadata, gene_id_column: str, gene_name_column: str, max_id: int):
    """(id -> column lookup, gene names): from a gene metadata table, or the ids 0..max_id themselves."""
    if gene_metadata is not None:
        table = _read_table(gene_metadata)
        for col in (gene_id_column, gene_name_column):
            if col not in table.columns:
                raise ValueError(f"{gene_metadata}: no column '{col}'; columns present: {list(table.columns)}")
        ids = table[gene_id_column].to_numpy().astype(np.int64)
        lookup = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        lookup[ids] = np.arange(len(ids))
        return lookup, _as_str(table[gene_name_column])
    return np.arange(max_id + 1, dtype=np.int64), np.array([str(i) for i in range(max_id + 1)], dtype=object)


def _lists_to_csr(genes, expr, lookup: np.ndarray, num_genes: int, *, where: str, first_row: int,
                  columns: tuple[str, str]) -> sp.csr_matrix:
    """Rows of (gene-id list, expression list) pairs (pyarrow list arrays) as a float32 CSR matrix.

    Tahoe-100M's leading CLS token (a negative expression in the first position) is dropped; gene
    ids map to columns through ``lookup``. A row whose two lists differ in length, or a gene id
    without a name, is an error naming the row (``first_row`` + its position).
    """
    import pyarrow as pa

    genes = genes.combine_chunks() if isinstance(genes, pa.ChunkedArray) else genes
    expr = expr.combine_chunks() if isinstance(expr, pa.ChunkedArray) else expr
    offsets = genes.offsets.to_numpy().astype(np.int64)
    e_off = expr.offsets.to_numpy().astype(np.int64)
    offsets, e_off = offsets - offsets[0], e_off - e_off[0]
    if not np.array_equal(e_off, offsets):
        row = int(np.flatnonzero(np.diff(e_off) != np.diff(offsets))[0])
        raise ValueError(f"{where}: row {first_row + row}: '{columns[0]}' has {int(np.diff(offsets)[row])} gene ids "
                         f"but '{columns[1]}' has {int(np.diff(e_off)[row])} values")
    gid = genes.values.to_numpy(zero_copy_only=False)[genes.offsets[0].as_py():][: offsets[-1]].astype(np.int64)
    val = expr.values.to_numpy(zero_copy_only=False)[expr.offsets[0].as_py():][: offsets[-1]].astype(np.float32)
    n = len(offsets) - 1
    # Drop Tahoe's leading CLS token (negative expression in the first position).
    lengths = np.diff(offsets)
    first = offsets[:-1][lengths > 0]
    cls = first[val[first] < 0]
    if len(cls):
        keep = np.ones(len(val), dtype=bool)
        keep[cls] = False
        row_of = np.repeat(np.arange(n), lengths)
        gid, val = gid[keep], val[keep]
        offsets = np.concatenate([[0], np.cumsum(np.bincount(row_of[keep], minlength=n))])
    bad = (gid < 0) | (gid >= len(lookup))
    col = np.full(len(gid), -1, dtype=np.int64)
    col[~bad] = lookup[gid[~bad]]
    if np.any(col < 0):
        unknown = np.unique(gid[col < 0])[:10].tolist()
        raise ValueError(f"{where}: gene ids {unknown} are not in the gene metadata")
    m = _csr(val, col.astype(np.int32), offsets, (n, num_genes))
    m.sum_duplicates()  # also sorts the gene indices of each row
    return m


def _read_table(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gene metadata {path} does not exist")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".txt") else ",")


HF_PREFIX = "hf://"
SOMA_PREFIX = "soma://"


def _is_hf_dataset(item) -> bool:
    mod = type(item).__module__ or ""
    return mod.startswith("datasets.") and type(item).__name__ in ("IterableDataset", "Dataset")


def open_sources(inputs, *, layer=None, gene_key=None, parquet_options: dict | None = None,
                 soma_options: dict | None = None) -> list:
    """Open the inputs: paths to ``.h5ad``/``.parquet`` files, folders of them, AnnData objects,
    ``hf://<Hub dataset id or local parquet folder>`` or `datasets` objects (streamed), or
    ``soma://<experiment URI>`` (TileDB-SOMA; ``soma_options``: measurement, obs_filter)."""
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not items:
        raise ValueError("no inputs given")
    sources = []
    for i, item in enumerate(items):
        if hasattr(item, "obs") and hasattr(item, "X"):
            sources.append(AnnDataSource(item, name=f"adata{i}", layer=layer, gene_key=gene_key))
            continue
        if isinstance(item, str) and item.startswith(SOMA_PREFIX):
            sources.append(SomaSource(item[len(SOMA_PREFIX):], layer=layer, gene_key=gene_key, **(soma_options or {})))
            continue
        if _is_hf_dataset(item) or (isinstance(item, str) and item.startswith(HF_PREFIX)):
            spec = item[len(HF_PREFIX):] if isinstance(item, str) else item
            sources.append(StreamingSource(spec, **(parquet_options or {})))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".h5ad", ".parquet"))
            if not files:
                raise FileNotFoundError(f"input folder {path} has no .h5ad or .parquet files")
        elif path.exists():
            files = [path]
        else:
            raise FileNotFoundError(f"input {path} does not exist")
        for f in files:
            if f.suffix == ".parquet":
                sources.append(ParquetSource(f, **(parquet_options or {})))
            elif f.suffix == ".h5ad":
                sources.append(H5adSource(f, layer=layer, gene_key=gene_key))
            else:
                raise ValueError(f"input {f}: unsupported file type (expected .h5ad or .parquet)")
    return sources
