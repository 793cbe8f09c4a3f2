"""Dense reference ops: O(N*M) per head, written with plain autograd so they are obviously right.

They define the semantics every sparse kernel is tested against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _DenseIndicator(torch.autograd.Function):
    """Straight-through estimator: forward the 0/1 adjacency, backward hardtanh(grad) on edges."""

    @staticmethod
    def forward(ctx: Any, lam: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return mask.to(lam.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad.clamp(-1.0, 1.0) * mask, None


def dense_indicator(lam: Tensor, mask: Tensor) -> Tensor:
    """Edge indicator ``(B, H, N, M)`` equal to ``mask`` whose gradient reaches ``lam`` on edges.

    Args:
        lam: ``(B, H, N, M)`` edge probabilities (requires grad to train the SBM).
        mask: ``(B, H, N, M)`` bool, the sampled edges.
    """
    return _DenseIndicator.apply(lam, mask)


def dense_edge_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weights: Tensor,
    mask: Tensor,
    scale: float,
    drop: Tensor | None = None,
) -> Tensor:
    """Softmax attention restricted to the edges of ``mask``, each edge weighted by ``weights``.

    ``out_i = sum_j p_ij drop_ij v_j`` with ``p_ij = w_ij exp(s_ij) / sum_l w_il exp(s_il)`` over
    the edges, ``s = scale * q k^T``. Rows whose weights sum to zero (no edge) output zeros.

    Args:
        q: ``(B, H, N, D)``; k: ``(B, H, M, D)``; v: ``(B, H, M, Dv)``.
        weights: ``(B, H, N, M)`` edge weights (the straight-through indicator in the model).
        mask: ``(B, H, N, M)`` bool, the edges.
        scale: score scale, usually ``1 / sqrt(D)``.
        drop: optional ``(B, H, N, M)`` dropout factors applied after normalisation.

    Returns:
        ``(B, H, N, Dv)``.
    """
    s = (q @ k.transpose(-1, -2)) * scale
    if s.shape[-1] == 0:  # no keys: every row is without edges
        return s @ v
    s = s.masked_fill(~mask, float("-inf"))
    row_max = s.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    w = weights * torch.exp(s - row_max)
    total = w.sum(-1, keepdim=True)
    has_mass = total > 0
    p = w / torch.where(has_mass, total, torch.ones_like(total)) * has_mass
    if drop is not None:
        p = p * drop
    return p @ v
