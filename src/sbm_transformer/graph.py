"""Graph: the sampled query-key edges of every (batch, head) pair, stored as CSR by query.

A :class:`Graph` is the only object the sampler and the attention ops share. For ``B`` sequences,
``H`` heads, ``N`` queries and ``M`` keys it holds one bipartite graph per (batch, head) pair. The
rows of all pairs are stacked in the order ``r = (b * H + h) * N + i``, so the whole batch is one
CSR matrix of ``B * H * N`` rows whose column indices are local key positions ``j`` in ``[0, M)``.
A row holds each key at most once. Columns within a row need not be sorted (the CPU sampler
leaves them in draw order, which the kernels do not care about); :meth:`Graph.sorted` sorts them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sbm_transformer._numba import use_numba

_INT32_MAX = 2**31 - 1

#: Tiles of ``2^TILE_SHIFT`` = 4096 keys (or queries): the numba sampler groups each row's keys by
#: key tile and records where each tile's keys start (:attr:`Graph.tile_pointers`), the numba
#: transpose does the same for each key's queries by query tile; the CPU kernels gather tile by
#: tile from these (or coarser) tiles.
TILE_SHIFT = 12


def index_dtype(*sizes: int) -> torch.dtype:
    """int32 when every size (edge count, stacked rows, stacked columns) fits, else int64."""
    return torch.int32 if max(sizes, default=0) <= _INT32_MAX else torch.int64


class TransposedGraph:
    """The edges of a :class:`Graph` grouped by key instead of by query.

    With one query tile (the default) this is CSC order: the edges of key column
    ``c = (b*H + h)*M + j`` are positions ``ccol_indices[c]:ccol_indices[c+1]``. With query tiles
    of ``2^tile_shift`` queries the order is tile-major: first every column's edges from query
    tile 0, column by column, then every column's edges from tile 1, and so on; the edges of
    column c from tile t are positions ``ptr[t*C + c]:ptr[t*C + c + 1]`` (``C = B*H*M``), so that
    a pass over one tile reads one contiguous run (the CPU kernels gather tile by tile).

    Attributes:
        ptr: ``(T*B*H*M + 1,)`` segment pointers as above, ``T = ceil(N / 2^tile_shift)``.
        row_indices: ``(E,)`` local query index ``i`` of each edge, ascending within a segment.
        tpos: ``(E,)`` the by-key position of each edge (indexed by CSR position).
        perm: ``(E,)`` the inverse of ``tpos``: the CSR position of the edge at each by-key
            position (derived on first use; the CPU kernels need ``tpos`` only).
        tile_shift: log2 of the queries per tile; None for one tile.
    """

    def __init__(
        self,
        ptr: Tensor,
        row_indices: Tensor,
        tpos: Tensor,
        perm: Tensor | None = None,
        tile_shift: int | None = None,
    ) -> None:
        self.ptr, self.row_indices, self.tpos = ptr, row_indices, tpos
        self._perm = perm
        self.tile_shift = tile_shift

    @property
    def ccol_indices(self) -> Tensor:
        """``(B*H*M + 1,)`` column pointers (CSC order: one query tile only)."""
        if self.tile_shift is not None:
            raise ValueError("ccol_indices needs the one-tile transpose (tile_shift=None)")
        return self.ptr

    @property
    def perm(self) -> Tensor:
        if self._perm is None:
            perm = torch.empty_like(self.tpos)
            perm[self.tpos.long()] = torch.arange(
                self.tpos.numel(), dtype=self.tpos.dtype, device=self.tpos.device
            )
            self._perm = perm
        return self._perm


class Graph:
    """Sampled edges of every (batch, head) pair, CSR by query.

    Args:
        crow_indices: ``(B*H*N + 1,)`` row pointers (int32 or int64); row ``r = (b*H + h)*N + i``
            holds edges ``crow_indices[r]:crow_indices[r+1]``.
        col_indices: ``(E,)`` local key index ``j`` in ``[0, M)`` of each edge, same dtype as
            ``crow_indices``, no key twice within a row.
        shape: ``(B, H, N, M)``.
        tile_shift: when known, the keys of each row are grouped by ``j >> tile_shift`` in
            ascending groups (0: sorted); the CPU kernels then gather tile by tile without
            regrouping. None: no known order.
        tile_pointers: optional ``(T + 1, B*H*N)``, ``T = ceil(M / 2^tile_shift)``: where each
            row's keys of tile t start (row r's tile t holds positions ``tile_pointers[t, r]`` to
            ``tile_pointers[t + 1, r] - 1``); the numba sampler gives them, saving the kernels a
            pass over the edges. Requires ``tile_shift``.
        check: verify dtypes, sizes and devices (cheap, O(1)); :meth:`validate` checks the
            contents (O(E)).

    Examples:
        >>> import torch
        >>> mask = torch.tensor([[[[True, False], [True, True]]]])  # (B=1, H=1, N=2, M=2)
        >>> g = Graph.from_dense(mask)
        >>> g.num_edges, g.crow_indices.tolist(), g.col_indices.tolist()
        (3, [0, 1, 3], [0, 0, 1])
        >>> bool((g.to_dense() == mask).all())
        True
    """

    __slots__ = ("_cache", "col_indices", "crow_indices", "shape", "tile_pointers", "tile_shift")

    def __init__(
        self,
        crow_indices: Tensor,
        col_indices: Tensor,
        shape: tuple[int, int, int, int],
        *,
        tile_shift: int | None = None,
        tile_pointers: Tensor | None = None,
        check: bool = True,
    ) -> None:
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.tile_shift = tile_shift
        self.tile_pointers = tile_pointers
        if len(shape) != 4:
            raise ValueError(f"Graph shape must be (B, H, N, M), got {tuple(shape)}")
        b, h, n, m = (int(s) for s in shape)
        self.shape: tuple[int, int, int, int] = (b, h, n, m)
        self._cache: dict[object, object] = {}
        if check:
            self._check_structure()

    def _check_structure(self) -> None:
        if len(self.shape) != 4 or min(self.shape) < 0:
            raise ValueError(
                f"Graph shape must be (B, H, N, M) of non-negative sizes, got {self.shape}"
            )
        b, h, n, _ = self.shape
        for name, t in (("crow_indices", self.crow_indices), ("col_indices", self.col_indices)):
            if t.dim() != 1:
                raise ValueError(f"Graph.{name} must be 1-D, got shape {tuple(t.shape)}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"Graph.{name} must be int32 or int64, got {t.dtype}")
        if self.crow_indices.dtype != self.col_indices.dtype:
            raise TypeError(
                "Graph.crow_indices and col_indices must share a dtype, got "
                f"{self.crow_indices.dtype} and {self.col_indices.dtype}"
            )
        if self.crow_indices.device != self.col_indices.device:
            raise ValueError("Graph.crow_indices and col_indices must be on the same device")
        if self.crow_indices.numel() != b * h * n + 1:
            raise ValueError(
                f"Graph.crow_indices must have B*H*N + 1 = {b * h * n + 1} entries for shape "
                f"{self.shape}, got {self.crow_indices.numel()}"
            )
        if self.tile_pointers is not None:
            if self.tile_shift is None:
                raise ValueError("Graph.tile_pointers needs tile_shift (the tile size they use)")
            tiles = -(-self.shape[3] >> self.tile_shift)
            expected = (tiles + 1, b * h * n)
            if tuple(self.tile_pointers.shape) != expected:
                raise ValueError(
                    f"Graph.tile_pointers must have shape (ceil(M / 2^tile_shift) + 1, B*H*N) = "
                    f"{expected}, got {tuple(self.tile_pointers.shape)}"
                )

    # ------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        return self.shape[0]

    @property
    def num_heads(self) -> int:
        return self.shape[1]

    @property
    def num_queries(self) -> int:
        return self.shape[2]

    @property
    def num_keys(self) -> int:
        return self.shape[3]

    @property
    def num_edges(self) -> int:
        """Total number of edges over all (batch, head) pairs (no device sync)."""
        return self.col_indices.numel()

    @property
    def device(self) -> torch.device:
        return self.col_indices.device

    def __repr__(self) -> str:
        b, h, n, m = self.shape
        dens = self.num_edges / max(b * h * n * m, 1)
        return (
            f"Graph(shape=(B={b}, H={h}, N={n}, M={m}), num_edges={self.num_edges}, "
            f"density={dens:.4g}, device={self.device}, index_dtype={self.col_indices.dtype})"
        )

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dense(cls, mask: Tensor) -> Graph:
        """Build a graph from a boolean adjacency ``mask`` of shape ``(B, H, N, M)``."""
        if not isinstance(mask, Tensor):
            raise TypeError(f"Graph.from_dense expects a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() != 4:
            raise ValueError(
                f"Graph.from_dense expects a (B, H, N, M) mask, got shape {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"Graph.from_dense expects a bool mask, got {mask.dtype}")
        b, h, n, m = mask.shape
        flat = mask.reshape(b * h * n, m)
        rows, cols = flat.nonzero(as_tuple=True)  # sorted by (row, col)
        idt = index_dtype(rows.numel(), b * h * n, b * h * m)
        counts = torch.bincount(rows, minlength=b * h * n)
        crow = torch.zeros(b * h * n + 1, dtype=idt, device=mask.device)
        crow[1:] = counts.cumsum(0)
        return cls(crow, cols.to(idt), (b, h, n, m), tile_shift=0)

    def to_dense(self) -> Tensor:
        """The adjacency as a bool tensor ``(B, H, N, M)``."""
        b, h, n, m = self.shape
        dense = torch.zeros(b * h * n, m, dtype=torch.bool, device=self.device)
        dense[self.row_indices().long(), self.col_indices.long()] = True
        return dense.reshape(b, h, n, m)

    def scatter_dense(self, values: Tensor) -> Tensor:
        """Scatter per-edge ``values`` ``(E,)`` into a dense ``(B, H, N, M)`` tensor (0 elsewhere).

        Differentiable with respect to ``values``.
        """
        b, h, n, m = self.shape
        flat = self.row_indices().long() * m + self.col_indices.long()
        out = values.new_zeros(b * h * n * m)
        out = out.index_put((flat,), values)
        return out.reshape(b, h, n, m)

    def edges(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """COO view: int64 tensors ``(b, h, i, j)`` of length E, in CSR order."""
        _, h, n, _ = self.shape
        r = self.row_indices().long()
        bh, i = r // n, r % n
        return bh // h, bh % h, i, self.col_indices.long()

    def row_indices(self) -> Tensor:
        """``(E,)`` stacked row ``r = (b*H + h)*N + i`` of each edge (cached)."""
        cached = self._cache.get("row_indices")
        if cached is None:
            rows = self.crow_indices.numel() - 1
            cached = torch.repeat_interleave(
                torch.arange(rows, dtype=self.col_indices.dtype, device=self.device),
                self.degrees().reshape(-1),
                output_size=self.num_edges,
            )
            self._cache["row_indices"] = cached
        assert isinstance(cached, Tensor)
        return cached

    def degrees(self) -> Tensor:
        """Number of edges of each query, int64 ``(B, H, N)``."""
        b, h, n, _ = self.shape
        return self.crow_indices.diff().long().reshape(b, h, n)

    def edges_per_head(self) -> Tensor:
        """Number of edges of each (batch, head) pair, int64 ``(B, H)``."""
        b, h, n, _ = self.shape
        bounds = self.crow_indices[:: max(n, 1)].long() if n > 0 else None
        if bounds is None:
            return torch.zeros(b, h, dtype=torch.long, device=self.device)
        return bounds.diff().reshape(b, h)

    def density(self) -> Tensor:
        """Fraction of (query, key) pairs that are edges, per head: float ``(H,)``."""
        b, _, n, m = self.shape
        return self.edges_per_head().sum(0).double() / max(b * n * m, 1)

    def to(self, device: torch.device | str) -> Graph:
        """A copy on ``device`` (no copy when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return Graph(
            self.crow_indices.to(device),
            self.col_indices.to(device),
            self.shape,
            tile_shift=self.tile_shift,
            tile_pointers=None if self.tile_pointers is None else self.tile_pointers.to(device),
        )

    # ------------------------------------------------------------- transpose
    def transpose(self, tile_shift: int | None = None) -> TransposedGraph:
        """The edges grouped by key, and within each key by query tiles of ``2^tile_shift``
        queries (None: one tile, CSC order); see :class:`TransposedGraph`. Computed once per
        graph and tile size, then cached."""
        tile_shift = one_tile_as_none(tile_shift, self.num_queries)
        key = ("transpose", tile_shift)
        cached = self._cache.get(key)
        if cached is None:
            cached = _transpose(self, tile_shift)
            self._cache[key] = cached
        assert isinstance(cached, TransposedGraph)
        return cached

    def sorted(self) -> Graph:
        """A copy whose columns are ascending within each row (O(E log E))."""
        key = self.row_indices().long() * self.num_keys + self.col_indices.long()
        key = torch.sort(key).values
        col = (key % max(self.num_keys, 1)).to(self.col_indices.dtype)
        return Graph(self.crow_indices, col, self.shape, tile_shift=0)

    # ------------------------------------------------------------ validation
    def validate(self) -> Graph:
        """Check the contents (O(E log E)): pointers, column range, no repeated key in a row.

        Returns the graph itself, so ``Graph(...).validate()`` chains. Raises ValueError.
        """
        crow, col = self.crow_indices.long(), self.col_indices.long()
        e = self.num_edges
        if crow[0].item() != 0 or crow[-1].item() != e:
            raise ValueError(
                f"Graph.crow_indices must start at 0 and end at num_edges={e}, got "
                f"{crow[0].item()} and {crow[-1].item()}"
            )
        if (crow.diff() < 0).any():
            raise ValueError("Graph.crow_indices must be non-decreasing")
        if e:
            lo, hi = col.min().item(), col.max().item()
            if lo < 0 or hi >= self.num_keys:
                raise ValueError(
                    f"Graph.col_indices must lie in [0, M={self.num_keys}), "
                    f"found values in [{lo}, {hi}]"
                )
            key = torch.sort(self.row_indices().long() * self.num_keys + col).values
            if (key.diff() == 0).any():
                raise ValueError("Graph.col_indices repeats a key within a row (duplicate edge)")
        return self

    def check_compatible(
        self,
        batch_size: int,
        num_heads: int,
        num_queries: int,
        num_keys: int,
        device: torch.device,
        *,
        argument: str = "graph",
    ) -> None:
        """Raise ValueError unless this graph fits attention inputs of the given sizes."""
        expected = (batch_size, num_heads, num_queries, num_keys)
        if self.shape != expected:
            raise ValueError(
                f"{argument} has shape (B, H, N, M)={self.shape} but q/k imply {expected}"
            )
        if self.device != device:
            raise ValueError(f"{argument} is on {self.device} but q/k are on {device}")

    def check_masks(self, key_padding_mask: Tensor | None, causal: bool) -> None:
        """Raise ValueError if an edge reaches a padded key or, with ``causal``, a future key."""
        if self.num_edges == 0:
            return
        b_idx, _, i, j = self.edges()
        if key_padding_mask is not None and key_padding_mask[b_idx, j].any():
            raise ValueError("graph has edges to keys marked as padding in key_padding_mask")
        if causal and (j > i).any():
            raise ValueError("graph has edges to future keys (j > i) but causal=True")


#: The numba transpose places the edges of this many key columns at a time (its column cursors
#: then stay in the per-core cache), when the graph says where each row's key tiles start.
_TRANSPOSE_KEYS = 1 << 14


def _transpose(graph: Graph, tile_shift: int | None) -> TransposedGraph:
    if graph.num_edges and use_numba(graph.col_indices):
        like = graph.col_indices.numpy()
        return transpose_into(graph, tile_shift, np.empty_like(like), np.empty_like(like))
    b, h, n, m = graph.shape
    idt = graph.col_indices.dtype
    shift = 62 if tile_shift is None else tile_shift  # every query index >> 62 is 0: one tile
    rows = graph.row_indices().long()
    local = rows % max(n, 1)
    cols = (rows // max(n, 1)) * m + graph.col_indices.long()  # stacked column (b*H + h)*M + j
    key = (local >> shift) * (b * h * m) + cols  # tile-major: (query tile, column)
    perm = torch.argsort(key, stable=True)  # edges are in row order: rows stay ascending
    # scatter_add, not bincount: bincount reads the largest key back to the host (a sync on CUDA)
    buckets = (-(-n >> shift) if n else 1) * b * h * m
    counts = torch.zeros(buckets, dtype=torch.long, device=graph.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    ptr = torch.zeros(counts.numel() + 1, dtype=idt, device=graph.device)
    ptr[1:] = counts.cumsum(0)
    tpos = torch.empty_like(perm)
    tpos[perm] = torch.arange(perm.numel(), device=perm.device)
    return TransposedGraph(
        ptr, local[perm].to(idt), tpos.to(idt), perm.to(idt), tile_shift=tile_shift
    )


def transpose_into(
    graph: Graph,
    tile_shift: int | None,
    rows: np.ndarray,
    tpos: np.ndarray,
    positions: np.ndarray | None = None,
) -> TransposedGraph:
    """:meth:`Graph.transpose` by the numba kernel, its per-edge arrays written into ``rows`` and
    ``tpos`` (each ``(E,)`` of the graph's index dtype) and not cached: the numba backward keeps
    them in reused scratch memory (fresh arrays of 64 MiB each at N = 64k, 128 edges per query,
    were faulted in again at every step). A CPU graph with numba installed. With ``positions``,
    ``tpos`` is indexed by ``positions[e]`` instead of CSR position e (the numba kernels' own
    by-query order)."""
    from sbm_transformer.ops import _numba_kernels as nk

    b, h, n, m = graph.shape
    tile_shift = one_tile_as_none(tile_shift, n)
    shift = 62 if tile_shift is None else tile_shift  # every query index >> 62 is 0: one tile
    crow = graph.crow_indices.numpy()
    if graph.tile_shift is not None and graph.tile_pointers is not None:
        kptr, key_shift = graph.tile_pointers.numpy(), graph.tile_shift
    else:
        kptr, key_shift = np.stack([crow[:-1], crow[1:]]), 62  # one key tile
    ptr = nk.transpose(
        crow, graph.col_indices.numpy(), kptr, key_shift,
        max(1, _TRANSPOSE_KEYS >> key_shift), b * h, n, m, shift, rows, tpos,
        crow[:0] if positions is None else positions,
    )  # fmt: skip
    return TransposedGraph(
        torch.from_numpy(ptr), torch.from_numpy(rows), torch.from_numpy(tpos),
        tile_shift=tile_shift,
    )  # fmt: skip


def one_tile_as_none(tile_shift: int | None, num_queries: int) -> int | None:
    """``tile_shift``, or None (one tile) when its tiles are not smaller than ``num_queries``."""
    if tile_shift is not None and (tile_shift < 0 or (1 << tile_shift) >= num_queries):
        return None
    return tile_shift
