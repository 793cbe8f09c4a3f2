"""Graph: CSR by query, conversions, transpose, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sbm_inputs

from sbm_transformer import Graph, sample_graph
from sbm_transformer._numba import numba_installed
from sbm_transformer.functional import sbm_attention
from sbm_transformer.graph import TransposedGraph, transpose_into


def random_mask(b: int, h: int, n: int, m: int, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, n, m, generator=g) < p


def test_dense_round_trip_and_counts() -> None:
    mask = random_mask(2, 3, 7, 5)
    mask[0, 1, 3] = False  # an empty row
    graph = Graph.from_dense(mask).validate()
    assert graph.shape == (2, 3, 7, 5)
    assert graph.num_edges == int(mask.sum())
    assert torch.equal(graph.to_dense(), mask)
    assert torch.equal(graph.degrees(), mask.sum(-1))
    assert torch.equal(graph.edges_per_head(), mask.sum((-1, -2)))
    assert torch.allclose(graph.density(), mask.double().mean((0, 2, 3)))
    b, h, i, j = graph.edges()
    assert mask[b, h, i, j].all() and b.numel() == graph.num_edges


def test_scatter_dense_is_differentiable() -> None:
    mask = random_mask(1, 2, 4, 6)
    graph = Graph.from_dense(mask)
    vals = torch.arange(graph.num_edges, dtype=torch.float64, requires_grad=True)
    dense = graph.scatter_dense(vals)
    assert torch.equal(dense != 0, mask & (dense != 0))
    dense.sum().backward()
    assert torch.equal(vals.grad, torch.ones_like(vals))


@pytest.mark.parametrize("impl", ["torch", "numba"])
@pytest.mark.parametrize("tile_shift", [None, 0, 2])
def test_transpose_groups_edges_by_key(
    impl: str, tile_shift: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By key, and within a key by query tile (tile-major: tile 0 of every column first):
    each segment holds exactly its tile's edges of its column, rows ascending."""
    monkeypatch.setenv("SBMT_DISABLE_NUMBA", "1" if impl == "torch" else "0")
    mask = random_mask(2, 2, 9, 11, seed=3)
    mask[1, 0, :, 4] = False  # a key without edges
    graph = Graph.from_dense(mask)
    t = graph.transpose(tile_shift)
    assert isinstance(t, TransposedGraph) and t.tile_shift == tile_shift
    b, h, n, m = graph.shape
    shift = 62 if tile_shift is None else tile_shift
    tiles, cols_total = -(-n >> shift), b * h * m
    ptr = t.ptr.long()
    assert ptr.shape == (tiles * cols_total + 1,) and ptr[-1] == graph.num_edges
    assert torch.equal(t.perm.sort().values, torch.arange(graph.num_edges, dtype=t.perm.dtype))
    rows, cols = graph.row_indices()[t.perm.long()], graph.col_indices[t.perm.long()]
    assert torch.equal(rows % n, t.row_indices.to(rows.dtype))
    per_pair = mask.reshape(b * h, n, m)
    for s in range(tiles * cols_total):
        tile, c = divmod(s, cols_total)
        seg = slice(int(ptr[s]), int(ptr[s + 1]))
        r = t.row_indices[seg].long()
        assert torch.all(cols[seg] == c % m) and torch.all(rows[seg] // n == c // m)
        assert torch.all(r >> shift == tile) and torch.all(r.diff() > 0)
        in_tile = (torch.arange(n) >> shift) == tile
        assert len(r) == int((per_pair[c // m, :, c % m] & in_tile).sum())
    if tile_shift is None:
        assert torch.equal(t.ccol_indices.diff(), mask.sum(2).reshape(-1))  # in-degree per key
    else:
        with pytest.raises(ValueError, match="one-tile"):
            t.ccol_indices  # noqa: B018
    assert graph.transpose(tile_shift) is t  # cached
    assert graph.transpose(10) is graph.transpose(None)  # a tile as large as N: one tile


@pytest.mark.skipif(not numba_installed(), reason="numba not installed")
def test_numba_backward_transposes_into_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numba backward's transpose goes to reused memory, not onto the graph (a graph kept
    after backward holds no by-key arrays of its own), and equals the cached one."""
    monkeypatch.setenv("SBMT_DISABLE_NUMBA", "0")
    inputs = sbm_inputs(1, 2, 300, 300, 4, dtype=torch.float32)

    def sampled() -> Graph:
        return sample_graph(*inputs, generator=torch.Generator().manual_seed(1))

    graph = sampled()
    like = graph.col_indices.numpy()
    rows, tpos = np.empty_like(like), np.empty_like(like)
    t = transpose_into(graph, 6, rows, tpos)
    assert np.shares_memory(t.row_indices.numpy(), rows)
    assert np.shares_memory(t.tpos.numpy(), tpos)
    assert not graph._cache  # not cached
    ref = graph.transpose(6)
    assert ref is not t and torch.equal(t.ptr, ref.ptr)
    assert torch.equal(t.row_indices, ref.row_indices) and torch.equal(t.tpos, ref.tpos)

    graph = sampled()
    q, k, v = (torch.randn(1, 2, 300, 8, requires_grad=True) for _ in range(3))
    out, _ = sbm_attention(q, k, v, *inputs, graph=graph, backend="sparse-numba")
    out.sum().backward()
    assert k.grad is not None and v.grad is not None
    assert not any(isinstance(x, TransposedGraph) for x in graph._cache.values())


def test_sorted_keeps_the_edges() -> None:
    Y, Z, B = sbm_inputs(2, 2, 12, 10, 3, scale=2.0)
    graph = sample_graph(Y, Z, B, exploration=0.1)
    s = graph.sorted()
    assert torch.equal(s.to_dense(), graph.to_dense())
    rows = s.row_indices()
    assert not ((rows.diff() == 0) & (s.col_indices.diff() <= 0)).any()


def test_structure_errors() -> None:
    crow = torch.tensor([0, 1, 2], dtype=torch.int32)
    col = torch.tensor([0, 1], dtype=torch.int32)
    ptr = torch.zeros(2, 2, dtype=torch.int32)  # one tile: (1 + 1, B*H*N)
    Graph(crow, col, (1, 1, 2, 2), tile_shift=12, tile_pointers=ptr)
    with pytest.raises(
        ValueError, match=r"tile_pointers must have shape .* = \(2, 2\), got \(3, 2\)"
    ):
        Graph(crow, col, (1, 1, 2, 2), tile_shift=12, tile_pointers=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="tile_pointers needs tile_shift"):
        Graph(crow, col, (1, 1, 2, 2), tile_pointers=ptr)
    with pytest.raises(ValueError, match="must have B\\*H\\*N \\+ 1 = 3 entries"):
        Graph(crow[:2], col, (1, 1, 2, 2))
    with pytest.raises(TypeError, match="share a dtype"):
        Graph(crow, col.long(), (1, 1, 2, 2))
    with pytest.raises(TypeError, match="int32 or int64"):
        Graph(crow.float(), col, (1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, M=2\)"):
        Graph(crow, torch.tensor([0, 2], dtype=torch.int32), (1, 1, 2, 2)).validate()
    with pytest.raises(ValueError, match="duplicate edge"):
        Graph(
            torch.tensor([0, 2, 2], dtype=torch.int32),
            torch.tensor([1, 1], dtype=torch.int32),
            (1, 1, 2, 2),
        ).validate()
    with pytest.raises(ValueError, match="end at num_edges"):
        Graph(torch.tensor([0, 1, 3], dtype=torch.int32), col, (1, 1, 2, 2)).validate()
    with pytest.raises(TypeError, match="bool mask"):
        Graph.from_dense(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, H, N, M\) mask"):
        Graph.from_dense(torch.ones(2, 2, dtype=torch.bool))


def test_repr_and_to() -> None:
    graph = Graph.from_dense(random_mask(1, 2, 3, 4))
    assert "num_edges" in repr(graph) and "B=1" in repr(graph)
    assert graph.to("cpu") is graph


@pytest.mark.parametrize("keys_at_a_time", [1 << 12, 1 << 13, 1 << 14])
def test_transpose_by_key_tiles_matches_one_pass(
    keys_at_a_time: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampled graph says where each row's 4096-key tiles start; the numba transpose then
    places the edges a group of key tiles at a time (1, 2 or 4 tiles here, the last group
    short): the same arrays as placing them all at once, in one query tile or several."""
    from sbm_transformer import graph as graph_module
    from sbm_transformer._numba import numba_enabled

    if not numba_enabled():
        pytest.skip("numba not installed")
    n, m, k = (1 << 12) + 700, 3 * (1 << 12) + 5, 3  # two query tiles, four key tiles
    gen = torch.Generator().manual_seed(0)
    Y, Z = torch.rand(1, 2, n, k, generator=gen), torch.rand(1, 2, m, k, generator=gen)
    B = torch.full((2, k, k), 0.002)
    sampled = sample_graph(Y, Z, B, exploration=0.001, generator=torch.Generator().manual_seed(1))
    assert sampled.tile_pointers is not None and sampled.num_edges > 10 * n
    plain = Graph(sampled.crow_indices, sampled.col_indices, sampled.shape)  # no tile pointers
    monkeypatch.setattr(graph_module, "_TRANSPOSE_KEYS", keys_at_a_time)
    for tile_shift in (None, 12, 11):  # one query tile, two, three
        a, b = sampled.transpose(tile_shift), plain.transpose(tile_shift)
        for name in ("ptr", "row_indices", "tpos"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
