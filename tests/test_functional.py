"""sbm_attention: the sparse backends compute the dense reference's function and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SPARSE_BACKENDS, padding_mask, sbm_inputs

from sbm_transformer import Graph, sample_graph, sbm_attention
from sbm_transformer.ops.reference import dense_edge_attention

F64 = torch.float64


def make_case(b, h, n, m, d, dv, k, *, dtype=F64, seed=0, batched_b=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype)
    kk = torch.randn(b, h, m, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, m, dv, generator=g, dtype=dtype)
    Y, Z, B = sbm_inputs(b, h, n, m, k, dtype=dtype, seed=seed + 1, scale=1.5)
    if batched_b:
        B = B.expand(b, h, k, k) * torch.rand(b, 1, 1, 1, generator=g, dtype=dtype)
    return [t.clone().requires_grad_() for t in (q, kk, v, Y, Z, B)]


def run(inputs, graph, backend, *, loss_scale=1.0, density_weight=0.7, **kw):
    for t in inputs:
        t.grad = None
    out, stats = sbm_attention(*inputs, graph=graph, backend=backend, **kw)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = loss_scale * (out * w).sum() + density_weight * stats.density.sum()
    loss.backward()
    return [out.detach(), stats.density.detach()] + [t.grad.clone() for t in inputs]


def assert_close_all(got, want, rtol=1e-6, atol=1e-12):
    """Every tensor within rtol of the reference's largest entry (atol: values that are zero up
    to rounding, like the gradient of a softmax over a single edge)."""
    names = ["out", "density", "q", "k", "v", "Y", "Z", "B"]
    for name, a, b in zip(names, got, want, strict=True):
        scale = b.abs().max()
        err = (a - b).abs().max()
        assert err <= rtol * scale + atol, f"{name}: error {err:.2e} (largest entry {scale:.2e})"


CASES = {
    "self, padding": dict(dims=(2, 3, 13, 13, 5, 7, 4), pad=True, causal=False),
    "cross, odd sizes": dict(dims=(3, 2, 11, 17, 3, 6, 5), pad=True, causal=False),
    "causal, padding": dict(dims=(2, 2, 15, 15, 4, 4, 3), pad=True, causal=True),
    "one head, one key cluster": dict(dims=(1, 1, 9, 6, 2, 2, 1), pad=False, causal=False),
    "batched B": dict(dims=(2, 2, 8, 10, 4, 4, 3), pad=False, causal=False, batched_b=True),
}


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_sparse_matches_dense_in_float64(backend: str, case: str, dropout_p: float) -> None:
    spec = CASES[case]
    b, h, n, m, d, dv, k = spec["dims"]
    inputs = make_case(b, h, n, m, d, dv, k, batched_b=spec.get("batched_b", False))
    mask = padding_mask(b, m) if spec["pad"] else None
    Y, Z, B = (t.detach() for t in inputs[3:])
    graph = sample_graph(
        Y,
        Z,
        B,
        exploration=0.05,
        key_padding_mask=mask,
        causal=spec["causal"],
        generator=torch.Generator().manual_seed(1),
    )
    assert graph.num_edges > 0
    kw = dict(key_padding_mask=mask, causal=spec["causal"], dropout_p=dropout_p)
    want = run(inputs, graph, "dense", generator=torch.Generator().manual_seed(9), **kw)
    got = run(inputs, graph, backend, generator=torch.Generator().manual_seed(9), **kw)
    assert_close_all(got, want)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_empty_rows_output_zeros_without_nan(backend: str) -> None:
    inputs = make_case(2, 2, 6, 5, 3, 3, 2)
    mask = torch.rand(2, 2, 6, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    mask[:, :, 0] = False  # query 0 has no edge in any head
    mask[1, 1] = False  # a pair without any edge
    graph = Graph.from_dense(mask)
    want = run(inputs, graph, "dense")
    got = run(inputs, graph, backend)
    assert_close_all(got, want)
    assert torch.all(got[0][:, :, 0] == 0) and torch.all(got[0][1, 1] == 0)
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("backend", ["dense", *SPARSE_BACKENDS])
def test_graph_without_edges(backend: str) -> None:
    inputs = make_case(1, 2, 4, 3, 2, 2, 2)
    graph = Graph.from_dense(torch.zeros(1, 2, 4, 3, dtype=torch.bool))
    out, density, *grads = run(inputs, graph, backend)
    assert torch.all(out == 0) and torch.all(density == 0)
    assert all(g is not None and torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_straight_through_gradient_is_clipped_like_dense(backend: str) -> None:
    inputs = make_case(1, 2, 10, 10, 4, 4, 3)
    Y, Z, B = (t.detach() for t in inputs[3:])
    graph = sample_graph(Y, Z, B, exploration=0.1, generator=torch.Generator().manual_seed(2))
    # with a large loss, many per-edge gradients exceed 1 and hardtanh clips them
    want = run(inputs, graph, "dense", loss_scale=300.0, density_weight=210.0)
    got = run(inputs, graph, backend, loss_scale=300.0, density_weight=210.0)
    assert_close_all(got, want)
    small = run(inputs, graph, backend, loss_scale=1.0, density_weight=0.7)
    assert torch.allclose(got[2], 300 * small[2])  # q's gradient is linear in the loss...
    assert not torch.allclose(got[5], 300 * small[5])  # ...Y's is not: the clip is active


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_gradcheck_q_k_v(backend: str) -> None:
    q, k, v, Y, Z, B = make_case(1, 2, 5, 6, 3, 2, 2)
    graph = sample_graph(
        Y.detach(),
        Z.detach(),
        B.detach(),
        exploration=0.2,
        generator=torch.Generator().manual_seed(0),
    )

    def f(q, k, v):
        return sbm_attention(
            q, k, v, Y.detach(), Z.detach(), B.detach(), graph=graph, backend=backend
        )[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dense_reference_edge_weight_gradient_is_its_derivative() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=g, dtype=F64) for _ in range(3))
    mask = torch.rand(1, 1, 4, 4, generator=g) < 0.7
    weights = (torch.rand(1, 1, 4, 4, generator=g, dtype=F64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w: dense_edge_attention(q, k, v, w, mask, 0.5), (weights,)
    )


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_float32_and_bfloat16(backend: str) -> None:
    inputs64 = make_case(2, 2, 20, 24, 8, 8, 4)
    Y, Z, B = (t.detach() for t in inputs64[3:])
    graph = sample_graph(Y, Z, B, exploration=0.05, generator=torch.Generator().manual_seed(0))
    want = run(inputs64, graph, "dense")
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    got = run(inputs32, graph, backend)
    assert_close_all([t.double() for t in got], want, rtol=1e-4)
    bf16 = [t.detach().bfloat16().requires_grad_() for t in inputs64]
    out, _ = sbm_attention(*bf16, graph=graph, backend=backend)
    assert out.dtype == torch.bfloat16
    assert (out.double() - want[0]).abs().max() < 0.05
    out.float().sum().backward()
    assert bf16[0].grad.dtype == torch.bfloat16 and torch.isfinite(bf16[0].grad.float()).all()


def test_auto_backend_and_sampling_inside() -> None:
    q, k, v, Y, Z, B = make_case(2, 2, 30, 30, 4, 4, 3, dtype=torch.float32)
    out, stats = sbm_attention(q, k, v, Y, Z, B, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 30, 4)
    assert stats.graph.shape == (2, 2, 30, 30)
    assert stats.num_edges == stats.graph.num_edges
    assert stats.edges_per_query == pytest.approx(stats.num_edges / (2 * 2 * 30))
    assert torch.allclose(stats.density, stats.graph.density().float())


def test_bad_inputs_name_the_problem() -> None:
    q, k, v, Y, Z, B = (t.detach() for t in make_case(2, 2, 5, 6, 3, 3, 2))
    graph = sample_graph(Y, Z, B)
    cases = [
        (dict(q=q[0]), ValueError, r"q must have shape \(B, H, L, D\)"),
        (dict(k=k[..., :2]), ValueError, "k must have shape"),
        (dict(v=v[:, :, :4]), ValueError, "v must have shape"),
        (dict(k=k.float()), TypeError, "must share a dtype"),
        (dict(Y=Y[:, :, :4]), ValueError, "Y must have shape"),
        (dict(Z=Z[:, :, :5]), ValueError, "Z must have shape"),
        (dict(backend="flash"), ValueError, "unknown backend 'flash'"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(causal=True), ValueError, "causal=True needs as many queries as keys"),
        (dict(exploration=-1.0), ValueError, "exploration must be finite and >= 0"),
        (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.int64)), TypeError, "bool tensor"),
        (
            dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
            ValueError,
            "key_padding_mask must have shape",
        ),
        (
            dict(graph=Graph.from_dense(torch.ones(2, 2, 5, 5, dtype=torch.bool))),
            ValueError,
            "graph has shape",
        ),
        (dict(graph="edges"), TypeError, "graph must be a sbm_transformer.Graph"),
        (
            dict(graph=graph, key_padding_mask=torch.ones(2, 6, dtype=torch.bool)),
            ValueError,
            "padding",
        ),
    ]
    for change, error, match in cases:
        kw = dict(q=q, k=k, v=v, Y=Y, Z=Z, B=B)
        kw.update(change)
        args = [kw.pop(name) for name in ("q", "k", "v", "Y", "Z", "B")]
        with pytest.raises(error, match=match):
            sbm_attention(*args, **kw)


# --------------------------------------------------------------------------- property test
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    dims=st.tuples(
        st.integers(1, 3),
        st.integers(1, 3),
        st.integers(1, 9),
        st.integers(1, 9),
        st.integers(1, 5),
        st.integers(1, 4),
    ),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_any_graph_any_shape_parity(dims, density, seed) -> None:
    b, h, n, m, d, k = dims
    inputs = make_case(b, h, n, m, d, d + 1, k, seed=seed)
    mask = torch.rand(b, h, n, m, generator=torch.Generator().manual_seed(seed)) < density
    graph = Graph.from_dense(mask)
    want = run(inputs, graph, "dense")
    for backend in SPARSE_BACKENDS:
        assert_close_all(run(inputs, graph, backend), want)


@pytest.mark.skipif("sparse-numba" not in SPARSE_BACKENDS, reason="numba not installed")
@pytest.mark.parametrize("graph_kind", ["sampled", "sorted", "unordered"])
@pytest.mark.parametrize("by_key", ["scatter", "gather", "gather, one key tile"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_tiled_kernels_match(
    monkeypatch: pytest.MonkeyPatch, graph_kind: str, by_key: str, dropout_p: float
) -> None:
    """Tables larger than a tile are gathered tile by tile: same outputs and gradients, whether
    rows come grouped by tile (sorted) or not (then they are regrouped). With enough key tiles,
    the by-key products scatter from the layout (no transposed graph); else they gather over the
    transposed graph, itself in query tiles, whose positions follow the layout's. Dropout
    factors (CSR order) follow the layout too."""
    from sbm_transformer.ops import kernels

    inputs = make_case(2, 2, 37, 29, 4, 3, 5)
    Y, Z, B = (t.detach() for t in inputs[3:])
    mask = padding_mask(2, 29)
    graph = sample_graph(
        Y, Z, B, exploration=0.1, key_padding_mask=mask, generator=torch.Generator().manual_seed(4)
    )
    if graph_kind == "sorted":
        graph = graph.sorted()
    elif graph_kind == "unordered":  # keys in each row reversed, order unknown to the kernels
        rows = graph.row_indices().long()
        order = torch.argsort(rows * 1000 - graph.col_indices.long(), stable=True)
        graph = Graph(graph.crow_indices, graph.col_indices[order], graph.shape)
    kw = dict(key_padding_mask=mask, dropout_p=dropout_p)
    want = run(inputs, graph, "dense", generator=torch.Generator().manual_seed(3), **kw)
    query_tiled = by_key != "gather, one key tile"
    if query_tiled:
        monkeypatch.setattr(kernels, "_QUERY_SIDE_TILE_KEYS", 4)  # by query: 4 tiles of 8 keys
        monkeypatch.setattr(kernels, "_MIN_EDGES_PER_QUERY_TILE", 0)
        monkeypatch.setattr(kernels, "_UNTILED_BYTES", 0)
    if by_key == "gather":
        monkeypatch.setattr(kernels, "_SCATTER_MIN_TILES", 5)
    monkeypatch.setattr(kernels, "_KEY_SIDE_TILE_ROWS", 8)  # by key: 3 tiles of 16 queries
    monkeypatch.setattr(kernels, "_MIN_EDGES_PER_KEY_TILE", 0)
    key_shifts = []

    def transpose_into(g: Graph, tile_shift: int | None, *args: object) -> object:
        key_shifts.append(tile_shift)
        return real_transpose_into(g, tile_shift, *args)

    real_transpose_into = kernels.transpose_into
    monkeypatch.setattr(kernels, "transpose_into", transpose_into)
    got = run(inputs, graph, "sparse-numba", generator=torch.Generator().manual_seed(3), **kw)
    assert_close_all(got, want)
    shifts = [key[1] for key in graph._cache if isinstance(key, tuple) and key[0] == "row_tiles"]
    if query_tiled:
        assert shifts == [3] and graph._cache["layout"].lo.shape == (4, 2 * 2 * 37)  # tiled
        assert graph._cache["layout"].tile_keys == 8
        assert key_shifts == ([] if by_key == "scatter" else [4])
    else:
        assert shifts == [] and graph._cache["layout"].lo.shape == (1, 2 * 2 * 37)
        assert key_shifts == [4]  # gathered by key, in tiles of 16 queries


@pytest.mark.skipif("sparse-numba" not in SPARSE_BACKENDS, reason="numba not installed")
@pytest.mark.parametrize("tiled", ["no", "by query", "by key"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_unrolled_edge_loops_match(monkeypatch: pytest.MonkeyPatch, tiled: str, dropout_p: float):
    """The numba kernels take edges four at a time, then the rest one by one: rows of every
    length mod 4, in one tile or in several, with and without dropout, match the reference."""
    from sbm_transformer.ops import kernels

    b, h, n, m = 1, 2, 9, 23
    inputs = make_case(b, h, n, m, 6, 5, 3)
    lengths = torch.arange(n) * 2 + 5  # 5 to 21 keys: every remainder mod 4
    dense = torch.arange(m)[None, :] < lengths[:, None]
    graph = Graph.from_dense(dense.expand(b, h, n, m))
    if tiled == "by query":  # and the by-key products scattered from its tiles
        monkeypatch.setattr(kernels, "_QUERY_SIDE_TILE_KEYS", 8)  # 16 keys and 7
        monkeypatch.setattr(kernels, "_MIN_EDGES_PER_QUERY_TILE", 0)
        monkeypatch.setattr(kernels, "_UNTILED_BYTES", 0)
        monkeypatch.setattr(kernels, "_SCATTER_MIN_TILES", 2)
    if tiled == "by key":
        monkeypatch.setattr(kernels, "_KEY_SIDE_TILE_ROWS", 2)  # 3 tiles of 4 queries
        monkeypatch.setattr(kernels, "_MIN_EDGES_PER_KEY_TILE", 0)
    kw = dict(dropout_p=dropout_p)
    want = run(inputs, graph, "dense", generator=torch.Generator().manual_seed(3), **kw)
    got = run(inputs, graph, "sparse-numba", generator=torch.Generator().manual_seed(3), **kw)
    assert_close_all(got, want)


@pytest.mark.skipif("sparse-numba" not in SPARSE_BACKENDS, reason="numba not installed")
def test_sampled_keys_are_grouped_by_tile() -> None:
    """The numba sampler leaves each row's keys grouped by 4096-key tile, so the kernels take
    the rows as they are for that tile size or coarser ones: their tile pointers then match a
    regrouping pass, and each tile's range holds exactly that tile's keys."""
    from sbm_transformer._numba_sampler import TILE_SHIFT
    from sbm_transformer.ops import _numba_kernels as nk
    from sbm_transformer.ops import kernels

    n, m, k = 6, 3 * (1 << TILE_SHIFT) + 5, 3  # four fine tiles, the last one nearly empty
    gen = torch.Generator().manual_seed(0)
    Y = torch.rand(1, 2, n, k, generator=gen)
    Z = torch.rand(1, 2, m, k, generator=gen)
    B = torch.full((1, 2, k, k), 200.0)
    graph = sample_graph(Y, Z, B, exploration=0.5, generator=torch.Generator().manual_seed(1))
    assert graph.tile_shift == TILE_SHIFT
    crow, col = graph.crow_indices.numpy(), graph.col_indices.numpy()
    rows = np.repeat(np.arange(crow.shape[0] - 1), np.diff(crow))
    assert np.all(np.diff(col >> TILE_SHIFT)[np.diff(rows) == 0] >= 0)  # ascending tiles
    # the sampler's own tile pointers are those of a pass over the keys
    assert graph.tile_pointers is not None
    np.testing.assert_array_equal(
        graph.tile_pointers.numpy(), nk.tile_pointers(crow, col, TILE_SHIFT, 4)
    )
    for tiles, shift in [(4, TILE_SHIFT), (2, TILE_SHIFT + 1), (1, 62)]:
        ptr, order = kernels._row_tiles(graph, tiles)
        assert order.size == 0
        num = ptr.shape[0] - 1
        regrouped, _ = nk.group_by_tile(crow, col, shift, num)
        np.testing.assert_array_equal(ptr, regrouped)
        for t in range(num):  # each tile's range holds exactly that tile's keys
            in_tile = (np.arange(col.shape[0]) >= ptr[t][rows]) & (
                np.arange(col.shape[0]) < ptr[t + 1][rows]
            )
            assert np.all((col[in_tile] >> shift) == t)
        assert ptr[num].tolist() == crow[1:].tolist()


def test_tile_counts() -> None:
    """The by-key passes take query tiles of 4096 queries or more, as many as leave each key 6
    edges per tile on average; the by-query ones key tiles of 16384 keys or more, 6 edges per
    row (measured best at N = 16k and 64k, 32 and 128 edges per query). A sampled graph's mean
    degree is a hair off its target: the counts are the same just above and below it."""
    from sbm_transformer.ops import kernels

    for off in (-0.01, 0.0, 0.01):
        assert kernels._key_side_tile_shift(65536, 128.0 + off) == 12  # 16 tiles, 8 per key
        assert kernels._key_side_tile_shift(65536, 32.0 + off) == 14  # 4 tiles
        assert kernels._key_side_tile_shift(16384, 128.0 + off) == 12  # 4 tiles
        min_keys, min_edges = kernels._QUERY_SIDE_TILE_KEYS, kernels._MIN_EDGES_PER_QUERY_TILE
        assert kernels._tiles(65536, min_keys, 128.0 + off, min_edges) == 4  # 16384 keys each
        assert kernels._tiles(65536, min_keys, 32.0 + off, min_edges) == 4  # 8 edges per row
        assert kernels._tiles(65536, min_keys, 16.0 + off, min_edges) == 2  # 8 edges per row
        assert kernels._tiles(16384, min_keys, 128.0 + off, min_edges) == 1
        assert kernels._tiles(1024, min_keys, 128.0 + off, min_edges) == 1
    assert kernels._key_side_tile_shift(16384, 4.0) is None  # one tile
    assert kernels._key_side_tile_shift(4096, 1000.0) is None
