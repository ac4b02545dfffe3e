"""Where an atlas lives: a local folder, or a prefix in an object store (S3, GCS, Azure).

``as_location("s3://bucket/pbmc.zarr")`` gives a `RemoteStore`; a plain path or ``file://`` URI gives a
`pathlib.Path`. The remote side goes through obstore (the Python binding of the Rust ``object_store``
crate), which zarr 3 uses as ``zarr.storage.ObjectStore``. obstore over fsspec/s3fs: one native
client for S3, GCS and Azure with credentials from the usual environment variables
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` / ``AWS_PROFILE``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_ACCOUNT_NAME`` / ``AZURE_STORAGE_ACCOUNT_KEY``, ...),
and a ``get_ranges`` call
that fetches several byte ranges of one object at once, which is what the atlas reader needs: a
cell set is a few coalesced range requests, not one request per chunk. (obstore's client does not
survive ``fork`` once used, so DataLoader workers on a remote atlas are spawned: `CellSetLoader`.)

Object stores have no rename, so a remote atlas is written in place and made valid by the
completeness marker, which `AtlasWriter` writes last; a store without it is refused on open.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

__all__ = ["REMOTE_SCHEMES", "RemoteStore", "RemoteStoreError", "as_location", "explain", "is_remote", "location_name",
           "scratch_path"]

REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "adl")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Byte ranges of one object closer than this are fetched as one request (the gap is read and dropped).
COALESCE_BYTES = 1 << 20


class RemoteStoreError(OSError):
    """An object store that cannot be reached, authenticated against, or read."""


def is_remote(location) -> bool:
    """Whether ``location`` is an object-store URI (``s3://``, ``gs://``, ``az://``, ...)."""
    if isinstance(location, RemoteStore):
        return True
    m = _SCHEME.match(str(location)) if isinstance(location, str) else None
    return bool(m) and m.group(1).lower() in REMOTE_SCHEMES


def as_location(location):
    """A `RemoteStore` for an object-store URI, a `Path` for a local path or ``file://`` URI."""
    if isinstance(location, RemoteStore):
        return location
    if isinstance(location, str):
        m = _SCHEME.match(location)
        if m:
            scheme = m.group(1).lower()
            if scheme == "file":
                return Path(location[len("file://"):])
            if scheme in REMOTE_SCHEMES:
                return RemoteStore(location)
            raise ValueError(f"{location}: unsupported URI scheme {scheme!r}; use a local path, file://, or one of "
                             + ", ".join(f"{s}://" for s in ("s3", "gs", "az")))
    return Path(location)


def location_name(location) -> str:
    """The last component of a path or URI (``pbmc.zarr``)."""
    if isinstance(location, (str, RemoteStore)) and is_remote(location):
        return str(location).rstrip("/").rsplit("/", 1)[-1]
    return Path(location).name


def scratch_path(location, tag: str) -> Path:
    """A local scratch file or folder for work on ``location``: its hidden sibling ``.NAME.TAG`` for a
    local path (so leftovers of a killed run sit beside it), ``perturbdiff-NAME.TAG`` in the
    temporary folder for an object store."""
    if is_remote(location):
        import tempfile

        return Path(tempfile.gettempdir()) / f"perturbdiff-{location_name(location)}.{tag}"
    location = Path(location)
    location.parent.mkdir(parents=True, exist_ok=True)
    return location.parent / f".{location.name}.{tag}"


def explain(uri: str, err: Exception) -> RemoteStoreError:
    """One line that says what went wrong with ``uri`` (obstore's errors carry a page of debug text)."""
    text = str(err)
    first = text.split("\n", 1)[0]
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if "169.254.169.254" in text or "credential" in text.lower() or "InvalidAccessKeyId" in text or "403" in first:
        why = ("access denied or no usable credentials (opening an atlas needs read and list permission on its "
               "prefix): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
               "GOOGLE_APPLICATION_CREDENTIALS, or AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY; "
               "AWS_SKIP_SIGNATURE=true for a public bucket")
    elif "NoSuchBucket" in text or ("404" in first and "list" in first.lower()):
        why = f"bucket {bucket!r} does not exist (check its spelling and AWS_ENDPOINT_URL / AWS_REGION)"
    elif "error sending request" in text or "dns" in text.lower() or "connect" in text.lower():
        why = "the object store cannot be reached (check the network, AWS_ENDPOINT_URL and the bucket's region)"
    else:
        why = first
    return RemoteStoreError(f"{uri}: {why}")


class RemoteStore:
    """An atlas location in an object store: byte reads, listing and the zarr store over one prefix.

    Args:
        uri: ``s3://bucket/prefix`` (also ``gs://``, ``az://``); credentials and endpoint come from
            the environment (see the module docstring).
    """

    def __init__(self, uri: str):
        from obstore.store import from_url

        self.uri = uri.rstrip("/")
        self.requests = 0  # range requests issued by `read_ranges` / `read_suffix` (benchmarks read it)
        retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=30),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5), "base": 2}}
        try:
            self.store = from_url(self.uri, retry_config=retry)
        except Exception as err:
            raise RemoteStoreError(f"{self.uri}: cannot configure the object store: {str(err).splitlines()[0]}") from err

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemoteStore({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemoteStore) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):  # DataLoader workers and spawned processes make their own client
        return (RemoteStore, (self.uri,))

    @property
    def name(self) -> str:
        return location_name(self.uri)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise explain(self.uri, err) from err

    # -- objects ---------------------------------------------------------------------------------------

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (relative to the store's prefix)."""
        import obstore

        def collect():
            return [m["path"] for batch in obstore.list(self.store, prefix=prefix or None) for m in batch]

        return self._call(collect)

    def exists(self, key: str = "zarr.json") -> bool:
        """Whether the object is there; a missing bucket or bad credentials raise `RemoteStoreError`."""
        import obstore

        try:
            self._call(obstore.head, self.store, key)
            return True
        except FileNotFoundError:
            self.any()  # a HEAD says 404 for a missing bucket too: a listing tells them apart
            return False

    def any(self) -> bool:
        """Whether any object lies under this prefix (a store, complete or not, is there)."""
        import obstore

        def first():
            for batch in obstore.list(self.store, chunk_size=1):
                return bool(batch)
            return False

        return self._call(first)

    def read_suffix(self, key: str, nbytes: int) -> bytes:
        """The last ``nbytes`` of an object (one request)."""
        import obstore

        self.requests += 1
        result = self._call(obstore.get, self.store, key, options={"range": {"suffix": int(nbytes)}})
        return bytes(result.bytes())

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes ``[offset, offset + length)`` of one object for each range, in as few requests as
        the ranges allow: ranges closer than `COALESCE_BYTES` are merged into one request."""
        import obstore

        if not ranges:
            return []
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        merged: list[list[int]] = []  # [start, end]
        for i in order:
            a, n = ranges[i]
            if merged and a - merged[-1][1] <= COALESCE_BYTES:
                merged[-1][1] = max(merged[-1][1], a + n)
            else:
                merged.append([a, a + n])
        self.requests += len(merged)
        got = self._call(obstore.get_ranges, self.store, key, starts=[m[0] for m in merged], ends=[m[1] for m in merged])
        blobs = [memoryview(b) for b in got]
        out: list[bytes] = [b""] * len(ranges)
        j = 0
        for i in order:
            a, n = ranges[i]
            while not (merged[j][0] <= a and a + n <= merged[j][1]):
                j += 1
            out[i] = bytes(blobs[j][a - merged[j][0] : a - merged[j][0] + n])
        return out

    def delete_all(self) -> int:
        """Delete every object under this prefix; returns how many."""
        import obstore

        keys = self.keys()
        for a in range(0, len(keys), 1000):
            self._call(obstore.delete, self.store, keys[a : a + 1000])
        return len(keys)

    def zarr_store(self, read_only: bool = True):
        from zarr.storage import ObjectStore

        return ObjectStore(self.store, read_only=read_only)
