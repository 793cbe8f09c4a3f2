"""Attention benchmark: SBM sparse attention vs SDPA vs the dense SBM backend, side by side.

One forward + backward of one attention layer's core on given q, k, v ``(1, H, N, D)``:

* ``sparse``: SBM memberships (node MLP, sigmoid), block matrix, sampling the graph, sparse
  attention, and backward into q, k, v and every SBM parameter (straight-through estimator);
  the loss includes ``1e-4 * density.mean()`` as in training. ``sampling`` is the sampler alone
  (``sample_graph`` given the memberships).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (full softmax attention).
* ``dense``: the same SBM attention with ``backend="dense"`` (O(N^2) memory), what the original
  code ran.

Times are medians over rounds in which the methods run interleaved (machines here are noisy:
only ratios measured side by side count). Peak memory is measured in a fresh subprocess per
method and size: the growth of the peak resident set (Linux ``VmHWM``) during one call, or the
CUDA allocator's peak on a GPU.

Run ``sbmt bench attention`` (or ``python benchmarks/attention.py``); ``--quick`` for a smoke run.
``--device cuda`` (or ``--suite gpu``) runs the GPU benchmark instead
(:mod:`sbm_transformer.bench_gpu`: Triton and torch.sparse SBM kernels, flash SDPA,
FlexAttention; its own options and defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sbm_transformer._memory import PeakMemory
from sbm_transformer._numba import numba_enabled
from sbm_transformer.attention import SBMAttention
from sbm_transformer.sampling import DISTRIBUTIONS, sample_graph

if TYPE_CHECKING:
    from sbm_transformer.bench_gpu import GpuRow

METHODS = ("sparse", "sdpa", "dense")


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: sequence length and a target sparsity."""

    n: int
    edges_per_query: float | None = None  # fixed edges per query, or
    density: float | None = None  # fixed density

    @property
    def target_density(self) -> float:
        if self.density is not None:
            return self.density
        assert self.edges_per_query is not None
        return min(self.edges_per_query / self.n, 0.9)

    @property
    def label(self) -> str:
        if self.density is not None:
            return f"{self.density:.0%} density"
        return f"{self.edges_per_query:g} edges/query"


@dataclass
class Settings:
    heads: int = 2
    head_dim: int = 32
    clusters: int = 128
    rounds: int = 3  # at least this many interleaved rounds per case...
    min_time: float = 2.0  # ...and more, for fast cases, until the rounds took this long (s)...
    max_rounds: int = 25  # ...but no more than this
    scaling_rounds: int = 21  # rounds of the side-by-side 16k/64k check (its ratio is noisy)
    dense_max_n: int = 4096
    sdpa_max_n: int = 65536
    max_edges: int = 120_000_000
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    distribution: str = "poisson"


@dataclass
class Row:
    case: Case
    edges: int = 0
    density: float = 0.0
    times: dict[str, float] = field(default_factory=dict)  # method -> median seconds
    sampling_share: float | None = None  # median over rounds of sampling / sparse
    rounds: int = 0
    memory: dict[str, float] = field(default_factory=dict)  # method -> peak bytes
    skipped: dict[str, str] = field(default_factory=dict)  # method -> reason


# ------------------------------------------------------------------------------ workloads
class Workload:
    """Inputs and the three methods for one case."""

    def __init__(self, case: Case, s: Settings) -> None:
        self.case, self.s = case, s
        dev, dtype = torch.device(s.device), getattr(torch, s.dtype)
        g = torch.Generator(device="cpu").manual_seed(s.seed)
        shape = (1, s.heads, case.n, s.head_dim)
        self.q, self.k, self.v, self.grad = (
            torch.randn(shape, generator=g).to(dev, dtype) for _ in range(4)
        )
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)
        torch.manual_seed(s.seed)
        self.attn = SBMAttention(
            s.heads * s.head_dim, s.heads, s.clusters, exploration=0.0,
            init_density=case.target_density, distribution=s.distribution, device=dev,
            dtype=dtype,
        )  # fmt: skip
        self.generator = torch.Generator(device=dev).manual_seed(s.seed)
        self._sbm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _zero_grads(self) -> None:
        for t in (self.q, self.k, self.v, *self.attn.parameters()):
            t.grad = None

    def memberships(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        Y, Z = self.attn.memberships(self.q, self.k)
        return Y, Z, self.attn.block_matrix()

    def run_sbm(self, backend: str) -> int:
        self._zero_grads()
        self.attn.backend = backend
        out, stats = self.attn.attend(self.q, self.k, self.v, generator=self.generator)
        ((out * self.grad).sum() + 1e-4 * stats.density.mean()).backward()
        return stats.num_edges

    def run_sdpa(self) -> int:
        self._zero_grads()
        out = torch.nn.functional.scaled_dot_product_attention(self.q, self.k, self.v)
        (out * self.grad).sum().backward()
        return 0

    def run_sampling(self) -> int:
        if self._sbm is None:  # the memberships are not the sampler's work: computed once
            with torch.no_grad():
                self._sbm = self.memberships()
        graph = sample_graph(*self._sbm, generator=self.generator, distribution=self.s.distribution)
        return graph.num_edges

    def method(self, name: str) -> Callable[[], int]:
        return {
            "sparse": lambda: self.run_sbm("sparse"),
            "dense": lambda: self.run_sbm("dense"),
            "sdpa": self.run_sdpa,
            "sampling": self.run_sampling,
        }[name]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def skip_reason(method: str, case: Case, s: Settings) -> str | None:
    expected_edges = case.target_density * case.n * case.n * s.heads
    if method in ("sparse", "sampling") and expected_edges > s.max_edges:
        return f"{expected_edges / 1e6:.0f}M edges > --max-edges"
    if method == "dense" and case.n > s.dense_max_n:
        return f"N > {s.dense_max_n} (N x N memory)"
    if method == "sdpa" and case.n > s.sdpa_max_n:
        return f"N > {s.sdpa_max_n}"
    return None


def time_case(case: Case, s: Settings, methods: Sequence[str], log: Callable[[str], None]) -> Row:
    """Median time of each method, the methods interleaved round by round; the sampler runs
    right after ``sparse`` (which includes it), and its share is the median of the per-round
    ratios: the two see the same machine state."""
    row = Row(case)
    work = Workload(case, s)
    active = []
    order = list(methods)
    order.insert(order.index("sparse") + 1 if "sparse" in order else len(order), "sampling")
    for name in order:
        reason = skip_reason(name, case, s)
        if reason:
            row.skipped[name] = reason
        else:
            active.append(name)
    samples: dict[str, list[float]] = {name: [] for name in active}
    for name in active:  # warm-up (JIT compilation, caches)
        edges = work.method(name)()
        if name == "sparse":
            row.edges = edges
    start = time.perf_counter()
    while row.rounds < s.rounds or (
        row.rounds < s.max_rounds and time.perf_counter() - start < s.min_time
    ):
        for name in active:
            _sync(s.device)
            t0 = time.perf_counter()
            work.method(name)()
            _sync(s.device)
            samples[name].append(time.perf_counter() - t0)
        row.rounds += 1
    row.times = {name: statistics.median(v) for name, v in samples.items()}
    if "sparse" in samples and "sampling" in samples:
        row.sampling_share = statistics.median(
            a / b for a, b in zip(samples["sampling"], samples["sparse"], strict=True)
        )
    row.density = row.edges / (s.heads * case.n * case.n) if row.edges else 0.0
    log(
        f"N={case.n:>6} {case.label:>16}: "
        + ", ".join(f"{k} {v:.3f}s" for k, v in row.times.items())
        + (f"  (E={row.edges:,})" if row.edges else "")
        + f"  [{row.rounds} rounds]"
    )
    return row


def measure_scaling(
    s: Settings, epq: float, small: int, large: int, log: Callable[[str], None]
) -> tuple[float, float, float]:
    """time(large) / time(small) of the sparse method at ``epq`` edges per query, the two sizes
    run alternately round by round (one process, the same machine state): (ratio, small, large)."""
    works = [
        Workload(Case(small, edges_per_query=epq), s),
        Workload(Case(large, edges_per_query=epq), s),
    ]
    for w in works:
        w.run_sbm("sparse")
    ratios: list[float] = []
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(s.scaling_rounds):
        round_times = []
        for w, acc in zip(works, times, strict=True):
            _sync(s.device)
            t0 = time.perf_counter()
            w.run_sbm("sparse")
            _sync(s.device)
            acc.append(time.perf_counter() - t0)
            round_times.append(acc[-1])
        ratios.append(round_times[1] / round_times[0])
    ratio = statistics.median(ratios)
    log(f"scaling at {epq:g} edges/query: time({large})/time({small}) = {ratio:.2f} (side by side)")
    return ratio, statistics.median(times[0]), statistics.median(times[1])


# ------------------------------------------------------------------ the two distributions
#: (label, N, SBMAttention options) of the side-by-side sampler comparison.
DISTRIBUTION_CASES: list[tuple[str, int, dict[str, Any]]] = [
    ("init_density=0.01", 16384, {"init_density": 0.01}),
    ("init_density=0.05", 4096, {"init_density": 0.05}),
    ("no rate scale (paper / released code at initialisation)", 4096, {"rate_scale": None}),
]


@dataclass
class DistributionRow:
    label: str
    n: int
    edges: dict[str, int]  # distribution -> edges of the last graph
    times: dict[str, float]  # distribution -> median seconds of sample_graph
    ratio: float  # median over rounds of bernoulli / poisson


def compare_distributions(s: Settings, log: Callable[[str], None]) -> list[DistributionRow]:
    """``sample_graph`` with each distribution on the same memberships, rounds interleaved."""
    rows = []
    for label, n, options in DISTRIBUTION_CASES:
        torch.manual_seed(s.seed)
        x = torch.randn(1, s.heads, n, s.head_dim)
        attn = SBMAttention(s.heads * s.head_dim, s.heads, s.clusters, exploration=0.0, **options)
        with torch.no_grad():  # one model, sampled with either distribution
            Y, Z = attn.memberships(x, x)
            B = attn.block_matrix()
        work = {d: (Y, Z, B, torch.Generator().manual_seed(s.seed)) for d in DISTRIBUTIONS}
        for d, (Y, Z, B, g) in work.items():
            sample_graph(Y, Z, B, generator=g, distribution=d)  # compile, warm
        times: dict[str, list[float]] = {d: [] for d in work}
        edges: dict[str, int] = {}
        ratios = []
        for _ in range(max(s.rounds, 5)):
            for d, (Y, Z, B, g) in work.items():
                t0 = time.perf_counter()
                edges[d] = sample_graph(Y, Z, B, generator=g, distribution=d).num_edges
                times[d].append(time.perf_counter() - t0)
            ratios.append(times["bernoulli"][-1] / times["poisson"][-1])
        row = DistributionRow(
            label, n, edges, {d: statistics.median(v) for d, v in times.items()},
            statistics.median(ratios),
        )  # fmt: skip
        log(
            f"sampling, {label}, N = {n}: poisson {_fmt_time(row.times['poisson'])} "
            f"({edges['poisson']:,} edges), bernoulli {_fmt_time(row.times['bernoulli'])} "
            f"({edges['bernoulli']:,} edges), ratio {row.ratio:.2f}"
        )
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------- memory
def _probe(case: Case, s: Settings, method: str) -> dict[str, float]:
    """Peak memory of one call of ``method``; runs in its own process."""
    work = Workload(case, s)
    fn = work.method(method)
    small = Workload(Case(256, density=0.05), s)  # load compiled kernels without a big peak
    small.method(method)()
    del small
    if s.device.startswith("cuda"):
        fn()  # the GPU allocator's peak counts only tensors: warm up the big call itself
    work._zero_grads()
    memory = PeakMemory(s.device)
    fn()
    return {"peak_bytes": float(memory.peak())}


def measure_memory(case: Case, s: Settings, method: str) -> float:
    cmd = [
        sys.executable, "-m", "sbm_transformer.bench", "_probe",
        "--case", json.dumps(asdict(case)), "--settings", json.dumps(asdict(s)), "--method", method,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"memory probe failed for {method} at N={case.n}:\n{done.stderr[-2000:]}"
        )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


# ---------------------------------------------------------------------- density at init
def density_at_init(s: Settings, n: int = 1024, **options: Any) -> float:
    """Mean density of a freshly initialised SBMAttention(**options) on random inputs
    (exploration 0.01)."""
    torch.manual_seed(s.seed)
    attn = SBMAttention(s.heads * s.head_dim, s.heads, s.clusters, exploration=0.01, **options)
    with torch.no_grad():
        _, stats = attn(torch.randn(2, n, s.heads * s.head_dim))
    return float(stats.density.mean())


# ------------------------------------------------------------------------------ reporting
def _fmt_time(t: float | None) -> str:
    return "-" if t is None else (f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s")


def _fmt_mem(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def targets(
    rows: list[Row], scaling: dict[float, tuple[float, float, float]] | None = None
) -> list[tuple[str, str, bool | None]]:
    """The issue's performance targets, checked against the measured rows (and the side-by-side
    scaling measurements, which take precedence over ratios of separately timed rows)."""
    by = {(r.case.n, r.case.label): r for r in rows}
    out: list[tuple[str, str, bool | None]] = []

    def t(n: int, label: str, method: str) -> float | None:
        r = by.get((n, label))
        return None if r is None else r.times.get(method)

    def mem(n: int, label: str, method: str) -> float | None:
        r = by.get((n, label))
        return None if r is None else r.memory.get(method)

    for epq in (32, 128):
        name = f"linear in edges: time(64k)/time(16k) at {epq} edges/query <= 4.5"
        if scaling and epq in scaling:
            ratio = scaling[epq][0]
            out.append((name + " (side by side)", f"{ratio:.2f}", ratio <= 4.5))
            continue
        a, b = t(65536, f"{epq} edges/query", "sparse"), t(16384, f"{epq} edges/query", "sparse")
        out.append((name, _ratio(a, b), None if a is None or b is None else a / b <= 4.5))
    a, b = t(16384, "1% density", "sparse"), t(16384, "1% density", "sdpa")
    out.append(
        (
            "N=16k, 1% density: sparse / SDPA (fwd+bwd) <= 0.5",
            _ratio(a, b),
            None if a is None or b is None else a / b <= 0.5,
        )
    )
    a, b = t(4096, "1% density", "dense"), t(4096, "1% density", "sparse")
    out.append(
        (
            "N=4k, 1% density: dense / sparse time >= 10",
            _ratio(a, b),
            None if a is None or b is None else a / b >= 10,
        )
    )
    a, b = mem(4096, "1% density", "dense"), mem(4096, "1% density", "sparse")
    out.append(
        (
            "N=4k, 1% density: dense / sparse peak memory >= 10",
            _ratio(a, b),
            None if a is None or b is None else a / b >= 10,
        )
    )
    m = mem(65536, "128 edges/query", "sparse")
    out.append(
        (
            "N=64k, 128 edges/query: peak memory < 4 GiB",
            _fmt_mem(m),
            None if m is None else m < 4 * 2**30,
        )
    )
    shares = [r.sampling_share for r in rows if r.sampling_share is not None]
    worst = max(shares) if shares else None
    out.append(
        (
            "sampling <= 1/3 of sparse fwd+bwd (worst case over the table, column `share`)",
            "-" if worst is None else f"{worst:.2f}",
            None if worst is None else worst <= 1 / 3,
        )
    )
    return out


def markdown(
    rows: list[Row],
    s: Settings,
    command: str,
    init: dict[str, float],
    plot: str | None,
    scaling: dict[float, tuple[float, float, float]] | None = None,
    distributions: list[DistributionRow] | None = None,
) -> str:
    lines = [
        "# Attention benchmark",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {s.device}, {s.dtype}; numba kernels: "
        f"{'on' if numba_enabled() else 'off'}. One layer's attention core, batch 1, "
        f"{s.heads} heads, head size {s.head_dim}, K = {s.clusters} clusters, exploration 0, "
        f"{s.distribution} edges; "
        "fwd+bwd of `sum(out * g)` (+ 1e-4 * density for SBM). Times: medians over rounds in "
        f"which the methods run interleaved: at least {s.rounds}, more for fast cases until the "
        f"rounds took {s.min_time:g} s, at most {s.max_rounds} (column `rounds`). Memory: growth "
        "of the peak resident set during one call, each in a fresh process.",
        "",
        "`sparse` = SBM attention with the sparse backend as `SBMAttention.attend` runs it, "
        "everything included (memberships, sampling, attention, backward into q, k, v and the "
        "SBM parameters); `sampling` = the "
        "sampler alone, `sample_graph(Y, Z, B)` given the memberships (part of `sparse`); "
        "`sdpa` = `scaled_dot_product_attention`; `dense` = SBM attention with the dense O(N^2) "
        "backend (the original code's path); `share` = sampling / sparse, the median of the "
        "per-round ratios (each round runs the sampler right after `sparse`).",
        "",
        "| N | sparsity | edges | density | sparse | sampling | share | sdpa | dense "
        "| sparse/sdpa | dense/sparse | mem sparse | mem sdpa | mem dense | rounds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tt, mm = r.times, r.memory
        lines.append(
            f"| {r.case.n:,} | {r.case.label} | {f'{r.edges:,}' if r.edges else '-'} | "
            f"{f'{r.density:.4f}' if r.edges else '-'} | "
            f"{_fmt_time(tt.get('sparse'))} | {_fmt_time(tt.get('sampling'))} | "
            f"{'-' if r.sampling_share is None else f'{r.sampling_share:.2f}'} | "
            f"{_fmt_time(tt.get('sdpa'))} | "
            f"{_fmt_time(tt.get('dense'))} | {_ratio(tt.get('sparse'), tt.get('sdpa'))} | "
            f"{_ratio(tt.get('dense'), tt.get('sparse'))} | {_fmt_mem(mm.get('sparse'))} | "
            f"{_fmt_mem(mm.get('sdpa'))} | {_fmt_mem(mm.get('dense'))} | {r.rounds} |"
        )
    skipped = sorted({f"{m}: {why}" for r in rows for m, why in r.skipped.items()})
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    for goal, measured, ok in targets(rows, scaling):
        verdict = "yes" if ok else ("n/a" if ok is None else "**no**")
        lines.append(f"| {goal} | {measured} | {verdict} |")
    if scaling:
        lines += [
            "",
            f"Side by side: the two sizes run alternately, {s.scaling_rounds} rounds, in one "
            "process:",
            "",
        ]
        for epq, (ratio, small, large) in sorted(scaling.items()):
            lines.append(
                f"- {epq:g} edges/query: 16k {_fmt_time(small)}, 64k {_fmt_time(large)}, "
                f"ratio {ratio:.2f} (median of per-round ratios)"
            )
    lines += [
        "",
        "## Density at initialisation",
        "",
        f"Freshly initialised `SBMAttention(embed_dim={s.heads * s.head_dim}, num_heads={s.heads}, "
        f"num_clusters={s.clusters})`, random inputs, N = 1024, exploration 0.01:",
        "",
    ]
    for name, value in init.items():
        lines.append(f"- {name}: {value:.2%}")
    if distributions:
        lines += [
            "",
            "## The Bernoulli distribution",
            "",
            "`sample_graph` on the same memberships (random inputs, one sequence, "
            f'{s.heads} heads, K = {s.clusters}, exploration 0) with `distribution="poisson"` '
            'and `"bernoulli"` (thinned Poisson proposals; rows with a rate bound of 0.9 or '
            "more drawn pair by pair), run alternately; ratio = median of per-round ratios.",
            "",
            "| model | N | poisson | edges | bernoulli | edges | bernoulli / poisson |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for d in distributions:
            lines.append(
                f"| {d.label} | {d.n:,} | {_fmt_time(d.times['poisson'])} | "
                f"{d.edges['poisson']:,} | {_fmt_time(d.times['bernoulli'])} | "
                f"{d.edges['bernoulli']:,} | {d.ratio:.2f} |"
            )
    if plot:
        lines += ["", f"![time and memory vs N]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    labels = sorted({r.case.label for r in rows}, key=lambda x: (x.endswith("density"), x))
    styles = {"sparse": "-o", "sdpa": "--s", "dense": ":^"}
    for ax, what in zip(axes, ("times", "memory"), strict=True):
        for label in labels:
            sub = [r for r in rows if r.case.label == label]
            for method in ("sparse", "dense"):
                pts = [
                    (r.case.n, getattr(r, what)[method]) for r in sub if method in getattr(r, what)
                ]
                if pts:
                    ax.plot(*zip(*pts, strict=True), styles[method], label=f"SBM {method}, {label}")
        sd = sorted(
            {(r.case.n, getattr(r, what)["sdpa"]) for r in rows if "sdpa" in getattr(r, what)}
        )
        if sd:
            ax.plot(
                *zip(*sd, strict=True), styles["sdpa"], color="k", label="SDPA (full attention)"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("fwd+bwd time (s)" if what == "times" else "peak memory (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SBM sparse attention vs SDPA vs dense SBM (fwd+bwd, one layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def build_cases(
    sizes: Sequence[int], epqs: Sequence[float], densities: Sequence[float]
) -> list[Case]:
    cases = [Case(n, edges_per_query=e) for n in sizes for e in epqs]
    cases += [Case(n, density=d) for n in sizes for d in densities]
    return sorted(
        cases, key=lambda c: (c.density is not None, c.edges_per_query or 0, c.density or 0, c.n)
    )


def gpu_suite(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for the GPU benchmark: ``--suite gpu``, or ``--device cuda...``
    without ``--suite cpu``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--suite", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--device", default="cpu")
    known, _ = p.parse_known_args(argv)
    return known.suite == "gpu" or (known.suite == "auto" and known.device.startswith("cuda"))


def run(
    argv: Sequence[str] | None = None, log: Callable[[str], None] = print
) -> list[Row] | list[GpuRow]:
    if gpu_suite(list(sys.argv[1:] if argv is None else argv)):
        from sbm_transformer import bench_gpu

        return bench_gpu.run(argv, log)
    p = argparse.ArgumentParser(prog="sbmt bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--edges-per-query", type=float, nargs="*", default=[32, 128])
    p.add_argument("--densities", type=float, nargs="*", default=[0.01, 0.05])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--rounds", type=int, default=3, help="at least this many rounds per case")
    p.add_argument(
        "--min-time", type=float, default=2.0,
        help="fast cases: more rounds until they took this long (seconds)",
    )  # fmt: skip
    p.add_argument("--max-rounds", type=int, default=25, help="rounds per case at most")
    p.add_argument("--clusters", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dense-max-n", type=int, default=4096)
    p.add_argument("--max-edges", type=int, default=120_000_000)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--suite", choices=["auto", "cpu", "gpu"], default="auto",
        help="gpu: the GPU benchmark (the default with --device cuda; see --suite gpu --help)",
    )  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument(
        "--distribution", default="poisson", choices=DISTRIBUTIONS, help="of the sparse method"
    )
    p.add_argument(
        "--no-distributions", action="store_true",
        help="skip the side-by-side sampler comparison of the two distributions",
    )  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--quick", action="store_true", help="N = 1k and 4k, one round: a smoke run")
    p.add_argument(
        "--out", default=None, help="write the markdown report here (e.g. docs/benchmarks.md)"
    )
    p.add_argument("--plot", default=None, help="write the log-log PNG here")
    p.add_argument("--json", default=None, help="write the raw rows as JSON here")
    p.add_argument("--no-scaling", action="store_true", help="skip the side-by-side 16k/64k check")
    p.add_argument(
        "--scaling-rounds",
        type=int,
        default=Settings.scaling_rounds,
        help="rounds of the side-by-side 16k/64k check (7 rounds moved by +-7 %% run to run)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds = [n for n in args.sizes if n <= 4096][:2] or [1024], 1
        args.min_time = 0.0
    s = Settings(
        heads=args.heads, head_dim=args.head_dim, clusters=args.clusters, rounds=args.rounds,
        min_time=args.min_time, max_rounds=max(args.max_rounds, args.rounds),
        dense_max_n=args.dense_max_n, max_edges=args.max_edges, device=args.device,
        dtype=args.dtype, scaling_rounds=args.scaling_rounds, distribution=args.distribution,
    )  # fmt: skip
    cases = build_cases(args.sizes, args.edges_per_query, args.densities)
    rows = []
    for case in cases:
        row = time_case(case, s, args.methods, log)
        if not args.no_memory:
            for method in row.times:
                if method != "sampling":
                    row.memory[method] = measure_memory(case, s, method)
            log(
                f"{'':>26}peak memory: "
                + ", ".join(f"{k} {_fmt_mem(v)}" for k, v in row.memory.items())
            )
        rows.append(row)
    scaling: dict[float, tuple[float, float, float]] = {}
    if not args.no_scaling and {16384, 65536} <= set(args.sizes) and "sparse" in args.methods:
        for epq in args.edges_per_query:
            scaling[epq] = measure_scaling(s, epq, 16384, 65536, log)
    init = {
        "default (rate_scale=16)": density_at_init(s),
        "paper / original form (no rate scale, K = 128)": density_at_init(s, rate_scale=None),
        "init_density=0.02": density_at_init(s, init_density=0.02),
    }
    for name, value in init.items():
        log(f"density at init, {name}: {value:.2%}")
    command = "sbmt bench attention " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_rows(rows, args.plot)
        log(f"plot: {args.plot}")
    distributions = None if args.no_distributions else compare_distributions(s, log)
    report = markdown(rows, s, command.strip(), init, args.plot, scaling, distributions)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        log(f"report: {args.out}")
    else:
        log(report)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    for goal, measured, ok in targets(rows, scaling):
        log(
            f"target: {goal}: {measured} -> {'met' if ok else ('n/a' if ok is None else 'NOT MET')}"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_probe"]:
        p = argparse.ArgumentParser()
        p.add_argument("_probe")
        p.add_argument("--case", required=True)
        p.add_argument("--settings", required=True)
        p.add_argument("--method", required=True)
        a = p.parse_args(argv)
        result = _probe(Case(**json.loads(a.case)), Settings(**json.loads(a.settings)), a.method)
        print(json.dumps(result))
        return
    run(argv)


if __name__ == "__main__":
    main()
