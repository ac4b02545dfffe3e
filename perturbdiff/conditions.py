"""The conditions to predict: a table of (perturbation, context, batch, dose), per-perturbation
feature vectors, and each condition's own random streams.

A conditions table is a DataFrame, a list of dicts, a CSV/TSV file, or every combination of the
values given as flags (`make_conditions`); it is checked once here, so the pipeline receives clean
rows: text names, ``None`` for an unset batch, ``NaN`` for an unset dose, no duplicates.
"""

from __future__ import annotations

import itertools
import math
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

__all__ = ["CONDITION_COLUMNS", "NUM_CELLS", "make_conditions", "read_conditions", "clean_conditions", "feature_table",
           "condition_rngs", "draw_cells"]

CONDITION_COLUMNS = ("perturbation", "context", "batch", "dose")
# optional column of a table: predicted cells per population for that row (empty or 0: the default)
NUM_CELLS = "num_cells"


def make_conditions(perturbation, context, batch=None, dose=None) -> pd.DataFrame:
    """All combinations of the given perturbations x contexts (x batches x doses), one row each.

    Each argument is a name / number or a list of them; ``None`` leaves batch / dose unset.
    """

    def as_list(v):
        return [None] if v is None else ([v] if isinstance(v, (str, int, float)) else list(v))

    if perturbation is None or context is None:
        raise ValueError("conditions need at least a perturbation and a context")
    rows = itertools.product(as_list(perturbation), as_list(context), as_list(batch), as_list(dose))
    return clean_conditions(pd.DataFrame(list(rows), columns=list(CONDITION_COLUMNS)))


def read_conditions(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV / TSV table of conditions with columns perturbation, context[, batch][, dose][, num_cells].

    The separator is taken from the extension (``.tsv``/``.tab`` tab, else comma). Empty batch or
    dose cells mean "not set". Names are read as text ("NA" stays the gene NA).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"conditions table {path} does not exist")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    return clean_conditions(table, source=str(path))


def clean_conditions(table: pd.DataFrame, source: str = "conditions") -> pd.DataFrame:
    table = table.copy()
    table.columns = [str(c).strip() for c in table.columns]
    unknown = [c for c in table.columns if c not in CONDITION_COLUMNS + (NUM_CELLS,)]
    missing = [c for c in ("perturbation", "context") if c not in table.columns]
    if unknown or missing:
        raise ValueError(
            f"{source}: columns must be {list(CONDITION_COLUMNS) + [NUM_CELLS]} (batch, dose, num_cells optional); "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown {unknown}" if unknown else "")
        )
    if len(table) == 0:
        raise ValueError(f"{source}: no conditions to predict")
    out = pd.DataFrame(index=range(len(table)))
    for col in ("perturbation", "context", "batch"):
        values = table[col].tolist() if col in table.columns else [None] * len(table)
        out[col] = [None if _is_missing(v) else str(v).strip() for v in values]
    if out["perturbation"].isna().any() or out["context"].isna().any():
        bad = out.index[out["perturbation"].isna() | out["context"].isna()].tolist()
        raise ValueError(f"{source}: rows {bad[:10]} have an empty perturbation or context")
    doses = []
    for v in table["dose"].tolist() if "dose" in table.columns else [None] * len(table):
        if _is_missing(v):
            doses.append(np.nan)
            continue
        try:
            doses.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"{source}: dose {v!r} is not a number") from None
    out["dose"] = np.asarray(doses, dtype=np.float64)
    key = out.astype(str).agg("|".join, axis=1)  # the condition itself, before num_cells
    counts = []
    for v in table[NUM_CELLS].tolist() if NUM_CELLS in table.columns else [None] * len(table):
        if _is_missing(v) or str(v).strip() == "0":  # empty or 0: the default count
            counts.append(0)
            continue
        try:
            number = float(v)
        except (TypeError, ValueError):
            number = float("nan")
        if not (number >= 1 and number == int(number)):
            raise ValueError(f"{source}: {NUM_CELLS} {v!r} is not a whole number >= 1")
        counts.append(int(number))
    out[NUM_CELLS] = np.asarray(counts, dtype=np.int64)  # 0: not set
    if key.duplicated().any():
        raise ValueError(f"{source}: duplicated conditions {key[key.duplicated()].tolist()[:5]}")
    return out


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def feature_table(features, dim: int, names) -> dict[str, np.ndarray]:
    """Feature vectors [dim] of the perturbations ``names`` from a table (a mapping or a DataFrame
    indexed by name), by `perturbdiff.features.compose`'s rule (``A+B``: the sum of its parts);
    a name without features, a wrong width or a non-finite value is an error naming it."""
    from .features import as_table, compose

    rows = compose(names, as_table(features, dim), what="the perturbation features")
    return {name: rows.loc[name].to_numpy(np.float32) for name in rows.index}


def condition_rngs(seed: int, condition: tuple) -> tuple[np.random.Generator, torch.Generator]:
    """The random streams of one condition (control-cell draws, sampling noise).

    They depend only on the seed and the condition's (perturbation, context, batch, dose), so a
    condition's prediction does not change with the other rows of the table. The torch generator
    lives on the CPU, so the noise is the same on every device.
    """
    key = zlib.crc32("|".join(str(v) for v in condition).encode())  # stable across processes, unlike hash()
    ss = np.random.SeedSequence([int(seed), key])
    torch_seed = int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))
    return np.random.default_rng(ss), torch.Generator().manual_seed(torch_seed)


def draw_cells(rng: np.random.Generator, cells: np.ndarray, n_cells: int, padded: int) -> np.ndarray:
    """``padded`` control-cell indices: the first ``n_cells`` without replacement while the pool
    lasts (then with), the padding resampled with replacement."""
    order = rng.permutation(cells)
    if n_cells > len(cells):
        order = np.concatenate([order, rng.choice(cells, n_cells - len(cells))])
    order = order[:n_cells]
    if padded > n_cells:
        order = np.concatenate([order, rng.choice(cells, padded - n_cells)])
    return order
