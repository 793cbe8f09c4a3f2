"""Fused CPU kernels (numba) for SBM edge attention over a :class:`~sbm_transformer.graph.Graph`.

Every kernel works on the stacked layout used throughout the package: query rows
``r = (b*H + h)*N + i`` and key rows ``c = (b*H + h)*M + j`` of 2-D arrays, local column
indices ``j``, and the edges laid out tile by tile (see :func:`tile_major`; one tile is the
graph's CSR order). Each is the fused form of a few torch ops in
:class:`sbm_transformer.ops.kernels.TorchKernels`; the tests compare both with the dense reference.

Forward keeps each edge's softmax weight ``pi`` (unnormalised, with one scale per row). Backward
runs a by-query pass (``gq`` and the gradients of every edge, written both in row order and, side
by side, at the edge's by-key position) and a by-key pass over the transposed graph that reads
those weights sequentially (``gk``, ``gv``); two sparse products then apply the straight-through
gradient ``G`` to the memberships. (Recomputing ``pi`` in backward from each row's log-sum-exp
instead, as FlashAttention does, measured 1.7x slower here: every pass then gathers more.)

Numerics: per-row softmax with the row maximum subtracted; all arithmetic in the input dtype
(float32 or float64). Scalars are created in that dtype (``_typed``) so that float32 inputs are
never promoted to float64, which would stop vectorisation.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# No 'nnan'/'ninf': the row maximum starts at -inf.
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}


@njit(inline="always")
def _typed(value, like):  # pragma: no cover - compiled
    """``value`` as a scalar of the dtype of array ``like``."""
    return np.full(1, value, like.dtype)[0]


#: Each parallel loop over rows (or key columns) covers whole (batch, head) pairs at a time, at
#: least this many rows: the tables it gathers from then belong to few pairs and stay in cache
#: (both threads on one pair instead of one pair each measured 1.4x faster at N = 64k).
_MIN_GROUP_ROWS = 4096


@njit(inline="always")
def _pair_group(rows_per_pair):  # pragma: no cover
    """Rows per parallel region: a whole number of pairs, at least ``_MIN_GROUP_ROWS``."""
    return max(1, -(-_MIN_GROUP_ROWS // max(rows_per_pair, 1))) * max(rows_per_pair, 1)


#: Edges ahead whose gathered row the sparse products prefetch.
_PREFETCH_DISTANCE = 8


@intrinsic
def _prefetch_row(typingctx, array, row):  # pragma: no cover - code generation
    """Prefetch (read, keep in cache) the first 512 bytes of row ``row`` of a C-contiguous array.

    Gathers from tables larger than the caches are latency-bound; asking for the row a few
    edges ahead measured 1.45x faster for K = 128, and for D = 32 (forward 0.75-0.94x, by-query
    backward 0.82-0.97x the time without; whole step 0.95-0.975x). Not in the by-key pass: its
    rows are ascending, the hardware prefetcher follows them (1.0-1.15x slower with it).
    """
    sig = types.void(array, row)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        width = builder.extract_value(arr.shape, 1)
        itemsize = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        row_bytes = builder.mul(width, ir.Constant(width.type, itemsize))
        index = args[1]
        if index.type.width < width.type.width:
            index = builder.sext(index, width.type)
        offset = builder.mul(index, row_bytes)
        i8p = ir.IntType(8).as_pointer()
        base = builder.bitcast(arr.data, i8p)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.globals.get("llvm.prefetch.p0") or ir.Function(
            builder.module, fnty, name="llvm.prefetch.p0"
        )

        def line_and_rest(line: int) -> None:
            """Line ``line`` and, inside its condition, the next ones: a row of 2 lines tests 3
            conditions, not 8 (forward 0.96x at N = 64k, 128 edges per query)."""
            if line == 8:
                return
            inside = builder.icmp_unsigned("<", ir.Constant(row_bytes.type, 64 * line), row_bytes)
            with builder.if_then(inside):
                ptr = builder.gep(base, [builder.add(offset, ir.Constant(offset.type, 64 * line))])
                builder.call(
                    fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
                )
                line_and_rest(line + 1)

        line_and_rest(0)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True)
def transpose(
    crow, col, kptr, key_shift, group, num_pairs, n, m, shift, rows, tpos, kpos
):  # pragma: no cover
    """Counting sort of the edges by (query tile, stacked key column), tile-major; rows stay
    ascending within each (tile, column) segment.

    Query tiles hold ``2^shift`` queries (a ``shift`` above log2(N) for one tile: CSC order).
    Returns ``ptr`` (T*P*M + 1,), the edges of column c from tile t being positions
    ``ptr[t*P*M + c]`` to ``ptr[t*P*M + c + 1] - 1``, and writes ``rows`` (E,), the local query
    of each by-key position, and ``tpos`` (E,), the by-key position of each edge: of CSR edge e
    at ``e``, or at ``kpos[e]`` when ``kpos`` is not empty (the kernels' by-query order, see
    :func:`tile_major`). The queries are visited in order, so at each tile's first query the
    column cursors are set to that tile's starts.

    ``kptr`` (KT + 1, P*N) holds where each row's keys of tile ``kt`` (keys ``kt * 2^key_shift``
    on) start, the rows' keys grouped by those tiles (``[crow[:-1], crow[1:]]`` and a
    ``key_shift`` above log2(M) for one tile). The edges are placed ``group`` key tiles at a
    time, so the column cursors being written stay in cache (at N = 64k, 128 edges per query,
    groups of 16k columns measured 0.82-0.85x the time of all 64k at once).
    """
    num_tiles = -(-n >> shift) if n > 0 else 1
    num_cols = num_pairs * m
    num_key_tiles = kptr.shape[0] - 1
    counts = np.zeros(num_tiles * num_cols + 1, crow.dtype)
    for p in prange(num_pairs):
        for i in range(n):
            at = (i >> shift) * num_cols + p * m + 1
            for e in range(crow[p * n + i], crow[p * n + i + 1]):
                counts[at + col[e]] += 1
    ptr = counts  # prefix sums in place: ptr[x] = edges before segment x
    for x in range(1, ptr.shape[0]):
        ptr[x] += ptr[x - 1]
    mask = (1 << shift) - 1
    moved = kpos.shape[0] > 0
    for p in prange(num_pairs):
        cursor = np.empty(m, crow.dtype)
        for g0 in range(0, num_key_tiles, group):
            g1 = min(num_key_tiles, g0 + group)
            c0, c1 = min(m, g0 << key_shift), min(m, g1 << key_shift)
            for i in range(n):
                if (i & mask) == 0:
                    at = (i >> shift) * num_cols + p * m
                    cursor[c0:c1] = ptr[at + c0 : at + c1]
                r = p * n + i
                for e in range(kptr[g0, r], kptr[g1, r]):
                    c = col[e]
                    t = cursor[c]
                    cursor[c] = t + 1
                    tpos[kpos[e] if moved else e] = t
                    rows[t] = i
    return ptr


# Every kernel below walks the edges of a row tile by tile: for each tile t of the gathered table
# (rows ``t * 2^shift`` to ``(t + 1) * 2^shift - 1`` of each pair) and row r, ``lo[t, r]`` to
# ``hi[t, r] - 1`` (both (T, R)) are the positions of r's edges in that tile. Both sides lay
# their edges out tile-major (all rows' edges of tile 0, row by row, then those of tile 1...; see
# :func:`tile_major` and :func:`transpose`: ``lo, hi`` are the pointers ``(T*R + 1,)`` without
# their last and first entries, reshaped), so that a tile pass reads one contiguous run. One
# tile (T = 1) is the plain CSR walk. Large tables are gathered from one cache-sized tile at a
# time: measured 1.3x (N = 16k) to 2.4x (N = 64k) faster than random gathers over the whole
# table; tile-major instead of each row's edges grouped by tile, 0.7-0.9x again.


@njit(parallel=True, cache=True)
def tile_major(ptr, order, col, tptr, kcol):  # pragma: no cover
    """The by-query edges tile-major: row r's edges of tile t (grouped positions ``ptr[t, r]``
    to ``ptr[t + 1, r] - 1``, ``order`` mapping them to CSR positions unless empty) go to
    ``tptr[t*R + r]`` on; ``kcol`` receives their keys. ``tptr`` (T*R + 1,) is the prefix sum
    of the segment lengths, tile by tile."""
    num_tiles, num_rows = ptr.shape[0] - 1, ptr.shape[1]
    grouped = order.shape[0] == 0
    for r in prange(num_rows):
        for t in range(num_tiles):
            d = tptr[t * num_rows + r]
            for pos in range(ptr[t, r], ptr[t + 1, r]):
                kcol[d] = col[pos if grouped else order[pos]]
                d += 1


@njit(parallel=True, cache=True)
def tile_major_positions(ptr, order, tptr, kpos):  # pragma: no cover
    """``kpos[e]``: the position :func:`tile_major` (same arguments) gives CSR edge e."""
    num_tiles, num_rows = ptr.shape[0] - 1, ptr.shape[1]
    grouped = order.shape[0] == 0
    for r in prange(num_rows):
        for t in range(num_tiles):
            d = tptr[t * num_rows + r]
            for pos in range(ptr[t, r], ptr[t + 1, r]):
                kpos[pos if grouped else order[pos]] = d
                d += 1


@njit(inline="always")
def _prefetch_next(x, lo, hi, t, r, last, n_self, n_other, idx):  # pragma: no cover
    """Prefetch the rows of ``x`` that row ``r + 1``'s first edges of tile ``t`` gather (a row's
    own loop prefetches only its later edges)."""
    if r + 1 < last:
        nb = ((r + 1) // n_self) * n_other
        a0 = lo[t, r + 1]
        for a in range(a0, min(hi[t, r + 1], a0 + _PREFETCH_DISTANCE)):
            _prefetch_row(x, nb + idx[a])  # type: ignore[call-arg]


@njit(inline="always")
def _prefetch_ahead(x, base, idx, pos, en):  # pragma: no cover
    """Prefetch the rows of ``x`` gathered ``_PREFETCH_DISTANCE`` edges after the four at
    ``pos``."""
    for a in range(_UNROLL):
        ahead = pos + a + _PREFETCH_DISTANCE
        if ahead < en:
            _prefetch_row(x, base + idx[ahead])  # type: ignore[call-arg]


#: Rows ahead whose sums the later tile passes prefetch.
_ACC_AHEAD = 2


@njit(inline="always")
def _start_row(out, r, t, last):  # pragma: no cover
    """Before tile pass ``t`` adds to row ``r`` of ``out``: the first pass zeroes the row (no
    separate pass over ``out``: the row is written once, while in cache); later passes, which
    read every row's sums again, prefetch the row ``_ACC_AHEAD`` rows ahead."""
    if t == 0:
        zero = _typed(0.0, out)
        for d in range(out.shape[1]):
            out[r, d] = zero
    elif r + _ACC_AHEAD < last:
        _prefetch_row(out, r + _ACC_AHEAD)  # type: ignore[call-arg]


# The edge loops below take edges four at a time: four independent gathers in flight and one
# read-modify-write of the row's accumulator per four edges (measured 1.3-1.8x faster than one
# edge at a time, for rows of 32 and 128 values); the rest one at a time.
_UNROLL = 4


@njit(inline="always")
def _dot4(a, ra, b, j0, j1, j2, j3, zero):  # pragma: no cover
    """``<a[ra], b[j]>`` for four rows j of b."""
    s0 = s1 = s2 = s3 = zero
    for d in range(a.shape[1]):
        x = a[ra, d]
        s0 += x * b[j0, d]
        s1 += x * b[j1, d]
        s2 += x * b[j2, d]
        s3 += x * b[j3, d]
    return s0, s1, s2, s3


@njit(inline="always")
def _dot(a, ra, b, j, zero):  # pragma: no cover
    s = zero
    for d in range(a.shape[1]):
        s += a[ra, d] * b[j, d]
    return s


@njit(inline="always")
def _axpy4(out, r, x, w0, w1, w2, w3, j0, j1, j2, j3):  # pragma: no cover
    """``out[r] += sum of w x[j]`` over four rows j of x."""
    for d in range(out.shape[1]):
        out[r, d] += (w0 * x[j0, d] + w1 * x[j1, d]) + (w2 * x[j2, d] + w3 * x[j3, d])


@njit(inline="always")
def _axpy(out, r, x, w, j):  # pragma: no cover
    for d in range(out.shape[1]):
        out[r, d] += w * x[j, d]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def forward(
    lo, hi, col, q, k, v, drop, scale, n, m, out, weights, row_scale, row_max
):  # pragma: no cover
    """``out_r = sum_e pi_e drop_e v_j``, ``pi`` the softmax of ``scale <q_r, k_j>`` over row r.

    Two passes over the edges, tile by tile: the scores (kept in ``weights``) and each row's
    maximum, then the weighted sum of values, exponentiating the scores on the way. ``pi`` is
    left unnormalised for backward: ``weights`` (E,) receives ``exp(s_e - max)``, ``row_scale``
    (R,) ``1 / sum`` of the row's weights (0 for a row without edges, which outputs zeros), and
    ``out`` is scaled once per row at the end. (A separate softmax pass normalising ``pi`` in
    place, between the two, read and wrote every edge once more: 1.27-1.37x the time of the
    whole forward at N = 16k and 64k, 32 and 128 edges per query.) ``weights`` and ``drop`` (the
    dropout factors, empty without dropout) are by position in the layout of ``lo, hi``;
    ``row_max`` (R,) is scratch.
    """
    num_rows = q.shape[0]
    num_tiles = lo.shape[0]
    has_drop = drop.shape[0] > 0
    zero, one = _typed(0.0, q), _typed(1.0, q)
    neg_inf, sc = _typed(-np.inf, q), _typed(scale, q)
    step = _pair_group(n)
    for first in range(0, num_rows, step):
        last = min(num_rows, first + step)
        for t in range(num_tiles):
            for r in prange(first, last):
                base = (r // n) * m
                mx = neg_inf if t == 0 else row_max[r]
                pos, en = lo[t, r], hi[t, r]
                _prefetch_next(k, lo, hi, t, r, last, n, m, col)
                while pos + _UNROLL <= en:
                    _prefetch_ahead(k, base, col, pos, en)
                    e0, e1, e2, e3 = pos, pos + 1, pos + 2, pos + 3
                    s0, s1, s2, s3 = _dot4(
                        q, r, k, base + col[e0], base + col[e1], base + col[e2], base + col[e3],
                        zero,
                    )  # fmt: skip
                    s0, s1, s2, s3 = s0 * sc, s1 * sc, s2 * sc, s3 * sc
                    weights[e0], weights[e1], weights[e2], weights[e3] = s0, s1, s2, s3
                    mx = max(mx, max(max(s0, s1), max(s2, s3)))
                    pos += _UNROLL
                for e in range(pos, en):
                    s = _dot(q, r, k, base + col[e], zero) * sc
                    weights[e] = s
                    mx = max(mx, s)
                row_max[r] = mx
        for t in range(num_tiles):
            for r in prange(first, last):
                _start_row(out, r, t, last)
                base = (r // n) * m
                mx = row_max[r]
                total = zero if t == 0 else row_scale[r]  # the row's running sum until its end
                pos, en = lo[t, r], hi[t, r]
                _prefetch_next(v, lo, hi, t, r, last, n, m, col)
                while pos + _UNROLL <= en:
                    _prefetch_ahead(v, base, col, pos, en)
                    e0, e1, e2, e3 = pos, pos + 1, pos + 2, pos + 3
                    w0, w1 = np.exp(weights[e0] - mx), np.exp(weights[e1] - mx)
                    w2, w3 = np.exp(weights[e2] - mx), np.exp(weights[e3] - mx)
                    weights[e0], weights[e1], weights[e2], weights[e3] = w0, w1, w2, w3
                    total += (w0 + w1) + (w2 + w3)
                    if has_drop:
                        w0, w1, w2, w3 = w0 * drop[e0], w1 * drop[e1], w2 * drop[e2], w3 * drop[e3]
                    _axpy4(
                        out, r, v, w0, w1, w2, w3,
                        base + col[e0], base + col[e1], base + col[e2], base + col[e3],
                    )  # fmt: skip
                    pos += _UNROLL
                for e in range(pos, en):
                    w = np.exp(weights[e] - mx)
                    weights[e] = w
                    total += w
                    _axpy(out, r, v, w * drop[e] if has_drop else w, base + col[e])
                if t < num_tiles - 1:
                    row_scale[r] = total
                else:
                    inv = one / total if total > zero else zero
                    row_scale[r] = inv
                    for d in range(out.shape[1]):
                        out[r, d] *= inv


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def backward_rows(
    lo, hi, col, tpos, k, v, drop, weights, row_scale, out, g, scale, n, m, gq, w, w_t, rs
):  # pragma: no cover
    """By-query pass of backward: ``gq`` and the gradients of every edge.

    With ``pi_e = weights[e] * row_scale[r]`` (see :func:`forward`), ``gp_e = drop_e <g_r, v_j>``
    and ``rs_r = <g_r, out_r>`` (= sum_e pi_e gp_e), the
    gradient of edge e's 0/1 indicator is ``t_e = pi_e (gp_e - rs_r)``, which is also the
    gradient of its score: ``gq_r = scale sum_e t_e k_j``. The straight-through gradient of
    ``lambda_e`` is ``G_e = clip(t_e + g_pair[p], -1, 1)`` (``g_pair`` = gradient of the pair's
    edge count).

    Per-edge arrays are by position in the layout of ``lo, hi``. ``w`` (E,) receives ``t``;
    ``w_t`` (E, 2) receives ``(t, pi drop)`` at the edge's by-key position ``tpos[e]``, side by
    side so that each scattered write touches one
    cache line. ``G`` is not stored: the products recompute it from ``t`` (see :func:`ste_spmm`),
    which halves the per-edge scratch and the bytes every later pass streams (8 and 16 bytes
    per edge in float32 instead of 24 and 48). With ``tpos`` empty, ``w_t`` is in the layout's
    order (for :func:`scatter_cols` and :func:`ste_scatter`). ``rs`` (R,) is scratch.
    """
    num_rows = gq.shape[0]
    dim_v = g.shape[1]
    num_tiles = lo.shape[0]
    has_drop = drop.shape[0] > 0
    zero, sc = _typed(0.0, g), _typed(scale, g)
    step = _pair_group(n)
    for first in range(0, num_rows, step):
        last = min(num_rows, first + step)
        for t in range(num_tiles):
            for r in prange(first, last):
                st, en = lo[t, r], hi[t, r]
                base = (r // n) * m
                if t == 0:
                    rs_r = zero
                    for d in range(dim_v):
                        rs_r += g[r, d] * out[r, d]
                    rs[r] = rs_r
                else:
                    rs_r = rs[r]
                sr = row_scale[r]
                pos = st
                _prefetch_next(v, lo, hi, t, r, last, n, m, col)
                while pos + _UNROLL <= en:
                    _prefetch_ahead(v, base, col, pos, en)
                    e0, e1, e2, e3 = pos, pos + 1, pos + 2, pos + 3
                    gp0, gp1, gp2, gp3 = _dot4(
                        g, r, v, base + col[e0], base + col[e1], base + col[e2], base + col[e3],
                        zero,
                    )  # fmt: skip
                    _edge_grad(e0, gp0, weights, sr, drop, has_drop, rs_r, tpos, w, w_t)
                    _edge_grad(e1, gp1, weights, sr, drop, has_drop, rs_r, tpos, w, w_t)
                    _edge_grad(e2, gp2, weights, sr, drop, has_drop, rs_r, tpos, w, w_t)
                    _edge_grad(e3, gp3, weights, sr, drop, has_drop, rs_r, tpos, w, w_t)
                    pos += _UNROLL
                for e in range(pos, en):
                    gp = _dot(g, r, v, base + col[e], zero)
                    _edge_grad(e, gp, weights, sr, drop, has_drop, rs_r, tpos, w, w_t)
        for t in range(num_tiles):
            for r in prange(first, last):
                _start_row(gq, r, t, last)
                st, en = lo[t, r], hi[t, r]
                base = (r // n) * m
                pos = st
                _prefetch_next(k, lo, hi, t, r, last, n, m, col)
                while pos + _UNROLL <= en:
                    _prefetch_ahead(k, base, col, pos, en)
                    e0, e1, e2, e3 = pos, pos + 1, pos + 2, pos + 3
                    _axpy4(
                        gq, r, k, w[e0] * sc, w[e1] * sc, w[e2] * sc, w[e3] * sc,
                        base + col[e0], base + col[e1], base + col[e2], base + col[e3],
                    )  # fmt: skip
                    pos += _UNROLL
                for e in range(pos, en):
                    _axpy(gq, r, k, w[e] * sc, base + col[e])


@njit(inline="always")
def _edge_grad(e, gp, weights, sr, drop, has_drop, rs_r, tpos, w, w_t):  # pragma: no cover
    """Edge e's gradients from ``gp = <g_r, v_j>`` (see :func:`backward_rows`; ``sr`` is the
    row's ``row_scale``)."""
    pi = weights[e] * sr
    wv = pi
    if has_drop:
        gp *= drop[e]
        wv *= drop[e]
    ts = pi * (gp - rs_r)
    w[e] = ts
    tp = tpos[e] if tpos.shape[0] > 0 else e
    w_t[tp, 0] = ts
    w_t[tp, 1] = wv


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def backward_cols(lo, hi, trow, q, g, w_t, scale, n, m, gk, gv):  # pragma: no cover
    """By-key pass of backward over the transposed graph (tile-major, see :func:`transpose`):
    ``gk_c = scale sum_t w_t[t, 0] q_i``, then ``gv_c = sum_t w_t[t, 1] g_i``, each in its own
    tile passes over one table (like :func:`backward_rows`)."""
    num_cols, dim = gk.shape
    num_tiles = lo.shape[0]
    sc = _typed(scale, gk)
    step = _pair_group(m)
    for first in range(0, num_cols, step):
        last = min(num_cols, first + step)
        for tile in range(num_tiles):
            for c in prange(first, last):
                _start_row(gk, c, tile, last)
                st, en = lo[tile, c], hi[tile, c]
                _axpy_rows(gk, c, q, w_t, 0, trow, (c // m) * n, st, en)
                if tile == num_tiles - 1:
                    for d in range(dim):
                        gk[c, d] *= sc
        for tile in range(num_tiles):
            for c in prange(first, last):
                _start_row(gv, c, tile, last)
                st, en = lo[tile, c], hi[tile, c]
                _axpy_rows(gv, c, g, w_t, 1, trow, (c // m) * n, st, en)


@njit(inline="always")
def _axpy_rows(out, c, x, w_t, which, trow, rbase, st, en):  # pragma: no cover
    """``out[c] += w_t[t, which] x[rbase + trow[t]]`` for t in [st, en)."""
    t = st
    while t + _UNROLL <= en:
        _axpy4(
            out, c, x, w_t[t, which], w_t[t + 1, which], w_t[t + 2, which], w_t[t + 3, which],
            rbase + trow[t], rbase + trow[t + 1], rbase + trow[t + 2], rbase + trow[t + 3],
        )  # fmt: skip
        t += _UNROLL
    for u in range(t, en):
        _axpy(out, c, x, w_t[u, which], rbase + trow[u])


# The by-key products can also be computed from the by-query layout, without the transposed
# graph: each (key tile, pair) of the layout is a unit of work that scatters into its own rows of
# the result, reading the rows of the query side in order. Where the layout has several tiles
# (N = 64k: 4 tiles of 16384 keys; measured first with 8 tiles of 8192 keys at 128 edges per
# query), the results' rows of one unit stay in cache and this measured 0.7x the time of the
# transpose and the by-key passes it replaces (whole step 0.956x); with 2 tiles it lost (1.08x
# at N = 64k, 32 edges per query: each unit's results are 8-16 MiB; 1.05x again after the
# cross-row prefetch below), with one (the whole table) 2x.


@njit(inline="always")
def _unit(u, num_pairs, tile_keys, m):  # pragma: no cover
    """Unit ``u``'s pair, tile and first and last result rows. Units go tile-major (all pairs'
    tile 0 first): a static split over threads gives each a share of every pair, so a pair with
    more edges than the others (heads differ in density) is shared too."""
    t = u // num_pairs
    p = u - t * num_pairs
    return p, t, p * m + t * tile_keys, p * m + min(m, (t + 1) * tile_keys)


@njit(inline="always")
def _zero_rows(out, c0, c1):  # pragma: no cover
    zero = _typed(0.0, out)
    for c in range(c0, c1):
        for d in range(out.shape[1]):
            out[c, d] = zero


@njit(inline="always")
def _prefetch_stop(hi, t, p, n):  # pragma: no cover
    """The last edge (exclusive) of a scatter unit whose row ``_PREFETCH_DISTANCE`` edges ahead
    is prefetched. A unit's edges (all rows of pair ``p`` in tile ``t``) are one contiguous run
    of the tile-major layout, so the prefetch runs across row boundaries: within each row only,
    the first ``_PREFETCH_DISTANCE`` edges of every row went unprefetched (about half of them at
    16 edges per row and tile; kernels 0.74-0.77x at N = 64k, 32 edges per query, 0.90x at 128).
    """
    return hi[t, (p + 1) * n - 1] - _PREFETCH_DISTANCE


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def scatter_cols(lo, hi, col, q, g, w_t, scale, n, m, tile_keys, gk, gv):  # pragma: no cover
    """:func:`backward_cols` from the by-query layout (``lo, hi, col``, keys tiles of
    ``tile_keys``; ``w_t`` in the layout's order): ``gk[j] += scale w_t[e, 0] q_r`` and
    ``gv[j] += w_t[e, 1] g_r`` along every edge e = (r, j), one (tile, pair) unit at a time."""
    num_tiles, num_rows = lo.shape
    num_pairs = num_rows // max(n, 1)
    dim, dim_v = gk.shape[1], gv.shape[1]
    sc = _typed(scale, gk)
    for u in prange(num_pairs * num_tiles):
        p, t, c0, c1 = _unit(u, num_pairs, tile_keys, m)
        _zero_rows(gk, c0, c1)
        _zero_rows(gv, c0, c1)
        base, stop = p * m, _prefetch_stop(hi, t, p, n)
        for r in range(p * n, (p + 1) * n):
            en = hi[t, r]
            for e in range(lo[t, r], en):
                if e < stop:
                    ahead = base + col[e + _PREFETCH_DISTANCE]
                    _prefetch_row(gk, ahead)  # type: ignore[call-arg]
                    _prefetch_row(gv, ahead)
                c = base + col[e]
                a, b = w_t[e, 0] * sc, w_t[e, 1]
                for d in range(dim):
                    gk[c, d] += a * q[r, d]
                for d in range(dim_v):
                    gv[c, d] += b * g[r, d]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def ste_scatter(lo, hi, col, w_t, g_pair, y, n, m, tile_keys, out):  # pragma: no cover
    """The by-key membership product of :func:`ste_spmm` from the by-query layout (like
    :func:`scatter_cols`): ``out[j] += G_e y[r]`` along every edge e = (r, j)."""
    num_tiles, num_rows = lo.shape
    num_pairs = num_rows // max(n, 1)
    dim = out.shape[1]
    g_lo, g_hi = _typed(-1.0, out), _typed(1.0, out)
    for u in prange(num_pairs * num_tiles):
        p, t, c0, c1 = _unit(u, num_pairs, tile_keys, m)
        _zero_rows(out, c0, c1)
        base, shift, stop = p * m, g_pair[p], _prefetch_stop(hi, t, p, n)
        for r in range(p * n, (p + 1) * n):
            en = hi[t, r]
            for e in range(lo[t, r], en):
                if e < stop:
                    _prefetch_row(out, base + col[e + _PREFETCH_DISTANCE])  # type: ignore[call-arg]
                c = base + col[e]
                a = _clip(w_t[e, 0] + shift, g_lo, g_hi)
                for d in range(dim):
                    out[c, d] += a * y[r, d]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def ste_spmm(lo, hi, idx, vals, g_pair, x, n_self, n_other, out):  # pragma: no cover
    """``out_r = sum over edges e of row r of G_e x[other-side row of e]``, by tile, with the
    straight-through gradient ``G_e = clip(vals[e, 0] + g_pair[r // n_self], -1, 1)``.

    Row ``r`` belongs to pair ``r // n_self``; its edge e points at row
    ``(r // n_self) * n_other + idx[e]`` of ``x``. The same kernel serves the graph (rows are
    queries, x the key memberships) and its transpose (rows are keys, ``vals`` in by-key order).
    The gathered rows are prefetched a few edges ahead, and the next row's first ones at the
    start of a row (tile passes leave rows ~16 edges per tile: without it, half of them were
    never prefetched; backward 0.96x at N = 64k, 32 and 128 edges per query).

    Each later tile pass reads every row's K-wide sum again (at N = 64k, 128 edges per query,
    those reads and writes are ~1/6 of the time): the first pass zeroes a row right before
    adding to it, instead of a separate pass over ``out`` (0.88-0.98x the time at N = 16k), and
    later passes prefetch the sums ``_ACC_AHEAD`` rows ahead (0.95x at N = 64k, 128 edges per
    query; both over 21 alternating rounds on synthetic graphs).
    """
    num_rows = out.shape[0]
    num_tiles = lo.shape[0]
    g_lo, g_hi = _typed(-1.0, out), _typed(1.0, out)
    step = _pair_group(n_self)
    for first in range(0, num_rows, step):
        last = min(num_rows, first + step)
        for t in range(num_tiles):
            for r in prange(first, last):
                _start_row(out, r, t, last)
                base = (r // n_self) * n_other
                shift = g_pair[r // n_self]
                st, en = lo[t, r], hi[t, r]
                _prefetch_next(x, lo, hi, t, r, last, n_self, n_other, idx)
                pos = st
                while pos + _UNROLL <= en:
                    _prefetch_ahead(x, base, idx, pos, en)
                    e0, e1, e2, e3 = pos, pos + 1, pos + 2, pos + 3
                    _axpy4(
                        out, r, x, _clip(vals[e0, 0] + shift, g_lo, g_hi),
                        _clip(vals[e1, 0] + shift, g_lo, g_hi),
                        _clip(vals[e2, 0] + shift, g_lo, g_hi),
                        _clip(vals[e3, 0] + shift, g_lo, g_hi), base + idx[e0], base + idx[e1],
                        base + idx[e2], base + idx[e3],
                    )  # fmt: skip
                    pos += _UNROLL
                for e in range(pos, en):
                    _axpy(out, r, x, _clip(vals[e, 0] + shift, g_lo, g_hi), base + idx[e])


@njit(inline="always")
def _clip(x, lo, hi):  # pragma: no cover
    return hi if x > hi else (lo if x < lo else x)


@njit(parallel=True, cache=True)
def group_by_tile(crow, col, shift, num_tiles):  # pragma: no cover
    """Counting sort of each row's edges by ``col >> shift``: returns ``ptr`` and ``order``."""
    num_rows = crow.shape[0] - 1
    ptr = np.empty((num_tiles + 1, num_rows), crow.dtype)
    order = np.empty(col.shape[0], crow.dtype)
    for r in prange(num_rows):
        st, en = crow[r], crow[r + 1]
        counts = np.zeros(num_tiles + 1, np.int64)
        for e in range(st, en):
            counts[(col[e] >> shift) + 1] += 1
        acc = st
        for t in range(num_tiles):
            acc += counts[t]
            ptr[t, r] = acc
            counts[t] = acc
        ptr[num_tiles, r] = en
        for e in range(st, en):
            t = col[e] >> shift
            order[counts[t]] = e
            counts[t] += 1
    return ptr, order


@njit(parallel=True, cache=True)
def tile_pointers(crow, col, shift, num_tiles):  # pragma: no cover
    """``ptr`` for rows whose columns are already grouped by ``col >> shift`` in ascending tiles."""
    num_rows = crow.shape[0] - 1
    ptr = np.empty((num_tiles + 1, num_rows), crow.dtype)
    for r in prange(num_rows):
        e = crow[r]
        en = crow[r + 1]
        for t in range(num_tiles):
            while e < en and (col[e] >> shift) < t:
                e += 1
            ptr[t, r] = e
        ptr[num_tiles, r] = en
    return ptr
