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
:class:`NumbaKernels` fuses each direction into one parallel loop on the CPU;
:class:`~sbm_transformer.ops._triton_kernels.TritonKernels` (optional, ``triton``) does the same
on a GPU (and on the CPU under ``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import functools
import importlib.util
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
    over every edge. Only the same kernels' backward reads it: the Triton kernels keep no
    weights (empty) and each row's log-sum-exp in ``row_scale``, recomputing ``pi_e``."""

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
        weights = torch.from_numpy(recycled(graph.num_edges, _np(q).dtype))  # layout order
        row_scale = q.new_empty(q.shape[0])
        lay = _layout(graph, m * max(k.shape[1], v.shape[1]) * k.element_size())
        drop_np = _drop(drop, graph, lay, q)
        nk.forward(
            lay.lo, lay.hi, lay.col, _np(q), _np(k), _np(v), drop_np, scale, n, m, out.numpy(),
            weights.numpy(), row_scale.numpy(),
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
        lay = _layout(graph, m * max(k.shape[1], v.shape[1]) * k.element_size())
        # By-key products: scattered from the layout when it has _SCATTER_MIN_TILES key tiles
        # or more, else gathered over the transposed graph (see _numba_kernels.scatter_cols).
        t = None if lay.lo.shape[0] >= _SCATTER_MIN_TILES else _by_key(graph, lay)
        drop_np = _drop(drop, graph, lay, q)
        g = _np(grad_out)
        pairs = graph.batch_size * graph.num_heads
        g_pair = _np(ste.g_pair.to(q.dtype) if ste is not None else q.new_zeros(pairs))
        dtype = _np(q).dtype
        gq = torch.empty_like(q)
        w = scratch("edge_weights", (e,), dtype)  # per edge, by query: t
        w_t = scratch("edge_weights_t", (e, 2), dtype)  # t, pi * drop: by key, or as in lay
        nk.backward_rows(
            lay.lo, lay.hi, lay.col, _np(t.tpos) if t is not None else lay.col[:0],
            _np(k), _np(v), drop_np, _np(softmax.weights), _np(softmax.row_scale), _np(out), g,
            scale, n, m, gq.numpy(), w, w_t, scratch("row_scratch", (q.shape[0],), dtype),
        )  # fmt: skip
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        if t is None:
            nk.scatter_cols(
                lay.lo, lay.hi, lay.col, _np(q), g, w_t, scale, n, m, lay.tile_keys,
                gk.numpy(), gv.numpy(),
            )  # fmt: skip
        else:
            lo_t, hi_t = _bounds(t.ptr, k.shape[0])
            trow = _np(t.row_indices)
            nk.backward_cols(lo_t, hi_t, trow, _np(q), g, w_t, scale, n, m, gk.numpy(), gv.numpy())
        if ste is None:
            return Grads(gq, gk, gv, None, None)
        z, y = _np(ste.z), _np(ste.y)
        # (B*H*N, K) products consumed within the caller's backward: reused scratch, not fresh
        # memory paid for in page faults at every call.
        gz = scratch("ste_gz", (q.shape[0], z.shape[1]), dtype)
        nk.ste_spmm(lay.lo, lay.hi, lay.col, w.reshape(e, 1), g_pair, z, n, m, gz)
        gy = scratch("ste_gy", (k.shape[0], y.shape[1]), dtype)
        if t is None:
            nk.ste_scatter(lay.lo, lay.hi, lay.col, w_t, g_pair, y, n, m, lay.tile_keys, gy)
        else:
            nk.ste_spmm(lo_t, hi_t, trow, w_t, g_pair, y, m, n, gy)
        return Grads(gq, gk, gv, torch.from_numpy(gz), torch.from_numpy(gy))


#: The by-query kernels gather from key tiles of at least this many keys (four of the sampler's
#: 4096-key groups: 2 MiB of keys or values per pass at D = 32)...
_QUERY_SIDE_TILE_KEYS = 4 << TILE_SHIFT
#: ...as many as leave each row at least this many edges per tile on average. Laid out
#: tile-major (:func:`_layout`), against each row's edges grouped by 4 MiB (8 MiB for the
#: membership product) tiles, kernel by kernel: at N = 64k, 128 edges per query (8 tiles)
#: forward 1.08x, by-query backward pass 0.86x, membership product 0.74x; at 16k (4 tiles)
#: 1.01x, 0.93x, 0.81x; at 64k, 32 edges per query (2 tiles) 0.95x, 0.93x, 0.75x; at 16k (2
#: tiles) 1.05x, 1.06x, 0.93x. Whole step, with the by-key products scattered from 4 tiles on:
#: at N = 64k, 32 edges per query, 4 tiles of 16384 keys (8 edges per row and tile) took
#: 0.961-0.965x the time of 2; at 128, 16 tiles of 4096 keys took 1.118x that of 8 of 8192.
#: Since the by-key scatter prefetches across rows, 4 tiles of 16384 keys beat 8 of 8192 at
#: 128 edges per query (whole step 0.978x, 11 alternating rounds: forward 0.87x, by-query
#: backward 0.91x, layout 0.78x, membership scatter 1.06x) and at 1 % density (0.974x), hence
#: the 16384-key minimum. The threshold sits between 4 and 8: a sampled graph's mean
#: edges per row is never exactly the target, and a threshold at the target's quotient (16,
#: once) flipped the tile count from step to step (one count every step: 0.936-0.954x).
_MIN_EDGES_PER_QUERY_TILE = 6
#: From this many key tiles, the by-key products scatter from the layout (see
#: ``_numba_kernels.scatter_cols``) instead of gathering over the transposed graph: whole step at
#: N = 64k, 128 edges per query (8 tiles) 0.956x; 64 (8 tiles) 0.986x; 32 (2 tiles of 32768
#: keys) 1.08x.
_SCATTER_MIN_TILES = 4
#: One tile (the CSR order, no layout pass) while one pair's keys and values fit this: at
#: N = 16k (2 MiB) four tiles measured 1.06x the whole step, one tile as before 1.0-1.02x.
_UNTILED_BYTES = 4 << 20


def _tiles(rows: int, min_rows: int, edges_per_row: float, min_edges: int) -> int:
    """Power-of-two tiles over ``rows`` table rows: as many as keep at least ``min_rows`` rows
    and ``min_edges`` edges per row (of the other side) per tile."""
    tiles = 1
    while rows / (2 * tiles) >= max(min_rows, 1) and edges_per_row / (2 * tiles) >= min_edges:
        tiles *= 2
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
#: Between 4 and 8, like the query side's threshold, so that 32 edges per query gives 4 tiles at
#: every step (at 8 it flipped between 2 and 4). (At 64k the by-key side now scatters; at 16k, 4
#: query tiles against 2: 1.008x.)
_MIN_EDGES_PER_KEY_TILE = 6


def _key_side_tile_shift(num_queries: int, edges_per_key: float) -> int | None:
    """log2 of the queries per tile of the transposed graph the by-key passes use (None: one
    tile)."""
    tiles = _tiles(num_queries, _KEY_SIDE_TILE_ROWS, edges_per_key, _MIN_EDGES_PER_KEY_TILE)
    return None if tiles == 1 else _tile_shift(num_queries, tiles)[0]


def _bounds(ptr: Tensor | np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` (T, R) segment bounds of tile-major pointers ``(T*R + 1,)``."""
    p = ptr.numpy() if isinstance(ptr, Tensor) else ptr
    tiles = (p.shape[0] - 1) // max(num_rows, 1)
    return p[:-1].reshape(tiles, num_rows), p[1:].reshape(tiles, num_rows)


class Layout(NamedTuple):
    """A graph's edges as the numba kernels walk them by query: tile-major over key tiles of
    ``tile_keys`` keys (row by row within each tile). ``lo, hi`` (T, R) bound each (tile, row)
    segment and ``col`` (E,) holds the keys in that order (with one tile, the CSR order; where
    each CSR edge went: :func:`_positions`)."""

    lo: np.ndarray
    hi: np.ndarray
    col: np.ndarray
    tile_keys: int

    @property
    def tiled(self) -> bool:
        return self.lo.shape[0] > 1


def _layout(graph: Graph, table_bytes: int) -> Layout:
    """The graph's :class:`Layout` (cached per graph): one pass over the edges (none for one
    tile: the CSR order itself). One tile while one pair's keys and values (``table_bytes``)
    fit ``_UNTILED_BYTES``; its keys come from the recycled pool."""
    from sbm_transformer.ops import _numba_kernels as nk

    def build() -> Layout:
        rows = graph.batch_size * graph.num_heads * graph.num_queries
        per_row = graph.num_edges / max(rows, 1)
        tiles = _tiles(
            graph.num_keys, _QUERY_SIDE_TILE_KEYS, per_row, _MIN_EDGES_PER_QUERY_TILE
        ) if table_bytes > _UNTILED_BYTES else 1  # fmt: skip
        crow, col = _np(graph.crow_indices), _np(graph.col_indices)
        if tiles == 1:
            return Layout(crow[None, :-1], crow[None, 1:], col, graph.num_keys)
        shift, _ = _tile_shift(graph.num_keys, tiles)
        ptr, order = _row_tiles(graph, tiles)
        tptr = np.zeros(tiles * rows + 1, crow.dtype)
        np.cumsum((ptr[1:] - ptr[:-1]).ravel(), out=tptr[1:])
        kcol = recycled(col.shape[0], col.dtype)
        nk.tile_major(ptr, order, col, tptr, kcol)
        return Layout(*_bounds(tptr, rows), kcol, 1 << shift)

    return _cached(graph, "layout", build)


def _positions(graph: Graph, lay: Layout) -> np.ndarray | None:
    """``kpos`` (E,): the position in ``lay`` of each CSR edge (cached per graph); None for one
    tile (the CSR order). Only dropout and the by-key gather over a tiled layout need it: built
    on demand, not with the layout (at N = 64k, 128 edges per query, the layout pass took 17
    ms without it against 24 with it)."""
    from sbm_transformer.ops import _numba_kernels as nk

    if not lay.tiled:
        return None

    def build() -> np.ndarray:
        ptr, order = _row_tiles(graph, lay.lo.shape[0])
        kpos = recycled(lay.col.shape[0], lay.col.dtype)
        nk.tile_major_positions(ptr, order, lay.lo.reshape(-1), kpos)
        return kpos

    return _cached(graph, "layout_positions", build)


def _by_key(graph: Graph, lay: Layout) -> TransposedGraph:
    """The transposed graph the by-key passes use (query tiles, see ``_KEY_SIDE_TILE_ROWS``),
    its ``tpos`` indexed by position in ``lay``: the graph's cached one if it has it and ``lay``
    is the CSR order, else one in scratch memory, valid until the next call on this thread (see
    :func:`~sbm_transformer.graph.transpose_into`)."""
    cols = graph.batch_size * graph.num_heads * graph.num_keys
    shift = _key_side_tile_shift(graph.num_queries, graph.num_edges / max(cols, 1))
    if not lay.tiled:
        cached = graph._cache.get(("transpose", one_tile_as_none(shift, graph.num_queries)))
        if isinstance(cached, TransposedGraph):
            return cached
    dtype = _np(graph.col_indices).dtype
    rows = scratch("transpose_rows", (graph.num_edges,), dtype)
    tpos = scratch("transpose_positions", (graph.num_edges,), dtype)
    return transpose_into(graph, shift, rows, tpos, _positions(graph, lay))


def _drop(drop: Tensor | None, graph: Graph, lay: Layout, like: Tensor) -> np.ndarray:
    """The dropout factors (CSR order) by position in ``lay``; empty without dropout."""
    if drop is None:
        return _np(like.new_empty(0))
    d = _np(drop)
    kpos = _positions(graph, lay)
    if kpos is None:
        return d
    out = np.empty_like(d)
    out[kpos] = d
    return out


_TORCH = TorchKernels()
_NUMBA = NumbaKernels()

#: Dtypes ``"auto"`` hands to the Triton kernels on a GPU (float64 stays with cuSPARSE; the
#: Triton kernels take it when asked by name).
_TRITON_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed and imports (tried once, when first asked)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (no compiler, mismatched torch): use the others
        return False
    return True


def _triton() -> Kernels:
    from sbm_transformer.ops._triton_kernels import TRITON

    return TRITON


def _auto_triton(*tensors: Tensor) -> bool:
    """``"auto"`` on CUDA tensors of float16, bfloat16 or float32, with triton importable."""
    return (
        bool(tensors)
        and all(t.device.type == "cuda" for t in tensors)
        and tensors[0].dtype in _TRITON_AUTO_DTYPES
        and triton_available()
    )


def get_kernels(name: str, *tensors: Tensor) -> Kernels:
    """Kernels by name: ``"torch"``, ``"numba"``, ``"triton"``, or ``"auto"`` (Triton on CUDA
    tensors when triton is installed, numba on CPU tensors when it is, torch.sparse otherwise).

    ``"triton"`` on CPU tensors runs the Triton interpreter and needs ``TRITON_INTERPRET=1``
    (a ValueError says so otherwise)."""
    if name == "torch":
        return _TORCH
    if name == "triton":
        if not triton_available():
            raise ValueError(
                "the Triton kernels need triton installed and importable "
                "(pip install 'sbm-transformer[triton]')"
            )
        from sbm_transformer.ops._triton_kernels import kernels_for

        kernels_for(*tensors)  # CPU tensors without the interpreter: a clear error
        return _triton()
    if name == "numba":
        if not use_numba(*tensors):
            raise ValueError(
                "the numba kernels need numba installed (pip install 'sbm-transformer[numba]'), "
                "SBMT_DISABLE_NUMBA unset and CPU tensors"
            )
        return _NUMBA
    if name == "auto":
        if _auto_triton(*tensors):
            return _triton()
        return _NUMBA if use_numba(*tensors) else _TORCH
    raise ValueError(f"unknown kernels {name!r}; expected 'auto', 'torch', 'numba' or 'triton'")
