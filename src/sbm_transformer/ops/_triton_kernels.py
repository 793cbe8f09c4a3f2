"""Triton kernels of SBM edge attention: :class:`TritonKernels`, the GPU implementation of the
:class:`~sbm_transformer.ops.kernels.Kernels` interface (CUDA tensors; CPU tensors under the
Triton interpreter, ``TRITON_INTERPRET=1``, which is how the tests run them without a GPU).

Three kernels, one program per row of the stacked layout (see :mod:`~sbm_transformer.ops.kernels`):

* ``_forward``, one program per query row ``r``: walks the row's CSR edges ``BLOCK_E`` at a time
  (keys gathered as ``(BLOCK_E, D)`` tiles), online softmax (running max and sum), accumulates
  ``sum_e w_e drop_e v_c``. Keeps the log-sum-exp of the row's scores (``lse``, float32; float64
  for float64 inputs), not the per-edge weights: backward recomputes ``pi_e = exp(s_e - lse_r)``
  from q and k, which it reads anyway, instead of reading and writing E weights.
* ``_backward_rows``, one program per query row: ``delta_r = <g_r, out_r>`` (stored for the
  next kernel), then per edge ``pi_e``, ``gp_e = drop_e <g_r, v_c>``, ``t_e = pi_e (gp_e -
  delta_r)``; accumulates ``dq_r = scale sum_e t_e k_c`` and the straight-through product
  ``(G Z)_r = sum_e clip(t_e + g_pair, -1, 1) z_c``.
* ``_backward_cols``, one program per key row ``c`` over the transposed graph
  (:meth:`~sbm_transformer.graph.Graph.transpose`, CSC: each key's queries): recomputes
  ``pi_e`` and ``t_e`` from the gathered ``q_r``, ``g_r``, ``lse_r``, ``delta_r`` (the key's own
  ``k_c``, ``v_c`` are loaded once) and accumulates ``dk_c = scale sum_e t_e q_r``, ``dv_c =
  sum_e pi_e drop_e g_r`` and ``(G^T Y)_c = sum_e clip(...) y_r``.

Why by key over the transposed graph rather than atomics from the by-query pass: every output
row is written once, by one program, from float32 registers (deterministic; no zero-filled
buffers; float16/bfloat16 outputs need no float32 staging copy); a key reached by many queries
(the exploration floor, a popular cluster) would otherwise serialise ``2D + K`` atomic adds per
edge on one row. The price is the transpose (a sort of the edges, cached per graph: one per
sampled graph, shared by every backward on it) and recomputing ``t_e`` (two dot products per
edge, on rows the by-key pass loads anyway).

Accumulation is float32 for float16, bfloat16 and float32 inputs (float64 for float64); outputs
and gradients come back in the inputs' dtypes, the straight-through products in the memberships'
dtype. Head sizes are padded to powers of two with masks (any size works; the tile heuristics
aim at 16 to 128). The tile sizes and warp counts are first guesses, not tuned on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from sbm_transformer.graph import Graph
from sbm_transformer.ops.kernels import Grads, Memberships, Softmax

#: Input dtypes the kernels take.
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Elements of one gathered tile (edges x padded width) a program holds, ``BLOCK_E`` follows;
#: about this many of them per thread give the warp count. First guesses, checked only for
#: register use (ptxas for sm_90, float32 and bfloat16, dropout and memberships on): at D = 64,
#: K = 32, (32, 64) tiles on 8 warps take 104 / 121 / 150 registers (forward / by query / by
#: key); no spills for D and K from 16 to 128; (64, 64) tiles on 4 warps spilled in the by-key
#: pass. Not timed on a GPU yet.
_TILE_ELEMENTS = 2048
_ELEMENTS_PER_THREAD = 8
_MIN_BLOCK = 16
_MAX_BLOCK_E = 64


# ------------------------------------------------------------------------------ kernels
# Plain functions, wrapped by _build() as compiled (JITFunction) or interpreted kernels, chosen
# at each call (see interpreting()), not once when this module is imported (triton.jit decides
# at decoration). They call no function of triton's own library (tl.sum, tl.max, tl.zeros):
# those are jit functions decorated when triton is imported, compiled or interpreted by the
# TRITON_INTERPRET of that moment, and an interpreted kernel cannot call a compiled one. The
# reductions go through the builtin tl.reduce with the library's combine functions, which the
# interpreter recognises (numpy's sum and max) and the compiler inlines, in either mode. So one
# process can run both (the tests: CPU tensors interpreted, CUDA ones compiled), whenever
# triton was imported.
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


def _forward(
    q,
    k,
    v,
    crow,
    col,
    drop,
    out,
    lse,
    scale_ptr,
    n,
    m,
    d,
    dv,
    HAS_DROP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # pragma: no cover - runs as a Triton kernel
    r = tl.program_id(0).to(tl.int64)
    kbase = (r // n) * m
    start = tl.load(crow + r).to(tl.int64)
    end = tl.load(crow + r + 1).to(tl.int64)
    sc = tl.load(scale_ptr).to(ACC)
    od = tl.arange(0, BLOCK_D)
    odm = od < d
    ov = tl.arange(0, BLOCK_DV)
    ovm = ov < dv
    qr = tl.load(q + r * d + od, mask=odm, other=0.0).to(ACC)
    m_i = tl.full([], float("-inf"), ACC)
    l_i = tl.full([], 0.0, ACC)
    acc = tl.full([BLOCK_DV], 0.0, ACC)
    for e0 in range(start, end, BLOCK_E):
        oe = e0 + tl.arange(0, BLOCK_E)
        em = oe < end
        c = kbase + tl.load(col + oe, mask=em, other=0).to(tl.int64)
        kt = tl.load(k + c[:, None] * d + od[None, :], mask=em[:, None] & odm[None, :], other=0.0)
        s = tl.reduce(kt.to(ACC) * qr[None, :], 1, _ADD) * sc
        s = tl.where(em, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 0, _MAX))
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.reduce(w, 0, _ADD)
        if HAS_DROP:
            w = w * tl.load(drop + oe, mask=em, other=0.0).to(ACC)
        vt = tl.load(v + c[:, None] * dv + ov[None, :], mask=em[:, None] & ovm[None, :], other=0.0)
        acc = acc * alpha + tl.reduce(w[:, None] * vt.to(ACC), 0, _ADD)
        m_i = m_new
    has = l_i > 0
    res = acc / tl.where(has, l_i, 1.0)
    tl.store(out + r * dv + ov, res.to(out.dtype.element_ty), mask=ovm)
    tl.store(lse + r, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0))


def _backward_rows(
    q,
    k,
    v,
    crow,
    col,
    drop,
    out,
    g,
    lse,
    delta,
    gq,
    z,
    gz,
    g_pair,
    scale_ptr,
    n,
    m,
    d,
    dv,
    kz,
    HAS_DROP: tl.constexpr,
    HAS_STE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # pragma: no cover - runs as a Triton kernel
    r = tl.program_id(0).to(tl.int64)
    pair = r // n
    kbase = pair * m
    start = tl.load(crow + r).to(tl.int64)
    end = tl.load(crow + r + 1).to(tl.int64)
    sc = tl.load(scale_ptr).to(ACC)
    od = tl.arange(0, BLOCK_D)
    odm = od < d
    ov = tl.arange(0, BLOCK_DV)
    ovm = ov < dv
    ok = tl.arange(0, BLOCK_K)
    okm = ok < kz
    qr = tl.load(q + r * d + od, mask=odm, other=0.0).to(ACC)
    gr = tl.load(g + r * dv + ov, mask=ovm, other=0.0).to(ACC)
    orow = tl.load(out + r * dv + ov, mask=ovm, other=0.0).to(ACC)
    dr = tl.reduce(gr * orow, 0, _ADD)  # = sum_e pi_e gp_e
    tl.store(delta + r, dr)
    lr = tl.load(lse + r)
    gpp = tl.load(g_pair + pair).to(ACC) if HAS_STE else 0.0
    dq = tl.full([BLOCK_D], 0.0, ACC)
    gzr = tl.full([BLOCK_K], 0.0, ACC)
    for e0 in range(start, end, BLOCK_E):
        oe = e0 + tl.arange(0, BLOCK_E)
        em = oe < end
        c = kbase + tl.load(col + oe, mask=em, other=0).to(tl.int64)
        kt = tl.load(k + c[:, None] * d + od[None, :], mask=em[:, None] & odm[None, :], other=0.0)
        kt = kt.to(ACC)
        pi = tl.where(em, tl.exp(tl.reduce(kt * qr[None, :], 1, _ADD) * sc - lr), 0.0)
        vt = tl.load(v + c[:, None] * dv + ov[None, :], mask=em[:, None] & ovm[None, :], other=0.0)
        gp = tl.reduce(vt.to(ACC) * gr[None, :], 1, _ADD)
        if HAS_DROP:
            gp = gp * tl.load(drop + oe, mask=em, other=0.0).to(ACC)
        t = pi * (gp - dr)  # gradient of the edge's score, and of its 0/1 indicator
        dq += tl.reduce((t * sc)[:, None] * kt, 0, _ADD)
        if HAS_STE:
            gl = tl.where(em, tl.minimum(tl.maximum(t + gpp, -1.0), 1.0), 0.0)
            zt = tl.load(
                z + c[:, None] * kz + ok[None, :], mask=em[:, None] & okm[None, :], other=0.0
            )
            gzr += tl.reduce(gl[:, None] * zt.to(ACC), 0, _ADD)
    tl.store(gq + r * d + od, dq.to(gq.dtype.element_ty), mask=odm)
    if HAS_STE:
        tl.store(gz + r * kz + ok, gzr.to(gz.dtype.element_ty), mask=okm)


def _backward_cols(
    q,
    k,
    v,
    ptr,
    trow,
    perm,
    drop,
    g,
    lse,
    delta,
    gk,
    gv,
    y,
    gy,
    g_pair,
    scale_ptr,
    n,
    m,
    d,
    dv,
    kz,
    HAS_DROP: tl.constexpr,
    HAS_STE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # pragma: no cover - runs as a Triton kernel
    c = tl.program_id(0).to(tl.int64)
    pair = c // m
    qbase = pair * n
    start = tl.load(ptr + c).to(tl.int64)
    end = tl.load(ptr + c + 1).to(tl.int64)
    sc = tl.load(scale_ptr).to(ACC)
    od = tl.arange(0, BLOCK_D)
    odm = od < d
    ov = tl.arange(0, BLOCK_DV)
    ovm = ov < dv
    ok = tl.arange(0, BLOCK_K)
    okm = ok < kz
    kc = tl.load(k + c * d + od, mask=odm, other=0.0).to(ACC)
    vc = tl.load(v + c * dv + ov, mask=ovm, other=0.0).to(ACC)
    gpp = tl.load(g_pair + pair).to(ACC) if HAS_STE else 0.0
    dk = tl.full([BLOCK_D], 0.0, ACC)
    dvc = tl.full([BLOCK_DV], 0.0, ACC)
    gyc = tl.full([BLOCK_K], 0.0, ACC)
    for e0 in range(start, end, BLOCK_E):
        oe = e0 + tl.arange(0, BLOCK_E)
        em = oe < end
        rr = qbase + tl.load(trow + oe, mask=em, other=0).to(tl.int64)
        qt = tl.load(q + rr[:, None] * d + od[None, :], mask=em[:, None] & odm[None, :], other=0.0)
        qt = qt.to(ACC)
        lr = tl.load(lse + rr, mask=em, other=0.0)
        pi = tl.where(em, tl.exp(tl.reduce(qt * kc[None, :], 1, _ADD) * sc - lr), 0.0)
        gt = tl.load(g + rr[:, None] * dv + ov[None, :], mask=em[:, None] & ovm[None, :], other=0.0)
        gt = gt.to(ACC)
        gp = tl.reduce(gt * vc[None, :], 1, _ADD)
        wv = pi
        if HAS_DROP:
            de = tl.load(drop + tl.load(perm + oe, mask=em, other=0), mask=em, other=0.0).to(ACC)
            gp = gp * de
            wv = pi * de
        t = pi * (gp - tl.load(delta + rr, mask=em, other=0.0))
        dk += tl.reduce((t * sc)[:, None] * qt, 0, _ADD)
        dvc += tl.reduce(wv[:, None] * gt, 0, _ADD)
        if HAS_STE:
            gl = tl.where(em, tl.minimum(tl.maximum(t + gpp, -1.0), 1.0), 0.0)
            yt = tl.load(
                y + rr[:, None] * kz + ok[None, :], mask=em[:, None] & okm[None, :], other=0.0
            )
            gyc += tl.reduce(gl[:, None] * yt.to(ACC), 0, _ADD)
    tl.store(gk + c * d + od, dk.to(gk.dtype.element_ty), mask=odm)
    tl.store(gv + c * dv + ov, dvc.to(gv.dtype.element_ty), mask=ovm)
    if HAS_STE:
        tl.store(gy + c * kz + ok, gyc.to(gy.dtype.element_ty), mask=okm)


# ----------------------------------------------------------------------------- launching
@dataclass(frozen=True)
class _Compiled:
    forward: Any
    backward_rows: Any
    backward_cols: Any


_BUILT: dict[bool, _Compiled] = {}


def interpreting() -> bool:
    """Whether the kernels run under the Triton interpreter: ``TRITON_INTERPRET`` set now (read
    at each call), or set when triton was imported (its library is interpreted then, and
    compiled kernels could not call it)."""
    from triton.runtime.interpreter import InterpretedFunction

    now = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    return now or isinstance(_ADD, InterpretedFunction)


def _build(interpret: bool) -> _Compiled:
    if interpret not in _BUILT:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            wrap = triton.runtime.jit.JITFunction
        _BUILT[interpret] = _Compiled(wrap(_forward), wrap(_backward_rows), wrap(_backward_cols))
    return _BUILT[interpret]


def kernels_for(*tensors: Tensor) -> _Compiled:
    """The kernels for tensors on their device: compiled on a GPU, interpreted under
    ``TRITON_INTERPRET=1``. CPU tensors need the interpreter: a clear error otherwise."""
    interpret = interpreting()
    if any(t.device.type == "cpu" for t in tensors) and not interpret:
        raise ValueError(
            "the Triton kernels (backend 'sparse-triton') run on CPU tensors only under the "
            "Triton interpreter: set TRITON_INTERPRET=1 (slow; meant for tests), or use CUDA "
            "tensors, or backend 'sparse'/'sparse-numba'/'sparse-torch' on the CPU"
        )
    return _build(interpret)


def _pow2(x: int) -> int:
    return max(_MIN_BLOCK, triton.next_power_of_2(max(int(x), 1)))


def _block_e(widest: int, edges_per_row: float) -> int:
    """Edges per step of a program: a tile of about ``_TILE_ELEMENTS``, fewer for short rows."""
    by_tile = max(_MIN_BLOCK, _TILE_ELEMENTS // widest)
    return min(_MAX_BLOCK_E, by_tile, _pow2(int(edges_per_row + 0.999)))


def _num_warps(block_e: int, widest: int) -> int:
    return min(8, max(1, block_e * widest // (32 * _ELEMENTS_PER_THREAD)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"the Triton kernels take q, k, v of one dtype among {DTYPES}, got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )


class TritonKernels:
    """Triton implementation of :class:`~sbm_transformer.ops.kernels.Kernels` (see the module
    docstring). Its :class:`~sbm_transformer.ops.kernels.Softmax` holds no per-edge weights:
    ``weights`` is empty and ``row_scale`` holds each row's log-sum-exp (0 for an empty row)."""

    name = "triton"

    def forward(
        self, graph: Graph, q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, scale: float
    ) -> tuple[Tensor, Softmax]:
        _check(q, k, v)
        fns = kernels_for(q, k, v)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        rows, d = q.shape
        dv = v.shape[1]
        acc = accumulation_dtype(q.dtype)
        out = q.new_empty(rows, dv)
        lse = torch.empty(rows, dtype=acc, device=q.device)
        if rows == 0:
            return out, Softmax(lse.new_empty(0), lse)
        bd, bdv = _pow2(d), _pow2(dv)
        widest = max(bd, bdv)
        block_e = _block_e(widest, graph.num_edges / rows)
        fns.forward[(rows,)](
            q, k, v, graph.crow_indices, graph.col_indices, _drop(drop, q), out, lse,
            _scale(scale, acc, q.device), graph.num_queries, graph.num_keys, d, dv,
            HAS_DROP=drop is not None, ACC=_tl_dtype(q.dtype), BLOCK_E=block_e, BLOCK_D=bd,
            BLOCK_DV=bdv, num_warps=_num_warps(block_e, widest), enable_fp_fusion=True,
        )  # fmt: skip
        return out, Softmax(lse.new_empty(0), lse)

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
        _check(q, k, v)
        fns = kernels_for(q, k, v, grad_out)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, grad_out = out.contiguous(), grad_out.contiguous()
        rows, d = q.shape
        cols, dv = v.shape
        _, _, n, m = graph.shape
        acc = accumulation_dtype(q.dtype)
        lse = softmax.row_scale
        gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if ste is not None:
            y, z = ste.y.contiguous(), ste.z.contiguous()
            kz = y.shape[1]
            gz = z.new_empty(rows, kz)
            gy = y.new_empty(cols, kz)
            g_pair = ste.g_pair.contiguous()
        else:
            kz = 1
            y = z = gz = gy = g_pair = q.new_empty(1)
        if rows == 0 or cols == 0:  # no edges possible: zero gradients
            for t in (gq, gk, gv, gz, gy):
                t.zero_()
            return Grads(gq, gk, gv, gz if ste else None, gy if ste else None)
        bd, bdv, bk = _pow2(d), _pow2(dv), _pow2(kz) if ste is not None else _MIN_BLOCK
        widest = max(bd, bdv, bk)
        sc = _scale(scale, acc, q.device)
        dropt = _drop(drop, q)
        delta = torch.empty(rows, dtype=acc, device=q.device)
        meta = dict(
            HAS_DROP=drop is not None, HAS_STE=ste is not None, ACC=_tl_dtype(q.dtype),
            BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_K=bk,
        )  # fmt: skip
        block_e = _block_e(widest, graph.num_edges / rows)
        fns.backward_rows[(rows,)](
            q, k, v, graph.crow_indices, graph.col_indices, dropt, out, grad_out, lse, delta, gq,
            z, gz, g_pair, sc, n, m, d, dv, kz, BLOCK_E=block_e,
            num_warps=_num_warps(block_e, widest), enable_fp_fusion=True, **meta,
        )  # fmt: skip
        by_key = graph.transpose()  # CSC, cached on the graph
        # the CSR position of each by-key edge: where its dropout factor is
        perm = by_key.perm if drop is not None else by_key.row_indices
        block_e = _block_e(widest, graph.num_edges / cols)
        fns.backward_cols[(cols,)](
            q, k, v, by_key.ccol_indices, by_key.row_indices, perm, dropt, grad_out, lse, delta,
            gk, gv, y, gy, g_pair, sc, n, m, d, dv, kz, BLOCK_E=block_e,
            num_warps=_num_warps(block_e, widest), enable_fp_fusion=True, **meta,
        )  # fmt: skip
        if ste is None:
            return Grads(gq, gk, gv, None, None)
        return Grads(gq, gk, gv, gz, gy)


def _scale(scale: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The score scale as a one-element tensor: a Python float reaches a kernel as float32 (and
    as a constexpr would compile one kernel per value)."""
    return torch.full((1,), scale, dtype=dtype, device=device)


def _drop(drop: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(1) if drop is None else drop.contiguous()


TRITON = TritonKernels()
