"""Sparse kernels of SBM edge attention over a :class:`~sbm_transformer.graph.Graph`.

Two implementations of the same two operations, on the stacked layout (query rows
``r = (b*H + h)*N + i`` of ``(B*H*N, F)`` tensors, key rows ``c = (b*H + h)*M + j`` of
``(B*H*M, F)`` tensors, per-edge values ``(E,)`` in the graph's CSR order):

* ``forward``: scores ``s_e = scale <q_r, k_c>`` on the edges, ``pi`` = their softmax within each
  query row, ``out_r = sum_e pi_e drop_e v_c``. Returns ``out`` and the :class:`Softmax` that
  backward needs: ``pi`` as unnormalised weights and one scale per row. A row without edges
  outputs zeros.
* ``backward``: gradients of q, k, v and, given the memberships, the straight-through products
  ``G Z`` ``(B*H*N, K)`` and ``G^T Y`` ``(B*H*M, K)`` where ``G_e = clip(t_e + g_pair, -1, 1)``,
  ``t_e`` the gradient of edge e's 0/1 indicator and ``g_pair`` the gradient of its pair's edge
  count.

:class:`TorchKernels` runs wherever torch.sparse does (CPU with MKL, CUDA with cuSPARSE);
:class:`NumbaKernels` fuses each direction into one parallel loop on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple, Protocol, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

from sbm_transformer._numba import recycled, scratch, sync_threads, use_numba
from sbm_transformer.graph import (
    TILE_SHIFT,
    Graph,
    TransposedGraph,
    one_tile_as_none,
    transpose_into,
)

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class Memberships(NamedTuple):
    """Inputs of the straight-through estimator, stacked: ``y`` (B*H*N, K), ``z`` (B*H*M, K),
    ``g_pair`` (B*H,) gradient of each pair's edge count."""

    y: Tensor
    z: Tensor
    g_pair: Tensor


class Softmax(NamedTuple):
    """The edges' softmax, as forward leaves it: ``pi_e = weights[e] * row_scale[r]`` for edge e
    of row r. ``weights`` (E,) ``exp(s_e - max of row r)``, ``row_scale`` (R,) ``1 / sum`` of the
    row's weights (0 for a row without edges). Normalising in place would take one more pass
    over every edge."""

    weights: Tensor
    row_scale: Tensor


class Grads(NamedTuple):
    """Gradients of q, k, v, and the straight-through products. ``gz`` and ``gy`` may be
    scratch memory: valid until the next backward call on this thread."""

    q: Tensor
    k: Tensor
    v: Tensor
    gz: Tensor | None  # (B*H*N, K) = G Z
    gy: Tensor | None  # (B*H*M, K) = G^T Y


class Kernels(Protocol):
    name: str

    def forward(
        self, graph: Graph, q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, scale: float
    ) -> tuple[Tensor, Softmax]: ...

    def backward(
        self,
        graph: Graph,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        drop: Tensor | None,
        softmax: Softmax,
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
    ) -> tuple[Tensor, Softmax]:
        offsets = graph.crow_indices.long()
        s = self._sddmm(graph, q, k) * scale
        row_max = torch.segment_reduce(s, "max", offsets=offsets)
        w = torch.exp(s - self._per_edge(graph, row_max))
        total = torch.segment_reduce(w, "sum", offsets=offsets)
        row_scale = torch.where(total > 0, 1.0 / total, 0.0)  # total >= 1 in a row with edges
        out = (self._csr(graph, w if drop is None else w * drop) @ v) * row_scale[:, None]
        return out, Softmax(w, row_scale)

    def backward(
        self,
        graph: Graph,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        drop: Tensor | None,
        softmax: Softmax,
        out: Tensor,
        grad_out: Tensor,
        scale: float,
        ste: Memberships | None,
    ) -> Grads:
        pi = softmax.weights * self._per_edge(graph, softmax.row_scale)
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
def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class NumbaKernels:
    """Fused CPU loops (see :mod:`sbm_transformer.ops._numba_kernels`)."""

    name = "numba"

    def forward(
        self, graph: Graph, q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, scale: float
    ) -> tuple[Tensor, Softmax]:
        from sbm_transformer.ops import _numba_kernels as nk

        sync_threads()
        n, m = graph.num_queries, graph.num_keys
        out = q.new_empty(q.shape[0], v.shape[1])
        weights = torch.from_numpy(recycled(graph.num_edges, _np(q).dtype))  # kept for backward
        row_scale = q.new_empty(q.shape[0])
        drop_np = _np(drop) if drop is not None else _np(q.new_empty(0))
        width = max(k.shape[1], v.shape[1]) * k.element_size()
        ptr, order = _row_tiles(graph, _num_tiles(m * width, graph.num_edges / max(q.shape[0], 1)))
        nk.forward(
            ptr[:-1], ptr[1:], order, _np(graph.col_indices), _np(q), _np(k), _np(v), drop_np,
            scale, n, m, out.numpy(), weights.numpy(), row_scale.numpy(),
            scratch("row_max", (q.shape[0],), _np(q).dtype),
        )  # fmt: skip
        return out, Softmax(weights, row_scale)

    def backward(
        self,
        graph: Graph,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        drop: Tensor | None,
        softmax: Softmax,
        out: Tensor,
        grad_out: Tensor,
        scale: float,
        ste: Memberships | None,
    ) -> Grads:
        from sbm_transformer.ops import _numba_kernels as nk

        sync_threads()
        n, m, e = graph.num_queries, graph.num_keys, graph.num_edges
        per_query, per_key = e / max(q.shape[0], 1), e / max(k.shape[0], 1)
        t = _by_key(graph, _key_side_tile_shift(n, per_key))
        lo_t, hi_t = _tile_major(t.ptr, k.shape[0])
        col, trow = _np(graph.col_indices), _np(t.row_indices)
        drop_np = _np(drop) if drop is not None else _np(q.new_empty(0))
        g = _np(grad_out)
        pairs = graph.batch_size * graph.num_heads
        g_pair = _np(ste.g_pair.to(q.dtype) if ste is not None else q.new_zeros(pairs))
        item = q.element_size()
        dtype = _np(q).dtype
        gq = torch.empty_like(q)
        w = scratch("edge_weights", (e,), dtype)  # per edge, by query: t
        w_t = scratch("edge_weights_t", (e, 2), dtype)  # by key: t, pi * drop
        width = max(k.shape[1], v.shape[1]) * item  # k and v are gathered in separate passes
        ptr, order = _row_tiles(graph, _num_tiles(m * width, per_query))
        nk.backward_rows(
            ptr[:-1], ptr[1:], order, col, _np(t.tpos), _np(k), _np(v), drop_np,
            _np(softmax.weights), _np(softmax.row_scale), _np(out), g,
            scale, n, m, gq.numpy(), w, w_t, scratch("row_scratch", (q.shape[0],), dtype),
        )  # fmt: skip
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        nk.backward_cols(lo_t, hi_t, trow, _np(q), g, w_t, scale, n, m, gk.numpy(), gv.numpy())
        if ste is None:
            return Grads(gq, gk, gv, None, None)
        z, y = _np(ste.z), _np(ste.y)
        # (B*H*N, K) products consumed within the caller's backward: reused scratch, not fresh
        # memory paid for in page faults at every call.
        gz = scratch("ste_gz", (q.shape[0], z.shape[1]), dtype)
        ptr, order = _row_tiles(graph, _num_tiles(m * z.shape[1] * item, per_query, wide=True))
        nk.ste_spmm(ptr[:-1], ptr[1:], order, col, w.reshape(e, 1), g_pair, z, n, m, gz)
        gy = scratch("ste_gy", (k.shape[0], y.shape[1]), dtype)
        nk.ste_spmm(lo_t, hi_t, trow[:0], trow, w_t, g_pair, y, m, n, gy)
        return Grads(gq, gk, gv, torch.from_numpy(gz), torch.from_numpy(gy))


#: A table gathered from (one pair's rows) larger than this is split into tiles gathered one at
#: a time, so that the rows being gathered stay in cache (4 MiB measured 0.93-0.96x the time of
#: 2 MiB at N = 16k, 1 % density and N = 64k, 32 and 128 edges per query; 8 MiB and more,
#: slower)...
_TILE_BYTES = 4 << 20
#: ...as long as rows keep at least this many edges per tile (each tile pass re-reads the rows'
#: own data, and the kernels take edges four at a time). Side by side at N = 64k, 32 edges per
#: query: 16 measured 0.86-0.91x the time of 2 (16 tiles instead of 2); no clear difference at
#: N = 16k or at 128 edges per query.
_MIN_EDGES_PER_TILE = 16
#: The membership products gather and accumulate K-wide rows: every tile pass reads and writes
#: each row's accumulator (512 bytes at K = 128) again, so they take fewer, larger tiles
#: (8 MiB: backward 0.965x the time of 4 MiB at N = 64k, 128 edges per query; whole step
#: 0.93-0.97x; N = 16k and 32 edges per query unchanged within noise).
_WIDE_TILE_BYTES = 8 << 20


def _num_tiles(pair_bytes: float, edges_per_row: float, *, wide: bool = False) -> int:
    """Tiles (a power of two) that bring one pair's table under ``_TILE_BYTES`` (``wide``:
    ``_WIDE_TILE_BYTES``), fewer if rows would keep fewer than ``_MIN_EDGES_PER_TILE`` edges per
    tile."""
    limit = _WIDE_TILE_BYTES if wide else _TILE_BYTES
    tiles = 1
    while pair_bytes / tiles > limit:
        tiles *= 2
    while tiles > 1 and edges_per_row / tiles < _MIN_EDGES_PER_TILE:
        tiles //= 2
    return tiles


T = TypeVar("T")


def _cached(graph: Graph, key: object, build: Callable[[], T]) -> T:
    """A per-graph value computed once (graphs are immutable)."""
    if key not in graph._cache:
        graph._cache[key] = build()
    return cast(T, graph._cache[key])


def _tile_shift(rows: int, tiles: int) -> tuple[int, int]:
    """(shift, number of tiles) splitting ``rows`` table rows into ``tiles`` power-of-two tiles."""
    if tiles <= 1:
        return 62, 1  # every index >> 62 is 0: one tile
    shift = max((rows - 1).bit_length() - (tiles - 1).bit_length(), 0)
    return shift, -(-rows >> shift)


#: Tile pointers of a graph are kept at this granularity (tiles of 4096 keys, the sampler's
#: grouping) and coarser ones derived from them. The numba sampler gives them; otherwise they are
#: computed once (a pass over every edge, and over every row and tile: 24 ms for both sides at
#: N = 64k, 32 edges per query, against under 1 ms given).
_FINE_SHIFT = TILE_SHIFT


def _tile_pointers(
    crow: np.ndarray, col: np.ndarray, shift: int, num: int, graph: Graph
) -> np.ndarray:
    """``ptr`` (num + 1, R) of the graph's rows, whose keys are grouped by tiles of ``2^shift``
    (or finer, down to ``_FINE_SHIFT``), derived from the fine pointers when coarser: the
    sampler's, or ones computed once per graph."""
    from sbm_transformer.ops import _numba_kernels as nk

    if shift < _FINE_SHIFT:
        return nk.tile_pointers(crow, col, shift, num)
    fine_num = -(-graph.num_keys >> _FINE_SHIFT)

    def build() -> np.ndarray:
        given = graph.tile_pointers if graph.tile_shift == _FINE_SHIFT else None
        if given is not None and given.shape[0] == fine_num + 1:
            return _np(given)
        return nk.tile_pointers(crow, col, _FINE_SHIFT, fine_num)

    fine = _cached(graph, ("row_tiles", "fine"), build)
    step = shift - _FINE_SHIFT
    return fine[np.minimum(np.arange(num + 1) << step, fine_num)]


def _row_tiles(graph: Graph, tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ptr, order)`` of the graph's rows over ``tiles`` key tiles (cached per graph).

    ``order`` is empty when the rows' keys are already grouped by these tiles or finer ones
    (sampled graphs); then ``ptr`` comes from one pass over the keys.
    """
    from sbm_transformer.ops import _numba_kernels as nk

    shift, num = _tile_shift(graph.num_keys, tiles)
    crow, col = _np(graph.crow_indices), _np(graph.col_indices)

    def build() -> tuple[np.ndarray, np.ndarray]:
        if num == 1:
            return np.stack([crow[:-1], crow[1:]]), crow[:0]
        if graph.tile_shift is None or graph.tile_shift > shift:
            return nk.group_by_tile(crow, col, shift, num)
        if graph.tile_shift > _FINE_SHIFT:
            return nk.tile_pointers(crow, col, shift, num), crow[:0]
        return _tile_pointers(crow, col, shift, num, graph), crow[:0]

    return _cached(graph, ("row_tiles", shift), build)


#: The by-key passes (over the transposed graph, laid out tile-major: each tile pass reads one
#: contiguous run) gather from query tiles of at least this many queries...
_KEY_SIDE_TILE_ROWS = 1 << TILE_SHIFT
#: ...and as many tiles as leave each key at least this many edges per tile on average. Against
#: the transposed graph in CSC order gathered by 4 MiB (8 MiB for the membership product) tiles:
#: N = 64k, 128 edges per query (16 tiles of 4096 queries): by-key pass 0.70x, membership
#: product 0.77x; N = 16k (4 tiles): 0.69x, 0.78x; N = 64k and 16k, 32 edges per query (4
#: tiles): 0.85x, 0.71-0.89x. Fewer edges per tile (16 tiles at 32 edges per query) lost again.
_MIN_EDGES_PER_KEY_TILE = 8


def _key_side_tile_shift(num_queries: int, edges_per_key: float) -> int | None:
    """log2 of the queries per tile of the transposed graph the by-key passes use (None: one
    tile; see ``_KEY_SIDE_TILE_ROWS``)."""
    rows = max(_KEY_SIDE_TILE_ROWS, 1)
    while rows < num_queries and edges_per_key * rows / num_queries < _MIN_EDGES_PER_KEY_TILE:
        rows *= 2
    return None if rows >= num_queries else rows.bit_length() - 1


def _by_key(graph: Graph, tile_shift: int | None) -> TransposedGraph:
    """The transposed graph for the numba backward: the graph's cached one if it has it, else
    one in scratch memory, valid until the next call on this thread (see
    :func:`~sbm_transformer.graph.transpose_into`)."""
    cached = graph._cache.get(("transpose", one_tile_as_none(tile_shift, graph.num_queries)))
    if isinstance(cached, TransposedGraph):
        return cached
    dtype = _np(graph.col_indices).dtype
    rows = scratch("transpose_rows", (graph.num_edges,), dtype)
    tpos = scratch("transpose_positions", (graph.num_edges,), dtype)
    return transpose_into(graph, tile_shift, rows, tpos)


def _tile_major(ptr: Tensor, num_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` (T, C) segment bounds of tile-major pointers ``(T*C + 1,)``."""
    p = _np(ptr)
    tiles = (p.shape[0] - 1) // max(num_cols, 1)
    return p[:-1].reshape(tiles, num_cols), p[1:].reshape(tiles, num_cols)


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
