"""GPU attention benchmark: SBM attention (Triton and torch.sparse kernels) against SDPA's flash
kernels and FlexAttention, on one CUDA device, case by case under time and memory caps.

``sbmt bench attention --device cuda`` runs it (``--suite gpu --device cpu`` runs the same code
on the CPU, small sizes, for the tests; ``--dry-run`` only plans the cases). The CPU benchmark of
:mod:`sbm_transformer.bench` is unchanged. Arms, one layer's attention core, batch 1:

* ``sbm-triton`` / ``sbm-torch``: SBM attention with backend ``"sparse-triton"`` /
  ``"sparse-torch"``. ``fwd`` = the attention forward on a graph sampled beforehand (no
  gradients); ``fwd+bwd`` = the whole training step as :meth:`SBMAttention.attend` runs it
  (memberships, sampling, attention, backward into q, k, v and the SBM parameters); ``bwd`` = its
  backward part (timed by events inside the step).
* ``sampling``: ``sample_graph(Y, Z, B)`` alone, given the memberships.
* ``sdpa-flash``: ``scaled_dot_product_attention`` under ``sdpa_kernel(FLASH_ATTENTION)`` (full
  softmax attention, CUDA only); ``sdpa``: the same with torch's own backend choice.
* ``flex``: ``torch.compile(flex_attention)`` with a :class:`BlockMask` built from the edges of
  the same sampled graph at FlexAttention's block granularity (:func:`graph_block_mask`): every
  128 x 128 block holding at least one edge is computed whole. Its ``fwd+bwd`` includes sampling
  the graph and building the mask.

The report (``--out``, e.g. docs/benchmarks-gpu.md) is rewritten after every case, so a run cut
short still leaves its measured cases; ``benchmarks/gpu_check.sh`` runs it within a time budget.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from sbm_transformer import functional
from sbm_transformer.bench import Case, Settings, Workload, _fmt_mem, _fmt_time, build_cases
from sbm_transformer.graph import Graph
from sbm_transformer.sampling import DISTRIBUTIONS, sample_graph

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

#: Every arm; ``DEFAULT_ARMS`` run unless ``--arms`` says otherwise.
ARMS = ("sbm-triton", "sbm-torch", "sampling", "sdpa-flash", "sdpa", "flex")
DEFAULT_ARMS = ("sbm-triton", "sbm-torch", "sampling", "sdpa-flash", "flex")
#: The SBM backend of each SBM arm.
SBM_BACKENDS = {"sbm-triton": "sparse-triton", "sbm-torch": "sparse-torch"}
#: FlexAttention's block (queries x keys) of the block mask built from a graph.
FLEX_BLOCK = 128

#: Nominal memory bandwidth (bytes/s) by device name: the first row whose words all occur in the
#: lower-cased name wins (more specific rows first). SBMT_GPU_BANDWIDTH_TBPS overrides.
NOMINAL_BANDWIDTH: list[tuple[tuple[str, ...], float, str]] = [
    (("gh200",), 4.0e12, "GH200 (96 GB HBM3)"),
    (("h200",), 4.8e12, "H200"),
    (("h100", "pcie"), 2.0e12, "H100 PCIe"),
    (("h100", "nvl"), 3.9e12, "H100 NVL"),
    (("h100",), 3.35e12, "H100 SXM"),
    (("h800", "pcie"), 2.0e12, "H800 PCIe"),
    (("h800",), 3.35e12, "H800 SXM"),
    (("b200",), 8.0e12, "B200"),
    (("a100", "pcie", "80"), 1.935e12, "A100 80GB PCIe"),
    (("a100", "80"), 2.039e12, "A100 80GB SXM"),
    (("a100",), 1.555e12, "A100 40GB"),
    (("l40s",), 0.864e12, "L40S"),
    (("l40",), 0.864e12, "L40"),
    (("a10g",), 0.6e12, "A10G"),
    (("4090",), 1.008e12, "RTX 4090"),
    (("v100",), 0.9e12, "V100"),
]
BANDWIDTH_ENV = "SBMT_GPU_BANDWIDTH_TBPS"

#: Planning defaults before an arm has a measured case: peak bytes of one training step per
#: expected edge (SBM arms, sampling, flex) or per query row (SDPA), and a fixed part per
#: (head, query) row for the memberships (K floats each, a few copies).
BYTES_PER_UNIT = {
    "sbm-torch": 220.0,  # ~140-165 B/edge measured on the CPU (float32 work tensors) + cuSPARSE
    "sbm-triton": 80.0,
    "sampling": 48.0,
    "flex": 48.0,
    "sdpa-flash": 1024.0,
    "sdpa": 1024.0,
}
#: Memory of the graph held for the ``fwd`` timings, per edge (indices, row pointers).
GRAPH_BYTES_PER_EDGE = 8.0


@dataclass
class GpuOptions:
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    min_rounds: int = 3  # timed rounds per arm at least...
    min_time: float = 0.5  # ...and more until they took this long (s)...
    max_rounds: int = 20  # ...at most this many
    arm_cap: float = 12.0  # seconds per arm and case: estimated over it, skipped; rounds stop
    deadline: float | None = None  # seconds from the start for the whole benchmark
    memory_limit: float | None = None  # bytes an arm may plan to use (None: no memory skips)
    memory: bool = True  # measure each arm's peak memory (one more step)
    bandwidth: float | None = None  # nominal bytes/s of the device
    bandwidth_source: str = "unknown"
    flex_compile: bool = True


@dataclass
class GpuRow:
    """One arm on one case. Times in seconds (medians over timed rounds)."""

    case: Case
    arm: str
    edges: int = 0  # edges of the sampled graph (expected edges when not run)
    fwd: float | None = None
    bwd: float | None = None
    step: float | None = None  # fwd+bwd (incl. sampling for the SBM arms and flex)
    warmup: float | None = None  # the first call (compilation, autotuning) in seconds
    rounds: int = 0
    peak_bytes: float | None = None
    kv_bytes: float | None = None  # K/V bytes one forward gathers (see the report's columns)
    err: float | None = None  # relative error of the forward against a reference (see note)
    blocks: float | None = None  # flex: fraction of the 128 x 128 blocks computed
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.fwd is not None or self.step is not None


# --------------------------------------------------------------------------- device facts
def nominal_bandwidth(name: str, env: dict[str, str] | None = None) -> tuple[float | None, str]:
    """(bytes/s, where it came from) of the device called ``name``."""
    env = dict(os.environ) if env is None else env
    override = env.get(BANDWIDTH_ENV, "").strip()
    if override:
        return float(override) * 1e12, f"{BANDWIDTH_ENV}={override}"
    lower = name.lower()
    for words, value, label in NOMINAL_BANDWIDTH:
        if all(w in lower for w in words):
            return value, f"nominal, {label}"
    return None, f"unknown device {name!r}: set {BANDWIDTH_ENV}"


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Bytes/s of a device-to-device copy, counting bytes read and written (CUDA only)."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        b.copy_(a)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 5
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def sbm_backend_available(backend: str) -> bool:
    return backend in functional.BACKENDS


def static_skip(arm: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``arm`` cannot run here at all (None: it can)."""
    if arm in SBM_BACKENDS:
        backend = SBM_BACKENDS[arm]
        if not sbm_backend_available(backend):
            return f"backend {backend!r} not in this version (functional.BACKENDS)"
        if arm == "sbm-triton" and device.type != "cuda":
            return "Triton kernels need CUDA (the CPU runs them only interpreted, in the tests)"
    if arm == "sdpa-flash":
        if device.type != "cuda":
            return "flash kernels need CUDA"
        if dtype not in (torch.float16, torch.bfloat16):
            return "flash kernels need float16 or bfloat16"
    if arm == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no flex_attention"
    return None


# ------------------------------------------------------------------------- the block mask
def block_occupancy(graph: Graph, block: int = FLEX_BLOCK, chunk: int = 1 << 24) -> Tensor:
    """``(B, H, ceil(N / block), ceil(M / block))`` bool: True where the block of queries
    ``[qb * block, (qb + 1) * block)`` and keys ``[kb * block, ...)`` holds at least one edge of
    ``graph``. Works through the edges ``chunk`` at a time (O(chunk) extra memory)."""
    b, h, n, m = graph.shape
    qb, kb = -(-n // block), -(-m // block)
    device = graph.crow_indices.device
    occupied = torch.zeros(b * h * qb * kb, dtype=torch.bool, device=device)
    crow, col = graph.crow_indices, graph.col_indices
    edges = graph.num_edges
    for start in range(0, edges, chunk):
        stop = min(start + chunk, edges)
        pos = torch.arange(start, stop, dtype=crow.dtype, device=device)
        row = torch.searchsorted(crow, pos, right=True).long() - 1  # stacked row (b*H + h)*N + i
        pair, i = row // n, row % n
        flat = (pair * qb + i // block) * kb + col[start:stop].long() // block
        occupied[flat] = True
    return occupied.view(b, h, qb, kb)


def graph_block_mask(
    graph: Graph, block: int = FLEX_BLOCK, *, exact_mask_mod: bool = False
) -> BlockMask:
    """FlexAttention ``BlockMask`` of the blocks of ``graph`` that hold an edge.

    Every such block is a *full* block: compiled FlexAttention computes all ``block x block``
    scores of it (no per-element mask), a superset of the graph's edges, and skips the others.
    Uncompiled (eager) FlexAttention ignores the block lists and applies ``mask_mod`` to every
    pair: ``exact_mask_mod`` then gives it a mask_mod that looks the block up, so both compute
    the same function.
    """
    from torch.nn.attention.flex_attention import BlockMask

    _, _, n, m = graph.shape
    occupied = block_occupancy(graph, block)
    counts = occupied.sum(-1, dtype=torch.int32)
    # the occupied blocks of each block row first, in ascending key order
    order = torch.argsort(occupied.to(torch.int8), dim=-1, descending=True, stable=True)
    order = order.to(torch.int32)
    kwargs: dict[str, Any] = {
        "full_kv_num_blocks": counts, "full_kv_indices": order, "BLOCK_SIZE": block,
    }  # fmt: skip
    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    if "seq_lengths" in params:
        kwargs["seq_lengths"] = (n, m)
    if exact_mask_mod:

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return occupied[b, h, q_idx // block, kv_idx // block]

        kwargs["mask_mod"] = mask_mod
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), order.clone(), **kwargs)


def expand_occupancy(occupied: Tensor, block: int, n: int, m: int) -> Tensor:
    """The ``(B, H, N, M)`` bool mask of whole occupied blocks (for checks at small N)."""
    return occupied.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :m]


# ------------------------------------------------------------------------------- timing
class Clock:
    """CUDA events on a GPU (the stream's own timeline), the host clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        if self.cuda:
            b.synchronize()
            return float(a.elapsed_time(b)) / 1000
        return float(b - a)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Arm:
    """One method on one case: ``fwd()`` and ``step()`` return clock marks around the forward
    (and the backward); ``fwd_output()`` the forward's output for checks."""

    has_step = True

    def fwd(self, clock: Clock) -> tuple[Any, Any]:
        raise NotImplementedError

    def step(self, clock: Clock) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    def fwd_output(self) -> Tensor | None:
        return None


class SbmArm(Arm):
    def __init__(self, work: Workload, backend: str, graph: Graph, sbm: tuple[Tensor, ...]) -> None:
        self.work, self.backend, self.graph, self.sbm = work, backend, graph, sbm

    def _forward(self) -> Tensor:
        w = self.work
        Y, Z, B = self.sbm
        with torch.no_grad():
            out, _ = functional.attend(
                w.q, w.k, w.v, Y, Z, B, graph=self.graph, exploration=w.attn.exploration,
                backend=self.backend,
            )  # fmt: skip
        return out

    def fwd(self, clock: Clock) -> tuple[Any, Any]:
        t0 = clock.mark()
        self._forward()
        return t0, clock.mark()

    def fwd_output(self) -> Tensor:
        return self._forward()

    def step(self, clock: Clock) -> tuple[Any, Any, Any]:
        w = self.work
        w._zero_grads()
        w.attn.backend = self.backend
        t0 = clock.mark()
        out, stats = w.attn.attend(w.q, w.k, w.v, generator=w.generator)
        loss = (out * w.grad).sum() + 1e-4 * stats.density.mean()
        t1 = clock.mark()
        loss.backward()
        return t0, t1, clock.mark()


class SamplingArm(Arm):
    has_step = False

    def __init__(self, work: Workload, sbm: tuple[Tensor, ...]) -> None:
        self.work, self.sbm = work, sbm

    def fwd(self, clock: Clock) -> tuple[Any, Any]:
        t0 = clock.mark()
        sample_graph(
            *self.sbm, generator=self.work.generator, distribution=self.work.s.distribution
        )
        return t0, clock.mark()


class SdpaArm(Arm):
    def __init__(self, work: Workload, flash: bool) -> None:
        self.work, self.flash = work, flash

    def _context(self) -> contextlib.AbstractContextManager[Any]:
        if not self.flash:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def _forward(self) -> Tensor:
        w = self.work
        with torch.no_grad(), self._context():
            return F.scaled_dot_product_attention(w.q, w.k, w.v)

    def fwd(self, clock: Clock) -> tuple[Any, Any]:
        t0 = clock.mark()
        self._forward()
        return t0, clock.mark()

    def fwd_output(self) -> Tensor:
        return self._forward()

    def step(self, clock: Clock) -> tuple[Any, Any, Any]:
        w = self.work
        w._zero_grads()
        t0 = clock.mark()
        with self._context():
            out = F.scaled_dot_product_attention(w.q, w.k, w.v)
        loss = (out * w.grad).sum()
        t1 = clock.mark()
        loss.backward()
        return t0, t1, clock.mark()


class FlexArm(Arm):
    """FlexAttention with the block mask of the sampled graph; compiled on a GPU. On a CPU it
    runs uncompiled (the reference implementation, forward only: torch has no CPU backward)."""

    def __init__(self, work: Workload, graph: Graph, compiled: bool) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self.work, self.compiled = work, compiled
        if compiled:
            _allow_recompiles()
        flex: Callable[..., Any] = flex_attention
        self.flex = cast(Callable[..., Any], torch.compile(flex)) if compiled else flex
        self.exact = not compiled
        self.mask = graph_block_mask(graph, exact_mask_mod=self.exact)
        self.has_step = work.q.device.type == "cuda"

    def _forward(self) -> Tensor:
        """The forward as the training step runs it (autograd on: the compiled graph of the
        step, no second compilation), without its backward. On the CPU, without autograd."""
        w = self.work
        q, k, v = (w.q, w.k, w.v) if self.has_step else (w.q.detach(), w.k.detach(), w.v.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.flex(q, k, v, block_mask=self.mask).detach()

    def fwd(self, clock: Clock) -> tuple[Any, Any]:
        t0 = clock.mark()
        self._forward()
        return t0, clock.mark()

    def fwd_output(self) -> Tensor:
        return self._forward()

    def step(self, clock: Clock) -> tuple[Any, Any, Any]:
        w = self.work
        w._zero_grads()
        t0 = clock.mark()
        with torch.no_grad():
            Y, Z, B = w.memberships()
            graph = sample_graph(Y, Z, B, generator=w.generator, distribution=w.s.distribution)
            mask = graph_block_mask(graph, exact_mask_mod=self.exact)
        out = self.flex(w.q, w.k, w.v, block_mask=mask)
        loss = (out * w.grad).sum()
        t1 = clock.mark()
        loss.backward()
        return t0, t1, clock.mark()


def _allow_recompiles(limit: int = 64) -> None:
    """One compiled FlexAttention serves every size: let dynamo keep more than its default 8
    compiled versions (past the limit it would fall back to eager flex, which materialises
    N x N scores)."""
    from torch._dynamo import config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), limit))


# ----------------------------------------------------------------------------- planning
def expected_edges(case: Case, s: Settings) -> float:
    return case.target_density * case.n * case.n * s.heads


def units(arm: str, case: Case, s: Settings, edges: float) -> float:
    """What an arm's time scales with: edges (SBM arms, sampling), all pairs (SDPA, flex)."""
    if arm in ("sdpa", "sdpa-flash", "flex"):
        return float(case.n) * case.n * s.heads
    return edges


def membership_memory(arm: str, case: Case, s: Settings) -> float:
    """The part of an SBM step's peak that grows with N, not with the edges: Y, Z, the node
    features and their gradients, float32 (none for SDPA)."""
    return 0.0 if arm.startswith("sdpa") else 8.0 * case.n * s.heads * s.clusters * 4


def planned_memory(arm: str, case: Case, s: Settings, edges: float, per_unit: float) -> float:
    """Bytes an arm is expected to need: its step's peak plus the inputs and the held graph."""
    rows = case.n * s.heads
    inputs = 6 * rows * s.head_dim * 4  # q, k, v, g, grads (at most 4 bytes each)
    if arm in ("sdpa", "sdpa-flash"):
        return inputs + per_unit * rows
    memberships = membership_memory(arm, case, s)
    held = GRAPH_BYTES_PER_EDGE * edges
    if arm == "flex":
        held += rows / FLEX_BLOCK * (case.n / FLEX_BLOCK) * 8  # block lists
    return inputs + memberships + held + per_unit * edges


@dataclass
class Planner:
    """Measured rates per arm, for skipping cases that would not fit (time or memory)."""

    opts: GpuOptions
    start: float = field(default_factory=time.perf_counter)
    seconds_per_unit: dict[str, float] = field(default_factory=dict)
    bytes_per_unit: dict[str, float] = field(default_factory=dict)
    units_measured: dict[str, float] = field(default_factory=dict)  # the units of that figure
    failed: dict[str, str] = field(default_factory=dict)  # arm -> its first error (not OOM)
    warmup: dict[str, float] = field(default_factory=dict)  # arm -> its longest warm-up (s)
    sizes: dict[str, set[int]] = field(default_factory=dict)  # arm -> the N it has run at

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        if self.opts.deadline is None:
            return math.inf
        return self.opts.deadline - self.elapsed()

    def fail(self, arm: str, note: str) -> None:
        """An arm that failed other than by running out of memory is not tried again."""
        if note != "out of memory":
            self.failed.setdefault(arm, note)

    def skip(self, arm: str, case: Case, s: Settings, edges: float) -> str | None:
        if arm in self.failed:
            return "not tried: " + self.failed[arm].removeprefix("failed: ") + " (earlier case)"
        u = units(arm, case, s, edges)
        if self.opts.memory_limit is not None:
            per_unit = self.bytes_per_unit.get(arm, BYTES_PER_UNIT[arm])
            need = planned_memory(arm, case, s, edges, per_unit)
            if need > self.opts.memory_limit:
                return (
                    f"est. memory {_fmt_mem(need)} > {_fmt_mem(self.opts.memory_limit)} "
                    f"({'measured' if arm in self.bytes_per_unit else 'planned'} "
                    f"{per_unit:.0f} B per {'row' if arm.startswith('sdpa') else 'edge'})"
                )
        rate = self.seconds_per_unit.get(arm)
        if rate is not None:
            step = rate * u
            # a warm-up and the timed rounds (a forward and a step each), the memory probe
            cost = step * (1.5 * (1 + self.opts.min_rounds) + (1 if self.opts.memory else 0))
            if cost > self.opts.arm_cap:
                return (
                    f"est. {_fmt_time(step)} per step, {_fmt_time(cost)} in all > the arm cap "
                    f"{self.opts.arm_cap:g} s"
                )
            if case.n not in self.sizes.get(arm, {case.n}):  # compiles anew for a new shape
                cost += self.warmup.get(arm, 0.0)
            if cost > self.left():
                return f"est. {_fmt_time(cost)} > the {self.left():.0f} s left of the budget"
        if self.left() <= 0:
            return "time budget spent"
        return None

    def learn(self, row: GpuRow, s: Settings) -> None:
        if row.warmup is not None:
            self.warmup[row.arm] = max(row.warmup, self.warmup.get(row.arm, 0.0))
            self.sizes.setdefault(row.arm, set()).add(row.case.n)
        t = row.step if row.step is not None else row.fwd
        u = units(row.arm, row.case, s, row.edges or expected_edges(row.case, s))
        if t is not None and u > 0:
            self.seconds_per_unit[row.arm] = t / u
        # memory per unit from the largest case so far (small ones are mostly fixed costs)
        if row.peak_bytes is not None and row.edges:
            sdpa = row.arm.startswith("sdpa")
            n_units = float(row.case.n * s.heads if sdpa else row.edges)
            if n_units >= self.units_measured.get(row.arm, 0.0):
                fixed = membership_memory(row.arm, row.case, s)
                per = max(row.peak_bytes - fixed, 0.0) / n_units
                self.bytes_per_unit[row.arm] = max(per * 1.15, 8.0)
                self.units_measured[row.arm] = n_units


# -------------------------------------------------------------------------------- running
def kv_bytes(edges: float, s: Settings, element: int) -> float:
    """Bytes of the keys and values one forward gathers: one key row and one value row per edge
    (D + Dv elements of the input dtype)."""
    return edges * 2 * s.head_dim * element


def _rel_err(out: Tensor, ref: Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        "out of memory" in str(exc).lower()
    )


def _describe(exc: BaseException) -> str:
    if _is_oom(exc):
        return "out of memory"
    text = " ".join(str(exc).split())
    return f"failed: {type(exc).__name__}: {text[:160]}".replace("|", "/")


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _make_arm(
    arm: str,
    work: Workload,
    graph: Graph | None,
    sbm: tuple[Tensor, ...] | None,
    compile_flex: bool,
) -> Arm:
    if arm in SBM_BACKENDS:
        assert graph is not None and sbm is not None
        return SbmArm(work, SBM_BACKENDS[arm], graph, sbm)
    if arm == "sampling":
        assert sbm is not None
        return SamplingArm(work, sbm)
    if arm in ("sdpa", "sdpa-flash"):
        return SdpaArm(work, flash=arm == "sdpa-flash")
    assert arm == "flex" and graph is not None
    return FlexArm(work, graph, compiled=compile_flex and work.q.device.type == "cuda")


def run_case(
    case: Case, s: Settings, opts: GpuOptions, planner: Planner, log: Callable[[str], None]
) -> list[GpuRow]:
    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    edges_expected = expected_edges(case, s)
    rows = {arm: GpuRow(case, arm, edges=round(edges_expected)) for arm in opts.arms}
    active: list[str] = []
    for arm in opts.arms:
        reason = static_skip(arm, device, dtype) or planner.skip(arm, case, s, edges_expected)
        if reason:
            rows[arm].note = reason
        else:
            active.append(arm)
    if not active:
        return list(rows.values())
    clock = Clock(device)
    work = Workload(case, s)
    graph: Graph | None = None
    sbm: tuple[Tensor, ...] | None = None
    if any(a != "sdpa" and a != "sdpa-flash" for a in active):
        try:
            with torch.no_grad():
                sbm = work.memberships()
            graph = sample_graph(*sbm, generator=work.generator, distribution=s.distribution)
        except Exception as exc:  # the arms that need the graph cannot run without it
            for arm in [a for a in active if not a.startswith("sdpa")]:
                rows[arm].note = "sampling the graph: " + _describe(exc)
                active.remove(arm)
            graph, sbm = None, None
            _free(device)
    if graph is not None:
        for arm in active:
            if arm in SBM_BACKENDS or arm in ("sampling", "flex"):
                rows[arm].edges = graph.num_edges
            if arm in SBM_BACKENDS:
                rows[arm].kv_bytes = kv_bytes(graph.num_edges, s, element)
    arms: dict[str, Arm] = {}
    outputs: dict[str, Tensor] = {}
    for arm in list(active):  # warm-up: compilation, autotuning, caches
        try:
            t0 = time.perf_counter()
            a = _make_arm(arm, work, graph, sbm, opts.flex_compile)
            out = a.fwd_output()
            if out is None:
                a.fwd(clock)
            if a.has_step:
                a.step(clock)
            clock.sync()
        except Exception as exc:
            rows[arm].note = _describe(exc)
            planner.fail(arm, rows[arm].note)
            active.remove(arm)
            _free(device)
            log(f"  {arm}: {rows[arm].note}")
            continue
        rows[arm].warmup = time.perf_counter() - t0
        arms[arm] = a
        if out is not None and (arm in SBM_BACKENDS or case.n <= 4096):
            outputs[arm] = out
        if isinstance(a, FlexArm) and graph is not None:
            occupied = block_occupancy(graph)
            rows[arm].blocks = float(occupied.float().mean())
            rows[arm].kv_bytes = float(occupied.sum()) * FLEX_BLOCK * 2 * s.head_dim * element
            if not a.has_step:
                rows[arm].note = "forward only: torch has no FlexAttention backward on the CPU"
            elif not a.compiled:
                rows[arm].note = "uncompiled"
    # checks: the Triton forward against torch.sparse's on the same graph; flex against SDPA
    # with the dense mask of its blocks (small N only)
    if "sbm-triton" in outputs and "sbm-torch" in outputs:
        rows["sbm-triton"].err = _rel_err(outputs["sbm-triton"], outputs["sbm-torch"])
    if "flex" in outputs and graph is not None and case.n <= 4096:
        dense = expand_occupancy(block_occupancy(graph), FLEX_BLOCK, case.n, case.n)
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(
                work.q.float(), work.k.float(), work.v.float(), attn_mask=dense
            )
        rows["flex"].err = _rel_err(outputs["flex"], ref)
        del dense, ref
    outputs.clear()

    samples: dict[str, dict[str, list[float]]] = {
        a: {"fwd": [], "bwd": [], "step": []} for a in arms
    }
    spent = dict.fromkeys(arms, 0.0)
    running = list(arms)
    while running:
        for arm in list(running):
            r, a = rows[arm], arms[arm]
            t_wall = time.perf_counter()
            try:
                f0, f1 = a.fwd(clock)
                samples[arm]["fwd"].append(clock.seconds(f0, f1))
                if a.has_step:
                    s0, s1, s2 = a.step(clock)
                    samples[arm]["step"].append(clock.seconds(s0, s2))
                    samples[arm]["bwd"].append(clock.seconds(s1, s2))
                clock.sync()
            except Exception as exc:
                r.note = _describe(exc)
                planner.fail(arm, r.note)
                running.remove(arm)
                _free(device)
                continue
            r.rounds += 1
            spent[arm] += time.perf_counter() - t_wall
            done = r.rounds >= opts.max_rounds or (
                r.rounds >= opts.min_rounds and spent[arm] >= opts.min_time
            )
            if not done and spent[arm] >= opts.arm_cap:
                done = True
                r.note = (r.note + "; " if r.note else "") + f"{r.rounds} rounds (time cap)"
            if not done and planner.left() <= 0:
                done = True
                r.note = (r.note + "; " if r.note else "") + f"{r.rounds} rounds (budget spent)"
            if done:
                running.remove(arm)
    for arm in arms:
        r, smp = rows[arm], samples[arm]
        r.fwd = statistics.median(smp["fwd"]) if smp["fwd"] else None
        r.bwd = statistics.median(smp["bwd"]) if smp["bwd"] else None
        r.step = statistics.median(smp["step"]) if smp["step"] else None
    if opts.memory:
        for arm, a in arms.items():
            if not rows[arm].measured:
                continue
            try:
                rows[arm].peak_bytes = float(_peak(a, work, clock, device))
            except Exception as exc:
                rows[arm].note = (rows[arm].note + "; " if rows[arm].note else "") + (
                    "memory probe " + _describe(exc)
                )
                _free(device)
    for arm in arms:
        planner.learn(rows[arm], s)
    del arms, work, graph, sbm
    _free(device)
    return list(rows.values())


def _peak(arm: Arm, work: Workload, clock: Clock, device: torch.device) -> int:
    """Peak memory of one step (the forward where the arm has no step) above what was allocated
    before it: the allocator's peak on a GPU, the resident set's growth on a CPU."""
    from sbm_transformer._memory import PeakMemory

    work._zero_grads()
    _free(device)
    memory = PeakMemory(device)
    if arm.has_step:
        arm.step(clock)
    else:
        arm.fwd(clock)
    clock.sync()
    return memory.peak()


# ------------------------------------------------------------------------------ reporting
TARGETS = (
    "forward >= 50 % of the memory bandwidth in gathered K/V bytes at N >= 16k",
    "backward <= 3x forward",
    "fwd+bwd incl. sampling <= 0.5x SDPA (flash) at N = 16k, 1 % density",
    "N = 128k at 32 edges/query: one layer's training step < 10 GiB",
    ">= 10x the torch.sparse path (fwd+bwd) at N = 16k, 1 % density",
)


def targets(
    rows: list[GpuRow], bandwidth: float | None, arm: str = "sbm-triton"
) -> list[tuple[str, str, str]]:
    """(target, measured, PASS / FAIL / not measured) for ``arm``, the issue's targets."""
    by = {(r.case.n, r.case.label, r.arm): r for r in rows}
    mine = [r for r in rows if r.arm == arm and r.measured]
    why_not = next((r.note for r in rows if r.arm == arm and r.note and not r.measured), "")
    missing = "not measured" + (f" ({why_not})" if why_not else "")
    out: list[tuple[str, str, str]] = []

    big = [r for r in mine if r.case.n >= 16384 and r.fwd and r.kv_bytes]
    if bandwidth is None:
        out.append((TARGETS[0], "no nominal bandwidth for this device", "not measured"))
    elif big:
        worst = min(big, key=lambda r: r.kv_bytes / r.fwd / bandwidth)  # type: ignore[operator]
        frac = worst.kv_bytes / worst.fwd / bandwidth  # type: ignore[operator]
        out.append(
            (
                TARGETS[0],
                f"worst {frac:.0%} (N = {worst.case.n:,}, {worst.case.label})",
                "PASS" if frac >= 0.5 else "FAIL",
            )
        )
    else:
        out.append((TARGETS[0], "-", missing))

    both = [r for r in mine if r.fwd and r.bwd]
    if both:
        worst = max(both, key=lambda r: r.bwd / r.fwd)  # type: ignore[operator]
        ratio = worst.bwd / worst.fwd  # type: ignore[operator]
        out.append(
            (
                TARGETS[1],
                f"worst {ratio:.2f}x (N = {worst.case.n:,}, {worst.case.label})",
                "PASS" if ratio <= 3 else "FAIL",
            )
        )
    else:
        out.append((TARGETS[1], "-", missing))

    a, b = by.get((16384, "1% density", arm)), by.get((16384, "1% density", "sdpa-flash"))
    if a and b and a.step and b.step:
        ratio = a.step / b.step
        out.append((TARGETS[2], f"{ratio:.2f}x", "PASS" if ratio <= 0.5 else "FAIL"))
    else:
        out.append((TARGETS[2], "-", missing))

    a = by.get((131072, "32 edges/query", arm))
    if a and a.peak_bytes is not None:
        ok = a.peak_bytes < 10 * 2**30
        out.append((TARGETS[3], _fmt_mem(a.peak_bytes), "PASS" if ok else "FAIL"))
    else:
        out.append((TARGETS[3], "-", missing))

    a, b = by.get((16384, "1% density", arm)), by.get((16384, "1% density", "sbm-torch"))
    if a and b and a.step and b.step:
        ratio = b.step / a.step
        out.append((TARGETS[4], f"{ratio:.1f}x", "PASS" if ratio >= 10 else "FAIL"))
    else:
        out.append((TARGETS[4], "-", missing))
    return out


def _rate(x: float | None, t: float | None, unit: str = "") -> str:
    """``x / t`` with a decimal prefix (``"-"`` when either is missing)."""
    if not x or not t:
        return "-"
    v = x / t
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}".strip()


def _fmt_secs(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.2f} ms" if t < 0.1 else _fmt_time(t)


HOW_TO_RUN = """\
## How to run

On a machine with one CUDA GPU (H100/H200 class), from the repository's root:

```
make gpu-check                      # or: bash benchmarks/gpu_check.sh
bash benchmarks/gpu_check.sh --quick    # a 1-minute smoke run (N = 4k and 16k, fewer arms)
bash benchmarks/gpu_check.sh --dry-run  # plan only, on any machine
```

The script (under 8 minutes in all) sets up Python (the current `python3` if its torch sees
CUDA, else a venv with PyPI's CUDA build of torch and `-e ".[numba,triton,dev]"`), runs the CUDA
tests (`tests/test_cuda.py`, `tests/test_triton.py`, `-k "cuda or gpu"`, under a time limit),
then this benchmark with the time left (`--deadline`), and rewrites this page after every case.
Every phase prints its duration. Direct use:
`sbmt bench attention --device cuda --out docs/benchmarks-gpu.md` (`--help` for the options:
`--arms`, `--sizes`, `--arm-cap`, `--deadline`, `--memory-fraction`, `--bandwidth-tbps`).
"""

COLUMNS = """\
## Columns

- `arm`: `sbm-triton` / `sbm-torch` = SBM attention with backend `"sparse-triton"` /
  `"sparse-torch"` (torch.sparse); `sampling` = `sample_graph(Y, Z, B)` alone; `sdpa-flash` =
  `scaled_dot_product_attention` under `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` (full
  attention); `flex` = `torch.compile(flex_attention)` with the block mask of the same sampled
  graph (below).
- `edges`: edges of the graph sampled for the case (all heads); for SDPA, all N x N x H pairs.
- `fwd`: the attention forward alone: for the SBM arms on a graph sampled beforehand (the
  kernels, with the dtype conversions around them; no gradients), for flex on a block mask built
  beforehand (autograd on, as in the step: the same compiled graph, no backward); for
  `sampling`, the sampler's time.
- `bwd`: the backward part of the training step (timed by CUDA events inside it).
- `fwd+bwd`: one training step of the layer's attention core: for the SBM arms everything
  (memberships, sampling, attention, backward into q, k, v and the SBM parameters, loss
  `sum(out * g) + 1e-4 * density`); for flex, sampling the graph, building the block mask,
  forward and backward; for SDPA forward and backward.
- `edges/s`: edges / `fwd` (SDPA: pairs / `fwd`).
- `K/V bytes/s`: the key and value bytes one forward must gather over its time `fwd`: one key
  row and one value row per edge, `edges x 2 x head size x bytes per element` of the input dtype
  (bf16: 2); for flex one key/value block per computed block
  (`blocks x 128 x 2 x head size x bytes`). `of peak` = that over the card's memory bandwidth
  (nominal, from the device's name; `SBMT_GPU_BANDWIDTH_TBPS` overrides).
- `peak mem`: the CUDA allocator's peak during one `fwd+bwd` step above what was allocated
  before it (inputs, parameters, the graph held for `fwd`).
- `rounds`: timed rounds (medians over them; the arms run interleaved round by round); each arm
  stops after `--rounds` rounds once they took `--min-time`, at `--max-rounds`, or at its
  time cap (`--arm-cap`). `warm-up`: the first call (compilation, autotuning).
- `err`: relative error `|out - ref| / |ref|` of the forward: `sbm-triton` against `sbm-torch`
  on the same graph; `flex` (N <= 4k) against SDPA with the dense mask of its blocks.
- `note`: why an arm did not run (unknown backend, CUDA-only feature, estimated memory over the
  limit, estimated time over the cap or the budget, out of memory), or how it was cut short.
"""

FLEX_TEXT = """\
## FlexAttention's block mask

`graph_block_mask` (`sbm_transformer.bench_gpu`) marks each 128 x 128 block (queries x keys) of
each head that holds at least one edge of the sampled graph (from the CSR rows: a
`searchsorted` of each edge's position in the row pointers, chunk by chunk) and passes them to
`BlockMask.from_kv_blocks` as *full* blocks. Compiled FlexAttention then computes every score of
those blocks, a superset of the graph's edges, and skips the empty ones: it computes whole
128 x 128 blocks, not the edges. At these densities almost every block holds an edge (N = 16k at
1 %: about 164 edges per block; 128k at 32 edges/query: about 4), so flex does the work of full
attention; column `blocks` gives the fraction computed.
"""


def markdown(
    rows: list[GpuRow],
    s: Settings,
    opts: GpuOptions,
    command: str,
    *,
    device_name: str,
    copy_bw: float | None,
    notes: Sequence[str] = (),
    status: str = "",
    planned: bool = False,
) -> str:
    """The report (``planned``: the page before any GPU ran it: structure, no figures)."""
    bw = opts.bandwidth
    lines = ["# GPU attention benchmark", ""]
    if planned:
        lines += [
            "**Not measured yet.** No GPU has run this benchmark: every figure on this page is "
            "still to be measured. The table below is the plan (the cases and arms, and the "
            "skips planned for an 80 GiB card); `make gpu-check` on a GPU machine overwrites "
            "this page with measurements.",
            "",
        ]
    else:
        lines += [
            "Produced by:",
            "",
            "```",
            command,
            "```",
            "",
            f"Device: {device_name}; memory bandwidth {_bw(bw)} ({opts.bandwidth_source})"
            + (f", device-to-device copy measured {_bw(copy_bw)} (read + write)" if copy_bw else "")
            + f". torch {torch.__version__}, {_versions()}, {platform.machine()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
        ]
        if status:
            lines += [status, ""]
    lines += [
        f"One layer's attention core, batch 1, {s.heads} heads, head size {s.head_dim}, "
        f"{s.dtype}, K = {s.clusters} clusters, exploration 0, {s.distribution} edges. Times are "
        "medians over timed rounds after a warm-up"
        + ("; CUDA events time the GPU's stream." if s.device.startswith("cuda") else "."),
        "",
    ]
    for note in notes:
        lines.append(f"- {note}")
    if notes:
        lines.append("")
    lines += [HOW_TO_RUN, COLUMNS, FLEX_TEXT]
    lines += ["## Results", ""]
    lines += [
        "| N | sparsity | edges | arm | fwd | bwd | fwd+bwd | edges/s | K/V bytes/s | of peak "
        "| peak mem | blocks | rounds | warm-up | err | note |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        edges = r.edges
        if r.arm.startswith("sdpa"):
            edges = r.case.n * r.case.n * s.heads
        expected = "" if r.measured or r.arm.startswith("sdpa") else " (exp.)"
        kv = r.kv_bytes if r.measured else None
        frac = "-" if not (kv and r.fwd and bw) else f"{kv / r.fwd / bw:.0%}"
        note = r.note or ("" if r.measured else "not measured")
        lines.append(
            f"| {r.case.n:,} | {r.case.label} | {edges:,}{expected} | "
            f"{r.arm} | {_fmt_secs(r.fwd)} | {_fmt_secs(r.bwd)} | {_fmt_secs(r.step)} | "
            f"{_rate(edges, r.fwd) if r.measured else '-'} | {_rate(kv, r.fwd, 'B/s')} | {frac} | "
            f"{_fmt_mem(r.peak_bytes)} | "
            f"{'-' if r.blocks is None else f'{r.blocks:.1%}'} | {r.rounds or '-'} | "
            f"{_fmt_secs(r.warmup)} | {'-' if r.err is None else f'{r.err:.1e}'} | {note} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        f"For the SBM attention with the Triton kernels (`sbm-triton`), {s.dtype}, head size "
        f"{s.head_dim}; `sbm-torch` for reference. The issue's targets hold for bfloat16 and "
        "head size 64 (the defaults).",
        "",
        "| target | measured | verdict | sbm-torch (reference) |",
        "|---|---:|:---:|---:|",
    ]
    ref = {t: m for t, m, _ in targets(rows, bw, "sbm-torch")}
    for goal, measured, verdict in targets(rows, bw):
        if planned:
            measured, verdict = "-", "not measured"
        shown = "**FAIL**" if verdict == "FAIL" else verdict
        other = "-" if planned or goal in TARGETS[4:] else ref.get(goal, "-")
        lines.append(f"| {goal} | {measured} | {shown} | {other} |")
    return "\n".join(lines) + "\n"


def _bw(b: float | None) -> str:
    return "unknown" if not b else f"{b / 1e12:.2f} TB/s"


def _versions() -> str:
    parts = []
    for name in ("triton", "numba"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except ImportError:
            parts.append(f"no {name}")
    cuda = torch.version.cuda
    parts.append(f"CUDA {cuda}" if cuda else "no CUDA build")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------- main
def order_cases(cases: list[Case], s: Settings) -> list[Case]:
    """Fewer expected edges first (then smaller N): each arm's time and memory per unit, measured
    on the cheaper cases, predict the dearer ones, and a run cut short by its deadline loses the
    dearest (N = 16k at 1 % and 128k at 32 edges/query, the targets' cases, come early)."""
    return sorted(cases, key=lambda c: (expected_edges(c, s), c.n))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sbmt bench attention --device cuda", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--suite", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--edges-per-query", type=float, nargs="*", default=[32, 128])
    p.add_argument("--densities", type=float, nargs="*", default=[0.01, 0.05])
    p.add_argument(
        "--arms", nargs="+", default=None, choices=ARMS,
        help=f"default: {' '.join(DEFAULT_ARMS)} (--quick: without flex)",
    )  # fmt: skip
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--distribution", default="poisson", choices=DISTRIBUTIONS)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per arm at least")
    p.add_argument("--min-time", type=float, default=0.5, help="more rounds until this long (s)")
    p.add_argument("--max-rounds", type=int, default=20)
    p.add_argument(
        "--arm-cap", type=float, default=GpuOptions.arm_cap,
        help="seconds per arm and case: arms estimated over it are skipped, rounds stop at it",
    )  # fmt: skip
    p.add_argument(
        "--deadline", type=float, default=None,
        help="seconds for the whole benchmark; cases that would not fit are skipped",
    )  # fmt: skip
    p.add_argument(
        "--memory-fraction", type=float, default=0.85,
        help="arms estimated over this fraction of the device's memory are skipped",
    )  # fmt: skip
    p.add_argument(
        "--memory-limit-gib", type=float, default=None,
        help="plan against this much memory instead (dry runs: 80 GiB x fraction by default)",
    )  # fmt: skip
    p.add_argument("--bandwidth-tbps", type=float, default=None, help="the card's bandwidth")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory steps")
    p.add_argument("--no-flex-compile", action="store_true", help="run flex uncompiled")
    p.add_argument("--quick", action="store_true", help="N = 4k and 16k, 32 edges/query and 1 %%")
    p.add_argument("--dry-run", action="store_true", help="plan the cases, run nothing")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--note", action="append", default=[], help="a line for the report")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> list[GpuRow]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.arms is None:  # flex compiles for tens of seconds: not in a smoke run
        args.arms = [a for a in DEFAULT_ARMS if not (args.quick and a == "flex")]
    if args.quick:
        args.sizes = [n for n in args.sizes if n <= 16384][:2] or [4096]
        args.edges_per_query, args.densities = args.edges_per_query[:1], args.densities[:1]
        args.rounds, args.min_time = min(args.rounds, 2), 0.0
    device = torch.device(args.device)
    s = Settings(
        heads=args.heads, head_dim=args.head_dim, clusters=args.clusters, device=args.device,
        dtype=args.dtype, seed=args.seed, distribution=args.distribution,
    )  # fmt: skip
    opts = GpuOptions(
        arms=list(dict.fromkeys(args.arms)), min_rounds=args.rounds, min_time=args.min_time,
        max_rounds=max(args.max_rounds, args.rounds), arm_cap=args.arm_cap,
        deadline=args.deadline, memory=not args.no_memory,
        flex_compile=not args.no_flex_compile,
    )  # fmt: skip
    cuda = device.type == "cuda" and torch.cuda.is_available() and not args.dry_run
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        raise ValueError("no CUDA device: --dry-run plans the cases; --device cpu runs them here")
    device_name = torch.cuda.get_device_name(device) if cuda else platform.machine() + " CPU"
    if args.memory_limit_gib is not None:
        opts.memory_limit = args.memory_limit_gib * 2**30
    elif cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        opts.memory_limit = args.memory_fraction * total
    elif args.dry_run:
        opts.memory_limit = args.memory_fraction * 80 * 2**30
    if args.bandwidth_tbps:
        opts.bandwidth, opts.bandwidth_source = args.bandwidth_tbps * 1e12, "--bandwidth-tbps"
    elif cuda or args.dry_run:
        opts.bandwidth, opts.bandwidth_source = nominal_bandwidth(
            device_name if cuda else "H100 SXM (planned)"
        )
    else:
        opts.bandwidth_source = "a CPU run: no nominal bandwidth"
    cases = order_cases(build_cases(args.sizes, args.edges_per_query, args.densities), s)
    shown = [a for i, a in enumerate(argv) if a != "--note" and argv[i - 1 : i] != ["--note"]]
    command = "sbmt bench attention " + " ".join(shown)  # (the notes are listed in the report)
    notes = list(args.note)

    def write(rows: list[GpuRow], status: str, copy_bw: float | None = None) -> None:
        text = markdown(
            rows, s, opts, command, device_name=device_name, copy_bw=copy_bw, notes=notes,
            status=status, planned=args.dry_run,
        )  # fmt: skip
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))

    if args.dry_run:
        planner = Planner(opts)
        rows = []
        for case in cases:
            edges = expected_edges(case, s)
            for arm in opts.arms:  # planned as on a GPU
                reason = static_skip(arm, torch.device("cuda"), getattr(torch, s.dtype))
                reason = reason or planner.skip(arm, case, s, edges)
                rows.append(GpuRow(case, arm, edges=round(edges), note=reason or "planned"))
        for r in rows:
            log(f"plan: N={r.case.n:>7} {r.case.label:>16} {r.arm:>11}: {r.note}")
        write(rows, "")
        if args.out:
            log(f"report skeleton: {args.out}")
        return rows

    copy_bw = copy_bandwidth(device) if cuda else None
    log(
        f"device {device_name}: bandwidth {_bw(opts.bandwidth)} ({opts.bandwidth_source})"
        + (f", copy measured {_bw(copy_bw)}" if copy_bw else "")
    )
    planner = Planner(opts)
    rows = []
    for index, case in enumerate(cases):
        t0 = time.perf_counter()
        if planner.left() <= 0:
            case_rows = [
                GpuRow(case, arm, edges=round(expected_edges(case, s)), note="time budget spent")
                for arm in opts.arms
            ]
        else:
            case_rows = run_case(case, s, opts, planner, log)
        rows += case_rows
        for r in case_rows:
            if r.measured:
                log(
                    f"N={case.n:>7} {case.label:>16} {r.arm:>11}: fwd {_fmt_secs(r.fwd)}, "
                    f"bwd {_fmt_secs(r.bwd)}, fwd+bwd {_fmt_secs(r.step)}, "
                    f"mem {_fmt_mem(r.peak_bytes)}, E={r.edges:,} [{r.rounds} rounds]"
                    + (f" ({r.note})" if r.note else "")
                )
            else:
                log(f"N={case.n:>7} {case.label:>16} {r.arm:>11}: not run: {r.note}")
        log(f"  case {index + 1}/{len(cases)} took {time.perf_counter() - t0:.1f} s")
        status = (
            ""
            if index + 1 == len(cases)
            else f"**Partial**: {index + 1} of {len(cases)} cases so far (the run goes on or was "
            "stopped)."
        )
        write(rows, status, copy_bw)
    if args.out:
        log(f"report: {args.out}")
    for goal, measured, verdict in targets(rows, opts.bandwidth):
        log(f"target: {goal}: {measured} -> {verdict}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
