"""The sampler and the edge attention as ``torch.library`` custom ops, for ``torch.compile``.

Dynamo cannot trace into numba dispatchers or torch.sparse internals; as custom ops with fake
(meta) implementations they are single opaque nodes of the compiled graph, with their real
implementation run as is. Eager calls do not use them: :func:`~sbm_transformer.ops.sparse.
sbm_edge_attention` and :func:`~sbm_transformer.sampling.sample_graph` switch to these ops only
while ``torch.compiler.is_compiling()``, so eager keeps its caches (the graph's layout, kept
between forward and backward) and its speed.

* ``sbmt::sample_csr``: the graph's CSR arrays; the number of edges is data-dependent (an
  unbacked size in the fake implementation). The seed comes in as a tensor, drawn by the caller.
* ``sbmt::edge_attention`` / ``sbmt::edge_attention_backward``: the kernels' forward and
  backward passes (the kernels named by the ``kernels`` argument: ``"torch"``, ``"numba"`` or
  ``"triton"``), which :class:`~sbm_transformer.ops.sparse._CompiledSBMEdgeAttention` (an
  autograd Function dynamo traces) calls; the estimator's remaining products are plain torch.
  Optional tensors that are absent are passed and returned as empty tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sbm_transformer.graph import Graph, index_dtype
from sbm_transformer.ops.kernels import Softmax, get_kernels

_NONE = (0,)  # the shape of an absent optional tensor


def _opt(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_NONE) if t is None else t


def _given(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _graph(crow: Tensor, col: Tensor, shape: list[int], tile_shift: int) -> Graph:
    b, h, n, m = shape
    return Graph(
        crow, col, (b, h, n, m), tile_shift=None if tile_shift < 0 else tile_shift, check=False
    )


# ------------------------------------------------------------------------------- sampler
@torch.library.custom_op("sbmt::sample_csr", mutates_args=())
def sample_csr(
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    exploration: float,
    key_padding_mask: Tensor | None,
    causal: bool,
    seed: Tensor,
    max_edges: int,
    distribution: str,
) -> tuple[Tensor, Tensor]:
    """``(crow_indices, col_indices)`` of :func:`~sbm_transformer.sampling.sample_graph`, the
    graph drawn from a generator seeded with ``seed`` (a one-element integer tensor)."""
    from sbm_transformer.sampling import sample_graph_eager, seeded_generator

    generator = seeded_generator(seed, Y.device)
    graph = sample_graph_eager(
        Y, Z, B, exploration=exploration, key_padding_mask=key_padding_mask, causal=causal,
        generator=generator, max_edges=None if max_edges < 0 else max_edges,
        distribution=distribution,
    )  # fmt: skip
    return graph.crow_indices.clone(), graph.col_indices.clone()


@sample_csr.register_fake
def _(Y, Z, B, exploration, key_padding_mask, causal, seed, max_edges, distribution):
    bsz, heads, n, _ = Y.shape
    m = Z.shape[2]
    dtype = index_dtype(bsz * heads * n * m, bsz * heads * n + 1)
    edges = torch.library.get_ctx().new_dynamic_size()
    crow = Y.new_empty(bsz * heads * n + 1, dtype=dtype)
    return crow, Y.new_empty(edges, dtype=dtype)


def sample_graph_op(
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    *,
    exploration: float,
    key_padding_mask: Tensor | None,
    causal: bool,
    seed: Tensor,
    max_edges: int | None,
    distribution: str,
) -> Graph:
    """:func:`sample_csr` as a :class:`Graph` (keys sorted or grouped by the sampler's tiles)."""
    from sbm_transformer.sampling import TILE_SHIFT

    crow, col = sample_csr(
        Y, Z, B, exploration, key_padding_mask, causal, seed,
        -1 if max_edges is None else max_edges, distribution,
    )  # fmt: skip
    bsz, heads, n, _ = Y.shape
    # both samplers group each row's keys by TILE_SHIFT tiles (torch's sorts them)
    return Graph(crow, col, (bsz, heads, n, Z.shape[2]), tile_shift=TILE_SHIFT, check=False)


# ------------------------------------------------------------------------ edge attention
@torch.library.custom_op("sbmt::edge_attention", mutates_args=())
def edge_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    crow: Tensor,
    col: Tensor,
    drop: Tensor,
    shape: list[int],
    tile_shift: int,
    scale: float,
    kernels: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the edge attention on flat ``q`` (R, D), ``k`` (C, D), ``v`` (C, Dv): ``out``
    (R, Dv) and the softmax (``weights`` (E,), ``row_scale`` (R,)); ``drop`` empty for none."""
    if col.numel() == 0:  # no edges: zeros (the kernels assume at least one)
        weights, row_scale = _softmax_like(q, 0, kernels)
        return q.new_zeros(q.shape[0], v.shape[1]), weights.zero_(), row_scale.zero_()
    graph = _graph(crow, col, shape, tile_shift)
    kern = get_kernels(kernels, q)
    with torch.autocast(q.device.type, enabled=False):
        out, softmax = kern.forward(graph, q, k, v, _given(drop), scale)
    return out, softmax.weights.clone(), softmax.row_scale.clone()


@edge_attention.register_fake
def _(q, k, v, crow, col, drop, shape, tile_shift, scale, kernels):
    return q.new_empty(q.shape[0], v.shape[1]), *_softmax_like(q, col.shape[0], kernels)


def _softmax_like(q: Tensor, edges: int, kernels: str) -> tuple[Tensor, Tensor]:
    """Uninitialised tensors shaped like the softmax the kernels' forward returns: a weight per
    edge and a scale per row in q's dtype; the Triton kernels' holds no weights and a
    log-sum-exp per row in their accumulation dtype (see ``TritonKernels``)."""
    if kernels == "triton":
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(0, dtype=acc), q.new_empty(q.shape[0], dtype=acc)
    return q.new_empty(edges), q.new_empty(q.shape[0])


@torch.library.custom_op("sbmt::edge_attention_backward", mutates_args=())
def edge_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    crow: Tensor,
    col: Tensor,
    drop: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    out: Tensor,
    y: Tensor,
    z: Tensor,
    g_pair: Tensor,
    shape: list[int],
    tile_shift: int,
    scale: float,
    kernels: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v, and the estimator's products ``G Z`` (R, K) and ``G^T Y`` (C, K)
    (empty when ``y`` is empty: no estimator)."""
    from sbm_transformer.ops.kernels import Memberships

    ste = None if y.numel() == 0 else Memberships(y, z, g_pair)
    if col.numel() == 0:
        gz = q.new_zeros(0) if ste is None else y.new_zeros(q.shape[0], y.shape[1])
        gy = q.new_zeros(0) if ste is None else z.new_zeros(k.shape[0], z.shape[1])
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), gz, gy
    graph = _graph(crow, col, shape, tile_shift)
    kern = get_kernels(kernels, q)
    softmax = Softmax(weights, row_scale)
    with torch.autocast(q.device.type, enabled=False):
        g = kern.backward(graph, q, k, v, _given(drop), softmax, out, grad_out, scale, ste)
    gz = q.new_zeros(0) if g.gz is None else g.gz.clone()  # may be scratch memory
    gy = q.new_zeros(0) if g.gy is None else g.gy.clone()
    return g.q, g.k, g.v, gz, gy


@edge_attention_backward.register_fake
def _(grad_out, q, k, v, crow, col, drop, weights, row_scale, out, y, z, g_pair, shape,
      tile_shift, scale, kernels):  # fmt: skip
    gz = q.new_empty(0) if y.numel() == 0 else y.new_empty(q.shape[0], y.shape[1])
    gy = q.new_empty(0) if y.numel() == 0 else z.new_empty(k.shape[0], z.shape[1])
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), gz, gy
