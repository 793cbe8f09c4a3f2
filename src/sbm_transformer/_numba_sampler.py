"""Fused CPU fastRG sampler (numba). Same distribution as :func:`sampling._sample_torch`.

For every stacked (batch, head) pair ``p``, query ``i`` and key cluster ``b`` the sampler draws the
number of edges that query sends through cluster ``b``::

    c[p, b, i] ~ Poisson(u[p, i, b] * mass[p, b, i])       u = Y B,  mass = sum of Z[:, b] over
                                                          the keys query i may see

and then each of those edges' key ``j`` from ``Z[j, b] / mass``. Summed over ``b`` the count of an
ordered pair (i, j) is Poisson(lambda_ij), lambda = Y B Z^T (the fastRG multigraph of Rohe, Tao and
Yu 2018). An extra component ``b = K`` draws the exploration layer: Poisson(eps * #visible keys)
edges per query with uniformly random visible keys. Duplicate (i, j) draws collapse, so an edge is
present with probability ``1 - exp(-(lambda_ij + eps))``.

A query row expecting fewer edges than 1.5 times the clusters (the usual case for sparse graphs)
gets the same counts without K Poisson draws or the O(K^2) product ``u``: it draws its total,
then each edge's query cluster a (weights ``Y[i, a] beta[a]``, ``beta = B mass``, by rejection
from an alias table over beta) and key cluster b (weights ``B[a, b] mass[b]``, an alias table per
a); see :func:`_count`. Busier rows, and causal sampling, use the per-cluster counts above.

Keys are drawn by rejection from the uniform distribution when a cluster's key weights are flat
(the heaviest at most 4x the mean: at most 4 tries per draw on average, nothing to build; each
try takes one uniform, its integer part proposing a key and its fraction testing it: measured
0.94-0.97x the time of :func:`_fill` with two uniforms per try), otherwise with Walker's alias
method (Vose's construction): O(M) to build, O(1) per draw. Loops over draws run cluster-major
so that one cluster's table stays in cache: each component draws all its keys, for all rows, into
its own run of a staging array, and a second pass (:func:`_merge_dedup`) hands each row its
share of every run and drops repeated keys. (Drawing each key straight into its row's slot
scattered single writes over the whole draw array; the staged sampler measured 0.90-0.95x the
time at 128 edges per query, N = 16k and 64k, 0.82-0.83x at 32, with the same graphs.)
Causal rows instead use the mass of their prefix ``j <= i`` of each cluster for their counts and
draw keys by binary search in the prefix's cumulative weights, with a random stream per (row,
component): a row's edges then depend on the tokens up to it only, never on later ones (strict
causality for a fixed seed).
Randomness comes from SplitMix64 streams keyed by (seed, phase, index): the result does not depend
on the number of threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numba import njit, prange

from sbm_transformer._numba import recycled, scratch
from sbm_transformer.graph import TILE_SHIFT

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / 9007199254740992.0


@njit(inline="always")
def _mix(z):  # pragma: no cover - compiled
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _stream(seed, phase, table):  # pragma: no cover
    return _mix(np.uint64(seed) ^ _mix(np.uint64(phase) * _GOLDEN + np.uint64(table)))


@njit(inline="always")
def _uniform(state):  # pragma: no cover
    """SplitMix64 step: (new state, uniform float64 in [0, 1))."""
    state = state + _GOLDEN
    return state, (_mix(state) >> np.uint64(11)) * _INV53


@njit(inline="always")
def _poisson(state, lam):  # pragma: no cover
    """Exact Poisson draw: inversion for small rates, PTRS (Hoermann 1993) for rates >= 10."""
    if lam <= 0.0:
        return state, 0
    if lam < 10.0:
        state, u = _uniform(state)
        if u < 1.0 - lam:  # 1 - lam <= exp(-lam): zero without computing the exponential
            return state, 0
        p = math.exp(-lam)
        cdf = p
        k = 0
        while u > cdf:
            k += 1
            p *= lam / k
            cdf += p
            if p == 0.0:
                break
        return state, k
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        state, u = _uniform(state)
        state, v = _uniform(state)
        u -= 0.5
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return state, int(k)
        if k < 0 or (us < 0.013 and v > us):
            continue
        lhs = math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)
        if lhs <= -lam + k * loglam - math.lgamma(k + 1.0):
            return state, int(k)


@njit(cache=True)
def _build_alias(w, prob, alias, scaled, small, large):  # pragma: no cover
    """Vose's alias table of weights ``w`` (length L) into ``prob``/``alias``; returns sum(w).

    Slot ``s`` keeps item ``s`` with probability ``prob[s]`` and otherwise gives ``alias[s]``;
    items of weight 0 are never returned. ``scaled``, ``small``, ``large`` are scratch (>= L).
    """
    size = w.shape[0]
    total = 0.0
    heaviest = 0
    for j in range(size):
        total += w[j]
        if w[j] > w[heaviest]:
            heaviest = j
    if total <= 0.0:
        for j in range(size):
            prob[j] = 1.0
            alias[j] = j
        return total
    ns = 0
    nl = 0
    factor = size / total
    for j in range(size):  # branch-free partition into small (< 1) and large
        x = w[j] * factor
        scaled[j] = x
        is_small = x < 1.0
        small[ns] = j
        large[nl] = j
        ns += is_small
        nl += 1 - is_small
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        g = large[nl - 1]
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        if scaled[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1
    for t in range(nl):  # left over only through rounding: weight ~1 each
        prob[large[t]] = 1.0
        alias[large[t]] = large[t]
    for t in range(ns):
        s = small[t]
        if w[s] > 0.0:
            prob[s] = 1.0
            alias[s] = s
        else:  # a zero-weight item must never be drawn
            prob[s] = 0.0
            alias[s] = heaviest
    return total


@njit(inline="always")
def _alias_draw(state, prob, alias, size):  # pragma: no cover
    """(new state, one draw from the alias table ``prob``/``alias`` of ``size`` items)."""
    state, x = _uniform(state)
    y = x * size
    s = min(int(y), size - 1)
    return state, (s if y - s < prob[s] else alias[s])


#: A cluster whose heaviest key weighs at most this many times the mean draws its keys by
#: rejection from the uniform distribution (acceptance >= 1/4, no table to build); heavier-tailed
#: clusters get an alias table (O(M) to build, then O(1) per draw).
_REJECTION_MAX_RATIO = 4.0


#: Keys per block of :func:`_by_cluster` (256 measured ~2x faster than 64 at N = 4k and 64k).
_TRANSPOSE_BLOCK = 256


@njit(parallel=True, cache=True)
def _by_cluster(z, zt):  # pragma: no cover
    """``zt[p, b, j] = z[p, j, b]``, in blocks of keys (one cache-friendly pass)."""
    num_pairs, m, k = z.shape
    blocks = (m + _TRANSPOSE_BLOCK - 1) // _TRANSPOSE_BLOCK
    for pb in prange(num_pairs * blocks):
        p, first = pb // blocks, (pb % blocks) * _TRANSPOSE_BLOCK
        last = min(m, first + _TRANSPOSE_BLOCK)
        for b in range(k):
            for j in range(first, last):
                zt[p, b, j] = z[p, j, b]


@njit(parallel=True, cache=True)
def _key_tables(zt, prob, alias, totals, maxima, use_alias):  # pragma: no cover
    """Per (pair, cluster): key-weight totals and maxima, and alias tables where needed.

    ``zt`` (P, K, M) holds each cluster's key weights contiguously. ``use_alias[p, b]`` tells
    whether cluster b of pair p got an alias table in ``prob``/``alias`` (P, K, M); other
    clusters sample by rejection and never touch their rows of the tables.
    """
    num_pairs, k, m = zt.shape
    for tb in prange(num_pairs * k):
        p, b = tb // k, tb % k
        weights = zt[p, b]
        total = 0.0
        top = 0.0
        for j in range(m):
            x = weights[j]
            total += x
            top = max(top, x)
        totals[p, b] = total
        maxima[p, b] = top
        use_alias[p, b] = top * m > _REJECTION_MAX_RATIO * total
        if use_alias[p, b]:
            scaled = np.empty(m, np.float64)
            small = np.empty(m, np.int32)
            large = np.empty(m, np.int32)
            _build_alias(weights, prob[p, b], alias[p, b], scaled, small, large)


@njit(parallel=True, cache=True)
def _pair_tables(bmat, totals, beta, prob_a, alias_a, prob_b, alias_b):  # pragma: no cover
    """Per pair: ``beta[p, a] = sum_b B[p, a, b] T[p, b]`` (T: key-weight totals), an alias table
    over query clusters a with weights beta, and one over key clusters b with weights
    ``B[p, a, b] T[p, b]`` for each a."""
    num_pairs, k, _ = bmat.shape
    for pa in prange(num_pairs * k):
        p, a = pa // k, pa % k
        w = np.empty(k, np.float64)
        total = 0.0
        for b in range(k):
            w[b] = max(bmat[p, a, b], 0.0) * totals[p, b]
            total += w[b]
        beta[p, a] = total
        scaled = np.empty(k, np.float64)
        small = np.empty(k, np.int32)
        large = np.empty(k, np.int32)
        _build_alias(w, prob_b[p, a], alias_b[p, a], scaled, small, large)
    scaled = np.empty(k, np.float64)
    small = np.empty(k, np.int32)
    large = np.empty(k, np.int32)
    for p in range(num_pairs):
        _build_alias(beta[p], prob_a[p], alias_a[p], scaled, small, large)


@njit(inline="always")
def _few_draws(sbm_rate, eps_rate, top, beta_sum, k):  # pragma: no cover
    """Whether a row draws its edges one by one (:func:`_count`): fewer expected draws than
    ``_QUIET_DRAWS`` times the clusters, and the query-cluster proposal accepted at least a
    quarter of the time."""
    quiet = sbm_rate + eps_rate < _QUIET_DRAWS * k
    return quiet and (sbm_rate <= 0.0 or 4.0 * sbm_rate >= top * beta_sum)


#: Rows expecting fewer draws than this many times K draw edge by edge, busier ones a Poisson
#: count per cluster. In-process A/B of the whole sampler against 1.0: 0.79-0.84x at 128 edges
#: per query (N = 1k, 4k, 16k), unchanged at ~205 (busy either way); 2.0 made rows of ~205
#: draws 1.06-1.08x slower.
_QUIET_DRAWS = 1.5


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def _row_rates(y, beta, visible, eps, heads, sbm_rate, top, busy):  # pragma: no cover
    """Per query row: its SBM rate ``sum_a Y[i, a] beta[a]``, its largest membership, and
    whether it is busy (needs its per-cluster rates ``u = Y B``, see :func:`_few_draws`).
    (Reassociated sums, vectorised: measured 0.95x the time of one ordered sum, K = 128.)"""
    num_pairs, n, k = y.shape
    beta_sum = np.zeros(num_pairs, np.float64)
    for p in range(num_pairs):
        for a in range(k):
            beta_sum[p] += beta[p, a]
    for r in prange(num_pairs * n):
        p, i = r // n, r % n
        rate = 0.0
        high = 0.0
        for a in range(k):
            ya = y[p, i, a]
            rate += ya * beta[p, a]
            high = max(high, ya)
        sbm_rate[r] = rate
        top[r] = high
        busy[r] = not _few_draws(rate, eps * visible[p // heads, i], high, beta_sum[p], k)


@njit(inline="always")
def _draw_component(
    state, rate, eps_rate, bound, y_row, prob_a, alias_a, prob_b, alias_b
):  # pragma: no cover
    """(new state, component of one draw of a quiet row): ``K`` (the exploration layer) with
    probability ``eps_rate / rate``, else key cluster b of query cluster a, a drawn with weights
    ``Y[i, a] beta[a]`` (alias draw over beta, accepted with probability ``Y[i, a] / bound``)
    and b with weights ``B[a, b] T[b]`` (alias draw)."""
    k = y_row.shape[0]
    if eps_rate > 0.0:  # (without exploration, no uniform spent on it)
        state, x = _uniform(state)
        if x * rate < eps_rate:
            return state, k
    while True:
        state, a = _alias_draw(state, prob_a, alias_a, k)
        state, x = _uniform(state)
        if x * bound < y_row[a]:
            break
    return _alias_draw(state, prob_b[a], alias_b[a], k)


@njit(inline="always")
def _draw_key(state, weights, top, tabled, prob, alias):  # pragma: no cover
    """(new state, one key drawn with weights ``weights`` (M,), heaviest ``top``): from the
    cluster's alias table if ``tabled``, else by rejection from the uniform proposal (one
    uniform per try: its integer part proposes a key, its fraction tests it)."""
    m = weights.shape[0]
    if tabled:
        return _alias_draw(state, prob, alias, m)
    state, x = _uniform(state)
    while True:
        x *= m
        j = min(int(x), m - 1)
        if (x - j) * top < weights[j]:
            return state, j
        state, x = _uniform(state)


@njit(parallel=True, cache=True)
def _count(
    seed,
    y,
    u,
    totals,
    prob_a,
    alias_a,
    prob_b,
    alias_b,
    sbm_rate,
    top,
    busy,
    visible,
    eps,
    heads,
    counts,
    deg,
    chunk_totals,
):  # pragma: no cover
    """Per query row and component: the number of draws.

    ``counts[r, b]`` receives how many of row ``r = p*N + i``'s draws come from component b,
    ``deg[r]`` the row's total and ``chunk_totals[p, c, b]`` the sum over the rows of chunk c
    (``_COUNT_CHUNK`` rows) of pair p. Component ``K`` is the exploration layer.

    A busy row draws one Poisson count per component, with rates ``u[i, b] T[b]`` (``u = Y B``).
    Other rows (the usual case for sparse graphs, and then ``u`` is never computed) draw their
    total from Poisson(row rate) and give each draw a component: the exploration layer with
    probability ``eps_rate / row rate``, else query cluster a with probability
    ``Y[i, a] beta[a] / sbm rate`` (an alias draw over beta, accepted with probability
    ``Y[i, a] / max Y[i]``) and then key cluster b with probability ``B[a, b] T[b] / beta[a]``
    (an alias draw): the same independent Poisson counts, at O(draws) instead of O(K) Poisson
    draws plus an O(K^2) product per row.
    """
    num_pairs, n, k = y.shape
    chunks = chunk_totals.shape[1]
    for pc in prange(num_pairs * chunks):
        p, c = pc // chunks, pc % chunks
        first, last = p * n + c * _COUNT_CHUNK, p * n + min(n, (c + 1) * _COUNT_CHUNK)
        for b in range(k + 1):
            chunk_totals[p, c, b] = 0
        for r in range(first, last):
            i = r - p * n
            state = _stream(seed, 1, r)
            eps_rate = eps * visible[p // heads, i]
            row = counts[r]
            if busy[r]:
                for b in range(k):
                    state, row[b] = _poisson(state, u[p, i, b] * totals[p, b])
                state, row[k] = _poisson(state, eps_rate)
            else:
                for b in range(k + 1):
                    row[b] = 0
                rate = sbm_rate[r] + eps_rate
                bound = top[r]
                state, draws = _poisson(state, rate)
                for _ in range(draws):
                    state, b = _draw_component(
                        state, rate, eps_rate, bound, y[p, i], prob_a[p], alias_a[p],
                        prob_b[p], alias_b[p],
                    )  # fmt: skip
                    row[b] += 1
            acc = 0
            for b in range(k + 1):
                acc += row[b]
                chunk_totals[p, c, b] += row[b]
            deg[r] = acc


#: Rows per parallel chunk of :func:`_count` and :func:`_merge_dedup` (chunks do not cross
#: pairs).
_COUNT_CHUNK = 256


@njit(parallel=True, cache=True)
def _fill(
    seed, zt, maxima, use_alias, prob, alias, valid, visible, heads, stage_start, stage
):  # pragma: no cover
    """Draw every component's keys, one component after the other (not causal).

    Component b of pair p draws its ``stage_start[tb + 1] - stage_start[tb]`` keys
    (``tb = p*(K+1) + b``) i.i.d. into that run of ``stage``, sequentially; :func:`_merge_dedup`
    gives them to their rows. Component ``K`` is the exploration layer, uniform over the
    visible keys (the same for every row when not causal).
    """
    num_pairs = zt.shape[0]
    k = zt.shape[1]
    kk = k + 1
    for tb in prange(num_pairs * kk):
        p, b = tb // kk, tb % kk
        bb = p // heads
        state = _stream(seed, 2, tb)
        bk = min(b, k - 1)
        weights, top, tabled = zt[p, bk], maxima[p, bk], use_alias[p, bk]
        prob_b, alias_b = prob[p, bk], alias[p, bk]
        st, en = stage_start[tb], stage_start[tb + 1]
        if b < k:
            for e in range(st, en):
                state, stage[e] = _draw_key(state, weights, top, tabled, prob_b, alias_b)
        else:
            vis = visible[bb, 0]
            for e in range(st, en):
                state, x = _uniform(state)
                stage[e] = valid[bb, min(int(x * vis), vis - 1)]


@njit(parallel=True, cache=True)
def _merge_dedup(counts, cursors, stage, offsets, m, buf, kept):  # pragma: no cover
    """Give each row its draws and drop repeated keys (first draw kept).

    Row r takes the next ``counts[r, b]`` keys of component b's run of ``stage``, components in
    order; ``cursors[p, c, b]`` is where chunk c of pair p starts in that run. Kept keys go to
    ``buf[offsets[r]:]``, their number to ``kept[r]``; an M-bit bitmap finds repeats. The K + 1
    runs are read sequentially, one cache line each at a time.
    """
    num_pairs, chunks, kk = cursors.shape
    n = counts.shape[0] // num_pairs
    words = (m + 63) // 64
    for pc in prange(num_pairs * chunks):
        p, c = pc // chunks, pc % chunks
        first, last = p * n + c * _COUNT_CHUNK, p * n + min(n, (c + 1) * _COUNT_CHUNK)
        seen = np.zeros(words, np.uint64)
        cur = cursors[p, c].copy()
        for r in range(first, last):
            st = offsets[r]
            w = st
            row = counts[r]
            for b in range(kk):
                pos = cur[b]
                for e in range(pos, pos + row[b]):
                    w = _keep(stage[e], seen, buf, w)
                cur[b] = pos + row[b]
            for e in range(st, w):
                seen[buf[e] >> 6] = 0
            kept[r] = w - st


@njit(inline="always")
def _keep(j, seen, buf, w):  # pragma: no cover
    """Append key j at ``buf[w]`` unless the bitmap ``seen`` has it; returns the new end."""
    bit = np.uint64(1) << np.uint64(j & 63)
    word = seen[j >> 6]
    if word & bit == 0:
        seen[j >> 6] = word | bit
        buf[w] = j
        w += 1
    return w


@njit(parallel=True, cache=True)
def _prefix_sums(zt, zcum):  # pragma: no cover
    """``zcum[p, b, j] = sum of zt[p, b, :j+1]`` in float64."""
    num_pairs, k, m = zt.shape
    for tb in prange(num_pairs * k):
        p, b = tb // k, tb % k
        acc = 0.0
        for j in range(m):
            acc += zt[p, b, j]
            zcum[p, b, j] = acc


@njit(parallel=True, cache=True)
def _count_causal(seed, u, zcum, visible, eps, heads, cnt, deg):  # pragma: no cover
    """As :func:`_count` for causal rows: rates use the mass of keys ``j <= i`` only."""
    num_pairs, n, k = u.shape
    for r in prange(num_pairs * n):
        p, i = r // n, r % n
        state = _stream(seed, 1, r)
        acc = 0
        for b in range(k):
            state, c = _poisson(state, u[p, i, b] * zcum[p, b, i])
            cnt[p, b, i] = acc
            acc += c
        state, c = _poisson(state, eps * visible[p // heads, i])
        cnt[p, k, i] = acc
        deg[r] = acc + c


@njit(parallel=True, cache=True)
def _fill_causal(seed, zcum, valid, visible, heads, cnt, deg, offsets, buf):  # pragma: no cover
    """Draw the keys of causal rows by inverse CDF on the prefix ``j <= i`` of each cluster.

    Every (row, component) has its own random stream and reads only keys up to its row, so a
    row's edges are a function of the tokens up to it (and the seed), never of later ones.
    """
    num_pairs, kk, n = cnt.shape
    k = kk - 1
    for r in prange(num_pairs * n):
        p, i = r // n, r % n
        bb = p // heads
        for b in range(kk):
            st = offsets[r] + cnt[p, b, i]
            en = offsets[r] + (cnt[p, b + 1, i] if b < k else deg[r])
            if st == en:
                continue
            state = _stream(seed, 2, r * kk + b)
            if b < k:
                mass = zcum[p, b, i]
                for e in range(st, en):
                    state, x = _uniform(state)
                    target = x * mass
                    lo, hi = 0, i  # first j <= i with zcum > target
                    while lo < hi:
                        mid = (lo + hi) >> 1
                        if zcum[p, b, mid] > target:
                            hi = mid
                        else:
                            lo = mid + 1
                    buf[e] = lo
            else:
                vis = visible[bb, i]
                for e in range(st, en):
                    state, x = _uniform(state)
                    buf[e] = valid[bb, min(int(x * vis), vis - 1)]


@njit(parallel=True, cache=True)
def _dedup(offsets, buf, m, kept):  # pragma: no cover
    """Drop repeated keys within each row in place (first draw kept), with an M-bit bitmap."""
    num_rows = kept.shape[0]
    chunk = 256
    words = (m + 63) // 64
    for c in prange((num_rows + chunk - 1) // chunk):
        seen = np.zeros(words, np.uint64)
        for r in range(c * chunk, min(num_rows, (c + 1) * chunk)):
            st, en = offsets[r], offsets[r + 1]
            w = st
            for e in range(st, en):
                w = _keep(buf[e], seen, buf, w)
            for e in range(st, w):
                seen[buf[e] >> 6] = 0
            kept[r] = w - st


@njit(parallel=True, cache=True)
def _compact(offsets, buf, crow, col, tiles, ptr):  # pragma: no cover
    """Copy each row's kept keys into the final array, grouped by tile (a stable counting sort
    by ``j >> TILE_SHIFT`` over ``tiles`` tiles); ``ptr`` (tiles + 1, R) receives where each
    row's tiles start (nothing when ``tiles`` is 1)."""
    num_rows = crow.shape[0] - 1
    chunk = 256
    for c in prange((num_rows + chunk - 1) // chunk):
        counts = np.zeros(tiles + 1, np.int64)
        for r in range(c * chunk, min(num_rows, (c + 1) * chunk)):
            src, dst, size = offsets[r], crow[r], crow[r + 1] - crow[r]
            if tiles == 1:
                for t in range(size):
                    col[dst + t] = buf[src + t]
                continue
            for t in range(tiles + 1):
                counts[t] = 0
            for t in range(size):
                counts[(buf[src + t] >> TILE_SHIFT) + 1] += 1
            for t in range(tiles):
                counts[t + 1] += counts[t]
            for t in range(tiles + 1):
                ptr[t, r] = dst + counts[t]
            for t in range(size):
                j = buf[src + t]
                tile = j >> TILE_SHIFT
                col[dst + counts[tile]] = j
                counts[tile] += 1


def sample_csr(
    seed: int,
    y: np.ndarray,
    bmat: np.ndarray,
    query_rates: Callable[[], np.ndarray],
    z: np.ndarray,
    valid: np.ndarray,
    visible: np.ndarray,
    eps: float,
    causal: bool,
    heads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sample all (batch, head) graphs at once.

    Args:
        seed: 63-bit seed.
        y: ``(P, N, K)`` float, query memberships, P = B * H stacked pairs.
        bmat: ``(P, K, K)`` float, block matrices.
        query_rates: returns ``Y B`` ``(P, N, K)`` (rates per key cluster); called only when
            some rows need it (causal sampling, or rows busier than K expected draws).
        z: ``(P, M, K)`` float, key memberships, zero for padded keys.
        valid: ``(B, M)`` int64, indices of the non-padded keys of each sequence first.
        visible: ``(B, N)`` int64, number of keys each query may see (its prefix when causal).
        eps: exploration rate.
        causal: draw only keys ``j <= i``.
        heads: H, to map a pair ``p`` to its sequence ``p // H``.

    Returns:
        ``crow`` (P*N + 1,) and ``col`` (E,) of the deduplicated CSR graph, each row's keys
        grouped by tile of ``2^TILE_SHIFT`` keys (in draw order within a tile); int32 when the
        edge count and the stacked sizes allow, else int64. Then the tiles' start positions
        ``ptr`` (T + 1, P*N), T = ceil(M / 2^TILE_SHIFT), or None when T is 1.
    """
    num_pairs, n, k = y.shape
    m = z.shape[1]
    zt = scratch("sampler_by_cluster", (num_pairs, k, m), z.dtype)  # each cluster contiguous
    _by_cluster(z, zt)
    deg = scratch("sampler_degrees", (num_pairs * n,), np.int64)
    offsets = scratch("sampler_offsets", (num_pairs * n + 1,), np.int64)
    offsets[0] = 0
    if causal:
        cnt = scratch("sampler_counts_causal", (num_pairs, k + 1, n), np.int32)
        zcum = scratch("sampler_prefix", (num_pairs, k, m), np.float64)
        _prefix_sums(zt, zcum)
        _count_causal(seed, query_rates(), zcum, visible, eps, heads, cnt, deg)
    else:
        prob = scratch("sampler_prob", (num_pairs, k, m), np.float64)
        alias = scratch("sampler_alias", (num_pairs, k, m), np.int32)
        totals = np.empty((num_pairs, k), np.float64)
        maxima = np.empty((num_pairs, k), np.float64)
        use_alias = np.empty((num_pairs, k), np.bool_)
        _key_tables(zt, prob, alias, totals, maxima, use_alias)
        beta = np.empty((num_pairs, k), np.float64)
        prob_a, alias_a = np.empty((num_pairs, k), np.float64), np.empty((num_pairs, k), np.int32)
        prob_b = np.empty((num_pairs, k, k), np.float64)
        alias_b = np.empty((num_pairs, k, k), np.int32)
        _pair_tables(bmat, totals, beta, prob_a, alias_a, prob_b, alias_b)
        sbm_rate = scratch("sampler_row_rates", (num_pairs * n,), np.float64)
        top = scratch("sampler_row_top", (num_pairs * n,), np.float64)
        busy = scratch("sampler_row_busy", (num_pairs * n,), np.bool_)
        _row_rates(y, beta, visible, eps, heads, sbm_rate, top, busy)
        u = query_rates() if busy.any() else y[:1, :1, :1]
        counts = scratch("sampler_counts", (num_pairs * n, k + 1), np.int32)
        chunk_totals = np.empty((num_pairs, -(-n // _COUNT_CHUNK), k + 1), np.int64)
        _count(
            seed, y, u, totals, prob_a, alias_a, prob_b, alias_b, sbm_rate, top, busy,
            visible, eps, heads, counts, deg, chunk_totals,
        )  # fmt: skip
    np.cumsum(deg, out=offsets[1:])
    fits32 = max(int(offsets[-1]), num_pairs * max(n, m) + 1) <= np.iinfo(np.int32).max
    index_dtype = np.int32 if fits32 else np.int64
    buf = scratch("sampler_draws", (int(offsets[-1]),), index_dtype)
    kept = scratch("sampler_kept", (num_pairs * n,), np.int64)
    if causal:
        _fill_causal(seed, zcum, valid, visible, heads, cnt, deg, offsets, buf)
        _dedup(offsets, buf, m, kept)
    else:
        # Each component's draws in one run of ``stage`` (pairs, then components, then rows).
        cursors = np.cumsum(chunk_totals, axis=1) - chunk_totals  # within each run
        run_start = np.zeros(num_pairs * (k + 1) + 1, np.int64)
        np.cumsum(chunk_totals.sum(axis=1).ravel(), out=run_start[1:])
        cursors += run_start[:-1].reshape(num_pairs, 1, k + 1)
        stage = scratch("sampler_stage", (int(offsets[-1]),), index_dtype)
        _fill(seed, zt, maxima, use_alias, prob, alias, valid, visible, heads, run_start, stage)
        _merge_dedup(counts, cursors, stage, offsets, m, buf, kept)
    crow = np.zeros(num_pairs * n + 1, index_dtype)
    np.cumsum(kept, out=crow[1:])
    col = recycled(int(crow[-1]), index_dtype)  # the graph's keys: 64 MiB at N = 64k, 128/query
    tiles = -(-m >> TILE_SHIFT)
    ptr = np.empty((tiles + 1 if tiles > 1 else 0, num_pairs * n), index_dtype)
    _compact(offsets, buf, crow, col, tiles, ptr)
    return crow, col, (ptr if tiles > 1 else None)


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def _thin_marks(seed, crow, col, u, z, c, dense, n, m, eps, c_top, keep, kept):  # pragma: no cover
    k = u.shape[1]
    for r in prange(crow.shape[0] - 1):
        base = (r // n) * m
        count = 0
        for e in range(crow[r], crow[r + 1]):
            if dense[r]:
                keep[e] = False
                continue
            j = col[e]
            acc = u[r, 0] - u[r, 0]  # a zero of the memberships' dtype: the sum vectorises
            for b in range(k):
                acc += u[r, b] * z[base + j, b]
            lam = float(acc)
            q = -math.expm1(-(c[r] * lam + c_top * eps))
            _, x = _uniform(_stream(seed, r, j))
            keep[e] = x * q < lam + eps
            count += keep[e]
        kept[r + 1] = count


@njit(parallel=True, cache=True)
def _thin_compact(crow, col, keep, new_crow, new_col):  # pragma: no cover
    for r in prange(crow.shape[0] - 1):
        out = new_crow[r]
        for e in range(crow[r], crow[r + 1]):
            if keep[e]:
                new_col[out] = col[e]
                out += 1


def thin_csr(
    seed: int,
    crow: np.ndarray,
    col: np.ndarray,
    u: np.ndarray,
    z: np.ndarray,
    c: np.ndarray,
    dense: np.ndarray,
    n: int,
    m: int,
    eps: float,
    c_top: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Bernoulli thinning of Poisson proposals (see ``sampling._sample_bernoulli``): keep edge
    e of row r with probability ``(lambda_e + eps) / (1 - exp(-(c[r] lambda_e + c_top eps)))``,
    ``lambda_e = u[r] . z[pair * m + j]``, with a uniform keyed by (seed, row, key), and no edge of
    a row drawn pair by pair (``dense[r]``). Returns the kept graph's CSR pointers and keys, each
    row's keys in their order."""
    keep = scratch("thin_keep", (col.shape[0],), np.bool_)
    kept = np.zeros(crow.shape[0], dtype=crow.dtype)
    _thin_marks(seed, crow, col, u, z, c, dense, n, m, eps, c_top, keep, kept)
    new_crow = np.cumsum(kept).astype(crow.dtype)
    new_col = np.empty(int(new_crow[-1]), dtype=col.dtype)
    _thin_compact(crow, col, keep, new_crow, new_col)
    return new_crow, new_col
