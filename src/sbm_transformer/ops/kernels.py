"""Sparse kernels of SBM edge attention over a :class:`~sbm_transformer.graph.Graph`.

Two implementations of the same two operations, on the stacked layout (query rows
``r = (b*H + h)*N + i`` of ``(B*H*N, F)`` tensors, key rows ``c = (b*H + h)*M + j`` of
``(B*H*M, F)`` tensors, per-edge values ``(E,)`` in the graph's CSR order):

* ``forward``: scores ``s_e = scale <q_r, k_c>`` on the edges, ``pi`` = their softmax within each
  query row, ``out_r = sum_e pi_e drop_e v_c``. Returns ``out`` and ``pi`` (E,), which backward
  needs. A row without edges outputs zeros.
* ``backward``: gradients of q, k, v and, given the memberships, the straight-through products
  ``G Z`` ``(B*H*N, K)`` and ``G^T Y`` ``(B*H*M, K)`` where ``G_e = clip(t_e + g_pair, -1, 1)``,
  ``t_e`` the gradient of edge e's 0/1 indicator and ``g_pair`` the gradient of its pair's edge
  count.

:class:`TorchKernels` runs wherever torch.sparse does (CPU with MKL, CUDA with cuSPARSE);
:class:`NumbaKernels` fuses each direction into one parallel loop on the CPU.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from sbm_transformer._numba import scratch, sync_threads, use_numba
from sbm_transformer.graph import Graph

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class Memberships(NamedTuple):
    """Inputs of the straight-through estimator, stacked: ``y`` (B*H*N, K), ``z`` (B*H*M, K),
    ``g_pair`` (B*H,) gradient of each pair's edge count."""

    y: Tensor
    z: Tensor
    g_pair: Tensor


class Grads(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor
    gz: Tensor | None  # (B*H*N, K) = G Z
    gy: Tensor | None  # (B*H*M, K) = G^T Y


class Kernels(Protocol):
    name: str

    def forward(
        self, graph: Graph, q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor]: ...

    def backward(
        self,
        graph: Graph,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        drop: Tensor | None,
        softmax: Tensor,
        out: Tensor,
        grad_out: Tensor,
        scale: float,
        ste: Memberships | None,
    ) -> Grads: ...


# ------------------------------------------------------------------------------------ torch
class TorchKernels:
    """torch.sparse CSR implementation: block-diagonal (B*H*N) x (B*H*M) matrices."""

    name = "torch"

    def _block_cols(self, graph: Graph) -> Tensor:
        """(E,) stacked key row of each edge: (b*H + h)*M + j."""
        n, m = graph.num_queries, graph.num_keys
        return _cached(
            graph, "block_cols", lambda: (graph.row_indices() // n) * m + graph.col_indices
        )

    def _block_rows_t(self, graph: Graph) -> Tensor:
        """(E,) stacked query row of each edge, in by-key order."""

        def build() -> Tensor:
            b, h, n, m = graph.shape
            t = graph.transpose()
            col_of_t = torch.repeat_interleave(
                torch.arange(b * h * m, device=graph.device, dtype=t.row_indices.dtype),
                t.ccol_indices.diff(),
                output_size=graph.num_edges,
            )
            return (col_of_t // m) * n + t.row_indices

        return _cached(graph, "block_rows_t", build)

    def _csr(self, graph: Graph, vals: Tensor) -> Tensor:
        b, h, n, m = graph.shape
        return torch.sparse_csr_tensor(
            graph.crow_indices, self._block_cols(graph), vals, size=(b * h * n, b * h * m),
            check_invariants=False,
        )  # fmt: skip

    def _csr_t(self, graph: Graph, vals: Tensor) -> Tensor:
        b, h, n, m = graph.shape
        t = graph.transpose()
        return torch.sparse_csr_tensor(
            t.ccol_indices, self._block_rows_t(graph), vals[t.perm.long()],
            size=(b * h * m, b * h * n), check_invariants=False,
        )  # fmt: skip

    def _sddmm(self, graph: Graph, x: Tensor, y: Tensor) -> Tensor:
        """(E,) per-edge dot products <x_r, y_c>."""
        pattern = self._csr(graph, x.new_zeros(graph.num_edges))
        return torch.sparse.sampled_addmm(pattern, x, y.t().contiguous(), beta=0.0).values()

    @staticmethod
    def _per_edge(graph: Graph, row_values: Tensor) -> Tensor:
        return row_values.index_select(0, graph.row_indices())

    def forward(
        self, graph: Graph, q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        offsets = graph.crow_indices.long()
        s = self._sddmm(graph, q, k) * scale
        row_max = torch.segment_reduce(s, "max", offsets=offsets)
        w = torch.exp(s - self._per_edge(graph, row_max))
        total = torch.segment_reduce(w, "sum", offsets=offsets)
        pi = w / self._per_edge(graph, total)
        out = self._csr(graph, pi if drop is None else pi * drop) @ v
        return out, pi

    def backward(
        self,
        graph: Graph,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        drop: Tensor | None,
        softmax: Tensor,
        out: Tensor,
        grad_out: Tensor,
        scale: float,
        ste: Memberships | None,
    ) -> Grads:
        pi = softmax
        gp = self._sddmm(graph, grad_out, v)
        wv = pi
        if drop is not None:
            gp, wv = gp * drop, pi * drop
        rs = (grad_out * out).sum(-1)  # = sum_e pi_e gp_e per row
        t = pi * (gp - self._per_edge(graph, rs))  # gradient of each edge's indicator and score
        gq = self._csr(graph, t * scale) @ k
        gk = self._csr_t(graph, t * scale) @ q
        gv = self._csr_t(graph, wv) @ grad_out
        gz = gy = None
        if ste is not None:
            pair = graph.row_indices().long() // graph.num_queries
            gl = (t + ste.g_pair[pair]).clamp(-1.0, 1.0)
            gz = self._csr(graph, gl) @ ste.z
            gy = self._csr_t(graph, gl) @ ste.y
        return Grads(gq, gk, gv, gz, gy)


# ------------------------------------------------------------------------------------ numba
def _np(t: Tensor):
    return t.detach().contiguous().numpy()


class NumbaKernels:
    """Fused CPU loops (see :mod:`sbm_transformer.ops._numba_kernels`)."""

    name = "numba"

    def forward(
        self, graph: Graph, q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        from sbm_transformer.ops import _numba_kernels as nk

        sync_threads()
        out = q.new_empty(q.shape[0], v.shape[1])
        pi = q.new_empty(graph.num_edges)
        drop_np = _np(drop) if drop is not None else _np(q.new_empty(0))
        nk.forward(
            _np(graph.crow_indices), _np(graph.col_indices), _np(q), _np(k), _np(v), drop_np,
            scale, graph.num_queries, graph.num_keys, out.numpy(), pi.numpy(),
        )  # fmt: skip
        return out, pi

    def backward(
        self,
        graph: Graph,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        drop: Tensor | None,
        softmax: Tensor,
        out: Tensor,
        grad_out: Tensor,
        scale: float,
        ste: Memberships | None,
    ) -> Grads:
        from sbm_transformer.ops import _numba_kernels as nk

        sync_threads()
        n, m, e = graph.num_queries, graph.num_keys, graph.num_edges
        t = graph.transpose()
        crow, col = _np(graph.crow_indices), _np(graph.col_indices)
        ccol, trow = _np(t.ccol_indices), _np(t.row_indices)
        drop_np = _np(drop) if drop is not None else _np(q.new_empty(0))
        g = _np(grad_out)
        pairs = graph.batch_size * graph.num_heads
        g_pair = _np(ste.g_pair.to(q.dtype) if ste is not None else q.new_zeros(pairs))
        gq = torch.empty_like(q)
        dtype = _np(q).dtype
        w = scratch("edge_weights", (e, 2), dtype)  # per edge, by query: scale * t, G
        w_t = scratch("edge_weights_t", (e, 4), dtype)  # by key: scale * t, pi * drop, G, -
        nk.backward_rows(
            crow, col, _np(t.tpos), _np(k), _np(v), drop_np, _np(softmax), _np(out), g, g_pair,
            scale, n, m, gq.numpy(), w, w_t,
        )  # fmt: skip
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        nk.backward_cols(ccol, trow, _np(q), g, w_t, n, m, gk.numpy(), gv.numpy())
        if ste is None:
            return Grads(gq, gk, gv, None, None)
        gz = q.new_empty(q.shape[0], ste.z.shape[1])
        gy = q.new_empty(k.shape[0], ste.y.shape[1])
        row_tiles = _num_tiles(ste.z, m, e / max(q.shape[0], 1))
        if row_tiles > 1:
            shift = (m - 1).bit_length() - (row_tiles - 1).bit_length()
            ptr, order = _cached(
                graph,
                ("row_tiles", shift),
                lambda: nk.group_by_tile(crow, col, shift, -(-m >> shift)),
            )
            nk.spmm_tiled(ptr, order, col, w, 1, _np(ste.z), n, m, gz.numpy())
        else:
            nk.spmm(crow, col, w, 1, _np(ste.z), n, m, gz.numpy())
        col_tiles = _num_tiles(ste.y, n, e / max(k.shape[0], 1))
        if col_tiles > 1:
            shift = (n - 1).bit_length() - (col_tiles - 1).bit_length()
            ptr = _cached(
                graph,
                ("col_tiles", shift),
                lambda: nk.tile_pointers(ccol, trow, shift, -(-n >> shift)),
            )
            nk.spmm_tiled(ptr, ccol[:0], trow, w_t, 2, _np(ste.y), m, n, gy.numpy())
        else:
            nk.spmm_t(ccol, trow, w_t, 2, _np(ste.y), n, m, gy.numpy())
        return Grads(gq, gk, gv, gz, gy)


#: A membership table (one pair's rows) larger than this is gathered tile by tile...
_TILE_BYTES = 1 << 20
#: ...when rows keep at least this many edges per tile: each tile pass re-reads the output rows.
_MIN_EDGES_PER_TILE = 16


def _num_tiles(table: Tensor, rows_per_pair: int, edges_per_row: float) -> int:
    """Tiles (a power of two) that bring one pair's table rows under ``_TILE_BYTES``; 1 (no
    tiling) when rows would keep fewer than ``_MIN_EDGES_PER_TILE`` edges per tile."""
    pair_bytes = rows_per_pair * table.shape[1] * table.element_size()
    tiles = 1
    while pair_bytes / tiles > _TILE_BYTES:
        tiles *= 2
    return tiles if edges_per_row / tiles >= _MIN_EDGES_PER_TILE else 1


def _cached(graph: Graph, key: object, build):
    value = graph._cache.get(key)  # type: ignore[call-overload]
    if value is None:
        value = build()
        graph._cache[key] = value  # type: ignore[index]
    return value


_TORCH = TorchKernels()
_NUMBA = NumbaKernels()


def get_kernels(name: str, *tensors: Tensor) -> Kernels:
    """Kernels by name: ``"torch"``, ``"numba"``, or ``"auto"`` (numba on CPU if installed)."""
    if name == "torch":
        return _TORCH
    if name == "numba":
        if not use_numba(*tensors):
            raise ValueError(
                "the numba kernels need numba installed (pip install 'sbm-transformer[numba]'), "
                "SBMT_DISABLE_NUMBA unset and CPU tensors"
            )
        return _NUMBA
    if name == "auto":
        return _NUMBA if use_numba(*tensors) else _TORCH
    raise ValueError(f"unknown kernels {name!r}; expected 'auto', 'torch' or 'numba'")
