"""The fastRG sampler realises exactly edge_probability, reproducibly, in O(edges)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import padding_mask, sbm_inputs

from sbm_transformer import (
    block_matrix,
    edge_probability,
    expected_adjacency,
    expected_num_edges,
    sample_graph,
)


def empirical_frequency(Y, Z, B, *, copies: int, rounds: int, seed: int, **kw) -> torch.Tensor:
    """Edge frequencies of one (1, H, N, M) problem over copies * rounds independent graphs.

    The problem is replicated along the batch, so one call samples ``copies`` graphs.
    """
    _, h, n, k = Y.shape
    m = Z.shape[2]
    Yr, Zr = Y.expand(copies, h, n, k).contiguous(), Z.expand(copies, h, m, k).contiguous()
    mask = kw.pop("key_padding_mask", None)
    if mask is not None:
        mask = mask.expand(copies, m).contiguous()
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(h, n, m, dtype=torch.float64)
    for _ in range(rounds):
        graph = sample_graph(Yr, Zr, B, key_padding_mask=mask, generator=g, **kw).validate()
        total += graph.to_dense().double().sum(0)
    return total / (copies * rounds)


def assert_matches_probability(freq: torch.Tensor, prob: torch.Tensor, samples: int) -> None:
    """Every pair within 5 binomial standard errors; impossible pairs never sampled."""
    assert torch.all(freq[prob == 0] == 0), "an edge with probability 0 was sampled"
    inner = (prob > 0) & (prob < 1)
    se = (prob * (1 - prob) / samples).sqrt()
    z = ((freq - prob) / se)[inner]
    assert z.abs().max() < 5.0, f"max |z| = {z.abs().max():.2f}"
    # and the z-scores look like standard normals overall: sum z^2 ~ chi-square(n), tested
    # through its Wilson-Hilferty normal approximation (4 sigma, both tails)
    n = z.numel()
    wh = ((z**2).mean() ** (1 / 3) - (1 - 2 / (9 * n))) / math.sqrt(2 / (9 * n))
    assert abs(wh) < 4.0, f"mean z^2 = {(z**2).mean():.3f} over {n} pairs (WH z = {wh:.2f})"


@pytest.mark.parametrize("causal", [False, True])
def test_edge_frequencies_match_edge_probability(sampler_impl: str, causal: bool) -> None:
    n, m = (6, 6) if causal else (5, 7)
    Y, Z, B = sbm_inputs(1, 2, n, m, 3, seed=1, scale=2.5)
    mask = torch.zeros(1, m, dtype=torch.bool)
    mask[0, 2] = True
    kw = dict(exploration=0.05, key_padding_mask=mask, causal=causal)
    prob = edge_probability(Y, Z, B, **kw)[0]
    freq = empirical_frequency(Y, Z, B, copies=2000, rounds=10, seed=7, **kw)
    assert_matches_probability(freq, prob, 20000)


def test_rows_of_later_chunks_match_edge_probability(sampler_impl: str) -> None:
    # 520 queries: the numba sampler counts and assigns draws in chunks of 256 rows per pair,
    # each chunk starting at its own place in every component's run of draws.
    Y, Z, B = sbm_inputs(1, 1, 520, 4, 3, seed=9, scale=2.5)
    mask = torch.zeros(1, 4, dtype=torch.bool)
    mask[0, 1] = True
    kw = dict(exploration=0.05, key_padding_mask=mask)
    prob = edge_probability(Y, Z, B, **kw)[0]
    freq = empirical_frequency(Y, Z, B, copies=100, rounds=20, seed=13, **kw)
    assert_matches_probability(freq, prob, 2000)


def test_rows_draw_independent_keys(sampler_impl: str) -> None:
    # Identical rows, ~8 edges each among 4096 keys: rows 256 apart (another chunk of the numba
    # sampler) share a key by chance only (~0.016 expected per pair of rows), never by reusing
    # each other's draws.
    n, m = 1024, 4096
    Y = torch.full((1, 1, n, 2), 0.5)
    Z = torch.full((1, 1, m, 2), 0.5)
    B = torch.full((1, 2, 2), 8 / m)
    graph = sample_graph(Y, Z, B, generator=torch.Generator().manual_seed(3))
    dense = graph.to_dense()[0, 0]
    assert 6 * n < graph.num_edges < 10 * n
    shared = sum(int((dense[:-step] & dense[step:]).sum()) for step in (256, 512))
    assert shared < 60, f"{shared} keys shared by rows 256 or 512 apart (~20 expected)"


def test_large_rates_use_the_exact_large_mean_poisson(sampler_impl: str) -> None:
    # Per (query, cluster) rates of ~50: the sampler's PTRS branch, not the small-rate inversion.
    Y, _, B = sbm_inputs(1, 1, 3, 300, 2, seed=2, scale=0.9)
    Z = torch.full((1, 1, 300, 2), 0.95, dtype=torch.float64)
    prob = edge_probability(Y, Z, B)[0]
    freq = empirical_frequency(Y, Z, B, copies=200, rounds=10, seed=3)
    assert_matches_probability(freq, prob, 2000)


def test_exploration_layer_alone_is_uniform(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(1, 1, 4, 8, 2)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5:] = True
    kw = dict(exploration=0.3, key_padding_mask=mask, causal=False)
    freq = empirical_frequency(Y * 0, Z, B, copies=2000, rounds=5, seed=1, **kw)
    prob = edge_probability(Y * 0, Z, B, **kw)[0]
    assert torch.allclose(prob[..., :5], torch.tensor(-math.expm1(-0.3), dtype=torch.float64))
    assert_matches_probability(freq, prob, 10000)


def test_expected_edge_count(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(3, 2, 40, 30, 4, seed=4)
    mask = padding_mask(3, 30)
    kw = dict(exploration=0.01, key_padding_mask=mask)
    prob = edge_probability(Y, Z, B, **kw)
    g = torch.Generator().manual_seed(0)
    rounds = 200
    counts = torch.tensor(
        [sample_graph(Y, Z, B, generator=g, **kw).num_edges for _ in range(rounds)],
        dtype=torch.float64,
    )
    mean, var = prob.sum(), (prob * (1 - prob)).sum()
    assert abs(counts.mean() - mean) < 5 * (var / rounds).sqrt()
    assert (
        0.5 < counts.var() / var < 1.6
    )  # edges are independent: the count's variance is sum p(1-p)


def test_no_edges_to_padding_or_the_future(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(4, 3, 33, 33, 5, seed=5, scale=3.0)
    mask = padding_mask(4, 33)
    graph = sample_graph(Y, Z, B, exploration=0.2, key_padding_mask=mask, causal=True)
    graph.validate()
    dense = graph.to_dense()
    assert not dense[mask[:, None, None, :].expand_as(dense)].any()
    assert not dense[..., ~torch.ones(33, 33, dtype=torch.bool).tril()].any()
    assert graph.num_edges > 0


def test_generator_reproduces_the_graph(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(2, 2, 50, 60, 4)
    first = sample_graph(Y, Z, B, exploration=0.01, generator=torch.Generator().manual_seed(11))
    again = sample_graph(Y, Z, B, exploration=0.01, generator=torch.Generator().manual_seed(11))
    other = sample_graph(Y, Z, B, exploration=0.01, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first.crow_indices, again.crow_indices)
    assert torch.equal(first.col_indices, again.col_indices)
    assert not torch.equal(first.to_dense(), other.to_dense())
    torch.manual_seed(5)
    a = sample_graph(Y, Z, B)
    torch.manual_seed(5)
    b = sample_graph(Y, Z, B)
    assert torch.equal(a.col_indices, b.col_indices)


def test_index_dtype_is_int32_when_sizes_allow(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(1, 1, 20, 20, 2)
    graph = sample_graph(Y, Z, B)
    assert graph.crow_indices.dtype == torch.int32 and graph.col_indices.dtype == torch.int32


def test_low_precision_inputs_are_sampled(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(1, 2, 16, 16, 4, dtype=torch.float32)
    graph = sample_graph(Y.bfloat16(), Z.bfloat16(), B.bfloat16(), exploration=0.01)
    assert graph.shape == (1, 2, 16, 16)
    graph.validate()


def test_empty_sizes(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(2, 1, 0, 5, 3)
    assert sample_graph(Y, Z, B).num_edges == 0
    Y, Z, B = sbm_inputs(2, 1, 4, 0, 3)
    assert sample_graph(Y, Z, B, exploration=0.1).num_edges == 0


def test_fully_padded_sequence_gets_no_edge(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(2, 2, 6, 6, 3, scale=3.0)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1] = True
    graph = sample_graph(Y, Z, B, exploration=0.5, key_padding_mask=mask)
    assert graph.edges_per_head()[1].sum() == 0
    assert graph.edges_per_head()[0].sum() > 0


def test_expected_num_edges_matches_the_dense_sum() -> None:
    Y, Z, B = sbm_inputs(3, 2, 9, 9, 4, seed=3)
    mask = padding_mask(3, 9)
    for causal in (False, True):
        got = expected_num_edges(Y, Z, B, exploration=0.02, key_padding_mask=mask, causal=causal)
        lam = expected_adjacency(Y, Z, B) + 0.02
        vis = ~mask[:, None, None, :].expand_as(lam)
        if causal:
            vis = vis & torch.ones(9, 9, dtype=torch.bool).tril()
        assert torch.allclose(got, (lam * vis).sum((-1, -2)))


def test_max_edges_guard_raises_before_sampling() -> None:
    Y, Z, B = sbm_inputs(1, 1, 100, 100, 2)
    with pytest.raises(ValueError, match="max_edges=10"):
        sample_graph(Y, Z, B, max_edges=10)
    assert sample_graph(Y, Z, B, max_edges=10**6).num_edges > 0


def test_block_matrix_is_a_distribution_over_block_pairs() -> None:
    C = torch.randn(3, 5, 8)
    B = block_matrix(C)
    assert B.shape == (3, 5, 5)
    assert torch.allclose(B.sum((-1, -2)), torch.ones(3))
    assert torch.allclose(B, B.transpose(-1, -2))  # C C^T is symmetric


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(Y=torch.rand(2, 3, 4)), ValueError, r"Y must have shape \(B, H, N, K\)"),
        (dict(Z=torch.rand(1, 2, 5, 4)), ValueError, "Z must have shape"),
        (dict(B=torch.rand(2, 3, 4)), ValueError, "B must have shape"),
        (dict(Y=torch.ones(1, 2, 4, 3, dtype=torch.long)), TypeError, "floating-point"),
        (dict(exploration=-0.1), ValueError, "exploration must be finite and >= 0"),
        (dict(exploration=float("nan")), ValueError, "exploration must be finite"),
        (dict(exploration="0.1"), TypeError, "exploration must be a float"),
        (dict(key_padding_mask=torch.zeros(1, 5)), TypeError, "key_padding_mask must be a bool"),
        (
            dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
            ValueError,
            r"shape \(B=1, M=5\)",
        ),
        (dict(causal=True), ValueError, "causal=True needs as many queries as keys"),
    ],
)
def test_bad_inputs_name_the_problem(change: dict, error: type, match: str) -> None:
    Y, Z, B = sbm_inputs(1, 2, 4, 5, 3)
    kw = dict(Y=Y, Z=Z, B=B, exploration=0.0)
    kw.update(change)
    with pytest.raises(error, match=match):
        sample_graph(kw.pop("Y"), kw.pop("Z"), kw.pop("B"), **kw)


def test_peaked_key_memberships_use_alias_tables(sampler_impl: str) -> None:
    # A few heavy keys per cluster: the numba sampler switches from rejection to alias tables.
    Y, _, B = sbm_inputs(1, 2, 4, 12, 3, seed=6, scale=2.0)
    Z = torch.full((1, 2, 12, 3), 1e-3, dtype=torch.float64)
    Z[..., 2, 0] = Z[..., 7, 1] = Z[..., 11, 2] = 0.9
    prob = edge_probability(Y, Z, B, exploration=0.02)[0]
    freq = empirical_frequency(Y, Z, B, copies=2000, rounds=10, seed=8, exploration=0.02)
    assert_matches_probability(freq, prob, 20000)


@pytest.mark.parametrize("exploration", [0.05, 0.0])
def test_rows_drawn_edge_by_edge_and_cluster_by_cluster_agree(
    sampler_impl: str, exploration: float
) -> None:
    """The numba sampler draws a quiet row edge by edge (query cluster by rejection, then key
    cluster) and a busy one with a Poisson count per cluster; both realise edge_probability,
    with and without exploration (which quiet rows then skip). Rows: quiet (uneven
    memberships), peaked memberships (rejection would stall: busy), many expected edges (busy),
    no memberships at all (exploration only: no edges without it)."""
    k, n, m = 6, 4, 9
    Y = torch.empty(1, 1, n, k, dtype=torch.float64)
    Y[0, 0, 0] = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.1, 0.02])  # quiet, accepted ~1/2
    Y[0, 0, 1] = 1e-3
    Y[0, 0, 1, 2] = 0.9
    Y[0, 0, 2] = 0.9
    Y[0, 0, 3] = 0.0
    # key j belongs mostly to cluster j % K, and B links cluster a mostly to cluster a: which
    # query cluster an edge takes shows in which keys it reaches
    Z = torch.full((1, 1, m, k), 0.05, dtype=torch.float64)
    Z[0, 0, torch.arange(m), torch.arange(m) % k] = 0.9
    # row 2 expects ~15 draws: more than 1.5 K = 9, the most a row draws edge by edge
    B = 2 * (0.01 + 0.8 * torch.eye(k, dtype=torch.float64))[None]
    kw = dict(exploration=exploration)
    if sampler_impl == "numba":  # the rows really take both paths
        from sbm_transformer import _numba_sampler as ns

        totals = Z[0, 0].sum(0).numpy()[None]
        beta = (B[0] @ torch.from_numpy(totals[0])).numpy()[None]
        rate, top = np.empty(n), np.empty(n)
        busy = np.empty(n, np.bool_)
        visible = np.full((1, n), m, np.int64)
        ns._row_rates(Y[0].numpy(), beta, visible, exploration, 1, rate, top, busy)
        assert busy.tolist() == [False, True, True, False]
    prob = edge_probability(Y, Z, B, **kw)[0]
    freq = empirical_frequency(Y, Z, B, copies=2000, rounds=10, seed=5, **kw)
    assert_matches_probability(freq, prob, 20000)


def test_causal_rows_depend_only_on_the_past(sampler_impl: str) -> None:
    """For a fixed seed, changing later tokens' memberships leaves earlier rows' edges unchanged."""
    Y, Z, B = sbm_inputs(2, 2, 40, 40, 4, seed=11, scale=3.0)
    mask = padding_mask(2, 40)
    kw = dict(exploration=0.05, key_padding_mask=mask, causal=True)
    a = sample_graph(Y, Z, B, generator=torch.Generator().manual_seed(3), **kw).to_dense()
    Y2, Z2 = Y.clone(), Z.clone()
    Y2[:, :, 25:] = torch.rand_like(Y2[:, :, 25:])
    Z2[:, :, 25:] = torch.rand_like(Z2[:, :, 25:])
    b = sample_graph(Y2, Z2, B, generator=torch.Generator().manual_seed(3), **kw).to_dense()
    assert torch.equal(a[:, :, :25], b[:, :, :25])
    assert not torch.equal(a[:, :, 25:], b[:, :, 25:])


# ------------------------------------------------------------------- the Bernoulli distribution
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [0.5, 2.5])  # thinned rows only; rows drawn pair by pair too
def test_bernoulli_frequencies_match_edge_probability(
    sampler_impl: str, causal: bool, scale: float
) -> None:
    n, m = (6, 6) if causal else (5, 7)
    Y, Z, B = sbm_inputs(1, 2, n, m, 3, seed=1, scale=scale)
    mask = torch.zeros(1, m, dtype=torch.bool)
    mask[0, 2] = True
    kw = dict(exploration=0.05, key_padding_mask=mask, causal=causal, distribution="bernoulli")
    prob = edge_probability(Y, Z, B, **kw)[0]
    lam = expected_adjacency(Y, Z, B)[0]
    visible = prob > 0
    assert torch.allclose(prob[visible], (lam + 0.05).clamp(max=1.0)[visible])
    if scale > 1:
        assert (prob == 1).any()  # some pairs are sure edges: those rows are drawn pair by pair
    freq = empirical_frequency(Y, Z, B, copies=2000, rounds=10, seed=7, **kw)
    assert torch.all(freq[prob == 1] == 1)
    assert_matches_probability(freq, prob, 20000)


def test_bernoulli_causal_rows_depend_only_on_the_past(sampler_impl: str) -> None:
    Y, Z, B = sbm_inputs(2, 2, 40, 40, 4, seed=11, scale=3.0)
    mask = padding_mask(2, 40)
    kw = dict(exploration=0.05, key_padding_mask=mask, causal=True, distribution="bernoulli")
    a = sample_graph(Y, Z, B, generator=torch.Generator().manual_seed(3), **kw)
    Y2, Z2 = Y.clone(), Z.clone()
    Y2[:, :, 25:] = torch.rand_like(Y2[:, :, 25:])
    Z2[:, :, 25:] = torch.rand_like(Z2[:, :, 25:])
    b = sample_graph(Y2, Z2, B, generator=torch.Generator().manual_seed(3), **kw)
    again = sample_graph(Y, Z, B, generator=torch.Generator().manual_seed(3), **kw)
    a, b = a.validate().to_dense(), b.validate().to_dense()
    assert torch.equal(a, again.to_dense())  # reproducible from the seed
    assert torch.equal(a[:, :, :25], b[:, :, :25])
    assert not torch.equal(a[:, :, 25:], b[:, :, 25:])


def test_bernoulli_on_small_rates_stays_sparse(sampler_impl: str, monkeypatch) -> None:
    """Where lambda is small no row is drawn pair by pair: the cost follows the edges."""
    from sbm_transformer import sampling

    def no_dense_rows(*args, **kwargs):
        raise AssertionError("a row was drawn pair by pair")

    monkeypatch.setattr(sampling, "_dense_rows_bernoulli", no_dense_rows)
    Y, Z, B = sbm_inputs(1, 2, 400, 400, 8, seed=2, scale=0.05)
    kw = dict(exploration=0.001, distribution="bernoulli")
    graph = sample_graph(Y, Z, B, generator=torch.Generator().manual_seed(0), **kw).validate()
    expected = float(edge_probability(Y, Z, B, **kw).sum())
    assert abs(graph.num_edges - expected) < 5 * expected**0.5


def test_unknown_distribution_is_named() -> None:
    Y, Z, B = sbm_inputs(1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="unknown distribution 'binomial'"):
        sample_graph(Y, Z, B, distribution="binomial")
    with pytest.raises(ValueError, match="unknown distribution"):
        edge_probability(Y, Z, B, distribution="uniform")


# ------------------------------------------------------------------------------ bad numbers
@pytest.mark.parametrize("distribution", ["poisson", "bernoulli"])
@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("Y", float("nan"), r"Y \(query memberships\) contains NaN"),
        ("Z", float("inf"), r"Z \(key memberships\) contains inf"),
        ("B", float("-inf"), r"B \(block matrix\) contains inf"),
        ("Y", -0.5, r"Y \(query memberships\) has negative entries"),
        ("B", -1e-3, r"B \(block matrix\) has negative entries"),
    ],
)
def test_bad_numbers_raise_naming_the_tensor(
    sampler_impl: str, deadline, distribution: str, name: str, value: float, match: str
) -> None:
    Y, Z, B = sbm_inputs(2, 2, 50, 50, 4)
    inputs = {"Y": Y.clone(), "Z": Z.clone(), "B": B.clone()}
    inputs[name].view(-1)[3] = value
    with pytest.raises(ValueError, match=match):
        sample_graph(inputs["Y"], inputs["Z"], inputs["B"], distribution=distribution)


def test_nan_input_to_the_module_raises_quickly(deadline) -> None:
    from sbm_transformer import SBMAttention

    attn = SBMAttention(64, 2, 16)
    x = torch.randn(2, 200, 64)
    x[0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        attn(x)
    x[0, 3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"contains (NaN|inf)"):
        attn(x)
