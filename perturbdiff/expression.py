"""Expression spaces: the one place that knows how any accepted input becomes the model's space.

The model works in ``log1p(counts / total * target_sum) / scale`` (`Normalization`; the paper:
target 10⁴, divide by 10), with each cell's total taken over **every gene of its source** (the
whole matrix the cells come from, not only the genes the model uses). Inputs are accepted as

- raw ``"counts"`` (integer-valued), or
- ``"log1p"``-normalised values, ``log1p(counts / total * T)`` for any T, over the same genes or
  over a larger gene set than the matrix holds (e.g. normalised over the whole transcriptome, then
  2,000 highly variable genes kept). ``expm1`` of such a row is proportional to the cell's counts,
  so normalising it over the matrix's genes gives exactly what the counts would.

Every path goes through the same two routines: the atlas loader (`normalize_csr` on stored
counts), prediction and evaluation (`to_model_space`, which calls `normalize_csr`). The atlas
builder stores counts and recovers them from log1p input with `log1p_to_counts`. Nothing here
imports the data, training or model layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "Normalization",
    "normalize_counts",
    "normalize_csr",
    "to_model_space",
    "detect_input_space",
    "log1p_to_counts",
    "decode_counts",
    "gene_columns",
    "INPUT_SPACES",
    "LOG1P_MAX",
]

INPUT_SPACES = ("auto", "counts", "log1p")
# log1p of counts normalised to 1e4 stays below ~10 (1e6: ~14); 20 leaves room and still
# separates log values from counts or from normalised values without the log.
LOG1P_MAX = 20.0
INTEGER_TOL = 1e-3
# Largest smallest-count tried when recovering counts from log1p input.
_MAX_MIN_COUNT = 64


# =========================================================================== the model's space
@dataclass(frozen=True)
class Normalization:
    """Per-cell normalisation: ``log1p(counts / total * target_sum) / scale``.

    Args:
        target_sum: total every cell is scaled to before log1p (``None`` skips total scaling).
        log1p: apply ``log1p`` after total scaling.
        scale: divide the result by this number.
    """

    target_sum: float | None = 1e4
    log1p: bool = True
    scale: float = 10.0

    def __post_init__(self):
        if self.target_sum is not None and not self.target_sum > 0:
            raise ValueError(f"normalization target_sum must be positive or None, got {self.target_sum}")
        if not self.scale > 0:
            raise ValueError(f"normalization scale must be positive, got {self.scale}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Normalization":
        return cls(**(d or {}))

    def __call__(self, counts):
        return normalize_counts(counts, self)

    @property
    def max_value(self) -> float | None:
        """The largest value a cell can have with ``scale`` 1 (all its counts in one gene)."""
        if self.target_sum is None:
            return None
        return float(np.log1p(self.target_sum)) if self.log1p else float(self.target_sum)

    def describe(self) -> str:
        """The space with ``scale`` 1, as text (what predictions are written in)."""
        inner = f"counts / total * {self.target_sum:g}" if self.target_sum is not None else "counts"
        return f"log1p({inner})" if self.log1p else inner


def normalize_counts(counts, norm: Normalization):
    """Normalise a dense [cells, genes] block of counts (numpy array or torch tensor), totals over its genes.

    Cells with zero total stay zero. Works in float32 and returns the same array type it was given.
    """
    is_torch = isinstance(counts, torch.Tensor)
    x = counts.float() if is_torch else np.asarray(counts, dtype=np.float32)
    if norm.target_sum is not None:
        total = x.sum(-1, keepdims=True) if not is_torch else x.sum(-1, keepdim=True)
        if is_torch:
            x = x * (norm.target_sum / total.clamp_min(1e-12))
            x = torch.where(total > 0, x, torch.zeros_like(x))
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.where(total > 0, x * (norm.target_sum / np.maximum(total, 1e-12)), 0.0).astype(np.float32)
    if norm.log1p:
        x = torch.log1p(x) if is_torch else np.log1p(x)
    return x / norm.scale


def normalize_csr(indptr: np.ndarray, data: np.ndarray, norm: Normalization) -> np.ndarray:
    """The normalised float32 values of a CSR block of counts (rows = cells), totals over each row.

    The loader's hot path: one ``reduceat`` for the totals, in-place scaling, no dense copy.
    """
    lens = np.diff(indptr)
    values = np.asarray(data).astype(np.float32, copy=True)
    if norm.target_sum is not None:
        # float32 sums are exact for integer counts up to 2**24 per cell, and twice as fast
        totals = row_sums(indptr, values)
        scale = np.divide(norm.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        values *= np.repeat(scale.astype(np.float32), lens)
    if norm.log1p:
        np.log1p(values, out=values)
    values *= np.float32(1.0 / norm.scale)
    return values


def row_sums(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Per-row sums (float64) of a CSR block given by ``indptr`` and ``data``; empty rows are 0."""
    lens = np.diff(indptr)
    totals = np.zeros(len(lens))
    nonempty = lens > 0
    if nonempty.any():
        totals[nonempty] = np.add.reduceat(data, indptr[:-1][nonempty])
    return totals


def to_model_space(X, columns: np.ndarray, space: str, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """Cells of ``X`` in the space of ``norm``, for the genes at ``columns`` of ``X`` (-1: absent, zero).

    Args:
        X: [cells, genes] counts or log1p-normalised values (dense or sparse), as `detect_input_space`
            says; each cell's total is taken over all of ``X``'s genes.
        columns: for each output gene, its column in ``X`` (-1 where ``X`` lacks it).
        space: ``"counts"`` or ``"log1p"``.
        norm: the target space.

    Returns:
        the dense float32 [cells, len(columns)] values, and each cell's total before normalisation
        (counts; for log1p input the total of ``expm1``, i.e. the input's own target sum).
    """
    if space not in ("counts", "log1p"):
        raise ValueError(f"space must be 'counts' or 'log1p', got {space!r}")
    if space == "log1p" and norm.target_sum is None:
        raise ValueError("the model takes log1p of un-normalised counts: pass raw counts")
    csr = sp.csr_matrix(X, dtype=np.float64)
    data = np.expm1(csr.data) if space == "log1p" else csr.data
    totals = row_sums(csr.indptr, data)
    values = normalize_csr(csr.indptr, data, norm)
    normed = sp.csr_matrix((values, csr.indices, csr.indptr), shape=csr.shape)
    columns = np.asarray(columns, dtype=np.int64)
    present = columns >= 0
    out = np.zeros((csr.shape[0], len(columns)), dtype=np.float32)
    if present.any():
        out[:, present] = normed[:, columns[present]].toarray()
    return out, totals


# =========================================================================== what the input is
def detect_input_space(X, declared: str = "auto", what: str = "control expression") -> str:
    """Say whether a [cells, genes] matrix holds raw ``"counts"`` or ``"log1p"``-normalised values.

    Counts are integer-valued; log1p-normalised values are non-integer and below ``LOG1P_MAX``.
    Raises ``ValueError`` (naming ``what``) on non-finite or negative values, on data that are
    neither, and when ``declared`` (``"counts"`` / ``"log1p"``) contradicts the data.
    """
    if declared not in INPUT_SPACES:
        raise ValueError(f"input_space must be one of {INPUT_SPACES}, got {declared!r}")
    values = X.data if sp.issparse(X) else np.asarray(X)
    values = np.asarray(values).ravel()
    finite = np.isfinite(values)
    if not finite.all():
        raise ValueError(f"{what} has {int((~finite).sum())} non-finite values (NaN or inf)")
    nonzero = values[values != 0]
    if nonzero.size == 0:
        raise ValueError(f"{what} is all zeros")
    vmin, vmax = float(nonzero.min()), float(nonzero.max())
    if vmin < 0:
        raise ValueError(
            f"{what} has negative values (min {vmin:.3g}): it looks scaled or centred; "
            "pass raw counts or log1p-normalised values"
        )
    frac = np.abs(nonzero - np.round(nonzero))
    integer = bool((frac < INTEGER_TOL).all())
    example = float(nonzero[np.argmax(frac)])
    if integer:
        detected = "counts"
    elif vmax < LOG1P_MAX:
        detected = "log1p"
    else:
        detected = None
    if declared == "auto":
        if detected is None:
            raise ValueError(
                f"{what} is neither raw counts (integers) nor log1p-normalised (max < {LOG1P_MAX:g}): "
                f"non-integer values up to {vmax:.4g}; normalised without log1p? apply log1p or pass raw counts"
            )
        return detected
    if declared == "counts" and not integer:
        raise ValueError(
            f"input_space='counts' but the {what} has non-integer values (e.g. {example:.4g}, "
            f"max {vmax:.4g}): " + ("it looks log1p-normalised" if vmax < LOG1P_MAX else "not raw counts")
        )
    if declared == "log1p" and (integer or vmax >= LOG1P_MAX):
        raise ValueError(
            f"input_space='log1p' but the {what} "
            + (f"is integer-valued (max {vmax:.4g}): it looks like raw counts" if integer
               else f"has values up to {vmax:.4g}, above any log1p-normalised value")
        )
    return declared


def log1p_to_counts(m: sp.csr_matrix) -> tuple[sp.csr_matrix, int]:
    """Raw counts from rows of ``log1p(counts / total * T)`` (any T, any total per cell).

    Returns the counts (float32 CSR) and the number of cells that stayed non-integral (kept
    rescaled so their smallest value is 1).
    """
    # log1p(c / total * T) -> expm1 gives c * (T / total): proportional to the counts of the cell.
    # Dividing by the smallest non-zero gives c / c_min; the smallest multiplier k that makes the
    # row integral is c_min (1 for nearly every UMI profile), which recovers the counts exactly.
    d = np.expm1(m.data.astype(np.float64))
    lens = np.diff(m.indptr)
    starts = m.indptr[:-1]
    nonempty = lens > 0
    rowmin = np.ones(len(lens))
    rowmin[nonempty] = np.minimum.reduceat(np.where(d > 0, d, np.inf), starts[nonempty])
    rel = d / np.repeat(rowmin, lens)
    mult = np.zeros(len(lens))
    mult[~nonempty] = 1.0
    for k in range(1, _MAX_MIN_COUNT + 1):
        todo = np.flatnonzero((mult == 0) & nonempty)
        if not len(todo):
            break
        c = rel * k
        near = np.abs(c - np.round(c)) <= 1e-4 * np.maximum(1.0, c)  # float32 log1p keeps ~1e-6
        ok = np.logical_and.reduceat(near, starts[nonempty])[np.searchsorted(np.flatnonzero(nonempty), todo)]
        mult[todo[ok]] = k
    integral = mult > 0
    counts = rel * np.repeat(np.where(integral, mult, 1.0), lens)
    counts = np.where(np.repeat(integral, lens), np.round(counts), counts)
    return sp.csr_matrix((counts.astype(np.float32), m.indices, m.indptr), shape=m.shape), int((~integral).sum())


def decode_counts(values: np.ndarray, library: np.ndarray, target_sum: float, rng: np.random.Generator,
                  outside: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Put predicted cells on the count lattice of their library sizes: integer counts, then normalise.

    A sequencer reports integers: a cell with L counts has normalised values log1p(k x T / L) for
    integer k, so nothing between 0 and log1p(T / L). Each predicted value v (log1p-normalised) lies
    between two such points, a = log1p(k T / L) <= v < b = log1p((k + 1) T / L); it becomes b with
    probability (v - a) / (b - a), else a. The draw keeps v on average *in log space*, the space the
    model is trained in, where its values are averages over what a cell could be (e.g. half way to one
    count for a gene that is zero in half such cells); rounding the expected counts expm1(v) L / T
    instead reads them as rates and gives too many zeros (measured: docs/benchmarks.md). The counts
    are then normalised again, the cell's total being its counts plus ``outside`` (the counts of
    genes not predicted, e.g. those of its control cell).

    Args:
        values: log1p-normalised predictions [n, G] (float32).
        library: each cell's library size L [n] (the total count of its control cell).
        target_sum: T of the normalisation.
        rng: draws of the rounding.
        outside: counts of each cell outside these G genes [n] (default 0: they are all the genes).

    Returns:
        (counts [n, G] float32 integers, normalised log1p values [n, G] float32).
    """
    v = values.astype(np.float64)
    step = target_sum / np.asarray(library, dtype=np.float64)[:, None]  # one count, normalised
    counts = np.floor(np.expm1(v) / step)
    lo, hi = np.log1p(counts * step), np.log1p((counts + 1) * step)
    counts += rng.random(v.shape) < (v - lo) / (hi - lo)
    total = counts.sum(1, keepdims=True) + (0.0 if outside is None else np.asarray(outside, np.float64)[:, None])
    normed = np.log1p(counts / np.where(total > 0, total, 1.0) * target_sum)
    return counts.astype(np.float32), normed.astype(np.float32)


# =========================================================================== genes
def gene_columns(names: Sequence[str], genes: Sequence[str], what: str = "the data") -> np.ndarray:
    """For each of ``genes`` (a vocabulary), its position in ``names`` (a matrix's genes); -1 if absent.

    Raises ``ValueError`` when a gene of the vocabulary appears more than once in ``names``.
    """
    col_of: dict[str, int] = {}
    dup = set()
    for j, g in enumerate(map(str, names)):
        if g in col_of:
            dup.add(g)
        col_of.setdefault(g, j)
    dup_wanted = sorted(dup & set(map(str, genes)))
    if dup_wanted:
        raise ValueError(f"{what} has duplicated gene names among the model's genes: {dup_wanted[:5]}")
    return np.array([col_of.get(str(g), -1) for g in genes], dtype=np.int64)
