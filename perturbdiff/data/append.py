"""Appending sources to an existing local atlas, so a corpus grows source by source.

``build_atlas(new_inputs, "corpus.zarr", append=True)`` (``perturbdiff atlas build NEW.h5ad -o
corpus.zarr --append``) builds the new inputs on their own (a hidden scratch atlas beside the corpus,
with the same builder, so every check and option of a build applies), then adds them to the corpus:

- **X is not rewritten**: the new cells' rows go after the old ones in X, in every obs column and in
  the cell names; of X only each array's last, partial shard is written again (its other shards are
  hard links). The obs columns (a few bytes per cell), var and the group index are copied and
  extended. So an append needs the memory of building the new source, whatever the size of the atlas
  (`loader_throughput.py --grow`); its time grows with the atlas by a copy of the obs columns and one
  pass over the old cell names (checked against the new ones).
- **Atomic**: the work happens in a hidden sibling folder in which the X shard files the append
  never writes (all but the last of each array: nearly all the bytes) are hard links to the atlas's,
  and every other file is a copy; it is swapped into place only when complete, as a build is. An
  interrupted, refused or failed append leaves the atlas as it was (a test checks its files byte for
  byte), and an exclusive lock (``.NAME.lock``) refuses a second append of the same atlas meanwhile.
- **New datasets only**: the appended cells must belong to datasets the corpus does not have yet
  (each file's stem by default, or ``--dataset-name`` / ``--dataset-key``), so every group stays one
  contiguous row range; the genes must be the corpus's (any order); the new inputs' control label is
  renamed to the corpus's. If any appended cell name is already in the corpus, every appended name
  is qualified with its dataset (``pbmc2:AAAC-1``; a build qualifies names that repeat across its
  inputs with the input's name).
- The per-gene statistics and the highly variable genes are recomputed over all cells from the two
  atlases' stored means and variances (float32: the combined figures agree with a build of all inputs
  to ~1e-6 relative; the HVG flags can differ only for genes tied at the cut).

An atlas that a training is reading should not be appended to meanwhile (the swap replaces its
files under the reader). An object-store atlas is not appended to: there is no rename there, so an interrupted append could
not be undone; build the new source as its own atlas and let the loader mix them (``--atlas a b``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["append_to_atlas"]


def append_to_atlas(target, inputs, *, progress: bool = True, **build_kwargs) -> Path:
    """Add ``inputs`` (anything `build_atlas` takes) to the complete local atlas ``target``.

    ``build_kwargs`` are `build_atlas`'s (column mapping, counts, genes, storage); the highly variable
    genes are re-selected with the target's ``n_top_genes``. Returns the target's path.
    """
    from .builder import build_atlas
    from .remote import as_location, is_remote, scratch_path
    from .store import Atlas

    location = as_location(target)
    if is_remote(location):
        raise ValueError(f"{location}: appending to an atlas in an object store is not supported (no rename there, so "
                         "an interrupted append could not be undone); build the new source as its own atlas and train "
                         "on both (--atlas A B)")
    old = Atlas(location)  # complete, readable, format checked
    path = old.path
    run_id = uuid.uuid4().hex[:8]
    # the datasets the inputs will form, where they are known before the build (a name, or file stems)
    if build_kwargs.get("dataset_key") is None:
        names = ([build_kwargs["dataset_name"]] if build_kwargs.get("dataset_name") is not None else
                 [Path(x).stem for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs])
                  if isinstance(x, (str, os.PathLike)) and Path(x).is_file()])
        clash = sorted(set(names) & set(old.groups["dataset"]))
        if clash:
            raise ValueError(_dataset_clash(path, clash))
    build_kwargs["n_top_genes"] = int(old.metadata.get("build", {}).get("n_top_genes", 2000))
    scratch = scratch_path(path, f"append-{run_id}.zarr")
    partial = path.parent / f".{path.name}.partial-{run_id}"
    lock = _lock(path)  # one append at a time: a second one would swap in an atlas without the first's cells
    try:
        build_atlas(inputs, scratch, progress=progress, overwrite=True, **build_kwargs)
        new = Atlas(scratch)
        clash = sorted(set(new.groups["dataset"]) & set(old.groups["dataset"]))
        if clash:
            raise ValueError(_dataset_clash(path, clash))
        gene_map = _gene_map(old, new)
        _link_tree(path, partial)
        _merge(old, new, partial, gene_map, build_kwargs["n_top_genes"], progress=progress)
        # Someone else appended meanwhile: swapping would lose their cells.
        now = Atlas(path)
        if (now.num_cells, now.metadata.get("created"), now.metadata.get("appended")) != (
            old.num_cells, old.metadata.get("created"), old.metadata.get("appended")
        ):
            raise ValueError(f"{path} changed while this append ran (a build with --overwrite); nothing was written, "
                             "run the append again")
        from .store import swap_into_place

        swap_into_place(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        Path(lock.name).unlink(missing_ok=True)
        lock.close()
    return path


def _lock(path: Path):
    """An exclusive lock on ``.NAME.lock`` beside the atlas (released when the returned file closes);
    another append of the same atlas is refused while it is held."""
    import fcntl

    handle = open(path.parent / f".{path.name}.lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(f"another append to {path} is running (it holds .{path.name}.lock); run this one after it") from None
    return handle


def _dataset_clash(path, names) -> str:
    return (f"{path} already has dataset(s) {names[:5]}; appended cells must form new datasets (each input's stem, "
            "--dataset-name or --dataset-key), so that each group stays one contiguous row range")


def _gene_map(old, new) -> np.ndarray | None:
    """For each of ``new``'s genes its column in ``old`` (None: same order)."""
    a, b = pd.Index(old.gene_names.astype(str)), pd.Index(new.gene_names.astype(str))
    if a.equals(b):
        return None
    if len(a) != len(b) or set(a) != set(b):
        missing, extra = len(set(a) - set(b)), len(set(b) - set(a))
        raise ValueError(f"the appended inputs' genes differ from {old.path}'s ({missing} missing, {extra} extra); an "
                         "atlas holds one gene set: build the new source as its own atlas and let the loader map both "
                         "into a shared vocabulary (--atlas A B)")
    return a.get_indexer(b).astype(np.int32)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` in which the shard files of X that an append never writes (all
    but the last of each array: nearly all the bytes) are hard links; every other file (metadata,
    obs, var, the group index, each array's last shard) is copied, so that no write of the append,
    whatever the zarr version does on a write, can reach a file of ``src``."""
    shared = set()
    for name in ("data", "indices", "indptr"):
        folder = src / "X" / name / "c"
        shards = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) if folder.is_dir() else []
        shared.update(shards[:-1])
    for folder, _dirs, files in os.walk(src):
        rel = Path(folder).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            source = Path(folder) / f
            if source in shared:
                try:
                    os.link(source, dst / rel / f)
                    continue
                except OSError as err:
                    raise OSError(f"cannot hard-link {source} into {dst} ({err}): appending needs a file system with "
                                  "hard links (else it would copy the whole atlas); build the new source as its own "
                                  "atlas and train on both (--atlas A B)") from err
            shutil.copy2(source, dst / rel / f)


def _merge(old, new, partial: Path, gene_map, n_top_genes: int, *, progress: bool) -> None:
    import warnings

    import scipy.sparse as sp
    from anndata.io import read_elem, write_elem
    from tqdm.auto import tqdm

    from .builder import gene_table
    from .store import _ATTR, _GROUPS_PATH, AtlasCorruptError, _Appender, _zarr

    root = _zarr().open_group(str(partial), mode="r+")
    n_old, n_new, g = old.num_cells, new.num_cells, old.num_genes
    nnz_old = int(old.metadata["nnz"])

    # ---- X: the new rows after the old ones (only the last partial shard of each array is rewritten)
    arrays = {k: root[f"X/{k}"] for k in ("data", "indices", "indptr")}
    app = {k: _Appender(a, (a.shards or a.chunks)[0], written=a.shape[0]) for k, a in arrays.items()}
    nnz = nnz_old
    step = 1 << 14
    bar = tqdm(total=n_new, unit="cell", unit_scale=True, disable=not progress, desc=f"append to {old.path.name}")
    for a in range(0, n_new, step):
        b = min(a + step, n_new)
        indptr, indices, data = new.read_rows(a, b)
        if gene_map is not None:
            m = sp.csr_matrix((data, gene_map[indices], indptr), shape=(b - a, g))
            m.sort_indices()
            indices, data = m.indices, m.data
        app["data"].append(data)
        app["indices"].append(indices)
        app["indptr"].append(indptr[1:] + nnz)
        nnz += int(indptr[-1])
        bar.update(b - a)
    bar.close()
    for a_ in app.values():
        a_.close()
    root["X"].attrs["shape"] = [n_old + n_new, g]

    # ---- obs: every column extended by the new cells' values (old values are not read back)
    obs_old, obs_new = root["obs"], _group(new.path)["obs"]
    control = old.control_label
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's zarr-v3 autosharding notice
        for col in obs_old.attrs["column-order"]:
            node, values = obs_old[col], read_elem(obs_new[col])
            kind = node.attrs.get("encoding-type")
            if kind == "categorical":
                if col == "perturbation" and new.control_label != control:
                    values = values.rename_categories({new.control_label: control})
                cats = list(node["categories"][:])
                seen = set(cats)
                added = [c for c in values.categories if c not in seen]
                cats += added
                codes = pd.Index(cats).get_indexer(values.categories)[values.codes]
                if len(cats) - 1 > np.iinfo(node["codes"].dtype).max:  # the codes need a wider type: rewrite them
                    old_codes = node["codes"][:]
                    write_elem(obs_old, col, pd.Categorical.from_codes(np.concatenate([old_codes, codes]), categories=cats))
                    continue
                _extend(node["codes"], n_old, codes)
                if added:
                    node["categories"].resize((len(cats),))
                    node["categories"][:] = np.asarray(cats, dtype=object)
            elif kind == "array":
                _extend(node, n_old, np.asarray(values) + (len(old.groups) if col == "group" else 0))
            else:
                raise AtlasCorruptError(f"{old.path}: obs column {col!r} has encoding {kind!r}, not one the builder writes")
    names = _new_names(old, new)
    index = obs_old["_index"]
    index.resize((n_old + n_new,))
    chunk = 1 << 16
    for a in range(0, n_new, chunk):
        index[n_old + a : n_old + min(a + chunk, n_new)] = np.char.decode(names[a : a + chunk], "utf-8").astype(object)

    # ---- the group index, var, metadata
    groups = new.groups.copy()
    groups[["start", "stop"]] += n_old
    if new.control_label != control:
        groups["perturbation"] = groups["perturbation"].replace({new.control_label: control})
    groups = pd.concat([old.groups, groups], ignore_index=True)
    groups.index = groups.index.astype(str)
    n = n_old + n_new
    va, vb = old.var, new.var.loc[old.var.index]
    # the two atlases' sums and sums of squares, back from their stored means and variances
    sums = [(v["mean"].to_numpy(np.float64) * k, (v["variance"].to_numpy(np.float64) * (k - 1) / max(k, 1)
             + v["mean"].to_numpy(np.float64) ** 2) * k) for v, k in ((va, n_old), (vb, n_new))]
    var_df = gene_table(sums[0][0] + sums[1][0], sums[0][1] + sums[1][1],
                        va["n_cells"].to_numpy() + vb["n_cells"].to_numpy(), n, n_top_genes, va.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_elem(root, "var", var_df)
        write_elem(root[_GROUPS_PATH.rsplit("/", 1)[0]], "groups", groups)
    import datetime as _dt

    meta = dict(old.metadata)
    meta.update(num_cells=n, nnz=nnz, num_groups=len(groups), sources=list(meta.get("sources", [])) + list(new.metadata["sources"]))
    meta["appended"] = list(meta.get("appended", [])) + [{
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cells": n_new, "first_row": n_old, "datasets": sorted(set(new.groups["dataset"])),
        "sources": [s["name"] for s in new.metadata["sources"]], "build": new.metadata.get("build", {}),
    }]
    meta["complete"] = True
    root.attrs.update({_ATTR: meta})


def _extend(array, n_old: int, values: np.ndarray) -> None:
    """Write ``values`` after the first ``n_old`` entries of a 1-D zarr array (its old chunks but the
    last are not touched)."""
    array.resize((n_old + len(values),))
    array[n_old:] = values.astype(array.dtype)


def _new_names(old, new) -> np.ndarray:
    """The appended cells' names (UTF-8 bytes). If any is already in ``old``, every appended name is
    qualified with its dataset (``b:AAAC-1``), as the builder qualifies names that repeat across
    inputs; checked on 64-bit hashes, confirmed on the names, the old names read a chunk at a time."""
    from .builder import _fnv1a
    from .sources import compact_names

    names = compact_names(_group(new.path)["obs/_index"][:])
    for qualified in (False, True):
        if qualified:
            from anndata.io import read_elem

            datasets = compact_names(read_elem(_group(new.path)["obs/dataset"]))
            names = np.char.add(np.char.add(datasets, b":"), names)
        hashes, index, step = _fnv1a(names), _group(old.path)["obs/_index"], 1 << 20
        for a in range(0, old.num_cells, step):
            part = compact_names(index[a : a + step])
            hit = np.isin(hashes, _fnv1a(part))
            if hit.any() and np.isin(names[hit], part).any():
                break
        else:
            return names
    raise ValueError(f"appended cell names repeat names of {old.path} even when qualified with their dataset "
                     f"(e.g. {names[hit][np.isin(names[hit], part)][0].decode()!r}); make them unique first")


def _group(path):
    from .store import _zarr

    return _zarr().open_group(str(path), mode="r")
