"""SBM edge attention as one autograd Function: O(E * (D + K)) forward and backward.

The straight-through estimator lives inside the op. The forward pass only needs the sampled
edges, never ``lambda_e = Y_i B Z_j^T``; backward turns the gradient of each edge's 0/1
indicator into the gradient of ``lambda_e`` (hardtanh, as in the original code) and pushes it
into Y, Z and B with two sparse products fused into the attention backward passes. Given what
the memberships are made of (:class:`~sbm_transformer.ops.memberships.MembershipInputs`, as
:class:`~sbm_transformer.SBMAttention` does), it continues through the sigmoid to the node
features and cluster embeddings without materialising the gradients of Y and Z.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sbm_transformer.graph import Graph
from sbm_transformer.ops.kernels import Grads, Kernels, Memberships, Softmax
from sbm_transformer.ops.memberships import MembershipInputs, sigmoid_membership_grads


class _SBMEdgeAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        Y: Tensor,
        Z: Tensor,
        Bx: Tensor,
        fq: Tensor | None,
        fk: Tensor | None,
        clusters: Tensor | None,
        graph: Graph,
        drop: Tensor | None,
        scale: float,
        kernels: Kernels,
    ) -> tuple[Tensor, Tensor]:
        bsz, heads, n, d = q.shape
        m, dv = k.shape[2], v.shape[3]
        qf = q.reshape(bsz * heads * n, d).contiguous()
        kf = k.reshape(bsz * heads * m, d).contiguous()
        vf = v.reshape(bsz * heads * m, dv).contiguous()
        with torch.autocast(q.device.type, enabled=False):  # the op picks its own dtype
            out, softmax = kernels.forward(graph, qf, kf, vf, drop, scale)
        ctx.save_for_backward(qf, kf, vf, Y, Z, Bx, *softmax, out, drop, fq, fk, clusters)
        ctx.graph, ctx.scale, ctx.kernels = graph, scale, kernels
        counts = graph.edges_per_head().to(q.dtype)  # (B, H)
        return out.reshape(bsz, heads, n, dv), counts

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_counts: Tensor) -> tuple[Tensor | None, ...]:
        with torch.autocast(grad_out.device.type, enabled=False):
            return _SBMEdgeAttention._backward(ctx, grad_out, grad_counts)

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor, grad_counts: Tensor) -> tuple[Tensor | None, ...]:
        qf, kf, vf, Y, Z, Bx, weights, row_scale, out, drop, fq, fk, clusters = ctx.saved_tensors
        softmax = Softmax(weights, row_scale)
        graph: Graph = ctx.graph
        bsz, heads, n, k = Y.shape
        m, p = Z.shape[2], bsz * heads
        need_ste = any(ctx.needs_input_grad[3:9])
        ste = None
        if need_ste:
            g_pair = grad_counts.reshape(p) if grad_counts is not None else Y.new_zeros(p)
            ste = Memberships(
                Y.reshape(p * n, k).contiguous(),
                Z.reshape(p * m, k).contiguous(),
                g_pair.contiguous(),
            )
        g = grad_out.reshape(out.shape).contiguous()
        grads = ctx.kernels.backward(graph, qf, kf, vf, drop, softmax, out, g, ctx.scale, ste)
        return _input_grads(grads, Y, Z, Bx, fq, fk, clusters, ste)


class _CompiledSBMEdgeAttention(torch.autograd.Function):
    """:class:`_SBMEdgeAttention` for ``torch.compile``: the graph comes in as its CSR tensors
    and the kernels run as the custom ops of :mod:`sbm_transformer.ops.library`, which dynamo
    keeps opaque; the rest (reshapes, the estimator's products) is traced. The layout the numba
    kernels cache on a graph is rebuilt in backward (a pass over the edges when keys are tiled,
    at N >= 16k)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        Y: Tensor,
        Z: Tensor,
        Bx: Tensor,
        fq: Tensor | None,
        fk: Tensor | None,
        clusters: Tensor | None,
        crow: Tensor,
        col: Tensor,
        drop: Tensor | None,
        shape: tuple[int, int, int, int],
        tile_shift: int,
        scale: float,
        kernels: str,
    ) -> tuple[Tensor, Tensor]:
        from sbm_transformer.ops import library

        bsz, heads, n, d = q.shape
        m, dv = k.shape[2], v.shape[3]
        qf = q.reshape(bsz * heads * n, d).contiguous()
        kf = k.reshape(bsz * heads * m, d).contiguous()
        vf = v.reshape(bsz * heads * m, dv).contiguous()
        dropt = qf.new_empty(0) if drop is None else drop
        args = (list(shape), tile_shift, scale, kernels)
        out, weights, row_scale = library.edge_attention(qf, kf, vf, crow, col, dropt, *args)
        ctx.save_for_backward(qf, kf, vf, Y, Z, Bx, weights, row_scale, out, dropt, crow, col)
        ctx.inputs = (fq, fk, clusters)
        ctx.args = args
        counts = Graph(crow, col, shape, check=False).edges_per_head().to(q.dtype)
        return out.reshape(bsz, heads, n, dv), counts

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_counts: Tensor) -> tuple[Tensor | None, ...]:
        from sbm_transformer.ops import library

        qf, kf, vf, Y, Z, Bx, weights, row_scale, out, dropt, crow, col = ctx.saved_tensors
        fq, fk, clusters = ctx.inputs
        bsz, heads, n, k = Y.shape
        m, p = Z.shape[2], bsz * heads
        ste = None
        y = z = g_pair = qf.new_empty(0)
        if any(ctx.needs_input_grad[3:9]):
            g_pair = grad_counts.reshape(p) if grad_counts is not None else Y.new_zeros(p)
            y, z = Y.reshape(p * n, k).contiguous(), Z.reshape(p * m, k).contiguous()
            g_pair = g_pair.contiguous()
            ste = Memberships(y, z, g_pair)
        g = grad_out.reshape(out.shape).contiguous()
        gq, gk, gv, gz, gy = library.edge_attention_backward(
            g, qf, kf, vf, crow, col, dropt, weights, row_scale, out, y, z, g_pair, *ctx.args
        )
        grads = Grads(gq, gk, gv, gz if ste else None, gy if ste else None)
        return (*_input_grads(grads, Y, Z, Bx, fq, fk, clusters, ste)[:9], *(None,) * 7)


def _input_grads(
    grads: Grads,
    Y: Tensor,
    Z: Tensor,
    Bx: Tensor,
    fq: Tensor | None,
    fk: Tensor | None,
    clusters: Tensor | None,
    ste: Memberships | None,
) -> tuple[Tensor | None, ...]:
    """The gradients of every input of the op from the kernels' backward pass."""
    bsz, heads, n, k = Y.shape
    m, p = Z.shape[2], bsz * heads
    gq = grads.q.reshape(bsz, heads, n, -1)
    gk = grads.k.reshape(bsz, heads, m, -1)
    gv = grads.v.reshape(bsz, heads, m, -1)
    gY = gZ = gB = gfq = gfk = gC = None
    if ste is not None:
        assert grads.gz is not None and grads.gy is not None
        GZ = grads.gz.reshape(p, n, k)  # sum_j G_ij Z_j
        GY = grads.gy.reshape(p, m, k)  # sum_i G_ij Y_i
        Bp = Bx.reshape(p, k, k)
        if fq is None:
            gY = (GZ @ Bp.transpose(1, 2)).reshape(Y.shape)  # lambda_ij = Y_i B Z_j^T
            gZ = (GY @ Bp).reshape(Z.shape)
            gB = (Y.reshape(p, n, k).transpose(1, 2) @ GZ).reshape(Bx.shape)
        else:
            assert fk is not None and clusters is not None
            gfq, gfk, gC, gB = _feature_grads(GZ, GY, Bp, ste, fq, fk, clusters)
            gB = gB.reshape(Bx.shape)
    return gq, gk, gv, gY, gZ, gB, gfq, gfk, gC, None, None, None, None


def _feature_grads(
    GZ: Tensor, GY: Tensor, Bp: Tensor, ste: Memberships, fq: Tensor, fk: Tensor, clusters: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the query and key features, the clusters and B (stacked ``(P, K, K)``)."""
    bsz, heads, n, d = fq.shape
    m, p, k = fk.shape[2], GZ.shape[0], GZ.shape[2]
    centers = clusters.expand(bsz, heads, k, d).reshape(p, k, d)
    grad_centers = centers.new_zeros(p, k, d)
    grad_blocks = Bp.new_zeros(p, k, k)
    y, z = ste.y.view(p, n, k), ste.z.view(p, m, k)
    gfq = sigmoid_membership_grads(
        GZ, Bp.transpose(1, 2), y, fq.reshape(p, n, d), centers, grad_centers, grad_blocks
    )
    gfk = sigmoid_membership_grads(GY, Bp, z, fk.reshape(p, m, d), centers, grad_centers)
    gC = grad_centers.reshape(bsz, heads, k, d).sum(0)
    return gfq.reshape(fq.shape), gfk.reshape(fk.shape), gC, grad_blocks


def sbm_edge_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    Y: Tensor,
    Z: Tensor,
    Bx: Tensor,
    graph: Graph,
    *,
    scale: float,
    kernels: Kernels,
    drop: Tensor | None = None,
    inputs: MembershipInputs | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention along the edges of ``graph``, with the SBM straight-through estimator.

    ``out_i = sum_j p_ij drop_ij v_j`` with ``p`` the softmax of ``scale q_i k_j^T`` over the
    edges of query i (zeros for a query without edges). Same function and gradients as
    :func:`~sbm_transformer.ops.reference.dense_edge_attention` with the dense straight-through
    indicator of ``lambda = Y B Z^T``.

    Args:
        q: ``(B, H, N, D)``; k: ``(B, H, M, D)``; v: ``(B, H, M, Dv)``, one floating dtype.
        Y: ``(B, H, N, K)``; Z: ``(B, H, M, K)``; Bx: ``(B, H, K, K)`` (an expanded view is fine).
        graph: the edges.
        scale: score scale.
        kernels: implementation (see :func:`~sbm_transformer.ops.kernels.get_kernels`).
        drop: optional ``(E,)`` dropout factors (0 or 1 / (1 - p)), applied after normalisation.
        inputs: what Y and Z are made of (``Y = sigmoid(query_features @ clusters^T)``); Y and Z
            then must not require gradients: theirs go to the inputs instead.

    Returns:
        ``out`` ``(B, H, N, Dv)`` and the edge count of each (batch, head) pair ``(B, H)`` (float,
        differentiable through the estimator: its gradient adds to every edge of the pair).
    """
    fq, fk, clusters = inputs if inputs is not None else (None, None, None)
    if torch.compiler.is_compiling():  # custom ops dynamo keeps opaque; no data-dependent branch
        tile_shift = -1 if graph.tile_shift is None else graph.tile_shift
        return _CompiledSBMEdgeAttention.apply(
            q, k, v, Y, Z, Bx, fq, fk, clusters, graph.crow_indices, graph.col_indices, drop,
            graph.shape, tile_shift, scale, kernels.name,
        )  # fmt: skip
    if graph.num_edges == 0:  # nothing to attend to: zeros, and zero gradients for every input
        given = [t for t in (q, k, v, Y, Z, Bx, fq, fk, clusters) if t is not None]
        zero = sum(t.sum() for t in given) * 0.0
        b, h, n, _ = q.shape
        return q.new_zeros(b, h, n, v.shape[3]) + zero, q.new_zeros(b, h) + zero
    return _SBMEdgeAttention.apply(
        q, k, v, Y, Z, Bx, fq, fk, clusters, graph, drop, scale, kernels
    )  # fmt: skip
