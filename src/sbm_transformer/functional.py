"""Functional SBM attention: sample a graph from the SBM, attend along its edges.

Reference: Cho et al., "Transformers meet Stochastic Block Models: Attention with Data-Adaptive
Sparsity and Cost", NeurIPS 2022, arXiv:2210.15541.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sbm_transformer.graph import Graph
from sbm_transformer.ops.kernels import get_kernels
from sbm_transformer.ops.memberships import MembershipInputs
from sbm_transformer.ops.reference import dense_edge_attention, dense_indicator
from sbm_transformer.ops.sparse import sbm_edge_attention
from sbm_transformer.sampling import _check_sbm_inputs, check_distribution, sample_graph

__all__ = ["BACKENDS", "MembershipInputs", "SBMStats", "attend", "sbm_attention"]

#: Accepted values of ``backend``. ``"sparse"`` picks the fastest sparse kernels for the device
#: (Triton on CUDA when installed, numba on CPU when installed, torch.sparse otherwise);
#: ``"sparse-torch"``/``"sparse-numba"``/``"sparse-triton"`` force one (Triton on CPU tensors
#: only under ``TRITON_INTERPRET=1``, for tests). ``"auto"`` uses ``"dense"`` for tiny problems
#: and ``"sparse"`` otherwise.
BACKENDS = ("auto", "dense", "sparse", "sparse-torch", "sparse-numba", "sparse-triton")

#: ``"auto"`` runs the dense backend when B*H*N*M is at most this (where it is faster).
AUTO_DENSE_MAX_PAIRS = 64 * 64 * 4


@dataclass
class SBMStats:
    """What one SBM attention call sampled.

    Attributes:
        density: ``(H,)`` fraction of (query, key) pairs that are edges, per head, averaged over
            the batch. Differentiable through the straight-through estimator, so
            ``loss + w * density.mean()`` trains heads to be sparser.
        graph: the sampled :class:`~sbm_transformer.graph.Graph`.
    """

    density: Tensor
    graph: Graph

    @property
    def num_edges(self) -> int:
        """Total number of edges over batch and heads."""
        return self.graph.num_edges

    @property
    def edges_per_query(self) -> float:
        """Mean number of edges per query (over batch, heads and queries)."""
        b, h, n, _ = self.graph.shape
        return self.num_edges / max(b * h * n, 1)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(
            f"k must have shape (B={b}, H={h}, M, D={d}) to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(
            f"v must have shape (B, H, M, Dv) with (B, H, M)={tuple(k.shape[:3])} like k, "
            f"got {tuple(v.shape)}"
        )


def _check_memberships(q: Tensor, k: Tensor, Y: Tensor, Z: Tensor) -> None:
    if Y.dim() != 4 or tuple(Y.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(
            f"Y must have shape (B, H, N, K) with (B, H, N)={tuple(q.shape[:3])}, "
            f"got {tuple(Y.shape)}"
        )
    if Z.dim() != 4 or tuple(Z.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(
            f"Z must have shape (B, H, M, K) with (B, H, M)={tuple(k.shape[:3])}, "
            f"got {tuple(Z.shape)}"
        )
    if Y.device != q.device:
        raise ValueError(f"Y, Z and B must be on the device of q ({q.device}), got {Y.device}")


def _check_inputs(k: Tensor, Y: Tensor, Z: Tensor, inputs: MembershipInputs) -> None:
    if Y.requires_grad or Z.requires_grad:
        raise ValueError("Y and Z must not require gradients when their inputs are given")
    fq, fk, clusters = inputs
    b, h, n, kk = Y.shape
    if clusters.dim() != 3 or clusters.shape[0] != h or clusters.shape[1] != kk:
        raise ValueError(
            f"inputs.clusters must have shape (H={h}, K={kk}, D'), got {tuple(clusters.shape)}"
        )
    width = clusters.shape[2]
    for name, t, length in (("query_features", fq, n), ("key_features", fk, k.shape[2])):
        if tuple(t.shape) != (b, h, length, width):
            raise ValueError(
                f"inputs.{name} must have shape {(b, h, length, width)}, got {tuple(t.shape)}"
            )


def _uniforms(size: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``size`` uniforms on ``device``, from ``generator`` when given (drawn outside compiled
    graphs then: dynamo does not take generators)."""
    if generator is None:
        return torch.rand(size, device=device)
    return _uniforms_from(size, generator).to(device)


@torch.compiler.disable
def _uniforms_from(size: int, generator: torch.Generator) -> Tensor:
    return torch.rand(size, generator=generator, device=generator.device)


def sbm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    *,
    graph: Graph | None = None,
    key_padding_mask: Tensor | None = None,
    exploration: float = 0.01,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "auto",
    generator: torch.Generator | None = None,
    scale: float | None = None,
    max_edges: int | None = None,
    distribution: str = "poisson",
) -> tuple[Tensor, SBMStats]:
    """SBM attention: sample a sparse query-key graph per head, softmax-attend along its edges.

    ``out_i = sum_j p_ij v_j`` with ``p_ij = A_ij exp(s_ij) / sum_l A_il exp(s_il)``,
    ``s = scale * q k^T``, ``A`` sampled from the SBM with edge probability
    ``1 - exp(-(Y_i B Z_j^T + exploration))`` (``distribution="poisson"``, the paper's) or
    ``min(1, Y_i B Z_j^T + exploration)`` (``"bernoulli"``, the released code's)
    (:func:`~sbm_transformer.sampling.edge_probability`).
    A query without edges outputs zeros. Gradients reach q, k, v directly and Y, Z, B through the
    straight-through estimator (hardtanh of the gradient at each sampled edge).

    Args:
        q: ``(B, H, N, D)`` queries.
        k: ``(B, H, M, D)`` keys.
        v: ``(B, H, M, Dv)`` values.
        Y: ``(B, H, N, K)`` query memberships in [0, 1].
        Z: ``(B, H, M, K)`` key memberships in [0, 1].
        B: ``(H, K, K)`` or ``(B, H, K, K)`` block matrix (non-negative, summing to at most 1).
        graph: use these edges instead of sampling (e.g. to compare backends on one graph).
        key_padding_mask: ``(B, M)`` bool, True = padding key, never attended.
        exploration: rate of the uniform exploration layer (paper: 0.01); 0 disables it.
        causal: only keys ``j <= i`` (needs N == M).
        dropout_p: probability of dropping an edge weight after normalisation.
        backend: one of :data:`BACKENDS`.
        generator: torch.Generator for the graph and the dropout mask.
        scale: score scale, default ``1 / sqrt(D)``.
        max_edges: raise before sampling if the expected edge count exceeds this.
        distribution: ``"poisson"`` or ``"bernoulli"``, the law of the sampled edges.

    Returns:
        ``(out, stats)``: ``out`` ``(B, H, N, Dv)`` in the dtype of q and :class:`SBMStats`.
        bfloat16/float16 inputs are computed in float32.
    """
    return attend(
        q, k, v, Y, Z, B, graph=graph, key_padding_mask=key_padding_mask,
        exploration=exploration, causal=causal, dropout_p=dropout_p, backend=backend,
        generator=generator, scale=scale, max_edges=max_edges, distribution=distribution,
    )  # fmt: skip


def _reads_half(kernels: object, dtype: torch.dtype) -> bool:
    """Whether ``kernels`` take q, k, v of ``dtype`` (float16, bfloat16) without conversion."""
    return dtype in (torch.float16, torch.bfloat16) and getattr(kernels, "name", "") == "triton"


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    *,
    graph: Graph | None = None,
    key_padding_mask: Tensor | None = None,
    exploration: float = 0.01,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "auto",
    generator: torch.Generator | None = None,
    scale: float | None = None,
    max_edges: int | None = None,
    inputs: MembershipInputs | None = None,
    distribution: str = "poisson",
) -> tuple[Tensor, SBMStats]:
    """:func:`sbm_attention`, optionally told what the memberships are made of.

    With ``inputs`` (``Y = sigmoid(inputs.query_features @ inputs.clusters^T)``, Z likewise;
    Y and Z given without gradients), the gradients go to the inputs instead of Y and Z, and the
    sparse backend computes them without the (B, H, L, K) gradient tensors of Y and Z. This is
    how :class:`~sbm_transformer.SBMAttention` calls it.
    """
    _check_qkv(q, k, v)
    _check_memberships(q, k, Y, Z)
    if inputs is not None:
        _check_inputs(k, Y, Z, inputs)
    Bx = _check_sbm_inputs(Y, Z, B, exploration, key_padding_mask, causal)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    check_distribution(distribution)
    bsz, heads, n, d = q.shape
    m = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    if graph is None:
        graph = sample_graph(
            Y.detach(), Z.detach(), Bx.detach(), exploration=exploration,
            key_padding_mask=key_padding_mask, causal=causal, generator=generator,
            max_edges=max_edges, distribution=distribution,
        )  # fmt: skip
    else:
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be a sbm_transformer.Graph, got {type(graph).__name__}")
        graph.check_compatible(bsz, heads, n, m, q.device)
        if key_padding_mask is not None or causal:
            graph.check_masks(key_padding_mask, causal)

    drop = None
    if dropout_p > 0.0:
        u = _uniforms(graph.col_indices.shape[0], generator, q.device)
        drop = (u >= dropout_p).to(q.dtype) / (1.0 - dropout_p)

    if backend == "auto":
        backend = "dense" if bsz * heads * n * m <= AUTO_DENSE_MAX_PAIRS else "sparse"
    kernels = None
    if backend != "dense":
        kernels = get_kernels(backend.removeprefix("sparse-") if "-" in backend else "auto", q)
    work = torch.promote_types(q.dtype, torch.float32)
    # The Triton kernels read half-precision q, k, v as they are (accumulating in float32):
    # converting first would double the bytes they gather. The others compute in float32.
    qkv = q.dtype if _reads_half(kernels, q.dtype) else work
    qw, kw, vw = q.to(qkv), k.to(qkv), v.to(qkv)
    Yw, Zw, Bw = Y.to(work), Z.to(work), Bx.to(work)
    dropw = None if drop is None else drop.to(work)

    feats = None
    if inputs is not None:
        feats = MembershipInputs(*(t.to(work) for t in inputs))
        if backend == "dense":  # the reference: plain autograd from the inputs
            centers = feats.clusters.transpose(-1, -2)
            Yw = torch.sigmoid(feats.query_features @ centers)
            Zw = torch.sigmoid(feats.key_features @ centers)
            feats = None
    if backend == "dense":
        mask = graph.to_dense()
        lam = Yw @ Bw @ Zw.transpose(-1, -2)  # (B, H, N, M)
        indicator = dense_indicator(lam, mask)
        drop_dense = None if dropw is None else graph.scatter_dense(dropw)
        out = dense_edge_attention(qw, kw, vw, indicator, mask, scale, drop_dense)
        per_head = indicator.sum(dim=(2, 3))  # (B, H)
    else:
        assert kernels is not None
        out, per_head = sbm_edge_attention(
            qw, kw, vw, Yw, Zw, Bw, graph, scale=scale, kernels=kernels, drop=dropw,
            inputs=feats,
        )  # fmt: skip
    density = per_head.sum(0) / max(bsz * n * m, 1)
    return out.to(q.dtype), SBMStats(density=density, graph=graph)
