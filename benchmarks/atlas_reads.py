"""Atlas read speed by reader, on a local store and on an S3-compatible server; prints JSON.

    python benchmarks/atlas_reads.py                        # 100k cells x 2,000 genes, ~3 min here
    python benchmarks/atlas_reads.py --cells 20000 --sets 50   # quick

Readers, each on the same atlas and the same cell sets (windows of ``--set-size`` rows, as the loader
reads them; and whole loader batches: conditional sets with their control sets, normalised):

- ``own``: the project's shard reader (`perturbdiff.data.store._ShardReader`: shard index cached,
  the chunks of a read fetched in one pread / one coalesced range request per shard);
- ``zarr``: zarr-python's default codec pipeline (``Atlas(fast_reads=False)``);
- ``zarrs``: zarr-python with the Rust codec pipeline of the ``zarrs`` package
  (``codec_pipeline.path = zarrs.ZarrsCodecPipeline``), if it is installed.

"local" is a folder on this machine's disk (page cache warm); "s3" is moto's S3 server on
127.0.0.1 in its own process (a Python server: its per-request latency, not a real bucket's, sets
the pace, so ``requests_per_set`` is the figure that carries over). Ratios are each reader's cells/s over
``own``'s, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _log(msg: str) -> None:
    print(f"[atlas_reads {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _s3_server():
    """moto's S3 server in its own process (in-process, it would share the reader's GIL)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    try:
        yield "s3://bench"
    finally:
        server.terminate()
        server.wait()


def _open(location, reader: str):
    import zarr

    from perturbdiff.data import Atlas

    if reader == "own":
        return Atlas(location)
    if reader == "zarr":
        return Atlas(location, fast_reads=False)
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        return Atlas(location, fast_reads=False)  # arrays take the pipeline configured when opened


def _measure(location, reader: str, windows, batches: int, set_size: int) -> dict:
    from perturbdiff.data import CellSetDataset

    atlas = _open(location, reader)
    atlas.read_rows(*windows[0])  # shard indexes and connections warm
    ref = atlas.requests
    t = time.perf_counter()
    reads = [atlas.read_rows(a, b) for a, b in windows]
    raw_s = time.perf_counter() - t
    nnz, digest = sum(len(r[1]) for r in reads), hashlib.sha256()
    for part in (p for r in reads for p in r):  # hashed after the clock stopped
        digest.update(np.ascontiguousarray(part).tobytes())
    del reads
    requests = (atlas.requests - ref) / len(windows)
    out = {"read_cells_per_s": len(windows) * set_size / raw_s, "read_ms_per_set": 1e3 * raw_s / len(windows), "nnz": nnz,
           "sha256": digest.hexdigest()}
    if atlas.remote and reader == "own":
        out["requests_per_set"] = requests
    ds = CellSetDataset([atlas], set_size=set_size, batch_size=8, mode="conditional", seed=0)
    it = iter(ds)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    out["loader_cells_per_s"] = batches * 8 * set_size * 2 / (time.perf_counter() - t)  # x0 and control cells
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--set-size", type=int, default=256)
    p.add_argument("--sets", type=int, default=200, help="windows read per reader")
    p.add_argument("--batches", type=int, default=10, help="loader batches (8 conditional sets) per reader")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    from perturbdiff.data import Atlas, make_synthetic_atlas

    try:
        import zarrs  # noqa: F401

        readers = ["own", "zarr", "zarrs"]
    except ImportError:
        readers = ["own", "zarr"]
        _log("zarrs is not installed: pip install zarrs to measure it")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="perturbdiff-reads-"))
    local = work / "reads.zarr"
    shape = dict(num_cells=args.cells, num_genes=args.genes, num_contexts=4, num_perturbations=20, num_batches=2)
    t = time.time()
    make_synthetic_atlas(local, overwrite=True, **shape)
    result = {"cells": args.cells, "genes": args.genes, "set_size": args.set_size, "sets": args.sets,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "build_local_s": time.time() - t, "local": {}}
    _log(f"built {local} in {result['build_local_s']:.1f} s")
    rng = np.random.default_rng(0)
    starts = rng.integers(0, args.cells - args.set_size, args.sets)
    windows = [(int(a), int(a) + args.set_size) for a in starts]
    places = [("local", local)]
    stack = contextlib.ExitStack()
    if not args.no_s3:
        bucket = stack.enter_context(_s3_server())
        uri = f"{bucket}/reads.zarr"
        t = time.time()
        make_synthetic_atlas(uri, **shape)
        result["build_s3_s"] = time.time() - t
        _log(f"built {uri} in {result['build_s3_s']:.1f} s")
        result["s3"] = {}
        places.append(("s3", uri))
    with stack:
        for place, location in places:
            for reader in readers:
                try:
                    r = _measure(location, reader, windows, args.batches, args.set_size)
                except Exception as err:  # a reader that cannot read this store is a result too
                    r = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
                result[place][reader] = r
                _log(f"{place} {reader}: {r}")
            base = result[place]["own"]
            for reader, r in result[place].items():
                if "error" not in r:
                    r["read_ratio_to_own"] = r["read_cells_per_s"] / base["read_cells_per_s"]
                    r["loader_ratio_to_own"] = r["loader_cells_per_s"] / base["loader_cells_per_s"]
            # every reader read, and read the same bytes (indptr, indices, data of every window)
            digests = [r.get("sha256") for r in result[place].values()]
            result[place]["same_values_read"] = None not in digests and len(set(digests)) == 1
    del Atlas
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
