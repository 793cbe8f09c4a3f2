"""The device-generic (torch) sampler, which GPUs run: exact distribution, CSR output, and a
fixed number of host synchronisations per call, whatever the batch, heads or clusters.

Every test runs the torch sampler on the CPU (numba off); the ones marked ``cuda`` run it on a
GPU where one is present, with ``torch.cuda.set_sync_debug_mode("error")`` around the call.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from conftest import padding_mask, sbm_inputs
from test_sampling import assert_matches_probability
from torch.utils._python_dispatch import TorchDispatchMode

from sbm_transformer import edge_probability, sample_graph, sampling

aten = torch.ops.aten
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def torch_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBMT_DISABLE_NUMBA", "1")


# --------------------------------------------------------------------- counting host syncs
#: Ops whose CUDA kernels read device data on the host (or size their output from it).
_SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,  # CUDA: its size from max().item()
}
_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostSyncs(TorchDispatchMode):
    """Counts what would synchronise a GPU with the host: reads of a tensor's value
    (``aten._local_scalar_dense``, which ``.item()``, ``int()``, ``float()`` and ``bool()`` go
    through), ops with data-dependent output sizes (``nonzero``, boolean-mask indexing,
    ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``), and, through
    patched methods, ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.cpu`` (which on a CPU
    tensor dispatch nothing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)

            def counted(self_, *args, _original=original, _name=name, **kwargs):
                self.counts[f"Tensor.{_name}"] += 1
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self.counts[str(func)] += 1
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.counts["repeat_interleave without output_size"] += 1
        elif func in _MASK_INDEXING and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
            for t in args[1]
            if t is not None
        ):
            self.counts[f"{func} with a mask"] += 1
        return func(*args, **kwargs)


def test_the_counter_sees_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.arange(6.0)
    for sync in (
        lambda: x.sum().item(),
        lambda: int(x.max()),
        lambda: float(x[0]),
        lambda: bool(x.any()),
        lambda: x[x > 2],
        lambda: x.nonzero(),
        lambda: torch.unique(x),
        lambda: torch.repeat_interleave(x.long()),
        lambda: x.tolist(),
    ):
        with HostSyncs(monkeypatch) as syncs:
            sync()
        assert syncs.total == 1, syncs.counts
    with HostSyncs(monkeypatch) as syncs:
        torch.repeat_interleave(x.long(), x.long(), output_size=15)
        torch.sort(x)
        torch.searchsorted(x, x)
    assert syncs.total == 0, syncs.counts


CASES = {
    "poisson": dict(),
    "poisson, padding": dict(pad=True),
    "poisson, causal, padding": dict(causal=True, pad=True),
    "bernoulli": dict(distribution="bernoulli"),
    "bernoulli, causal, padding": dict(distribution="bernoulli", causal=True, pad=True),
    "bernoulli, rows drawn pair by pair": dict(distribution="bernoulli", scale=40.0),
    "bernoulli, dense rows, causal": dict(distribution="bernoulli", scale=40.0, causal=True),
    "max_edges": dict(max_edges=10**8),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("bsz", "heads", "n", "k"), [(1, 1, 40, 2), (3, 4, 70, 16)])
def test_two_host_syncs_per_call(monkeypatch, case: str, bsz, heads, n, k) -> None:
    """Two host reads, whatever the batch, heads, clusters, masks and distribution: the number
    of draws (with the value checks) and the number of edges. A per-head or per-cluster loop with
    an ``.item()``, a boolean mask or a ``nonzero`` makes this fail."""
    kw = dict(CASES[case])
    Y, Z, B = sbm_inputs(bsz, heads, n, n, k, seed=3, scale=kw.pop("scale", 2.0))
    mask = padding_mask(bsz, n) if kw.pop("pad", False) else None
    generator = torch.Generator().manual_seed(0)
    with HostSyncs(monkeypatch) as syncs:
        graph = sample_graph(
            Y, Z, B, exploration=0.02, key_padding_mask=mask, generator=generator, **kw
        )
    assert syncs.counts == {"Tensor.tolist": 2}, syncs.counts
    assert graph.num_edges > 0
    graph.validate()


def test_two_host_syncs_without_a_generator_and_for_empty_rows(monkeypatch) -> None:
    Y, Z, B = sbm_inputs(2, 3, 30, 25, 4, seed=1, scale=0.0)  # no SBM edges
    for kw in (dict(), dict(exploration=0.05), dict(distribution="bernoulli")):
        with HostSyncs(monkeypatch) as syncs:
            sample_graph(Y, Z, B, **kw)
        assert syncs.counts == {"Tensor.tolist": 2}, syncs.counts
    with HostSyncs(monkeypatch) as syncs:  # nothing to sample: the checks' read alone
        sample_graph(*sbm_inputs(2, 1, 0, 5, 3))
    assert syncs.counts == {"Tensor.tolist": 1}, syncs.counts


# ---------------------------------------------------------------------------- the output
@pytest.mark.parametrize("distribution", ["poisson", "bernoulli"])
@pytest.mark.parametrize("causal", [False, True])
def test_output_is_sorted_csr_by_query(distribution: str, causal: bool) -> None:
    bsz, heads, n = 3, 2, 50
    Y, Z, B = sbm_inputs(bsz, heads, n, n, 5, seed=2, scale=3.0)
    mask = padding_mask(bsz, n)
    graph = sample_graph(
        Y, Z, B, exploration=0.05, key_padding_mask=mask, causal=causal,
        distribution=distribution, generator=torch.Generator().manual_seed(4),
    ).validate()  # fmt: skip
    assert graph.crow_indices.dtype == torch.int32 and graph.col_indices.dtype == torch.int32
    assert graph.crow_indices.shape == (bsz * heads * n + 1,) and graph.tile_shift == 0
    assert torch.equal(graph.col_indices, graph.sorted().col_indices)  # keys ascend per row
    graph.check_masks(mask, causal)
    # rows stacked as (b * H + h) * N + i: the same edges as the dense mask's CSR
    again = type(graph).from_dense(graph.to_dense())
    assert torch.equal(graph.crow_indices, again.crow_indices)
    assert torch.equal(graph.col_indices, again.col_indices)


# ---------------------------------------------------------------------- the distribution
def frequencies(Y, Z, B, *, copies: int, rounds: int, seed: int, mask=None, **kw) -> torch.Tensor:
    """Edge frequencies of a (b, H, N, M) problem over copies * rounds graphs (batch repeated)."""
    b, h, n, _ = Y.shape
    m = Z.shape[2]
    Yr = Y.repeat(copies, 1, 1, 1)
    Zr = Z.repeat(copies, 1, 1, 1)
    maskr = None if mask is None else mask.repeat(copies, 1)
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(b, h, n, m, dtype=torch.float64)
    for _ in range(rounds):
        graph = sample_graph(Yr, Zr, B, key_padding_mask=maskr, generator=g, **kw).validate()
        total += graph.to_dense().double().reshape(copies, b, h, n, m).sum(0)
    return total / (copies * rounds)


@pytest.mark.parametrize("distribution", ["poisson", "bernoulli"])
@pytest.mark.parametrize("causal", [False, True])
def test_sequences_with_different_padding_and_heads(distribution: str, causal: bool) -> None:
    """Two sequences with different padding, three heads (one sparse, one dense, one with
    sure Bernoulli edges): every pair, every (batch, head), at edge_probability."""
    n = 6
    Y, Z, B = sbm_inputs(2, 3, n, n, 3, seed=5, scale=1.0)
    B = B * torch.tensor([0.3, 2.0, 6.0], dtype=B.dtype).reshape(3, 1, 1)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, 1] = True
    mask[1, 3:] = True
    kw = dict(exploration=0.05, causal=causal, distribution=distribution)
    prob = edge_probability(Y, Z, B, key_padding_mask=mask, **kw)
    freq = frequencies(Y, Z, B, copies=1000, rounds=10, seed=3, mask=mask, **kw)
    assert torch.all(freq[prob == 1] == 1)
    assert_matches_probability(freq, prob, 10000)


def test_causal_rows_with_large_rates() -> None:
    """Per-row rates of ~100 (the PTRS branch of the per-row Poisson counts when causal)."""
    n = 120
    Y, _, B = sbm_inputs(1, 1, n, n, 2, seed=2, scale=0.9)
    Z = torch.full((1, 1, n, 2), 0.95, dtype=torch.float64)
    prob = edge_probability(Y, Z, B, causal=True)
    freq = frequencies(Y, Z, B, copies=100, rounds=10, seed=3, causal=True)
    assert_matches_probability(freq, prob, 1000)


@pytest.mark.parametrize("distribution", ["poisson", "bernoulli"])
@pytest.mark.parametrize("causal", [False, True])
def test_small_chunks_and_search_blocks(monkeypatch, distribution: str, causal: bool) -> None:
    """The loops over fixed-size chunks (PTRS tries, edge rates, dense rows) and the blocks of
    the causal prefix search give the same distribution when each holds a few elements."""
    monkeypatch.setattr(sampling, "_PTRS_CHUNK", sampling._PTRS_TRIES * 3)
    monkeypatch.setattr(sampling, "_CHUNK_ELEMENTS", 4)
    monkeypatch.setattr(sampling, "_SEARCH_ROWS", 5)
    n = 6
    Y, Z, B = sbm_inputs(1, 2, n, n, 3, seed=1, scale=2.5)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, 2] = True
    kw = dict(exploration=0.05, causal=causal, distribution=distribution)
    prob = edge_probability(Y, Z, B, key_padding_mask=mask, **kw)
    freq = frequencies(Y, Z, B, copies=500, rounds=10, seed=9, mask=mask, **kw)
    assert_matches_probability(freq, prob, 5000)


def poisson_pmf(lam: float, kmax: int) -> torch.Tensor:
    k = torch.arange(kmax + 1, dtype=torch.float64)
    if lam == 0:
        return (k == 0).double()
    return torch.exp(k * math.log(lam) - lam - torch.lgamma(k + 1))


@pytest.mark.parametrize("tries", [sampling._PTRS_TRIES, 1])
@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.7, 4.0, 9.99, 10.0, 37.0, 2500.0])
def test_poisson_draws_are_exact(monkeypatch, lam: float, tries: int) -> None:
    """The counter-based Poisson draws against the pmf (chi-square over binned counts); with one
    PTRS try per pass, most large-rate elements take the host-synced redraw and stay exact."""
    monkeypatch.setattr(sampling, "_PTRS_TRIES", tries)
    size = 200_000
    rates = torch.full((size,), lam, dtype=torch.float64)
    keys = sampling._element_keys(torch.tensor(7), 1, torch.arange(size))
    counts, failed = sampling._poisson(rates, keys)
    if failed.any():
        assert tries == 1 and lam >= 10
        counts = sampling._poisson_redraw(rates, keys, counts, failed)
    assert counts.dtype == torch.int64 and counts.min() >= 0
    lo = max(0, int(lam - 6 * math.sqrt(lam) - 2))
    hi = int(lam + 6 * math.sqrt(lam) + 8)
    pmf = poisson_pmf(lam, hi)[lo:]
    expected = pmf * size
    observed = torch.bincount((counts - lo).clamp(0, hi - lo), minlength=hi - lo + 1).double()
    keep = expected > 20  # bins with enough expected counts; the rest in the tail checks
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = max(int(keep.sum()) - 1, 1)
    assert chi2 < dof + 5 * math.sqrt(2 * dof) + 10, f"chi2 {chi2:.1f} over {dof} bins"
    assert abs(counts.double().mean() - lam) < 5 * math.sqrt(max(lam, 1e-3) / size)
    assert observed[~keep].sum() <= expected[~keep].sum() + 5 * math.sqrt(expected[~keep].sum() + 1)


def test_poisson_draws_depend_on_their_own_key_only() -> None:
    rates = torch.tensor([0.5, 12.0, 3.0, 400.0], dtype=torch.float64)
    keys = sampling._element_keys(torch.tensor(3), 1, torch.arange(4))
    counts, _ = sampling._poisson(rates, keys)
    other = rates.clone()
    other[[0, 2]] = torch.tensor([50.0, 7.0], dtype=torch.float64)
    again, _ = sampling._poisson(other, keys)
    assert counts[1] == again[1] and counts[3] == again[3]


def test_seed_tensor_is_not_read_and_reproduces(monkeypatch) -> None:
    """The graph is a function of the seed tensor: the same seed gives the same graph whether it
    comes from sample_graph or from the custom op's seeded_generator (torch.compile)."""
    Y, Z, B = sbm_inputs(2, 2, 30, 30, 4, seed=4, scale=2.0)
    seed = torch.tensor([12345])
    for kw in (dict(), dict(causal=True), dict(distribution="bernoulli")):
        a = sampling.sample_graph_eager(
            Y, Z, B, generator=sampling.seeded_generator(seed, Y.device), exploration=0.01, **kw
        )
        b = sampling.sample_graph_eager(
            Y, Z, B, generator=sampling.seeded_generator(seed, Y.device), exploration=0.01, **kw
        )
        assert torch.equal(a.col_indices, b.col_indices)
        assert torch.equal(a.crow_indices, b.crow_indices)


def test_same_graph_compiled_and_eager() -> None:
    from sbm_transformer import SBMAttention

    config = torch._dynamo.config
    if not hasattr(config, "capture_dynamic_output_shape_ops"):
        # pytest >= 9.2 undoes a monkeypatch.setattr of a torch config entry by deleting it,
        # which hides the entry, and dynamo then fails to read it: set it back to its default
        config.capture_dynamic_output_shape_ops = False

    attn = SBMAttention(16, 2, 4, backend="sparse")
    x = torch.randn(2, 24, 16)

    def edges(x: torch.Tensor, seed: int) -> torch.Tensor:
        _, stats = attn(x, generator=torch.Generator().manual_seed(seed))
        return stats.graph.col_indices

    compiled = torch.compile(edges, backend="aot_eager")
    assert torch.equal(compiled(x, 3), edges(x, 3))


# ------------------------------------------------------------------------------------ GPU
@cuda
@pytest.mark.parametrize("case", list(CASES))
def test_no_other_sync_on_gpu(monkeypatch, case: str) -> None:
    """With sync debug mode "error", the whole call runs except the sampler's two host reads
    (which this test lets through and counts); any other sync raises."""
    kw = dict(CASES[case])
    Y, Z, B = (t.cuda() for t in sbm_inputs(3, 4, 70, 70, 16, seed=3, scale=kw.pop("scale", 2.0)))
    mask = padding_mask(3, 70).cuda() if kw.pop("pad", False) else None
    reads = []
    host_read = sampling._host_read

    def allowed(*parts):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            reads.append(len(parts))
            return host_read(*parts)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(sampling, "_host_read", allowed)
    generators = (
        lambda: None,  # the device's default generator
        lambda: torch.Generator(device="cuda").manual_seed(1),
        lambda: torch.Generator().manual_seed(1),  # a CPU seed: read on the host, no sync
    )
    for generator in generators:
        call = dict(exploration=0.02, key_padding_mask=mask, generator=generator(), **kw)
        sample_graph(Y, Z, B, **call)  # warm: lazy CUDA initialisation may synchronise
        reads.clear()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph = sample_graph(Y, Z, B, **call)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert len(reads) == 2
        assert graph.device.type == "cuda"
        graph.validate()


@cuda
@pytest.mark.parametrize("distribution", ["poisson", "bernoulli"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_frequencies_match_edge_probability(distribution: str, causal: bool) -> None:
    n = 6
    Y, Z, B = sbm_inputs(2, 3, n, n, 3, seed=5, scale=1.0)
    B = B * torch.tensor([0.3, 2.0, 6.0], dtype=B.dtype).reshape(3, 1, 1)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, 1] = True
    mask[1, 3:] = True
    kw = dict(exploration=0.05, causal=causal, distribution=distribution)
    prob = edge_probability(Y, Z, B, key_padding_mask=mask, **kw)
    copies = 4000
    Yr, Zr = (t.repeat(copies, 1, 1, 1).cuda() for t in (Y, Z))
    g = torch.Generator(device="cuda").manual_seed(0)
    total = torch.zeros_like(prob)
    for _ in range(5):
        graph = sample_graph(
            Yr, Zr, B.cuda(), key_padding_mask=mask.repeat(copies, 1).cuda(), generator=g, **kw
        ).validate()
        total += graph.to_dense().double().reshape(copies, *prob.shape).sum(0).cpu()
    freq = total / (copies * 5)
    assert torch.all(freq[prob == 1] == 1)
    assert_matches_probability(freq, prob, copies * 5)


@cuda
def test_gpu_and_cpu_draw_the_same_poisson_counts() -> None:
    """Counter-based: the same keys give the same counts on both devices (integer hashing; the
    float comparisons could differ only within rounding)."""
    rates = torch.logspace(-3, 5, 5000, dtype=torch.float64)
    keys = sampling._element_keys(torch.tensor(11), 1, torch.arange(rates.numel()))
    cpu, _ = sampling._poisson(rates, keys)
    gpu, _ = sampling._poisson(rates.cuda(), keys.cuda())
    assert (cpu != gpu.cpu()).sum() <= 2


def test_the_transpose_for_the_backward_reads_nothing_back(monkeypatch) -> None:
    """The by-key order the Triton and torch backward passes use is built without a host sync."""
    g = torch.Generator().manual_seed(0)
    Y, Z = torch.rand(2, 3, 40, 6, generator=g), torch.rand(2, 3, 40, 6, generator=g)
    B = torch.softmax(torch.randn(3, 36, generator=g), -1).reshape(3, 6, 6) * 8
    graph = sample_graph(Y, Z, B, generator=g)
    with HostSyncs(monkeypatch) as syncs:
        graph.transpose()
        graph.transpose(3)
    assert syncs.total == 0, syncs.counts
