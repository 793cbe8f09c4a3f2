"""Fused CPU kernels (numba) for SBM edge attention over a :class:`~sbm_transformer.graph.Graph`.

Every kernel works on the stacked layout used throughout the package: query rows
``r = (b*H + h)*N + i`` and key rows ``c = (b*H + h)*M + j`` of 2-D arrays, CSR pointers over the
query rows, local column indices ``j``. Each is the fused form of a few torch ops in
:class:`sbm_transformer.ops.kernels.TorchKernels`; the tests compare both with the dense reference.

Backward runs two passes. The by-query pass computes the score gradient of every edge, ``gq``,
and the straight-through gradient ``G`` times the key memberships; it writes the per-edge weights
the by-key pass needs directly in by-key order (``tpos``), so the by-key pass reads them
sequentially and computes ``gk``, ``gv`` and ``G^T`` times the query memberships.

Numerics: per-row softmax with the row maximum subtracted; all arithmetic in the input dtype
(float32 or float64). Scalars are created in that dtype (``_typed``) so that float32 inputs are
never promoted to float64, which would stop vectorisation.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# No 'nnan'/'ninf': the row maximum starts at -inf.
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}


@njit(inline="always")
def _typed(value, like):  # pragma: no cover - compiled
    """``value`` as a scalar of the dtype of array ``like``."""
    return np.full(1, value, like.dtype)[0]


@njit(parallel=True, cache=True)
def transpose(crow, col, num_pairs, n, m):  # pragma: no cover
    """Counting sort of the edges by stacked key column; rows stay ascending within a column.

    Returns ``ccol`` (P*M + 1,), ``rows`` (E,) local query per by-key position, ``perm`` (E,)
    edge at each by-key position, and ``tpos`` (E,) its inverse (by-key position of each edge).
    """
    num_edges = col.shape[0]
    counts = np.zeros(num_pairs * m + 1, np.int64)
    for p in prange(num_pairs):
        for e in range(crow[p * n], crow[(p + 1) * n]):
            counts[p * m + col[e] + 1] += 1
    ccol = np.cumsum(counts).astype(crow.dtype)
    perm = np.empty(num_edges, crow.dtype)
    tpos = np.empty(num_edges, crow.dtype)
    rows = np.empty(num_edges, crow.dtype)
    for p in prange(num_pairs):
        cursor = ccol[p * m : (p + 1) * m].copy()
        for i in range(n):
            r = p * n + i
            for e in range(crow[r], crow[r + 1]):
                c = col[e]
                t = cursor[c]
                cursor[c] = t + 1
                perm[t] = e
                tpos[e] = t
                rows[t] = i
    return ccol, rows, perm, tpos


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def forward(crow, col, q, k, v, drop, scale, n, m, out, pi):  # pragma: no cover
    """``out_r = sum_e pi_e drop_e v_j`` with ``pi`` the softmax of ``scale <q_r, k_j>`` over the row.

    ``pi`` (E,) receives the softmax weights (backward needs them); ``drop`` is empty without
    dropout. Rows without edges output zeros.
    """
    num_rows, dim = q.shape
    dim_v = v.shape[1]
    has_drop = drop.shape[0] > 0
    zero, one = _typed(0.0, q), _typed(1.0, q)
    neg_inf, sc = _typed(-np.inf, q), _typed(scale, q)
    for r in prange(num_rows):
        st, en = crow[r], crow[r + 1]
        for d in range(dim_v):
            out[r, d] = zero
        if st == en:
            continue
        base = (r // n) * m
        row_max = neg_inf
        for e in range(st, en):
            kr = base + col[e]
            s = zero
            for d in range(dim):
                s += q[r, d] * k[kr, d]
            s *= sc
            pi[e] = s
            row_max = max(row_max, s)
        total = zero
        for e in range(st, en):
            w = np.exp(pi[e] - row_max)
            pi[e] = w
            total += w
        inv = one / total
        for e in range(st, en):
            p = pi[e] * inv
            pi[e] = p
            if has_drop:
                p *= drop[e]
            kr = base + col[e]
            for d in range(dim_v):
                out[r, d] += p * v[kr, d]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def backward_rows(crow, col, tpos, k, v, drop, pi, out, g, g_pair, scale, n, m, gq, w, w_t):  # pragma: no cover
    """By-query pass of backward: per-edge gradients and ``gq``.

    With ``gp_e = drop_e <g_r, v_j>`` and ``rs_r = <g_r, out_r>`` the gradient of edge e's
    0/1 indicator is ``t_e = pi_e (gp_e - rs_r)`` (also the gradient of its score), and
    ``gq_r = scale sum_e t_e k_j``. The straight-through gradient of ``lambda_e`` is
    ``G_e = clip(t_e + g_pair[p], -1, 1)`` (``g_pair`` = gradient of the pair's edge count).

    Per-edge weights go to ``w`` (E, 2) in row order: ``scale t`` and ``G``; and to ``w_t``
    (E, 4) at the edge's by-key position, side by side so that each edge costs one cache line:
    ``scale t``, ``pi drop``, ``G`` (and one unused slot that keeps records aligned).
    """
    num_rows, dim = gq.shape
    dim_v = g.shape[1]
    has_drop = drop.shape[0] > 0
    zero, sc = _typed(0.0, g), _typed(scale, g)
    lo, hi = _typed(-1.0, g), _typed(1.0, g)
    for r in prange(num_rows):
        st, en = crow[r], crow[r + 1]
        base = (r // n) * m
        shift = g_pair[r // n]
        rs = zero
        for d in range(dim_v):
            rs += g[r, d] * out[r, d]
        for e in range(st, en):
            kr = base + col[e]
            gp = zero
            for d in range(dim_v):
                gp += g[r, d] * v[kr, d]
            wv = pi[e]
            if has_drop:
                gp *= drop[e]
                wv *= drop[e]
            t = pi[e] * (gp - rs)
            ste = t + shift
            ste = hi if ste > hi else (lo if ste < lo else ste)
            w[e, 0] = t * sc
            w[e, 1] = ste
            tp = tpos[e]
            w_t[tp, 0] = t * sc
            w_t[tp, 1] = wv
            w_t[tp, 2] = ste
        for d in range(dim):
            gq[r, d] = zero
        for e in range(st, en):
            c = w[e, 0]
            kr = base + col[e]
            for d in range(dim):
                gq[r, d] += c * k[kr, d]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def backward_cols(ccol, trow, q, g, w_t, n, m, gk, gv):  # pragma: no cover
    """By-key pass of backward: ``gk_c = sum_t w_t[t, 0] q_i`` and ``gv_c = sum_t w_t[t, 1] g_i``."""
    num_cols, dim = gk.shape
    dim_v = gv.shape[1]
    zero = _typed(0.0, gk)
    for c in prange(num_cols):
        st, en = ccol[c], ccol[c + 1]
        rbase = (c // m) * n
        for d in range(dim):
            gk[c, d] = zero
        for t in range(st, en):
            w = w_t[t, 0]
            r = rbase + trow[t]
            for d in range(dim):
                gk[c, d] += w * q[r, d]
        for d in range(dim_v):
            gv[c, d] = zero
        for t in range(st, en):
            w = w_t[t, 1]
            r = rbase + trow[t]
            for d in range(dim_v):
                gv[c, d] += w * g[r, d]


# Plain sparse-times-dense products for the straight-through estimator. Kept as separate small
# kernels: fused into the passes above (more arrays written per loop) they measured 2-3x slower.
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def spmm(crow, col, vals, which, x, n, m, out):  # pragma: no cover
    """``out_r = sum_e vals[e, which] x[key row of e]`` (the graph times dense, by query)."""
    num_rows, f = out.shape
    zero = _typed(0.0, out)
    for r in prange(num_rows):
        for d in range(f):
            out[r, d] = zero
        base = (r // n) * m
        for e in range(crow[r], crow[r + 1]):
            w = vals[e, which]
            kr = base + col[e]
            for d in range(f):
                out[r, d] += w * x[kr, d]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def spmm_t(ccol, trow, vals_t, which, x, n, m, out):  # pragma: no cover
    """``out_c = sum_t vals_t[t, which] x[query row of t]`` (the graph transposed times dense).

    ``vals_t`` holds per-edge values in by-key order.
    """
    num_cols, f = out.shape
    zero = _typed(0.0, out)
    for c in prange(num_cols):
        for d in range(f):
            out[c, d] = zero
        rbase = (c // m) * n
        for t in range(ccol[c], ccol[c + 1]):
            w = vals_t[t, which]
            r = rbase + trow[t]
            for d in range(f):
                out[c, d] += w * x[r, d]
