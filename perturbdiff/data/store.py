"""The atlas store: AnnData's on-disk Zarr (v3) layout plus a group index.

An atlas is one Zarr store that ``anndata.read_zarr`` opens as an ordinary AnnData:

```
atlas.zarr/
  zarr.json            root attributes: AnnData's encoding plus "perturbdiff" (format version,
                       sources, build parameters, and "complete": true, written last)
  X/                   raw counts as CSR: data float32, indices int32, indptr int64
                       (chunked, Blosc-zstd compressed, CRC32C-checked, sharded)
  obs/                 dataset, context, perturbation, batch (categorical), dose, is_control,
                       total_counts, group
  var/                 gene names (index) + per-gene statistics and "highly_variable"
  uns/perturbdiff/groups   the group index: one row per group with its row range [start, stop)
```

The cells of one group (dataset, context, perturbation, dose, batch) are contiguous, so a cell set
is one contiguous read of ``indptr`` and one of ``data``/``indices``.

`AtlasWriter` streams CSR blocks into a temporary sibling store and renames it into place only
after the completeness marker is written, so an interrupted build never leaves a store that looks
complete. `Atlas` opens a store for reading and refuses incomplete, unknown or damaged stores with
messages that name the store and the array.

The module is longer than most (~570 lines): the writer, the reader and the shard reader share the
on-disk layout they must agree on byte for byte, so they stay together.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .remote import RemoteStoreError, as_location, is_remote, location_name
from .remote import explain as explain_remote_error

__all__ = [
    "FORMAT_VERSION",
    "GROUP_KEYS",
    "Atlas",
    "AtlasWriter",
    "AtlasError",
    "AtlasIncompleteError",
    "AtlasCorruptError",
    "open_atlas",
]

FORMAT_VERSION = 1
_ATTR = "perturbdiff"
# A group is one (dataset, context, perturbation, dose, batch); dose refines the issue's
# (dataset, context, perturbation, batch) so that a set never mixes doses (it is 0 without a dose column).
GROUP_KEYS = ("dataset", "context", "perturbation", "dose", "batch")
_GROUPS_PATH = "uns/perturbdiff/groups"


class AtlasError(ValueError):
    """A store that is not a usable PerturbDiff atlas."""


class AtlasIncompleteError(AtlasError):
    """The store's build did not finish (no completeness marker)."""


class AtlasCorruptError(AtlasError):
    """A chunk of the store could not be read or failed its checksum."""


def _zarr():
    import zarr

    return zarr


CODECS = ("zstd", "lz4")


def _codecs(codec: str = "zstd"):
    from zarr.codecs import BloscCodec, Crc32cCodec

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    # Blosc with byte shuffle: zstd (level 3) compresses integer-valued float32 counts and sorted gene
    # indices tightly and decodes at GB/s; lz4 decodes ~1.5x faster for ~1.8x the bytes. The CRC32C
    # turns silent corruption into a read error.
    level = 3 if codec == "zstd" else 5
    return (BloscCodec(cname=codec, clevel=level, shuffle="shuffle"), Crc32cCodec())


class _Appender:
    """Appends to a 1-D zarr array in whole shards, so each shard file is written exactly once (after
    ``written`` values already there, the first write completes their last, partial shard)."""

    def __init__(self, array, shard_elems: int, written: int = 0):
        self.array = array
        self.shard_elems = shard_elems
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.written = int(written)

    def append(self, values: np.ndarray) -> None:
        if len(values):
            self.parts.append(np.asarray(values, dtype=self.array.dtype))
            self.buffered += len(values)
        whole = (self.written + self.buffered) // self.shard_elems * self.shard_elems - self.written
        if whole > 0:
            self._write(whole)

    def close(self) -> None:
        if self.buffered:
            self._write(self.buffered)

    def _write(self, n: int) -> None:
        buf = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        out, rest = buf[:n], buf[n:]
        self.array.resize((self.written + n,))
        self.array[self.written : self.written + n] = out
        self.written += n
        self.parts = [rest] if len(rest) else []
        self.buffered = len(rest)


class AtlasWriter:
    """Streams a cells × genes CSR matrix, in final row order, into a new atlas store.

    Rows are appended block by block with `append`; `finish` writes obs, var, the group index and the
    metadata, sets the completeness marker last and renames the temporary store into place. Used as a
    context manager, an exception removes the temporary store.

    Args:
        path: the atlas to create (conventionally ``*.zarr``): a local path, or an object-store URI
            (``s3://bucket/pbmc.zarr``; written in place, valid once the marker is written).
        num_genes: number of columns of X.
        chunk_elems: values per compressed chunk of ``X/data`` and ``X/indices`` (a set read decodes
            only the chunks it touches, so smaller chunks mean less wasted decoding).
        shard_chunks: chunks per shard file (sharding keeps the file count low on large atlases).
        codec: "zstd" (compact, the default) or "lz4" (faster to decode, larger).
        overwrite: replace an existing store at ``path`` (only once the new one is complete).
    """

    def __init__(
        self,
        path,
        *,
        num_genes: int,
        chunk_elems: int = 32768,
        shard_chunks: int = 128,
        indptr_chunk: int = 4096,
        codec: str = "zstd",
        overwrite: bool = False,
    ):
        zarr = _zarr()
        compressors = _codecs(codec)
        self.location = as_location(path)
        self.remote = is_remote(self.location)
        self.run_id = uuid.uuid4().hex[:8]  # names this build's scratch (partial store, spool)
        if self.remote:
            # No rename on an object store: the atlas is written in place and only the completeness
            # marker, written last, makes it valid.
            self.path = self.location.uri
            if self.location.any():
                # Replacing would delete the old atlas before the new one is complete (no rename on
                # an object store): a failed build would then lose both. The user deletes it, knowingly.
                raise ValueError(f"{self.path} already exists; an atlas in an object store is not replaced in place "
                                 "(the old one would be gone before the new one is complete): build to a new prefix, "
                                 "or delete this one first (e.g. `aws s3 rm --recursive`)")
            store = self.location.zarr_store(read_only=False)
        else:
            self.path = self.location
            if self.path.exists() and not overwrite:
                raise ValueError(f"{self.path} already exists; pass overwrite=True (--overwrite) to replace it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.parent / f".{self.path.name}.partial-{self.run_id}"
            store = str(self.tmp)
        self.num_genes = int(num_genes)
        self.num_cells = 0
        self.nnz = 0
        self._closed = False
        self.root = zarr.open_group(
            store,
            mode="w-",
            zarr_format=3,
            attributes={
                "encoding-type": "anndata",
                "encoding-version": "0.1.0",
                _ATTR: {"format_version": FORMAT_VERSION, "complete": False},
            },
        )
        X = self.root.create_group(
            "X", attributes={"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [0, self.num_genes]}
        )
        self._X = X
        cfg = {"write_empty_chunks": True}  # every chunk exists, so a missing file is detectable
        shard = chunk_elems * shard_chunks
        # indptr is read 257 values at a time: small chunks, many per shard (1M cells per file)
        ip_shard = indptr_chunk * 256
        self.layout = {
            "chunk_elems": chunk_elems,
            "shard_elems": shard,
            "indptr_chunk": indptr_chunk,
            "indptr_shard": ip_shard,
            "codec": f"blosc({codec},shuffle)+crc32c",
        }
        mk = lambda name, dtype, c, s: X.create_array(  # noqa: E731
            name, shape=(0,), dtype=dtype, chunks=(c,), shards=(s,), compressors=compressors, fill_value=0, config=cfg
        )
        self._data = _Appender(mk("data", "float32", chunk_elems, shard), shard)
        self._indices = _Appender(mk("indices", "int32", chunk_elems, shard), shard)
        self._indptr = _Appender(mk("indptr", "int64", indptr_chunk, ip_shard), ip_shard)
        self._indptr.append(np.zeros(1, dtype=np.int64))

    def append(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Append a CSR block of rows (``indptr`` starts at 0, indices sorted within each row)."""
        indptr = np.asarray(indptr, dtype=np.int64)
        self._data.append(np.asarray(data, dtype=np.float32))
        self._indices.append(np.asarray(indices, dtype=np.int32))
        self._indptr.append(indptr[1:] + self.nnz)
        self.nnz += int(indptr[-1])
        self.num_cells += len(indptr) - 1

    def finish(self, *, obs, obs_names, var: pd.DataFrame, groups: pd.DataFrame, metadata: dict):
        """Write obs/var/uns and the metadata, mark the store complete, and move it into place (local;
        returns the Path) or leave it where it is (an object store; returns the URI).

        ``obs`` maps each column name to its values (an array, a Categorical, or a function returning
        one, called when that column is written, so that the columns need not all exist at once);
        ``obs_names`` gives the cell names in row order as UTF-8 bytes (numpy ``S``), by slices
        (an ``S`` array, or anything with ``len`` and slicing), written in chunks so that millions of
        names never exist as Python strings all at once.
        """
        from anndata.io import write_elem

        if len(obs_names) != self.num_cells or len(var) != self.num_genes:
            raise RuntimeError(f"obs/var sizes {len(obs_names)}/{len(var)} do not match X {self.num_cells}x{self.num_genes}")
        for appender in (self._data, self._indices, self._indptr):
            appender.close()
        self._X.attrs["shape"] = [self.num_cells, self.num_genes]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's zarr-v3 autosharding notice
            # obs in AnnData's dataframe encoding; the columns through anndata, the index by hand
            group = self.root.create_group(
                "obs",
                attributes={"_index": "_index", "column-order": list(obs), "encoding-type": "dataframe", "encoding-version": "0.2.0"},
            )
            for col, values in obs.items():
                values = values() if callable(values) else values
                if len(values) != self.num_cells:
                    raise RuntimeError(f"obs column {col!r} has {len(values)} values for {self.num_cells} cells")
                write_elem(group, col, values)
                del values
            step = 1 << 16
            index = group.create_array(
                "_index",
                shape=(self.num_cells,),
                dtype=str,
                chunks=(max(1, min(step, self.num_cells)),),
                attributes={"encoding-type": "string-array", "encoding-version": "0.2.0"},
            )
            for a in range(0, self.num_cells, step):
                index[a : a + step] = np.char.decode(obs_names[a : a + step], "utf-8").astype(object)
            write_elem(self.root, "var", var)
            write_elem(self.root, "uns", {"perturbdiff": {"groups": groups}})
            for name in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(self.root, name, {})
        meta = {
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "num_cells": self.num_cells,
            "num_genes": self.num_genes,
            "nnz": self.nnz,
            "num_groups": len(groups),
            "layout": self.layout,
            **metadata,
            "complete": True,  # the completeness marker: written last, in the same update
        }
        self.root.attrs.update({_ATTR: meta})
        if self.remote:
            self._closed = True
            return self.path
        swap_into_place(self.tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Remove the temporary store (nothing is left at ``path``)."""
        if not self._closed:
            if self.remote:
                self.location.delete_all()
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def swap_into_place(complete: Path, path: Path) -> None:
    """Move the complete store ``complete`` to ``path``; an existing atlas there is removed only once
    the new one is in place (a crash between the two renames leaves it beside ``path`` as ``.NAME.old-*``)."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(complete, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_MAX_UINT64 = 2**64 - 1


def _fast_layout(arr) -> tuple[int, int] | None:
    """(chunk, shard) if ``arr`` has exactly the codec layout `AtlasWriter` writes, else None."""
    meta = arr.metadata.to_dict()
    codecs = meta.get("codecs") or ()
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or len(arr.shape) != 1:
        return None
    if meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}:
        return None
    cfg = codecs[0]["configuration"]
    inner = [c["name"] for c in cfg["codecs"]]
    index = [c["name"] for c in cfg["index_codecs"]]
    little = all(c.get("configuration", {}).get("endian", "little") == "little" for c in cfg["codecs"] + cfg["index_codecs"] if c["name"] == "bytes")
    if inner != ["bytes", "blosc", "crc32c"] or index != ["bytes", "crc32c"] or cfg["index_location"] != "end" or not little:
        return None
    return int(cfg["chunk_shape"][0]), int(arr.shards[0])


class _LocalFiles:
    """Byte reads of a local store's files (kept open, at most 64 at once)."""

    def __init__(self, root: Path):
        self.root = root
        self._fds: dict[str, int] = {}

    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            if len(self._fds) >= 64:  # bound open files: close the oldest
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.root / key, os.O_RDONLY)
            self._fds[key] = fd
        return fd

    def read_suffix(self, key: str, nbytes: int) -> bytes:
        """The last ``nbytes`` (the whole file if it is shorter, as an object store's suffix range)."""
        fd = self._fd(key)
        return os.pread(fd, nbytes, max(os.fstat(fd).st_size - nbytes, 0))

    def read_ranges(self, key: str, ranges) -> list[bytes]:
        fd = self._fd(key)
        return [os.pread(fd, n, a) for a, n in ranges]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _ShardReader:
    """Reads element ranges of one 1-D sharded array straight from its shard objects.

    zarr-python spends about half a millisecond of Python and asyncio overhead per read, and a cell
    set needs six reads; for the exact layout `AtlasWriter` writes (Blosc + CRC32C chunks inside
    shards with a CRC32C-checked index at the end) this reader fetches the shard index (cached) and
    the needed chunks of each shard in one call (``pread`` on a local store; one coalesced range
    request on an object store), verifies each checksum and Blosc-decodes them. Any other layout is
    read through zarr.

    Args:
        files: the store's bytes: `_LocalFiles` or a `remote.RemoteStore`.
        where: the store, for messages.
    """

    def __init__(self, files, where: str, name: str, arr, chunk: int, shard: int):
        self.files, self.where, self.name = files, where, name
        self.dtype = np.dtype(arr.dtype)
        self.length = int(arr.shape[0])
        self.chunk, self.per_shard = chunk, shard // chunk
        self._index: dict[int, np.ndarray] = {}

    def _error(self, what: str, shard: int) -> AtlasCorruptError:
        return AtlasCorruptError(f"atlas {self.where}: array '{self.name}' has a corrupt or truncated chunk ({what} in {self.name}/c/{shard})")

    def _key(self, shard: int) -> str:
        return f"{self.name}/c/{shard}"

    def _missing(self, shard: int) -> AtlasCorruptError:
        return AtlasCorruptError(f"atlas {self.where}: array '{self.name}' is missing chunk file {self.name}/c/{shard}")

    def _shard_index(self, shard: int) -> np.ndarray:
        index = self._index.get(shard)
        if index is None:
            import google_crc32c

            nbytes = self.per_shard * 16 + 4
            try:
                raw = self.files.read_suffix(self._key(shard), nbytes)
            except FileNotFoundError:
                raise self._missing(shard) from None
            if len(raw) != nbytes:
                raise self._error("file shorter than its index", shard)
            if np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:
                raise self._error("index checksum mismatch", shard)
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
            if len(self._index) >= 4096:
                self._index.pop(next(iter(self._index)))
            self._index[shard] = index
        return index

    def _chunks(self, first: int, last: int) -> list[np.ndarray]:
        """Chunks ``first..last`` decoded: one byte read per shard they lie in."""
        import google_crc32c
        from numcodecs import blosc

        out = []
        for shard in range(first // self.per_shard, last // self.per_shard + 1):
            a = max(first, shard * self.per_shard) - shard * self.per_shard
            b = min(last, (shard + 1) * self.per_shard - 1) - shard * self.per_shard
            index = self._shard_index(shard)
            ranges = []
            for local in range(a, b + 1):
                offset, nbytes = (int(v) for v in index[local])
                if offset == _MAX_UINT64:
                    raise self._error(f"chunk {local} absent", shard)
                ranges.append((offset, nbytes))
            try:
                raws = self.files.read_ranges(self._key(shard), ranges)
            except FileNotFoundError:
                raise self._missing(shard) from None
            for local, raw, (_, nbytes) in zip(range(a, b + 1), raws, ranges):
                if len(raw) != nbytes or nbytes < 4:
                    raise self._error(f"chunk {local} truncated", shard)
                body = raw[:-4]
                if np.uint32(google_crc32c.value(body)).tobytes() != raw[-4:]:
                    raise self._error(f"chunk {local} checksum mismatch", shard)
                try:
                    out.append(np.frombuffer(blosc.decompress(body), dtype=self.dtype))
                except Exception as err:
                    raise self._error(f"chunk {local} does not decode: {err}", shard) from err
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        c = self.chunk
        first, last = start // c, (stop - 1) // c
        parts = self._chunks(first, last)
        if first == last:
            return parts[0][start - first * c : stop - first * c].copy()
        return np.concatenate(parts)[start - first * c : stop - first * c]


class Atlas:
    """A PerturbDiff atlas opened for reading.

    Opening checks the format version, the completeness marker and (for local stores) that every
    chunk file of X exists; it reads only the small group index and gene names, never X.

    Args:
        path: the store.
        fast_reads: read X's shards directly (see `_ShardReader`) when the layout allows; False
            reads every chunk through zarr.

    Attributes:
        path: the store.
        metadata: the store's ``perturbdiff`` attributes (format version, sources, build parameters).
        groups: DataFrame, one row per group: dataset, context, perturbation, dose, batch,
            is_control, start, stop (its row range in X).
        gene_names: numpy array of the gene names (var index).
        num_cells, num_genes: X's shape.
    """

    def __init__(self, path, *, fast_reads: bool = True):
        zarr = _zarr()
        self.location = as_location(path)
        self.remote = is_remote(self.location)
        self.path = self.location.uri if self.remote else self.location
        self.fast_reads = fast_reads
        if not (self.location.exists() if self.remote else self.path.exists()):
            what = "(no zarr.json under that prefix)" if self.remote else ""
            raise FileNotFoundError(f"atlas {self.path} does not exist {what}".rstrip())
        try:
            store = self.location.zarr_store(read_only=True) if self.remote else str(self.path)
            root = zarr.open_group(store, mode="r")
        except RemoteStoreError:
            raise
        except Exception as err:  # not a zarr store at all
            if self.remote:  # or the store failed mid-open (timeout, throttling): say which, in one line
                raise explain_remote_error(self.path, err) from err
            raise AtlasError(f"{self.path} is not a Zarr store: {err}") from err
        meta = dict(root.attrs).get(_ATTR)
        if meta is None:
            raise AtlasError(
                f"{self.path} is not a PerturbDiff atlas (no '{_ATTR}' attributes); build one with `perturbdiff atlas build`"
            )
        if not meta.get("complete", False):
            raise AtlasIncompleteError(
                f"atlas {self.path} is incomplete: its build did not finish (no completeness marker); "
                "delete it and rebuild it with `perturbdiff atlas build`"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise AtlasError(
                f"atlas {self.path} has format version {meta.get('format_version')}; this PerturbDiff reads version "
                f"{FORMAT_VERSION}; rebuild it"
            )
        self.metadata = meta
        self._root = root
        self.num_cells = int(meta["num_cells"])
        self.num_genes = int(meta["num_genes"])
        self._arrays = {}
        for name in ("data", "indices", "indptr"):
            try:
                self._arrays[name] = root[f"X/{name}"]
            except Exception as err:
                raise AtlasCorruptError(f"atlas {self.path}: array 'X/{name}' is missing or unreadable: {err}") from err
        self._check_chunk_files()
        self._fast = {}
        files = self.location if self.remote else _LocalFiles(self.path)
        for name, arr in self._arrays.items():
            layout = _fast_layout(arr) if fast_reads else None
            if layout is not None:
                self._fast[name] = _ShardReader(files, str(self.path), f"X/{name}", arr, *layout)
        from anndata.io import read_elem

        try:
            self.groups = read_elem(root[_GROUPS_PATH])
            self.var = read_elem(root["var"])
        except Exception as err:
            raise AtlasCorruptError(f"atlas {self.path}: cannot read the group index or var: {err}") from err
        self.gene_names = np.asarray(self.var.index, dtype=object)
        self.control_label = meta.get("control_label")
        self._check_index()

    # -- integrity ---------------------------------------------------------------------------------

    def _check_index(self) -> None:
        """The arrays read at open agree with the metadata: a lost chunk reads as fill values, not an error."""
        where = f"atlas {self.path}"
        if self._arrays["indptr"].shape[0] != self.num_cells + 1:
            raise AtlasCorruptError(f"{where}: X/indptr has {self._arrays['indptr'].shape[0]} entries for {self.num_cells} cells")
        names = pd.Index(self.gene_names.astype(str))
        if len(names) != self.num_genes or not names.is_unique or (names == "").any():
            raise AtlasCorruptError(f"{where}: var holds {len(names)} gene names ({names.nunique()} distinct) for "
                                    f"{self.num_genes} genes: the var index is damaged; rebuild the atlas")
        g = self.groups
        start, stop = g["start"].to_numpy(np.int64), g["stop"].to_numpy(np.int64)
        order = np.argsort(start, kind="stable")
        bad = (start < 0) | (stop < start) | (stop > self.num_cells)
        overlap = stop[order][:-1] > start[order][1:]
        if bad.any() or overlap.any() or int((stop - start).sum()) != self.num_cells:
            raise AtlasCorruptError(f"{where}: the group index is damaged (row ranges out of bounds, overlapping or not "
                                    f"covering the {self.num_cells} cells); rebuild the atlas")

    def _check_chunk_files(self) -> None:
        # Zarr reads a missing chunk as zeros: check every expected shard file (object) exists.
        present = set(self.location.keys("X/")) if self.remote else None
        for name, arr in self._arrays.items():
            shard = (arr.shards or arr.chunks)[0]
            expected = -(-arr.shape[0] // shard)
            if self.remote:
                missing = [i for i in range(expected) if f"X/{name}/c/{i}" not in present]
            else:
                folder = self.path / "X" / name / "c"
                missing = [i for i in range(expected) if not (folder / str(i)).is_file()]
            if missing:
                raise AtlasCorruptError(
                    f"atlas {self.path}: array 'X/{name}' is missing {len(missing)} chunk file(s) "
                    f"(first: X/{name}/c/{missing[0]}); the store is damaged, rebuild it"
                )

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        fast = self._fast.get(name)
        if fast is not None:
            return fast.read(start, stop)
        try:
            return self._arrays[name][start:stop]
        except Exception as err:
            raise AtlasCorruptError(
                f"atlas {self.path}: array 'X/{name}' has a corrupt or truncated chunk "
                f"(reading elements {start}:{stop}): {type(err).__name__}: {err}"
            ) from err

    def validate(self, progress: bool = False) -> None:
        """Read every chunk of X (checksums included) and check the CSR structure; raise on damage."""
        from tqdm.auto import tqdm

        indptr_arr = self._arrays["indptr"]
        step = indptr_arr.chunks[0] * 64
        last = 0
        bar = tqdm(total=self.num_cells, unit="cell", disable=not progress, desc=f"validate {location_name(self.path)}")
        for a in range(0, self.num_cells, step):
            b = min(a + step, self.num_cells)
            ip = self._read("indptr", a, b + 1)
            if ip[0] != last or np.any(np.diff(ip) < 0):
                raise AtlasCorruptError(f"atlas {self.path}: array 'X/indptr' is inconsistent near row {a}")
            idx = self._read("indices", int(ip[0]), int(ip[-1]))
            dat = self._read("data", int(ip[0]), int(ip[-1]))
            if len(idx) and (idx.min() < 0 or idx.max() >= self.num_genes):
                raise AtlasCorruptError(f"atlas {self.path}: array 'X/indices' has out-of-range gene indices near row {a}")
            if not np.all(np.isfinite(dat)):
                raise AtlasCorruptError(f"atlas {self.path}: array 'X/data' has non-finite values near row {a}")
            last = int(ip[-1])
            bar.update(b - a)
        bar.close()
        if last != self._arrays["data"].shape[0]:
            raise AtlasCorruptError(f"atlas {self.path}: X/indptr ends at {last} but X/data has {self._arrays['data'].shape[0]}")

    # -- reading -----------------------------------------------------------------------------------

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``[start, stop)`` of X as CSR parts ``(indptr from 0, indices, data)``: three contiguous reads."""
        ip = self._read("indptr", start, stop + 1)
        a, b = int(ip[0]), int(ip[-1])
        return ip - a, self._read("indices", a, b), self._read("data", a, b)

    def read_obs(self, columns=None) -> pd.DataFrame:
        """The per-cell obs table (all cells: O(cells) memory; the loader never needs it)."""
        from anndata.io import read_elem

        obs = read_elem(self._root["obs"])
        return obs if columns is None else obs[list(columns)]

    def __repr__(self) -> str:
        return f"Atlas({str(self.path)!r}, cells={self.num_cells}, genes={self.num_genes}, groups={len(self.groups)})"

    @property
    def requests(self) -> int:
        """Range requests this atlas has made so far (an object store; 0 for a local one)."""
        return self.location.requests if self.remote else 0

    def __getstate__(self):
        # Zarr handles are re-opened in each process (DataLoader workers) rather than pickled.
        return {"path": self.path, "fast_reads": self.fast_reads}

    def __setstate__(self, state):
        self.__init__(state["path"], fast_reads=state.get("fast_reads", True))


def open_atlas(path) -> Atlas:
    """Open an atlas for reading (see `Atlas`)."""
    return Atlas(path)
