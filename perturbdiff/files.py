"""Files: atomic writes (every file the project writes goes to a temporary sibling first, then is
renamed into place, so a reader or a resumed run never sees a partial file) and checked reads."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_json", "read_h5ad"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it to ``path``.

    The temporary name keeps ``path``'s suffix (some writers choose the format by it). On any
    error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (non-finite floats are refused: JSON has none)."""
    text = json.dumps(obj, indent=2, default=str, allow_nan=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_h5ad(path: str | os.PathLike, what: str = "input"):
    """``anndata.read_h5ad`` with one clear error for a missing, empty, truncated or non-HDF5 file."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes)")
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError) as err:  # h5py: truncated file, bad signature, missing groups
        raise ValueError(f"{what} {path} is not a readable .h5ad file (truncated, damaged or not HDF5): {err}") from None
