"""Expression normalisation shared by the model config, the data loader and prediction.

Counts are normalised per cell to a fixed total, log1p-transformed and divided by a scale
(the paper divides by 10). The parameters travel with the checkpoint in
``PerturbDiffConfig.normalization`` so that predictions come back in the same space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["Normalization", "normalize_counts", "denormalize"]


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


def normalize_counts(counts, norm: Normalization):
    """Normalise a [cells, genes] block of raw counts (numpy array or torch tensor).

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


def denormalize(values, norm: Normalization):
    """Undo ``scale`` and ``log1p`` (not the per-cell total, which is not recoverable)."""
    is_torch = isinstance(values, torch.Tensor)
    x = values * norm.scale
    if norm.log1p:
        x = torch.expm1(x) if is_torch else np.expm1(x)
    return x
