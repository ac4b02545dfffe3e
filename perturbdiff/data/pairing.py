"""Optimal-transport pairing of a perturbed set's cells with its control set's cells.

A paired model (``paired_control``) reads control cell i beside perturbed cell i, so training
must present the two sets matched cell by cell. The matching is the optimal transport plan
between the two sets (equal sizes, uniform weights, squared Euclidean cost), which for equal sets
is an assignment: each perturbed cell is paired with the control cell it is closest to as a whole,
so the pairs differ mostly by the perturbation's change and not by which cells were drawn.

The loader pairs while it builds a batch (on the CPU, in its DataLoader workers), so the training
step receives paired sets and does no device-to-host round trip.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pair_order", "pair_control_sets"]


@torch.no_grad()
def pair_order(x0: torch.Tensor, control: torch.Tensor) -> np.ndarray:
    """For each set and perturbed cell i, the control cell paired with it: int64 [B, m]."""
    from scipy.optimize import linear_sum_assignment

    if x0.shape != control.shape:
        raise ValueError(f"pairing needs sets of one shape, got {tuple(x0.shape)} and {tuple(control.shape)}")
    x, y = x0.float(), control.float()
    # squared distances as |x|^2 + |y|^2 - 2 x.y: one batched matmul, 1.6x faster than cdist at
    # m = 256, G = 2,000 (cdist takes square roots that the cost squares again)
    cost = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * torch.bmm(x, y.transpose(1, 2))
    cost = cost.cpu().numpy()  # [B, m, m]
    return np.stack([linear_sum_assignment(c)[1] for c in cost]).astype(np.int64)


def pair_control_sets(x0: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """The control sets [B, m, G] reordered so that control cell i of each set is paired with perturbed cell i."""
    order = torch.from_numpy(pair_order(x0, control)).to(control.device)
    return torch.gather(control, 1, order.unsqueeze(-1).expand_as(control))
