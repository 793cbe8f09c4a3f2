"""Backward of the memberships ``Y = sigmoid(F C_h^T)`` fused with the straight-through products.

The straight-through estimator hands back ``G Z`` and ``G^T Y`` (one K-wide row per query and per
key, ``G`` the clipped gradient of each edge). Through ``lambda_ij = Y_i B Z_j^T`` and the sigmoid
they become the gradients of the node features F (the node MLP's outputs), of the cluster
embeddings C and of B. Autograd would build four more (B, H, L, K) tensors for that (``gY``,
``gZ`` and their sigmoid derivatives: 64 MiB each at L = 64k, K = 128, 2 heads, fresh memory
every step); here the rows are taken in chunks of a few MiB, so the intermediates stay in cache
and are allocated once per call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor


class MembershipInputs(NamedTuple):
    """What the memberships are made of: ``Y = sigmoid(query_features @ clusters^T)`` and
    ``Z = sigmoid(key_features @ clusters^T)``, per head.

    ``query_features`` ``(B, H, N, D')``, ``key_features`` ``(B, H, M, D')``, ``clusters``
    ``(H, K, D')``.
    """

    query_features: Tensor
    key_features: Tensor
    clusters: Tensor


#: Rows of the (pairs, rows, K) products handled at a time: about this many bytes.
CHUNK_BYTES = 4 << 20


def _chunks(pairs: int, rows: int, row_bytes: int) -> Iterator[tuple[slice, slice]]:
    """(pairs, rows) slices covering a ``(pairs, rows, ...)`` tensor in about ``CHUNK_BYTES``
    pieces, each contiguous: whole pairs when a pair is small, else row blocks of one pair."""
    per_pair = rows * row_bytes
    if per_pair > CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // row_bytes)
        for p in range(pairs):
            for first in range(0, rows, step):
                yield slice(p, p + 1), slice(first, min(rows, first + step))
    else:
        step = max(1, CHUNK_BYTES // max(per_pair, 1))
        for first in range(0, pairs, step):
            yield slice(first, min(pairs, first + step)), slice(0, rows)


def sigmoid_membership_grads(
    products: Tensor,
    mixing: Tensor,
    memberships: Tensor,
    features: Tensor,
    centers: Tensor,
    grad_centers: Tensor,
    grad_blocks: Tensor | None = None,
) -> Tensor:
    """Gradients reaching the features and centres from one side's straight-through product.

    With ``gM = products @ mixing`` (the gradient of the memberships M) and
    ``s = gM * M * (1 - M)`` (through the sigmoid), returns ``s @ centers`` (the features'
    gradient) and adds ``s^T @ features`` to ``grad_centers``; with ``grad_blocks``, also adds
    ``M^T @ products`` to it (the block matrix's gradient, from the query side).

    Args:
        products: ``(P, L, K)`` ``G Z`` (queries) or ``G^T Y`` (keys).
        mixing: ``(P, K, K)``: ``B^T`` for queries, ``B`` for keys.
        memberships: ``(P, L, K)`` M, sigmoid outputs.
        features: ``(P, L, D')``.
        centers: ``(P, K, D')`` each pair's cluster embeddings.
        grad_centers: ``(P, K, D')``, accumulated into.
        grad_blocks: ``(P, K, K)`` or None, accumulated into.

    Returns:
        ``(P, L, D')`` gradient of the features.
    """
    pairs, rows, k = products.shape
    grad_features = features.new_empty(features.shape)
    chunks = list(_chunks(pairs, rows, k * products.element_size()))
    most_pairs = max(ps.stop - ps.start for ps, _ in chunks)
    most_rows = max(rs.stop - rs.start for _, rs in chunks)
    grad_m = products.new_empty(most_pairs, most_rows, k)
    slope = products.new_empty(most_pairs, most_rows, k)
    for ps, rs in chunks:
        shape = (ps.stop - ps.start, rs.stop - rs.start, k)
        g, m = products[ps, rs], memberships[ps, rs]
        gm = grad_m.view(-1)[: g.numel()].view(shape)
        sl = slope.view(-1)[: g.numel()].view(shape)
        if grad_blocks is not None:
            grad_blocks[ps].baddbmm_(m.transpose(1, 2), g)
        torch.bmm(g, mixing[ps], out=gm)
        torch.addcmul(m, m, m, value=-1.0, out=sl)  # M (1 - M)
        sl.mul_(gm)
        torch.bmm(sl, centers[ps], out=grad_features[ps, rs])
        grad_centers[ps].baddbmm_(sl.transpose(1, 2), features[ps, rs])
    return grad_features
