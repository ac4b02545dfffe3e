"""Atlases on object storage, against a real S3-compatible server (moto's) on 127.0.0.1: build, info,
validate and reads identical to a local atlas, few range requests per set, the completeness marker,
bad buckets and credentials, and a 2-process training run that reads from the bucket and resumes."""

import logging
import os

import numpy as np
import pytest

from perturbdiff.cli import main as cli
from perturbdiff.data import Atlas, AtlasIncompleteError, AtlasWriter, CellSetDataset, make_synthetic_atlas
from perturbdiff.data.remote import RemoteStoreError, as_location, is_remote

BUCKET = "atlases"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port, its bucket, and the environment that points at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ALLOW_HTTP": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_locations():
    assert is_remote("s3://b/x.zarr") and is_remote("gs://b/x") and is_remote("az://c/x")
    assert not is_remote("x.zarr") and not is_remote("/tmp/x.zarr")
    assert str(as_location("file:///tmp/x.zarr")) == "/tmp/x.zarr"
    with pytest.raises(ValueError, match="unsupported URI scheme 'ftp'"):
        as_location("ftp://host/x.zarr")


def test_build_info_validate_and_reads_match_a_local_atlas(s3, tmp_path, capsys):
    uri = f"s3://{BUCKET}/synthetic.zarr"
    assert cli(["atlas", "synthetic", uri, "--num-cells", "3000"]) == 0
    local = make_synthetic_atlas(tmp_path / "local.zarr", num_cells=3000)
    assert cli(["atlas", "info", uri]) == 0
    assert "3,000 cells" in capsys.readouterr().out
    assert cli(["atlas", "validate", uri]) == 0
    assert "every chunk read and checksummed" in capsys.readouterr().out

    remote, here = Atlas(uri), Atlas(local)
    assert remote.remote and remote.metadata["complete"] and remote.num_cells == here.num_cells == 3000
    assert remote.groups.equals(here.groups) and list(remote.gene_names) == list(here.gene_names)
    for a, b in [(0, 1), (17, 900), (1000, 2999)]:
        for x, y in zip(remote.read_rows(a, b), here.read_rows(a, b)):
            np.testing.assert_array_equal(x, y)
    zarr_reads = Atlas(uri, fast_reads=False)  # the same bytes through zarr's own ObjectStore
    for x, y in zip(zarr_reads.read_rows(17, 900), here.read_rows(17, 900)):
        np.testing.assert_array_equal(x, y)

    # a set costs a few coalesced range requests (indptr, indices, data), not one per chunk
    ds = CellSetDataset([remote], set_size=64, batch_size=4, mode="conditional", seed=0)
    batches = iter(ds)
    next(batches)  # shard indexes are fetched once and cached
    before = remote.requests
    for _ in range(5):
        next(batches)
    per_set = (remote.requests - before) / 20  # a set and its control set each
    assert 0 < per_set <= 8, per_set


def test_dataloader_workers_read_a_bucket(s3):
    # obstore does not survive fork: the loader spawns its workers for a remote atlas
    uri = f"s3://{BUCKET}/workers.zarr"
    make_synthetic_atlas(uri, num_cells=1000)
    ds = CellSetDataset([Atlas(uri)], set_size=16, batch_size=2, mode="conditional", seed=0)
    loader = ds.loader(num_workers=2, timeout=120)
    assert loader.kwargs["multiprocessing_context"] == "spawn"
    batches = [b for _, b in zip(range(4), loader)]
    assert len(batches) == 4 and all(b["x0"].shape == (2, 16, 200) for b in batches)
    single = [b for _, b in zip(range(4), ds)]  # the same sets as without workers
    assert sorted(float(b["x0"].sum()) for b in batches) == pytest.approx(sorted(float(b["x0"].sum()) for b in single))


def test_existing_store_needs_overwrite_and_an_aborted_build_leaves_nothing(s3):
    uri = f"s3://{BUCKET}/again.zarr"
    make_synthetic_atlas(uri, num_cells=500)
    for overwrite in (False, True):  # never replaced in place: a failed build would lose both
        with pytest.raises(ValueError, match=f"{uri} already exists; an atlas in an object store is not replaced"):
            make_synthetic_atlas(uri, num_cells=600, overwrite=overwrite)
    assert Atlas(uri).num_cells == 500

    partial = f"s3://{BUCKET}/partial.zarr"
    with pytest.raises(RuntimeError, match="interrupted"):
        with AtlasWriter(partial, num_genes=5) as w:
            w.append(np.array([0, 2]), np.array([0, 3]), np.array([1.0, 2.0]))
            raise RuntimeError("interrupted")
    assert as_location(partial).keys() == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Atlas(partial)


def test_a_store_without_the_completeness_marker_is_refused(s3):
    uri = f"s3://{BUCKET}/unfinished.zarr"
    w = AtlasWriter(uri, num_genes=5)
    w.append(np.array([0, 2]), np.array([0, 3]), np.array([1.0, 2.0]))  # the build stops here: no finish
    with pytest.raises(AtlasIncompleteError, match=f"atlas {uri} is incomplete"):
        Atlas(uri)


def test_bad_buckets_and_credentials_get_one_clear_error(s3, monkeypatch, capsys):
    with pytest.raises(RemoteStoreError, match="bucket 'no-such-bucket' does not exist"):
        Atlas("s3://no-such-bucket/x.zarr")
    assert cli(["atlas", "info", "s3://no-such-bucket/x.zarr"]) == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket/x.zarr" in err and "does not exist" in err and "Debug source" not in err
    with pytest.raises(FileNotFoundError, match=f"atlas s3://{BUCKET}/missing.zarr does not exist"):
        Atlas(f"s3://{BUCKET}/missing.zarr")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(RemoteStoreError, match="no usable credentials .*set AWS_ACCESS_KEY_ID"):
        Atlas(f"s3://{BUCKET}/synthetic.zarr")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(RemoteStoreError, match="cannot be reached"):
        Atlas(f"s3://{BUCKET}/synthetic.zarr")


@pytest.mark.slow
def test_two_process_training_reads_the_bucket_and_resumes(s3, tmp_path):
    from test_trainer import launch, metrics

    uri = f"s3://{BUCKET}/train.zarr"
    make_synthetic_atlas(uri)  # the built-in default atlas's data, in the bucket
    local = make_synthetic_atlas(tmp_path / "train.zarr")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PERTURBDIFF_CACHE=str(tmp_path / "cache"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    args = ("train.save_every=2",)
    launch(env, tmp_path / "local", *args, "--atlas", str(local), processes=2)
    proc = launch(env, tmp_path / "remote", *args, "train.stop_after_steps=3", "--atlas", uri, processes=2)
    assert "continue with --resume" in proc.stdout
    proc = launch(env, tmp_path / "remote", *args, "--resume", "--atlas", uri, processes=2)
    assert "resumed from" in proc.stdout
    a, b = metrics(tmp_path / "local"), metrics(tmp_path / "remote")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s]["loss"] == b[s]["loss"] for s in a), (a, b)  # the same cells, read from the bucket
    assert (tmp_path / "remote" / "model" / "model.safetensors").exists()
