"""Loader and builder throughput and memory on large synthetic atlases; prints JSON.

    python benchmarks/loader_throughput.py --workdir /tmp/perturbdiff-bench          # ~10 min
    python benchmarks/loader_throughput.py --cells 200000 --big-copies 2 --no-gzip    # quick
    python benchmarks/loader_throughput.py --paired-only --cells 200000                # paired sets, ~3 min
    python benchmarks/loader_throughput.py --scale --scale-copies 20 --epoch-fraction 0.02   # 20M cells, ~30 min

What it measures (each in a fresh child process, so every peak RSS is that step's own):

- generation of a ``--cells`` x ``--genes`` synthetic ``.h5ad`` (uncompressed CSR counts) with its
  cells in the order a pooled screen's file has them: perturbations and cell types interleaved cell
  by cell (barcode order; ``--run-cells N`` writes runs of N cells of one group instead);
- the builder on it (``build_1m``) and on ``--big-copies`` copies of it as separate datasets
  (``build_4m``; the copies are symlinks, the atlas has ``big-copies`` x ``cells`` cells): time and
  peak RSS, beside the size of the input's X in memory;
- the loader (conditional sets of m=256 with their control sets, normalised dense tensors out,
  one process, no workers) on both atlases: cells/s counting x0 and control cells, and peak RSS;
  also with normalised CSR out (``sparse=True``, what the trainer streams to a GPU), with 2
  DataLoader workers, and (unless ``--no-lz4``) on a 1M atlas built with ``--codec lz4``;
- the reference way: the *same* sets (the loader's exact cells, via ``batch_rows``) read from the
  backed ``.h5ad`` through anndata (``adata[rows].X``), densified and normalised (or, beside the
  loader's sparse runs, normalised and left sparse); on the
  uncompressed input and, unless ``--no-gzip``, on a gzip-compressed copy (how h5ad files are often
  shipped); and, unless ``--no-grouped``, on a copy whose cells come in runs of 256 of one group (as
  files concatenated from wells or samples are; a different file, so it gets its own atlas and
  loader run): the most favourable layout for the reference, since a set is then a few
  near-contiguous row ranges.

Page caches are warm for every reader (the files were just written). Large files are deleted at the
end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- child steps ------------------------------------------------------------------------------------


def child_generate(a):
    from perturbdiff.data.synthetic import write_synthetic_h5ad

    t = time.time()
    write_synthetic_h5ad(a.output, num_cells=a.cells, num_genes=a.genes, compression=a.compression, seed=0,
                         run_cells=a.run_cells, progress=False)
    import h5py

    with h5py.File(a.output) as f:
        nnz = int(f["X/data"].shape[0])
    return {"seconds": time.time() - t, "nnz": nnz, "file_bytes": os.path.getsize(a.output)}


def child_build(a):
    from perturbdiff.data.builder import build_atlas
    from perturbdiff.data.synthetic import BUILD_COLUMNS

    base = _rss_mb()
    t = time.time()
    build_atlas(a.inputs, a.output, overwrite=True, progress=False, codec=a.codec, workers=a.build_workers, **BUILD_COLUMNS)
    seconds = time.time() - t
    out = {"seconds": seconds, "peak_rss_mb": _rss_mb(), "rss_after_import_mb": base,
           "atlas_bytes": sum(f.stat().st_size for f in Path(a.output).rglob("*") if f.is_file()),
           "workers": a.build_workers, "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    if a.digest:  # the atlas's content (every array's chunks, not the metadata with its creation time)
        digest = hashlib.sha256()
        for f in sorted(Path(a.output).rglob("*")):
            if f.is_file() and f.name != "zarr.json":
                digest.update(str(f.relative_to(a.output)).encode() + f.read_bytes())
        out["content_sha256"] = digest.hexdigest()
    return out


def child_append(a):
    from perturbdiff.data.builder import build_atlas
    from perturbdiff.data.synthetic import BUILD_COLUMNS

    t = time.time()
    build_atlas(a.inputs, a.output, append=True, progress=False, workers=a.build_workers, **BUILD_COLUMNS)
    return {"seconds": time.time() - t, "peak_rss_mb": _rss_mb(),
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _dataset(a):
    from perturbdiff.data.loader import CellSetDataset

    return CellSetDataset(a.atlas, set_size=a.set_size, batch_size=a.batch_size, seed=0, sparse=a.sparse,
                          pair_controls=a.pair)


def child_loader(a):
    ds = _dataset(a)
    base = _rss_mb()
    n_cells = 0
    if a.workers:
        it = iter(ds.loader(num_workers=a.workers, prefetch_factor=4))
    else:
        it = iter(ds)
    for _ in range(a.warmup):
        next(it)
    t = time.time()
    for _ in range(a.batches):
        b = next(it)
        n_cells += b["x0"].shape[0] * b["x0"].shape[1] + b["control"].shape[0] * b["control"].shape[1]
    dt = time.time() - t
    return {
        "cells_per_s": n_cells / dt,
        "sets_per_s": a.batches * a.batch_size / dt,
        "ms_per_batch": dt / a.batches * 1e3,
        "batches": a.batches,
        "workers": a.workers,
        "output": "sparse CSR" if a.sparse else "dense",
        "paired_controls": a.pair,
        "peak_rss_mb": _rss_mb(),
        "rss_after_import_mb": base,
        "num_sets_per_epoch": ds.num_sets,
    }


def child_reference(a):
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    import torch

    from perturbdiff.data.store import Atlas
    from perturbdiff.expression import Normalization, normalize_counts

    ds = _dataset(a)
    names = Atlas(a.atlas).read_obs([]).index
    adata = ad.read_h5ad(a.h5ad, backed="r")
    to_h5 = pd.Index(adata.obs_names).get_indexer(names)
    norm = Normalization()
    plans = [ds.batch_rows(a.warmup + i) for i in range(a.batches)]  # the loader's measured batches
    n_cells = 0
    t = time.time()
    for sets in plans:
        out = {}
        for key in ("x0", "control"):
            blocks = []
            for s in sets:
                rows = to_h5[s[key]]
                uniq, inverse = np.unique(rows, return_inverse=True)  # backed indexing wants sorted, unique rows
                x = adata[uniq].X
                if not a.sparse:
                    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
                blocks.append(x[inverse])
            if a.sparse:  # normalised CSR out, as the loader's sparse=True (no dense [B, m, G] write)
                x = sp.vstack(blocks, format="csr")
                lens = np.diff(x.indptr)
                totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
                scale = np.divide(norm.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
                values = np.log1p(x.data.astype(np.float32) * np.repeat(scale.astype(np.float32), lens)) / norm.scale
                out[key] = (torch.from_numpy(x.indptr.astype(np.int64)), torch.from_numpy(x.indices), torch.from_numpy(values))
                n_cells += x.shape[0]
                continue
            out[key] = normalize_counts(torch.from_numpy(np.stack(blocks)), norm)
            n_cells += out[key].shape[0] * out[key].shape[1]
    dt = time.time() - t
    return {"cells_per_s": n_cells / dt, "sets_per_s": a.batches * a.batch_size / dt, "ms_per_batch": dt / a.batches * 1e3,
            "batches": a.batches, "h5ad": str(a.h5ad), "output": "sparse CSR" if a.sparse else "dense",
            "peak_rss_mb": _rss_mb()}


def child_pairing(a):
    """The pairing alone on the loader's own sets: milliseconds per set (cdist + assignment)."""
    import torch

    from perturbdiff.data.pairing import pair_order

    ds = _dataset(argparse.Namespace(**{**vars(a), "pair": False}))
    it = iter(ds)
    batches = [next(it) for _ in range(a.batches)]
    t = time.time()
    for b in batches:
        pair_order(b["x0"], b["control"])
    dt = time.time() - t
    return {"ms_per_set": dt / (a.batches * a.batch_size) * 1e3, "sets": a.batches * a.batch_size, "torch_threads": torch.get_num_threads()}


def child_s3loader(a):
    """The 1M atlas's input built into moto's S3 server (its own process), then the loader from it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from atlas_reads import _s3_server

    from perturbdiff.data import Atlas
    from perturbdiff.data.builder import build_atlas
    from perturbdiff.data.synthetic import BUILD_COLUMNS

    with _s3_server() as bucket:
        uri = f"{bucket}/scale.zarr"
        t = time.time()
        build_atlas(a.inputs, uri, progress=False, **BUILD_COLUMNS)
        build_s = time.time() - t
        atlas = Atlas(uri)
        from perturbdiff.data.loader import CellSetDataset

        ds = CellSetDataset(atlas, set_size=a.set_size, batch_size=a.batch_size, seed=0)
        it = iter(ds)
        next(it)
        before, t, n = atlas.requests, time.time(), 0
        for _ in range(a.batches):
            b = next(it)
            n += b["x0"].shape[0] * b["x0"].shape[1] * 2
        dt = time.time() - t
        return {"build_seconds": build_s, "cells_per_s": n / dt, "batches": a.batches,
                "requests_per_set": (atlas.requests - before) / (a.batches * a.batch_size),
                "requests_per_set_counts": "a set and its control set", "peak_rss_mb": _rss_mb()}


def child_synthetic(a):
    from perturbdiff.data import make_synthetic_atlas

    t = time.time()
    make_synthetic_atlas(a.output, num_cells=a.cells, num_genes=a.genes, num_contexts=4, num_perturbations=20,
                         overwrite=True)
    return {"seconds": time.time() - t}


CHILDREN = {"generate": child_generate, "build": child_build, "loader": child_loader, "reference": child_reference,
            "pairing": child_pairing, "synthetic": child_synthetic, "s3loader": child_s3loader,
            "append": child_append}


def run_child(step: str, **kw) -> dict:
    args = [sys.executable, __file__, "--child", step]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, (list, tuple)):
            args += [flag, *map(str, v)]
        elif isinstance(v, bool):
            args += [flag] if v else []
        elif v is not None:
            args += [flag, str(v)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {step} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- driver ------------------------------------------------------------------------------------------


def _copy(link: Path, target: Path) -> Path:
    """``link`` as a symlink to ``target`` (another input file with the same cells)."""
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    return link


def _scale(a) -> int:
    """The scale check: atlases of 1x and ``--scale-copies``x ``--cells`` cells (the copies are symlinks
    of one generated input, each its own dataset), builder time and peak RSS for each, the loader's
    cells/s and peak RSS on each over ``--epoch-fraction`` of an epoch's sets, and the loader against
    moto's S3 server on the 1x atlas (cells/s, requests per set)."""
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    h5 = work / "input.h5ad"
    common = dict(set_size=a.set_size, batch_size=a.batch_size)
    out = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
           "config": {"cells": a.cells, "genes": a.genes, "copies": a.scale_copies, "set_size": a.set_size,
                      "batch_size": a.batch_size, "epoch_fraction": a.epoch_fraction}}
    if not (a.reuse and h5.exists()):
        _log(f"generating {a.cells:,} x {a.genes:,} h5ad")
        out["input"] = run_child("generate", output=h5, cells=a.cells, genes=a.genes, run_cells=a.run_cells)
    for name, copies in (("1x", 1), (f"{a.scale_copies}x", a.scale_copies)):
        inputs = []
        for i in range(copies):
            inputs.append(_copy(work / f"part{i:03d}.h5ad", h5))
        atlas = work / f"scale_{name}.zarr"
        _log(f"building {atlas.name} ({copies * a.cells:,} cells)")
        out[f"build_{name}"] = run_child("build", inputs=inputs, output=atlas)
        sets = copies * a.cells // a.set_size  # an epoch: every cell once in a set, about
        batches = max(1, int(a.epoch_fraction * sets / a.batch_size))
        _log(f"loader on {atlas.name}: {batches} batches")
        out[f"loader_{name}"] = run_child("loader", atlas=atlas, batches=batches, **common)
        if copies > 1:
            shutil.rmtree(atlas, ignore_errors=True)
    if not a.no_s3:
        _log("the 1x atlas built into moto's S3 server; loader from it")
        out["s3_1x"] = run_child("s3loader", inputs=[work / "part000.h5ad"], batches=a.s3_batches, **common)
    big = f"{a.scale_copies}x"
    out["summary"] = {
        "builder_peak_rss_mb": {k: out[f"build_{k}"]["peak_rss_mb"] for k in ("1x", big)},
        "builder_seconds": {k: out[f"build_{k}"]["seconds"] for k in ("1x", big)},
        "loader_peak_rss_mb": {k: out[f"loader_{k}"]["peak_rss_mb"] for k in ("1x", big)},
        "loader_cells_per_s": {k: out[f"loader_{k}"]["cells_per_s"] for k in ("1x", big)},
    }
    print(json.dumps(out, indent=2))
    return 0


def _grow(a) -> int:
    """A corpus grown source by source: one ``--cells`` input built, then ``--scale-copies`` - 1 copies
    (symlinks, each its own dataset) appended one at a time (``build_atlas(append=True)``): seconds and
    peak RSS of each append against the atlas's size before it (flat = the cost of an append does not
    grow with the corpus), and the loader's cells/s on the grown atlas."""
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    h5 = work / "input.h5ad"
    out = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
           "config": {"cells": a.cells, "genes": a.genes, "copies": a.scale_copies}}
    if not (a.reuse and h5.exists()):
        _log(f"generating {a.cells:,} x {a.genes:,} h5ad")
        out["input"] = run_child("generate", output=h5, cells=a.cells, genes=a.genes, run_cells=a.run_cells)
    atlas = work / "grown.zarr"
    steps = []
    for i in range(a.scale_copies):
        link = _copy(work / f"part{i:03d}.h5ad", h5)
        _log(f"{'building' if i == 0 else 'appending'} part {i} ({i * a.cells:,} cells before)")
        step = run_child("build" if i == 0 else "append", inputs=[link], output=atlas, build_workers=a.build_workers)
        steps.append({"cells_before": i * a.cells, **{k: step[k] for k in ("seconds", "peak_rss_mb", "worker_peak_rss_mb")}})
    sets = a.scale_copies * a.cells // a.set_size
    batches = max(1, int(a.epoch_fraction * sets / a.batch_size))
    out["loader"] = run_child("loader", atlas=atlas, batches=batches, set_size=a.set_size, batch_size=a.batch_size)
    out["steps"] = steps
    out["summary"] = {"append_seconds": [s["seconds"] for s in steps[1:]],
                      "append_peak_rss_mb": [s["peak_rss_mb"] for s in steps[1:]],
                      "first_build_peak_rss_mb": steps[0]["peak_rss_mb"],
                      "loader_cells_per_s": out["loader"]["cells_per_s"]}
    shutil.rmtree(atlas, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0


def _parallel_build(a) -> int:
    """The builder with 1 and 2 processes on the same interleaved input (so its rows are bucketed
    and read back, the common case of a pooled screen): seconds, peak RSS of the writing process and
    of a worker, and whether the two atlases have the same content."""
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    h5 = work / "input.h5ad"
    out = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
           "config": {"cells": a.cells, "genes": a.genes}}
    if not (a.reuse and h5.exists()):
        _log(f"generating {a.cells:,} x {a.genes:,} h5ad")
        out["input"] = run_child("generate", output=h5, cells=a.cells, genes=a.genes, run_cells=a.run_cells)
    for workers in (1, 2):
        _log(f"building with {workers} process(es)")
        out[f"build_{workers}"] = run_child("build", inputs=[h5], output=work / f"parallel_{workers}.zarr", build_workers=workers,
                                            digest=True)
        shutil.rmtree(work / f"parallel_{workers}.zarr", ignore_errors=True)
    out["summary"] = {
        "seconds": {w: out[f"build_{w}"]["seconds"] for w in (1, 2)},
        "speedup_2_vs_1": out["build_1"]["seconds"] / out["build_2"]["seconds"],
        "peak_rss_mb": {w: out[f"build_{w}"]["peak_rss_mb"] for w in (1, 2)},
        "worker_peak_rss_mb": out["build_2"]["worker_peak_rss_mb"],
        "same_content": out["build_1"]["content_sha256"] == out["build_2"]["content_sha256"],
    }
    print(json.dumps(out, indent=2))
    return 0


def _paired(a) -> int:
    """Paired control sets (what a ``paired_control`` model trains on) at m = ``--set-size``: the loader's
    cells/s with 0, 1 and 2 DataLoader workers, the pairing's own cost, and the projection to 16 cores
    from the per-worker throughput."""
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    atlas = work / "atlas_paired.zarr"
    common = dict(set_size=a.set_size, batch_size=a.batch_size, batches=a.batches)
    out = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
           "config": {"cells": a.cells, "genes": a.genes, "set_size": a.set_size, "batch_size": a.batch_size,
                      "cells_per_s_counts": "x0 + control cells, normalised dense float32 out"}}
    _log(f"building a {a.cells:,}-cell synthetic atlas")
    out["build"] = run_child("synthetic", output=atlas, cells=a.cells, genes=a.genes)
    out["unpaired_0_workers"] = run_child("loader", atlas=atlas, **common)
    for w in (0, 1, 2):
        _log(f"paired, {w} worker(s)")
        out[f"paired_{w}_workers"] = run_child("loader", atlas=atlas, pair=True, workers=w, **common)
    out["pairing"] = run_child("pairing", atlas=atlas, **common)
    paired0, unpaired0 = out["paired_0_workers"]["cells_per_s"], out["unpaired_0_workers"]["cells_per_s"]
    per_worker = out["paired_1_workers"]["cells_per_s"]
    out["summary"] = {
        "paired_cells_per_s_by_workers": {w: out[f"paired_{w}_workers"]["cells_per_s"] for w in (0, 1, 2)},
        "pairing_share_of_loader_time": 1 - paired0 / unpaired0,
        "pairing_ms_per_set": out["pairing"]["ms_per_set"],
        "pairing_share_of_training_step": 0.0,  # the trainer's step receives paired sets; it calls no pairing
        "projected_16_cores_cells_per_s": 16 * per_worker,
        "projection": "16 x the 1-worker figure (each worker one core; the main process only moves tensors)",
        "target_cells_per_s": 300_000,
    }
    print(json.dumps(out, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/perturbdiff-bench")
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--big-copies", type=int, default=4)
    p.add_argument("--set-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=60, help="loader batches measured")
    p.add_argument("--reference-batches", type=int, default=8, help="batches measured on the h5ad path")
    p.add_argument("--no-gzip", action="store_true", help="skip the gzip-compressed h5ad reference")
    p.add_argument("--no-grouped", action="store_true", help="skip the reference on an h5ad in runs of 256 cells per group")
    p.add_argument("--run-cells", type=int, default=1, help="cells per run of one group in the input h5ad (1: interleaved)")
    p.add_argument("--no-lz4", action="store_true", help="skip the 1M atlas built with --codec lz4")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--reuse", action="store_true", help="reuse input .h5ad files already in --workdir (from --keep)")
    # child-process arguments
    p.add_argument("--child", choices=sorted(CHILDREN))
    p.add_argument("--output")
    p.add_argument("--inputs", nargs="*")
    p.add_argument("--compression")
    p.add_argument("--codec", default="zstd")
    p.add_argument("--atlas")
    p.add_argument("--h5ad")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sparse", action="store_true", help="child: normalised CSR out instead of dense")
    p.add_argument("--pair", action="store_true", help="child: paired control sets (optimal transport)")
    p.add_argument("--paired-only", action="store_true",
                   help="only the paired-control measurements (0, 1, 2 workers; pairing cost; 16-core projection) "
                        "on a synthetic atlas of --cells cells")
    p.add_argument("--scale", action="store_true", help="only the scale check (see _scale): 1x and --scale-copies x "
                                                        "--cells cells; builder and loader RSS and speed; S3 at 1x")
    p.add_argument("--scale-copies", type=int, default=20)
    p.add_argument("--epoch-fraction", type=float, default=1.0, help="--scale: fraction of an epoch's sets streamed")
    p.add_argument("--s3-batches", type=int, default=20)
    p.add_argument("--build-workers", type=int, default=None,
                   help="the builder's processes (default: its own default, the cores up to 8)")
    p.add_argument("--digest", action="store_true", help="child build: also hash the atlas's array chunks")
    p.add_argument("--parallel-build", action="store_true",
                   help="only the parallel builder: the --cells input built with 1 and 2 processes (time, RSS, same content)")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--grow", action="store_true", help="only the grown corpus (see _grow): one input built, then "
                   "--scale-copies - 1 copies appended one at a time")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return 0
    if a.paired_only:
        return _paired(a)
    if a.parallel_build:
        return _parallel_build(a)
    if a.scale:
        return _scale(a)
    if a.grow:
        return _grow(a)

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    h5 = work / "input.h5ad"
    atlas1, atlas4 = work / "atlas_1m.zarr", work / "atlas_big.zarr"
    common = dict(set_size=a.set_size, batch_size=a.batch_size)
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_at_start": os.getloadavg()},
        "config": {"cells": a.cells, "genes": a.genes, "big_cells": a.cells * a.big_copies, "set_size": a.set_size,
                   "batch_size": a.batch_size, "input_run_cells": a.run_cells,
                   "cells_per_s_counts": "x0 + control cells, normalised float32 out: dense [B, m, G], "
                                         "or CSR where the entry says sparse (both sides alike)"},
    }
    try:
        if a.reuse and h5.exists():
            import h5py

            with h5py.File(h5) as f:
                gen = {"seconds": None, "nnz": int(f["X/data"].shape[0]), "file_bytes": h5.stat().st_size, "reused": True}
        else:
            _log(f"generating {a.cells:,} x {a.genes:,} h5ad")
            gen = run_child("generate", output=h5, cells=a.cells, genes=a.genes, run_cells=a.run_cells)
        gen["x_in_memory_bytes"] = gen["nnz"] * 8 + (a.cells + 1) * 8  # float32 data + int32 indices + int64 indptr
        out["input"] = gen
        _log(f"building {atlas1.name}")
        out["build_1m"] = run_child("build", inputs=[h5], output=atlas1)
        out["build_1m"]["input_x_bytes"] = gen["x_in_memory_bytes"]
        copies = []
        for i in range(a.big_copies):
            copies.append(_copy(work / f"copy{i}.h5ad", h5))
        _log(f"building {atlas4.name} from {a.big_copies} inputs")
        out["build_4m"] = run_child("build", inputs=copies, output=atlas4)
        out["build_4m"]["input_x_bytes"] = gen["x_in_memory_bytes"] * a.big_copies
        _log("loader on the 1M atlas")
        out["loader_1m"] = run_child("loader", atlas=atlas1, batches=a.batches, **common)
        _log("loader on the big atlas")
        out["loader_4m"] = run_child("loader", atlas=atlas4, batches=a.batches, **common)
        _log("loader with sparse output on the 1M atlas")
        out["loader_1m_sparse"] = run_child("loader", atlas=atlas1, batches=a.batches, sparse=True, **common)
        if not a.no_lz4:
            _log("lz4 variant of the 1M atlas")
            lz4 = work / "atlas_1m_lz4.zarr"
            out["build_1m_lz4"] = run_child("build", inputs=[h5], output=lz4, codec="lz4")
            out["loader_1m_lz4"] = run_child("loader", atlas=lz4, batches=a.batches, **common)
            out["loader_1m_lz4_sparse"] = run_child("loader", atlas=lz4, batches=a.batches, sparse=True, **common)
            shutil.rmtree(lz4, ignore_errors=True)
        _log("loader with 2 DataLoader workers")
        out["loader_1m_2workers"] = run_child("loader", atlas=atlas1, batches=a.batches, workers=2, **common)
        _log("reference: the same sets from the backed h5ad through anndata")
        out["reference_h5ad"] = run_child("reference", atlas=atlas1, h5ad=h5, batches=a.reference_batches, **common)
        out["reference_h5ad_sparse"] = run_child("reference", atlas=atlas1, h5ad=h5, batches=a.reference_batches,
                                                 sparse=True, **common)
        if not a.no_gzip:
            gz = work / "input_gzip.h5ad"
            if not (a.reuse and gz.exists()):
                _log("generating the gzip-compressed h5ad (same cells)")
                out["input_gzip"] = run_child("generate", output=gz, cells=a.cells, genes=a.genes, compression="gzip",
                                              run_cells=a.run_cells)
            out["reference_h5ad_gzip"] = run_child("reference", atlas=atlas1, h5ad=gz, batches=a.reference_batches, **common)
        if not a.no_grouped:
            grouped = work / "input_grouped.h5ad"
            if not (a.reuse and grouped.exists()):
                _log("generating an h5ad in runs of 256 cells per group (same generator, its own cells)")
                out["input_grouped"] = run_child("generate", output=grouped, cells=a.cells, genes=a.genes, run_cells=256)
            # a different file (cell names are positions), so its own atlas, loader run and reference
            atlas_g = work / "atlas_1m_grouped.zarr"
            _log("building the grouped input's atlas; loader and reference on it")
            out["build_1m_grouped"] = run_child("build", inputs=[grouped], output=atlas_g)
            out["loader_1m_grouped"] = run_child("loader", atlas=atlas_g, batches=a.batches, **common)
            out["loader_1m_grouped_sparse"] = run_child("loader", atlas=atlas_g, batches=a.batches, sparse=True, **common)
            out["reference_h5ad_grouped"] = run_child("reference", atlas=atlas_g, h5ad=grouped,
                                                      batches=a.reference_batches, **common)
            out["reference_h5ad_grouped_sparse"] = run_child("reference", atlas=atlas_g, h5ad=grouped,
                                                             batches=a.reference_batches, sparse=True, **common)
        loader = out["loader_1m"]["cells_per_s"]
        out["speedup_vs_h5ad"] = loader / out["reference_h5ad"]["cells_per_s"]
        if "reference_h5ad_gzip" in out:
            out["speedup_vs_h5ad_gzip"] = loader / out["reference_h5ad_gzip"]["cells_per_s"]
        out["speedup_vs_h5ad_sparse"] = out["loader_1m_sparse"]["cells_per_s"] / out["reference_h5ad_sparse"]["cells_per_s"]
        if "reference_h5ad_grouped" in out:
            out["speedup_vs_h5ad_grouped"] = (out["loader_1m_grouped"]["cells_per_s"]
                                              / out["reference_h5ad_grouped"]["cells_per_s"])
            out["speedup_vs_h5ad_grouped_sparse"] = (out["loader_1m_grouped_sparse"]["cells_per_s"]
                                                     / out["reference_h5ad_grouped_sparse"]["cells_per_s"])
        out["targets"] = {
            "loader_50k_cells_per_s": loader >= 50_000,
            "speedup_20x_vs_backed_h5ad_uncompressed": out["speedup_vs_h5ad"] >= 20,
            "speedup_20x_vs_backed_h5ad_gzip": out.get("speedup_vs_h5ad_gzip", 0) >= 20,
            "speedup_20x_vs_backed_h5ad_grouped_runs": out.get("speedup_vs_h5ad_grouped", 0) >= 20,
            "speedup_20x_vs_backed_h5ad_grouped_runs_sparse_out": out.get("speedup_vs_h5ad_grouped_sparse", 0) >= 20,
            "loader_rss_growth_1m_to_big_mb": out["loader_4m"]["peak_rss_mb"] - out["loader_1m"]["peak_rss_mb"],
            "builder_peak_rss_under_2gib": max(out["build_1m"]["peak_rss_mb"], out["build_4m"]["peak_rss_mb"]) < 2048,
            "builder_input_larger_than_2gib": out["build_1m"]["input_x_bytes"] > 2 * 2**30,
        }
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    out["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
