"""Mixed-membership SBM edge probabilities and the fastRG graph sampler.

For one head with memberships ``Y`` (N, K) of the queries, ``Z`` (M, K) of the keys and block
matrix ``B`` (K, K), the expected adjacency is ``lambda = Y B Z^T``. The sampler draws the fastRG
multigraph of Rohe, Tao and Yu (2018): the number of times the ordered pair (i, j) is drawn is
Poisson(lambda_ij), independently over pairs; an exploration layer adds Poisson(eps) draws on
every pair a query may see (the paper's and original code's floor, eps = 0.01, sampled in
O(its edges)). Duplicates collapse to one edge, so edges are independent and

    P(edge i -> j) = 1 - exp(-(lambda_ij + eps))     for visible pairs, 0 otherwise,

(:func:`edge_probability`), which is ``lambda + eps`` up to a relative error of about
``(lambda + eps) / 2``. A pair is visible when its key is not padding and, if ``causal``, j <= i.
Cost: O(E + (N + M) K + K^2) per head, no Python loop over batch, heads or clusters.

Reference: Cho et al., "Transformers meet Stochastic Block Models: Attention with Data-Adaptive
Sparsity and Cost", NeurIPS 2022, arXiv:2210.15541.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from sbm_transformer._numba import sync_threads, use_numba
from sbm_transformer.graph import TILE_SHIFT, Graph, index_dtype

__all__ = [
    "DISTRIBUTIONS",
    "block_matrix",
    "edge_probability",
    "expected_adjacency",
    "expected_num_edges",
    "sample_graph",
]


def block_matrix(clusters: Tensor) -> Tensor:
    """Block matrix of the SBM from cluster embeddings: softmax over all K*K entries of C C^T.

    Args:
        clusters: ``(H, K, D)`` cluster embeddings.

    Returns:
        ``(H, K, K)`` non-negative, each head's entries sum to 1.
    """
    h, k, _ = clusters.shape
    logits = clusters @ clusters.transpose(-1, -2)  # (H, K, K)
    return torch.softmax(logits.reshape(h, k * k), dim=-1).reshape(h, k, k)


#: Edge distributions of :func:`sample_graph`: ``"poisson"``, the paper's fastRG graph
#: (P = 1 - exp(-(rate + eps))), and ``"bernoulli"``, the released code's (P = min(1, rate + eps)).
DISTRIBUTIONS = ("poisson", "bernoulli")


def check_distribution(distribution: str) -> None:
    """Raise unless ``distribution`` is one of :data:`DISTRIBUTIONS`."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


def edge_probability_of_rate(rate: Tensor | float, distribution: str = "poisson") -> Tensor:
    """The edge probability of a pair whose total rate (``lambda + eps``) is ``rate``."""
    check_distribution(distribution)
    r = torch.as_tensor(rate)
    return -torch.expm1(-r) if distribution == "poisson" else r.clamp(max=1.0)


def rate_for_probability(probability: float, distribution: str = "poisson") -> float:
    """The total rate (``lambda + eps``) that gives an edge this probability (in [0, 1))."""
    check_distribution(distribution)
    return -math.log1p(-probability) if distribution == "poisson" else float(probability)


# ----------------------------------------------------------------------------- input checks
def _check_sbm_inputs(
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    exploration: float,
    key_padding_mask: Tensor | None,
    causal: bool,
) -> Tensor:
    """Validate the SBM inputs; return B expanded to (batch, H, K, K)."""
    for name, t in (("Y", Y), ("Z", Z), ("B", B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if Y.dim() != 4:
        raise ValueError(f"Y must have shape (B, H, N, K), got {tuple(Y.shape)}")
    bsz, heads, _, k = Y.shape
    if Z.dim() != 4 or Z.shape[0] != bsz or Z.shape[1] != heads or Z.shape[3] != k:
        raise ValueError(
            f"Z must have shape (B={bsz}, H={heads}, M, K={k}) to match Y {tuple(Y.shape)}, "
            f"got {tuple(Z.shape)}"
        )
    if B.dim() == 3:
        if tuple(B.shape) != (heads, k, k):
            raise ValueError(f"B must have shape (H={heads}, K={k}, K={k}), got {tuple(B.shape)}")
        B = B.unsqueeze(0).expand(bsz, heads, k, k)
    elif B.dim() == 4:
        if tuple(B.shape) != (bsz, heads, k, k):
            raise ValueError(
                f"B must have shape (H={heads}, K={k}, K={k}) or (B={bsz}, H={heads}, K, K), "
                f"got {tuple(B.shape)}"
            )
    else:
        raise ValueError(f"B must have shape (H, K, K) or (B, H, K, K), got {tuple(B.shape)}")
    if Z.device != Y.device or B.device != Y.device:
        raise ValueError(
            f"Y, Z and B must be on one device, got {Y.device}, {Z.device}, {B.device}"
        )
    check_exploration(exploration)
    check_key_padding_mask(key_padding_mask, bsz, Z.shape[2], Y.device)
    if causal and Y.shape[2] != Z.shape[2]:
        raise ValueError(
            f"causal=True needs as many queries as keys, got N={Y.shape[2]} and M={Z.shape[2]}"
        )
    return B


#: What each SBM input is, for error messages.
_SBM_TENSORS = {"Y": "query memberships", "Z": "key memberships", "B": "block matrix"}


def check_sbm_values(**tensors: Tensor) -> None:
    """Raise ValueError naming the tensor unless every entry is finite and >= 0.

    A NaN or infinite rate would make the sampler draw without bound (a hang); a negative one
    has no meaning. One min/max pass per tensor (NaN propagates through both).
    """
    values = _value_ranges(tensors).tolist()  # one host read for all the tensors
    _raise_on_bad_values(list(tensors), values)


def _value_ranges(tensors: dict[str, Tensor]) -> Tensor:
    """float64 ``(2 * len(tensors),)``: each tensor's minimum and maximum (0, 0 when empty),
    computed on the tensors' device without a host read."""
    parts = []
    for t in tensors.values():
        if t.numel() == 0:
            parts.append(torch.zeros(2, dtype=torch.float64, device=t.device))
        else:
            parts.append(torch.stack(torch.aminmax(t.detach())).double())
    return torch.cat(parts)


def _raise_on_bad_values(names: list[str], values: list[float]) -> None:
    """Raise for the first tensor whose (min, max) in ``values`` is NaN, inf or negative."""
    for index, name in enumerate(names):
        lo, hi = values[2 * index], values[2 * index + 1]
        what = f"{name} ({_SBM_TENSORS.get(name, name)})"
        if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or math.isinf(hi):
            kind = "NaN" if math.isnan(lo) or math.isnan(hi) else "inf"
            raise ValueError(
                f"{what} contains {kind}: cannot sample a graph from it (NaN or inf in the "
                "attention's inputs or parameters reach the memberships)"
            )
        if lo < 0:
            raise ValueError(f"{what} has negative entries (min {lo:.4g}); rates must be >= 0")


def check_exploration(exploration: float) -> None:
    """Raise unless ``exploration`` is a finite number >= 0."""
    if isinstance(exploration, bool) or not isinstance(exploration, (int, float)):
        raise TypeError(f"exploration must be a float, got {type(exploration).__name__}")
    if not math.isfinite(exploration) or exploration < 0:
        raise ValueError(f"exploration must be finite and >= 0, got {exploration}")


def check_key_padding_mask(
    mask: Tensor | None, batch_size: int, num_keys: int, device: torch.device
) -> None:
    """Raise unless ``mask`` is None or a bool tensor (batch_size, num_keys) on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = padding), got dtype {mask.dtype}"
        )
    if tuple(mask.shape) != (batch_size, num_keys):
        raise ValueError(
            f"key_padding_mask must have shape (B={batch_size}, M={num_keys}), "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but the inputs are on {device}")


# ------------------------------------------------------------------------- dense quantities
def _visible(
    key_padding_mask: Tensor | None, causal: bool, n: int, m: int, device: torch.device
) -> Tensor:
    """Bool (B or 1, 1, N, M): which (query, key) pairs may be edges."""
    vis = torch.ones(1, 1, n, m, dtype=torch.bool, device=device)
    if causal:
        vis = vis & torch.ones(n, m, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        vis = vis & ~key_padding_mask[:, None, None, :]
    return vis


def expected_adjacency(Y: Tensor, Z: Tensor, B: Tensor) -> Tensor:
    """Dense ``lambda = Y B Z^T`` ``(B, H, N, M)`` in O(N M K): for tests, plots, dense backend."""
    Bx = _check_sbm_inputs(Y, Z, B, 0.0, None, False)
    return Y @ Bx @ Z.transpose(-1, -2)


def edge_probability(
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    *,
    exploration: float = 0.0,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    distribution: str = "poisson",
) -> Tensor:
    """The exact probability that :func:`sample_graph` makes each edge, ``(B, H, N, M)`` (dense).

    ``1 - exp(-(lambda_ij + exploration))`` (``"poisson"``) or ``min(1, lambda_ij + exploration)``
    (``"bernoulli"``) for visible pairs, and 0 for padded keys or, with ``causal``, future keys.
    Arguments as in :func:`sample_graph`.
    """
    _check_sbm_inputs(Y, Z, B, exploration, key_padding_mask, causal)
    check_distribution(distribution)
    lam = expected_adjacency(Y, Z, B)
    prob = edge_probability_of_rate(lam + exploration, distribution)
    vis = _visible(key_padding_mask, causal, Y.shape[2], Z.shape[2], Y.device)
    return prob * vis


def expected_num_edges(
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    *,
    exploration: float = 0.0,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Expected number of edge draws per (batch, head), ``(B, H)``, without any N x M tensor.

    This is the sum of ``lambda_ij + exploration`` over visible pairs: the mean size of the fastRG
    multigraph before duplicates collapse, an upper bound on the expected edge count that is
    tight when edges are sparse. Cost O((N + M) K + K^2), or O(N K) when causal.
    """
    Bx = _check_sbm_inputs(Y, Z, B, exploration, key_padding_mask, causal)
    with torch.no_grad():
        Zm = _masked_keys(Z, key_padding_mask)
        visible = _visible_counts(
            key_padding_mask, causal, Y.shape[0], Y.shape[2], Z.shape[2], Y.device
        )
        if causal:
            u = Y @ Bx  # (B, H, N, K)
            lam = (u * Zm.cumsum(2)).sum(-1).sum(-1)
        else:
            lam = ((Y.sum(2).unsqueeze(-2) @ Bx).squeeze(-2) * Zm.sum(2)).sum(-1)
        return lam + exploration * visible.sum(-1).to(lam.dtype).unsqueeze(1)


def _masked_keys(Z: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    if key_padding_mask is None:
        return Z
    return Z.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def _visible_counts(
    key_padding_mask: Tensor | None, causal: bool, bsz: int, n: int, m: int, device: torch.device
) -> Tensor:
    """int64 (B, N): how many keys each query may see."""
    valid = (
        torch.ones(bsz, m, dtype=torch.long, device=device)
        if key_padding_mask is None
        else (~key_padding_mask).long()
    )
    if causal:
        return valid.cumsum(1)  # N == M
    return valid.sum(1, keepdim=True).expand(bsz, n).contiguous()


def _valid_keys(key_padding_mask: Tensor | None, bsz: int, m: int, device: torch.device) -> Tensor:
    """int64 (B, M): indices of each sequence's non-padded keys first, ascending."""
    ar = torch.arange(m, device=device)
    if key_padding_mask is None:
        return ar.expand(bsz, m).contiguous()
    order = torch.argsort(key_padding_mask.to(torch.uint8), dim=1, stable=True)
    return order


# ---------------------------------------------------------------------------------- sampler
@torch.no_grad()
def sample_graph(
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    *,
    exploration: float = 0.0,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    generator: torch.Generator | None = None,
    max_edges: int | None = None,
    distribution: str = "poisson",
) -> Graph:
    """Sample one bipartite query-key graph per (batch, head) from a mixed-membership SBM.

    With ``distribution="bernoulli"`` each visible pair is an edge with probability exactly
    ``min(1, lambda_ij + eps)`` (the released code's distribution), sampled by thinning Poisson
    proposals; see :func:`_sample_bernoulli` for how and what it costs.

    Args:
        Y: ``(B, H, N, K)`` query memberships, values >= 0 (sigmoid outputs in the model).
        Z: ``(B, H, M, K)`` key memberships, values >= 0.
        B: ``(H, K, K)`` or ``(B, H, K, K)`` block matrix, values >= 0 (entries sum to at most 1
            in the model).
        exploration: rate ``eps`` of the uniform exploration layer on every visible pair.
        key_padding_mask: ``(B, M)`` bool, True marks padding keys, which get no edge.
        causal: only pairs with ``j <= i`` (requires N == M).
        generator: torch.Generator for reproducible graphs (same seed, same graph on the same
            device and sampler implementation).
        max_edges: raise before allocating if the expected number of edges exceeds this.
        distribution: ``"poisson"`` or ``"bernoulli"`` (:data:`DISTRIBUTIONS`).

    Returns:
        A :class:`Graph`; each edge is present independently with :func:`edge_probability`.
    """
    _check_sbm_inputs(Y, Z, B, exploration, key_padding_mask, causal)
    check_distribution(distribution)
    # one seed drawn from `generator`, then a generator of its own: compiled and eager calls
    # then draw the same graph from the same generator state
    seed = random_seed(generator, Y.device)
    if torch.compiler.is_compiling():  # one opaque custom op (see ops.library)
        from sbm_transformer.ops.library import sample_graph_op

        return sample_graph_op(
            Y, Z, B, exploration=exploration, key_padding_mask=key_padding_mask, causal=causal,
            seed=seed, max_edges=max_edges, distribution=distribution,
        )  # fmt: skip
    return sample_graph_eager(
        Y, Z, B, exploration=exploration, key_padding_mask=key_padding_mask, causal=causal,
        generator=seeded_generator(seed, Y.device), max_edges=max_edges,
        distribution=distribution,
    )  # fmt: skip


class _SeedGenerator(torch.Generator):
    """What :func:`seeded_generator` returns: a generator that keeps its seed as a tensor.

    The torch sampler takes its random numbers from the seed tensor itself, so a seed on the
    GPU is never read by the host; the numba sampler seeds the generator from the tensor's value
    when it first needs it (:func:`_seeded`).
    """

    seed_tensor: Tensor
    is_seeded: bool  # manual_seed called with the seed's value
    seed_used: bool  # the seed tensor went to one torch sampler call (a second one draws anew)


def seeded_generator(seed: Tensor, device: torch.device) -> torch.Generator:
    """A generator on ``device`` for :func:`sample_graph_eager`, seeded with the value of the
    one-element tensor ``seed`` (read lazily: the torch sampler uses the tensor without reading
    it, see :class:`_SeedGenerator`)."""
    generator = _SeedGenerator(device)
    generator.seed_tensor = seed
    generator.is_seeded = generator.seed_used = False
    return generator


def _seeded(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator``, seeded now if it is a :func:`seeded_generator` not seeded yet."""
    if isinstance(generator, _SeedGenerator) and not generator.is_seeded:
        generator.manual_seed(int(generator.seed_tensor.item()))
        generator.is_seeded = True
    return generator


def random_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A one-element int64 tensor of random bits from ``generator`` (the default generator of
    ``device`` when None); compiled code draws it outside the graph when a generator is given
    (dynamo does not take generators)."""
    if generator is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return _seed_from_generator(generator)


@torch.compiler.disable
def _seed_from_generator(generator: torch.Generator) -> Tensor:
    # drawn on the generator's own device (a CUDA generator cannot draw CPU numbers)
    return torch.randint(
        0, 2**62, (1,), dtype=torch.int64, generator=generator, device=generator.device
    )


def sample_graph_eager(
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    *,
    exploration: float = 0.0,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    generator: torch.Generator | None = None,
    max_edges: int | None = None,
    distribution: str = "poisson",
) -> Graph:
    """:func:`sample_graph` outside ``torch.compile`` (and inside its custom op)."""
    Bx = _check_sbm_inputs(Y, Z, B, exploration, key_padding_mask, causal)
    check_distribution(distribution)
    if not use_numba(Y):  # the device-generic sampler: two host reads per call
        if isinstance(generator, _SeedGenerator) and not (
            generator.is_seeded or generator.seed_used
        ):
            seed, generator.seed_used = generator.seed_tensor, True
        else:
            seed = random_seed(_seeded(generator), Y.device)
        return _sample_torch(
            Y, Z, B, Bx, exploration, key_padding_mask, causal, seed, max_edges, distribution
        )
    generator = _seeded(generator)
    check_sbm_values(Y=Y, Z=Z, B=B)
    bsz, heads, n, _ = Y.shape
    m = Z.shape[2]
    if max_edges is not None:
        expected = float(
            expected_num_edges(
                Y, Z, B, exploration=exploration, key_padding_mask=key_padding_mask, causal=causal
            ).sum()
        )
        _check_max_edges(expected, max_edges, Y.shape, m)
    work = torch.promote_types(Y.dtype, torch.float32)  # bf16/fp16 -> fp32
    Yw, Zw, Bw = Y.to(work), _masked_keys(Z, key_padding_mask).to(work), Bx.to(work)
    if bsz * heads * n * m == 0:
        return _empty_graph(Y.shape, m, Y.device)
    if distribution == "bernoulli":
        return _sample_bernoulli(Yw, Zw, Bw, exploration, key_padding_mask, causal, generator)
    return _sample_poisson(Yw, Zw, Bw, exploration, key_padding_mask, causal, generator)


def _check_max_edges(expected: float, max_edges: int, shape: torch.Size, m: int) -> None:
    if expected > max_edges:
        bsz, heads, n, _ = shape
        raise ValueError(
            f"expected number of edges {expected:.4g} exceeds max_edges={max_edges} "
            f"(B={bsz}, H={heads}, N={n}, M={m}); lower the density or raise max_edges"
        )


def _empty_graph(shape: torch.Size, m: int, device: torch.device) -> Graph:
    bsz, heads, n, _ = shape
    crow = torch.zeros(bsz * heads * n + 1, dtype=torch.int32, device=device)
    return Graph(crow, crow.new_zeros(0), (bsz, heads, n, m))


def _sample_poisson(
    Yw: Tensor,
    Zw: Tensor,
    Bw: Tensor,
    exploration: float,
    key_padding_mask: Tensor | None,
    causal: bool,
    generator: torch.Generator | None,
) -> Graph:
    """The fastRG graph of checked inputs by the numba sampler (Z already zero on padded keys,
    B expanded)."""
    bsz, heads, n, _ = Yw.shape
    m = Zw.shape[2]
    visible = _visible_counts(key_padding_mask, causal, bsz, n, m, Yw.device)
    valid = _valid_keys(key_padding_mask, bsz, m, Yw.device)
    crow, col, ptr = _sample_numba(Yw, Zw, Bw, exploration, causal, visible, valid, generator)
    return Graph(crow, col, (bsz, heads, n, m), tile_shift=TILE_SHIFT, tile_pointers=ptr)


def _seed_from(generator: torch.Generator | None, device: torch.device) -> int:
    gen_device = generator.device if generator is not None else device
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=gen_device).item())


def _sample_numba(
    Y: Tensor,
    Z: Tensor,
    Bx: Tensor,
    eps: float,
    causal: bool,
    visible: Tensor,
    valid: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """CSR pointers, keys, and the key-tile pointers (see :class:`Graph`) of a sampled graph."""
    from sbm_transformer import _numba_sampler

    bsz, heads, n, k = Y.shape
    m = Z.shape[2]
    p = bsz * heads
    seed = _seed_from(generator, Y.device)
    y = Y.reshape(p, n, k).contiguous()
    bmat = Bx.reshape(p, k, k).contiguous()
    z = Z.reshape(p, m, k).contiguous()

    def query_rates() -> np.ndarray:  # (P, N, K): u_ib = sum_a Y_ia B_ab, when needed
        with torch.autocast("cpu", enabled=False):  # in the memberships' dtype, as numpy takes
            return torch.bmm(y, bmat).numpy()

    sync_threads()
    crow, col, ptr = _numba_sampler.sample_csr(
        seed,
        y.numpy(),
        bmat.numpy(),
        query_rates,
        z.numpy(),
        valid.numpy(),
        visible.numpy(),
        float(eps),
        bool(causal),
        heads,
    )
    tiles = None if ptr is None else torch.from_numpy(ptr)
    return torch.from_numpy(crow), torch.from_numpy(col), tiles


# ------------------------------------------------------------ counter-based random numbers
# The torch sampler's random numbers are SplitMix64 hashes of (seed, stream, element, draw),
# computed with int64 tensor arithmetic (which wraps modulo 2^64): a draw depends on its own
# counters only, so causal rows depend on earlier tokens only, and the seed can stay on the GPU
# (a 0-dim tensor in the arithmetic, never read by the host).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_STREAM = 0x632BE59BD9B4E019


def _int64(x: int) -> int:
    """``x`` modulo 2^64 as a signed int64 value."""
    x &= 2**64 - 1
    return x - 2**64 if x >= 2**63 else x


def _srl(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: Tensor) -> Tensor:
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def _element_keys(seed: Tensor, stream: int, index: Tensor) -> Tensor:
    """A 64-bit key per element of ``index``, a pure function of (seed, stream, index)."""
    base = _mix64(seed ^ _int64((stream + 1) * _STREAM))
    return _mix64(base ^ (index * _GOLDEN))


def _uniform(keys: Tensor, draw: Tensor | int) -> Tensor:
    """float64 uniforms in (0, 1), the ``draw``-th of each key's stream (SplitMix64 of
    ``key + draw * golden``); broadcasts ``keys`` against ``draw``."""
    step = draw * _GOLDEN if isinstance(draw, Tensor) else _int64(draw * _GOLDEN)
    return (_srl(_mix64(keys + step), 11).double() + 0.5) * (1.0 / 9007199254740992.0)


def _seed_on(seed: Tensor, device: torch.device) -> tuple[Tensor, int | None]:
    """The seed as a 0-dim int64 tensor usable in ops on ``device``, and its value when the host
    has it without a device sync (a CPU seed for GPU inputs: a CPU scalar in the arithmetic)."""
    s = seed.reshape(()).to(torch.int64)
    if s.device == device:
        return s, None
    if s.device.type == "cpu":
        value = int(s)
        return torch.tensor(value), value
    return s.to(device), None


# ------------------------------------------------------------------- exact Poisson, no syncs
#: Rates below this are drawn by inversion (bisection over [0, 64) on the exact CDF, which
#: ``torch.special.gammaincc`` gives to ~1e-15 there), the others by PTRS (Hoermann 1993).
_SMALL_RATE = 10.0
_SMALL_STEPS = 6  # P(X >= 2^6 = 64) < 4e-30 for a rate below 10
#: PTRS tries per element, all drawn at once: each is accepted with probability >= 0.75, so all
#: are rejected with probability < 4e-15 (0.165^24 < 2e-19 from rate 50 on); the rare element
#: that runs out is redrawn by :func:`_poisson_redraw`, with host syncs.
_PTRS_TRIES = 24
#: Element-tries per chunk of the PTRS pass (bounds its temporaries).
_PTRS_CHUNK = 1 << 21


def _ptrs(lam: Tensor, uu: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """One PTRS try per element (rates ``lam`` >= 10): whether it is accepted, and its value."""
    slam, loglam = lam.sqrt(), lam.log()
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    uu = uu - 0.5
    us = 0.5 - uu.abs()
    kk = torch.floor((2 * a / us + b) * uu + lam + 0.43)
    quick = (us >= 0.07) & (v <= vr)
    bad = (kk < 0) | ((us < 0.013) & (v > us))
    lhs = torch.log(v) + torch.log(invalpha) - torch.log(a / (us * us) + b)
    rhs = -lam + kk * loglam - torch.lgamma(kk.clamp_min(0) + 1.0)
    return quick | (~bad & (lhs <= rhs)), kk


def _poisson(rates: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Exact Poisson draws, int64 like ``rates`` (float64), from each element's key stream
    (draw 0 for inversion, draws 1.. for PTRS), in a fixed number of passes: no host sync.
    Also returns which elements ran out of PTRS tries (bool; see :data:`_PTRS_TRIES`)."""
    lam, keys = rates.reshape(-1), keys.reshape(-1)
    small = lam < _SMALL_RATE
    ls = torch.where(small, lam, 0.0)  # NaN (reported by the caller) -> 0
    u = _uniform(keys, 0)
    lo = torch.zeros_like(lam)
    hi = torch.full_like(lam, float(2**_SMALL_STEPS - 1))
    for _ in range(_SMALL_STEPS):  # smallest k in [lo, hi] with P(X <= k) >= u
        mid = torch.floor((lo + hi) * 0.5)
        enough = torch.special.gammaincc(mid + 1.0, ls) >= u
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1.0)
    large = lam >= _SMALL_RATE
    ll = torch.where(large, lam, _SMALL_RATE)
    value = torch.empty_like(lam)
    failed = torch.empty_like(large)
    tries = torch.arange(1, 2 * _PTRS_TRIES + 1, device=lam.device)
    step = max(1, _PTRS_CHUNK // _PTRS_TRIES)
    for first in range(0, lam.numel(), step):
        s = slice(first, first + step)
        uv = _uniform(keys[s].unsqueeze(1), tries)
        accept, kk = _ptrs(ll[s].unsqueeze(1), uv[:, 0::2], uv[:, 1::2])
        pick = accept.to(torch.uint8).argmax(1, keepdim=True)  # the first accepted try
        value[s] = kk.gather(1, pick).squeeze(1)
        failed[s] = ~accept.any(1)
    counts = torch.where(large, value, lo).long()
    return counts.reshape(rates.shape), (large & failed).reshape(rates.shape)


def _poisson_redraw(rates: Tensor, keys: Tensor, counts: Tensor, failed: Tensor) -> Tensor:
    """Finish the elements that ran out of PTRS tries, one more try at a time (a host sync per
    try; reached with probability < 4e-15 per element)."""
    lam, keys = rates.reshape(-1), keys.reshape(-1)
    counts, todo = counts.reshape(-1).clone(), failed.reshape(-1).clone()
    ll = torch.where(todo, lam, _SMALL_RATE)
    attempt = _PTRS_TRIES
    while bool(todo.any()):
        uu, v = _uniform(keys, 2 * attempt + 1), _uniform(keys, 2 * attempt + 2)
        accept, kk = _ptrs(ll, uu, v)
        accept = accept & todo
        counts = torch.where(accept, kk.long(), counts)
        todo = todo & ~accept
        attempt += 1
    return counts.reshape(rates.shape)


# ------------------------------------------------------------ the torch sampler (any device)
def _categorical(weights: Tensor, rows: Tensor, u: Tensor) -> Tensor:
    """For each entry of ``rows``, the column of ``weights`` (T, L) that the uniform ``u`` picks
    with probability proportional to the row.

    One vectorised binary search over all rows: row ``t``'s normalised CDF is shifted by ``t``
    so the concatenation is monotone (float64 keeps the resolution for T * L up to ~1e12).
    Each row is normalised by its own total only (a causal row's search depends on its row).
    """
    t, length = weights.shape
    cdf = weights.double().cumsum(1)
    total = cdf[:, -1:]
    cdf = torch.where(total > 0, cdf / total, torch.ones_like(cdf))
    cdf += torch.arange(t, device=weights.device, dtype=torch.float64).unsqueeze(1)
    target = rows.double() + u * (1.0 - 1e-12)
    idx = torch.searchsorted(cdf.reshape(-1), target, right=True)
    return torch.minimum(idx - rows * length, torch.full_like(idx, length - 1))


#: Rows of the float-bits search table per block (a block's row index and the kept bits of a
#: float64 share one int64 key: 2^20 rows keep 32 bits of mantissa).
_SEARCH_ROWS = 1 << 20


def _prefix_search(cols: Tensor, rows: Tensor, target: Tensor, last: Tensor) -> Tensor:
    """For each draw, the first index ``j <= last`` with ``cols[row, j] > target`` (``cols``
    (T, L) non-negative and non-decreasing along L, ``target < cols[row, last]``), by one
    ``searchsorted`` over int64 keys ``(row, float64 bits of the value)``.

    Non-negative float64 values order like their bit patterns, and each key depends on its own
    value only (no normalisation by a total that later tokens change): a causal row's key is a
    function of its prefix. The low mantissa bits that the row index displaces (32 of 52 kept
    with 2^20 rows) only round the CDF; rounding can push the result past ``last``, never
    beyond the row, hence the clamp.
    """
    t, length = cols.shape
    out = torch.empty_like(rows)
    cols = cols + 0.0  # -0.0 -> +0.0: its sign bit would order it first
    target = target + 0.0
    for first in range(0, t, _SEARCH_ROWS):  # one block unless T > 2^20
        block = cols[first : first + _SEARCH_ROWS]
        shift = max(1, (block.shape[0] - 1).bit_length())
        keep = 63 - shift
        ids = torch.arange(block.shape[0], device=cols.device).unsqueeze(1)
        table = (block.view(torch.int64) >> shift) + (ids << keep)
        local = (rows - first).clamp(0, block.shape[0] - 1)
        key = (target.view(torch.int64) >> shift) + (local << keep)
        pos = torch.searchsorted(table.reshape(-1), key, right=True) - local * length
        inside = (rows >= first) & (rows < first + block.shape[0])
        out = torch.where(inside, torch.minimum(pos, last), out)
    return out


def _compact(values: Tensor, mask: Tensor, count: int, out: Tensor | None = None) -> Tensor:
    """The ``count`` entries of ``values`` where ``mask`` holds, in order, without a host sync
    (``count`` is known): a scatter to their ranks, the others to a spare slot."""
    rank = mask.cumsum(0) - 1
    if out is None:
        out = values.new_empty(count + 1)
    out.scatter_(0, torch.where(mask, rank, count), values)
    return out[:count]


def _host_read(*parts: Tensor) -> list[int]:
    """The int64 entries of ``parts`` on the host: one device-to-host copy, which is one host
    synchronisation on a GPU. The torch sampler makes two per call (sizes of the draws and of
    the graph) and reads nothing else."""
    return torch.cat([t.reshape(-1) for t in parts]).tolist()


def _float_bits(t: Tensor) -> Tensor:
    return t.double().reshape(-1).view(torch.int64)


def _bits_float(v: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", v))[0])


def _sample_torch(
    Y: Tensor,
    Z: Tensor,
    B: Tensor,
    Bx: Tensor,
    eps: float,
    key_padding_mask: Tensor | None,
    causal: bool,
    seed: Tensor,
    max_edges: int | None,
    distribution: str,
) -> Graph:
    """The device-generic sampler (GPUs, and CPUs without numba): vectorised torch ops, no
    Python loop over batch, heads or clusters, and two host reads per call.

    1. On the device: the value checks, the expected edge count (with ``max_edges``), and the
       Poisson number of draws of each (batch, head) pair (of each query row when causal).
    2. First read: those checks, the total number of draws (and for Bernoulli the rows drawn
       pair by pair). It sizes the draws' arrays.
    3. The draws (component, query, key), sorted by (row, key): duplicates are adjacent.
    4. Second read: the number of distinct edges (kept ones, for Bernoulli). It sizes the CSR.
    """
    bsz, heads, n, _ = Y.shape
    m = Z.shape[2]
    p = bsz * heads
    dev = Y.device
    seed0, seed_value = _seed_on(seed, dev)
    checks = [_float_bits(_value_ranges({"Y": Y, "Z": Z, "B": B}))]
    if max_edges is not None:
        expected = expected_num_edges(
            Y, Z, B, exploration=eps, key_padding_mask=key_padding_mask, causal=causal
        ).sum()
        checks.append(_float_bits(expected))

    def check(values: list[int]) -> None:
        _raise_on_bad_values(["Y", "Z", "B"], [_bits_float(v) for v in values[:6]])
        if max_edges is not None:
            _check_max_edges(_bits_float(values[6]), max_edges, Y.shape, m)

    if p * n * m == 0:
        check(_host_read(*checks))
        return _empty_graph(Y.shape, m, dev)
    work = torch.promote_types(Y.dtype, torch.float32)  # bf16/fp16 -> fp32
    Yw, Zw, Bw = Y.to(work), _masked_keys(Z, key_padding_mask).to(work), Bx.to(work)
    visible = _visible_counts(key_padding_mask, causal, bsz, n, m, dev)  # (B, N)
    valid = _valid_keys(key_padding_mask, bsz, m, dev)  # (B, M)
    bern = _BernoulliRows(Yw, Zw, Bw, eps, causal) if distribution == "bernoulli" else None
    Yp = Yw if bern is None else Yw * bern.c.unsqueeze(-1).to(work)
    eps_p = eps if bern is None else (bern.c_top * eps if eps > 0 else 0.0)
    fastrg = _FastRG(Yp, Zw, Bw, eps_p, causal, visible, valid, seed0)
    sizes = [fastrg.counts.sum().reshape(1), fastrg.failed.sum().reshape(1)]
    if bern is not None:
        per_pair = bern.dense.reshape(p, n).sum(1)
        sizes += [per_pair.sum().reshape(1), per_pair.max().reshape(1)]
    if seed_value is None and not causal:
        sizes.append(seed0.reshape(1))
    values = _host_read(*checks, *sizes)  # first host read: checks and sizes of the draws
    check(values)
    values = values[6 + (max_edges is not None) :]  # the sizes
    draws, failed = values[0], values[1]
    if failed:  # never seen: every PTRS try of some element rejected
        fastrg.redraw()
        draws = _host_read(fastrg.counts.sum().reshape(1))[0]
    if seed_value is None and not causal:
        seed_value = values[-1]
    flat = torch.sort(fastrg.draw(draws, seed_value)).values  # (row * M + key), sorted
    first = torch.ones_like(flat, dtype=torch.bool)
    first[1:] = flat[1:] != flat[:-1]
    if bern is None:
        edges = _host_read(first.sum().reshape(1))[0]  # second host read: the graph's size
        flat = _compact(flat, first, edges)
    else:
        dense_rows, max_rows = values[2], values[3]
        flat = bern.thin(flat, first, Yw.shape, Zw, key_padding_mask, seed0, dense_rows, max_rows)
    idt = index_dtype(flat.numel(), p * max(n, m) + 1)
    row = flat // m
    crow = torch.searchsorted(row, torch.arange(p * n + 1, device=dev)).to(idt)
    col = (flat - row * m).to(idt)
    return Graph(crow, col, (bsz, heads, n, m), tile_shift=0)  # keys sorted


class _FastRG:
    """The fastRG draws of the torch sampler, in two steps around the host read that sizes them.

    Not causal: the Poisson number of draws of each (batch, head) pair, over its K*K block pairs
    and the exploration layer (one more component); each draw picks a component, then its query
    from ``Y[:, a]`` and its key from ``Z[:, b]`` (or a uniform visible pair), by inverse-CDF
    searches. Causal: the same per query row, with the components ``(Y B)_ib * sum_{j<=i} Z_jb``
    and keys drawn from the row's prefix; every random number is keyed by (row, draw).
    """

    def __init__(
        self,
        Y: Tensor,
        Z: Tensor,
        Bx: Tensor,
        eps: float,
        causal: bool,
        visible: Tensor,
        valid: Tensor,
        seed: Tensor,
    ) -> None:
        bsz, heads, n, k = Y.shape
        m = Z.shape[2]
        p = bsz * heads
        dev = Y.device
        self.shape, self.causal, self.valid, self.visible, self.seed = (
            (bsz, heads, n, m, k), causal, valid, visible, seed
        )  # fmt: skip
        self.Y, self.Z = Y.reshape(p, n, k), Z.reshape(p, m, k)
        Bf = Bx.reshape(p, k, k).double()
        if causal:
            u = torch.bmm(self.Y.double(), Bf)  # (P, N, K)
            self.zcum = self.Z.double().cumsum(1)  # (P, N, K): each cluster's prefix mass
            seq_visible = visible.double().unsqueeze(1).expand(bsz, heads, n).reshape(p, n, 1)
            comp = torch.cat([u * self.zcum, eps * seq_visible], dim=-1)  # (P, N, K + 1)
            self.components = comp.reshape(p * n, k + 1)
            elements = torch.arange(p * n, device=dev)
        else:
            ysum, zsum = self.Y.double().sum(1), self.Z.double().sum(1)  # (P, K)
            block = ysum.unsqueeze(2) * Bf * zsum.unsqueeze(1)  # (P, K, K)
            pairs_visible = visible[:, 0].double().unsqueeze(1).expand(bsz, heads).reshape(p, 1)
            self.components = torch.cat([block.reshape(p, k * k), eps * n * pairs_visible], 1)
            elements = torch.arange(p, device=dev)
        self.rates = self.components.sum(1)
        self.keys = _element_keys(seed, 1, elements)
        self.counts, self.failed = _poisson(self.rates, self.keys)

    def redraw(self) -> None:
        self.counts = _poisson_redraw(self.rates, self.keys, self.counts, self.failed)

    def draw(self, total: int, seed_value: int | None) -> Tensor:
        """``(row * M + key)`` of every draw, ``row = (b * H + h) * N + i``: int64 ``(total,)``."""
        bsz, heads, n, m, k = self.shape
        p = bsz * heads
        dev = self.Y.device
        owner = torch.repeat_interleave(
            torch.arange(self.counts.numel(), device=dev), self.counts, output_size=total
        )
        if self.causal:
            start = self.counts.cumsum(0) - self.counts
            draw = torch.arange(total, device=dev) - start[owner]
            keys = _element_keys(self.seed, 2, torch.arange(p * n, device=dev))[owner]
            x_comp, x_key = _uniform(keys, 2 * draw), _uniform(keys, 2 * draw + 1)
            comp = _categorical(self.components, owner, x_comp)
            pair, qi = owner // n, owner % n
            cluster = comp.clamp(max=k - 1)
            cols = self.zcum.permute(0, 2, 1).reshape(p * k, n)  # (P*K, N) prefix masses
            target = x_key * self.zcum[pair, qi, cluster]
            key = _prefix_search(cols, pair * k + cluster, target, qi)
            seq = pair // heads
            vis = self.visible[seq, qi]
            slot = torch.minimum((x_key * vis).long(), (vis - 1).clamp(min=0))
            key = torch.where(comp < k, key, self.valid[seq, slot])
            return owner * n + key
        assert seed_value is not None
        gen = torch.Generator(dev).manual_seed(seed_value)
        x = torch.rand(3, total, generator=gen, device=dev, dtype=torch.float64)
        pair = owner
        comp = _categorical(self.components, pair, x[0])
        block = comp.clamp(max=k * k - 1)
        a, b = block // k, block % k
        qi = _categorical(self.Y.transpose(1, 2).reshape(p * k, n), pair * k + a, x[1])
        kj = _categorical(self.Z.transpose(1, 2).reshape(p * k, m), pair * k + b, x[2])
        # exploration: a uniform query and a uniform valid key of the pair's sequence
        seq = pair // heads
        count = self.visible[seq, 0]
        ei = torch.minimum((x[1] * n).long(), torch.full_like(pair, n - 1))
        slot = torch.minimum((x[2] * count).long(), (count - 1).clamp(min=0))
        explore = comp == k * k
        qi = torch.where(explore, ei, qi)
        kj = torch.where(explore, self.valid[seq, slot], kj)
        return (pair * n + qi) * m + kj


# --------------------------------------------------------------------- Bernoulli by thinning
#: Rows whose bound on ``lambda_ij + eps`` reaches this are drawn pair by pair (O(M K) each);
#: the others are thinned from Poisson proposals at most ``-log(1 - T) / T`` = 2.56 times
#: denser than the result.
BERNOULLI_DENSE_ROW = 0.9

#: Edges (or dense-row entries) handled per chunk when computing ``lambda`` on them.
_CHUNK_ELEMENTS = 1 << 16


def _edge_rates(u: Tensor, Z: Tensor, row: Tensor, key: Tensor) -> Tensor:
    """``lambda_e = u[row] . Z[key]`` for each edge (``u`` (R, K), ``Z`` (C, K) flat), float64,
    in O(E K) by chunks."""
    out = torch.empty(row.numel(), dtype=torch.float64, device=u.device)
    k = u.shape[-1]
    step = max(1, (_CHUNK_ELEMENTS * 16) // max(k, 1))
    for first in range(0, row.numel(), step):
        s = slice(first, first + step)
        out[s] = (u[row[s]].double() * Z[key[s]].double()).sum(-1)
    return out


class _BernoulliRows:
    """Per query row: the bound ``x_i >= max_j lambda_ij + eps``, whether the row is drawn pair by
    pair (``dense``), and the proposal factor ``c_i`` (see :func:`_sample_bernoulli`)."""

    def __init__(self, Y: Tensor, Z: Tensor, Bx: Tensor, eps: float, causal: bool) -> None:
        bsz, heads, n, k = Y.shape
        p = bsz * heads
        self.u = (Y.reshape(p, n, k) @ Bx.reshape(p, k, k)).reshape(bsz, heads, n, k)
        if causal:
            zmax = Z.cummax(2).values  # (B, H, N, K) prefix maxima
            bound = (self.u * zmax).sum(-1)
        else:
            bound = (self.u @ Z.amax(2).unsqueeze(-1)).squeeze(-1)  # (B, H, N)
        # >= max_j lambda_ij + eps: a margin above the rounding of K-term float32 sums
        bound = bound.double() * (1.0 + 1e-4) + eps
        self.dense = bound >= BERNOULLI_DENSE_ROW
        x = bound.clamp(min=1e-12, max=BERNOULLI_DENSE_ROW)
        self.c = torch.where(self.dense, 0.0, (-torch.log1p(-x) / x).clamp(min=1.0))
        self.c_top = -math.log1p(-BERNOULLI_DENSE_ROW) / BERNOULLI_DENSE_ROW
        self.eps, self.causal = eps, causal

    def thin(
        self,
        flat: Tensor,
        first: Tensor,
        shape: torch.Size,
        Z: Tensor,
        key_padding_mask: Tensor | None,
        seed: Tensor,
        dense_rows: int,
        max_rows: int,
    ) -> Tensor:
        """The kept proposals (``flat``, sorted, ``first`` marking the first of equal ones) and the
        edges of the dense rows, as sorted ``row * M + key``; the second host read sizes them."""
        bsz, heads, n, k = shape
        m = Z.shape[2]
        p = bsz * heads
        dev = flat.device
        u, zf = self.u.reshape(p * n, k), Z.reshape(p * m, k)
        row = flat // m
        key = flat - row * m
        lam = _edge_rates(u, zf, row, (row // n) * m + key)
        q = -torch.expm1(-(self.c.reshape(-1)[row] * lam + self.c_top * self.eps))
        row_keys = _element_keys(seed, 3, torch.arange(p * n, device=dev))
        accept = _uniform(row_keys[row], key) * q < lam + self.eps
        keep = first & accept & ~self.dense.reshape(-1)[row]
        dense = self.dense.reshape(p, n)
        if dense_rows == 0:
            edges = _host_read(keep.sum().reshape(1))[0]  # second host read
            return _compact(flat, keep, edges)
        hits = torch.zeros((), dtype=torch.int64, device=dev)
        chunks = lambda: _dense_rows_bernoulli(  # noqa: E731 - run twice: count, then place
            self.u.reshape(p, n, k), Z.reshape(p, m, k), dense, max_rows, self.eps,
            key_padding_mask, self.causal, heads, row_keys,
        )  # fmt: skip
        for _, hit in chunks():
            hits = hits + hit.sum()
        kept, extra = _host_read(keep.sum().reshape(1), hits.reshape(1))  # second host read
        out = flat.new_empty(kept + extra + 1)
        _compact(flat, keep, kept + extra, out)  # kept proposals first ...
        offset = torch.full((), kept, dtype=torch.int64, device=dev)
        for rows, hit in chunks():  # ... then each chunk's dense-row edges after them
            mask = hit.reshape(-1)
            flat_hit = (rows.unsqueeze(-1) * m + torch.arange(m, device=dev)).reshape(-1)
            place = torch.where(mask, offset + mask.cumsum(0) - 1, kept + extra)
            out.scatter_(0, place, flat_hit)
            offset = offset + mask.sum()
        return torch.sort(out[: kept + extra]).values


def _sample_bernoulli(
    Y: Tensor,
    Z: Tensor,
    Bx: Tensor,
    eps: float,
    key_padding_mask: Tensor | None,
    causal: bool,
    generator: torch.Generator | None,
) -> Graph:
    """Each visible pair an edge with probability ``min(1, lambda_ij + eps)``, independently.

    Per row, ``x_i = max_j lambda_ij + eps`` is bounded from above by ``u_i . max_j Z_j``
    (``u = Y B``, the maximum per cluster over visible keys, a prefix maximum when causal).
    Rows with ``x_i < T`` (:data:`BERNOULLI_DENSE_ROW`) take Poisson proposals at rate
    ``c_i lambda_ij + c_T eps`` with ``c_i = -log(1 - x_i) / x_i``: since ``(1 - e^{-cx}) / x``
    falls with ``x``, every such pair is proposed with probability ``q_ij >= lambda_ij + eps``,
    and a proposal is kept with probability ``(lambda_ij + eps) / q_ij``. Rows at or above
    ``T`` are drawn pair by pair. Cost: the Poisson sampler's at most ``c_T`` = 2.56 times the
    result's edges, ``O(E K)`` for the rates of proposed edges, and ``O(M K)`` per dense row.
    All uniforms of the thinning and the dense rows are keyed by (pair, query, key), so a causal
    row depends on earlier tokens only, as in the Poisson sampler.

    This is the numba sampler's path (CPU); the torch sampler does the same in
    :meth:`_BernoulliRows.thin`.
    """
    bsz, heads, n, k = Y.shape
    m = Z.shape[2]
    p = bsz * heads
    rows_info = _BernoulliRows(Y, Z, Bx, eps, causal)
    dense, c = rows_info.dense, rows_info.c
    c_top = rows_info.c_top
    proposal = _sample_poisson(
        Y * c.unsqueeze(-1).to(Y.dtype), Z, Bx, c_top * eps if eps > 0 else 0.0,
        key_padding_mask, causal, generator,
    )  # fmt: skip
    seed = _seed_from(generator, Y.device)
    crow, col = proposal.crow_indices, proposal.col_indices
    up, zp, cp = rows_info.u.reshape(p, n, k), Z.reshape(p, m, k), c.reshape(p * n)
    from sbm_transformer import _numba_sampler

    crow_np, col_np = _numba_sampler.thin_csr(
        seed, crow.numpy(), col.numpy(), up.reshape(p * n, k).contiguous().numpy(),
        zp.reshape(p * m, k).contiguous().numpy(), cp.numpy(),
        dense.reshape(-1).numpy(), n, m, float(eps), c_top,
    )  # fmt: skip
    crow, col = torch.from_numpy(crow_np), torch.from_numpy(col_np)
    per_pair = dense.reshape(p, n).sum(1)
    if bool(per_pair.any()):  # merged in: every edge of these rows comes from here
        row_keys = _element_keys(torch.tensor(seed), 3, torch.arange(p * n))
        d_rows, d_col = [], []
        for rows, hit in _dense_rows_bernoulli(
            up, zp, dense.reshape(p, n), int(per_pair.max()), eps, key_padding_mask, causal,
            heads, row_keys,
        ):  # fmt: skip
            pair, slot, key = hit.nonzero(as_tuple=True)
            d_rows.append(rows[pair, slot])
            d_col.append(key)
        rows = torch.repeat_interleave(torch.arange(p * n), crow[1:] - crow[:-1])
        rows = torch.cat([rows, *d_rows])
        col = torch.cat([col, *(d.to(col.dtype) for d in d_col)])
        order = torch.argsort(rows, stable=True)  # keeps each row's keys in their order
        col = col[order]
        crow = torch.zeros_like(crow)
        crow[1:] = torch.bincount(rows, minlength=p * n).cumsum(0)
    return Graph(crow, col, (bsz, heads, n, m), tile_shift=proposal.tile_shift)


def _dense_rows_bernoulli(
    u: Tensor,
    Z: Tensor,
    dense: Tensor,
    max_rows: int,
    eps: float,
    key_padding_mask: Tensor | None,
    causal: bool,
    heads: int,
    row_keys: Tensor,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The rows drawn pair by pair, chunk by chunk: ``(rows, hits)``, ``rows`` (P, S) the global
    row ids of the next S dense rows of each (batch, head) pair (-1: none), ``hits`` (P, S, M)
    bool the edges drawn, each pair with probability ``min(1, lambda + eps)`` against the
    uniform keyed by (row, key) (``row_keys`` (P*N,)).

    ``u`` (P, N, K) = Y B, ``Z`` (P, M, K), ``dense`` (P, N) bool with at most ``max_rows`` rows
    per pair (the same chunks come out on every call: the torch sampler counts, then places).
    ``lambda`` comes from one batched product per chunk, ``(P, S, K) @ (P, K, M)``.
    """
    p, n, k = u.shape
    m = Z.shape[1]
    dev = u.device
    rank = dense.long().cumsum(1) - 1
    dest = torch.where(
        dense, torch.arange(p, device=dev).unsqueeze(1) * max_rows + rank, p * max_rows
    )
    slots = torch.full((p * max_rows + 1,), -1, dtype=torch.int64, device=dev)
    slots.scatter_(0, dest.reshape(-1), torch.arange(p * n, device=dev))
    slots = slots[:-1].reshape(p, max_rows)
    zt = Z.double().transpose(1, 2)  # (P, K, M)
    uf = u.reshape(p * n, k)
    keys = torch.arange(m, device=dev)
    pad = None
    if key_padding_mask is not None:
        bsz = key_padding_mask.shape[0]
        pad = key_padding_mask.unsqueeze(1).expand(bsz, heads, m).reshape(p, 1, m)
    step = max(1, _CHUNK_ELEMENTS * 64 // max(p * m, 1))
    for first in range(0, max_rows, step):
        rows = slots[:, first : first + step]  # (P, S)
        safe = rows.clamp(min=0)
        lam = torch.bmm(uf[safe].double(), zt)  # (P, S, M)
        prob = (lam + eps).clamp(max=1.0)
        hit = _uniform(row_keys[safe].unsqueeze(-1), keys) < prob
        hit &= (rows >= 0).unsqueeze(-1)
        if pad is not None:
            hit &= ~pad
        if causal:
            hit &= keys <= (safe % n).unsqueeze(-1)
        yield rows, hit
