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
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        lo, hi = (float(v) for v in torch.aminmax(t.detach()))
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


def seeded_generator(seed: Tensor, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with the value of the one-element tensor ``seed``."""
    return torch.Generator(device).manual_seed(int(seed.item()))


def random_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A one-element int64 tensor of random bits from ``generator`` (the default generator of
    ``device`` when None); compiled code draws it outside the graph when a generator is given
    (dynamo does not take generators)."""
    if generator is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return _seed_from_generator(generator)


@torch.compiler.disable
def _seed_from_generator(generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator).to(
        generator.device
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
    check_sbm_values(Y=Y, Z=Z, B=B)
    bsz, heads, n, _ = Y.shape
    m = Z.shape[2]
    if max_edges is not None:
        expected = float(
            expected_num_edges(
                Y, Z, B, exploration=exploration, key_padding_mask=key_padding_mask, causal=causal
            ).sum()
        )
        if expected > max_edges:
            raise ValueError(
                f"expected number of edges {expected:.4g} exceeds max_edges={max_edges} "
                f"(B={bsz}, H={heads}, N={n}, M={m}); lower the density or raise max_edges"
            )
    work = torch.promote_types(Y.dtype, torch.float32)  # bf16/fp16 -> fp32
    Yw, Zw, Bw = Y.to(work), _masked_keys(Z, key_padding_mask).to(work), Bx.to(work)
    if bsz * heads * n * m == 0:
        crow = torch.zeros(bsz * heads * n + 1, dtype=torch.int32, device=Y.device)
        return Graph(crow, crow.new_zeros(0), (bsz, heads, n, m))
    if distribution == "bernoulli":
        return _sample_bernoulli(Yw, Zw, Bw, exploration, key_padding_mask, causal, generator)
    return _sample_poisson(Yw, Zw, Bw, exploration, key_padding_mask, causal, generator)


def _sample_poisson(
    Yw: Tensor,
    Zw: Tensor,
    Bw: Tensor,
    exploration: float,
    key_padding_mask: Tensor | None,
    causal: bool,
    generator: torch.Generator | None,
) -> Graph:
    """The fastRG graph of checked inputs (Z already zero on padded keys, B expanded)."""
    bsz, heads, n, _ = Yw.shape
    m = Zw.shape[2]
    visible = _visible_counts(key_padding_mask, causal, bsz, n, m, Yw.device)
    valid = _valid_keys(key_padding_mask, bsz, m, Yw.device)
    if use_numba(Yw):
        crow, col, ptr = _sample_numba(Yw, Zw, Bw, exploration, causal, visible, valid, generator)
        return Graph(crow, col, (bsz, heads, n, m), tile_shift=TILE_SHIFT, tile_pointers=ptr)
    crow, col = _sample_torch(Yw, Zw, Bw, exploration, causal, visible, valid, generator)
    return Graph(crow, col, (bsz, heads, n, m), tile_shift=0)  # torch.unique sorts


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


def _categorical(weights: Tensor, rows: Tensor, generator: torch.Generator | None) -> Tensor:
    """For each entry of ``rows``, draw a column of ``weights`` (T, L) with probability ∝ the row.

    One vectorised binary search over all rows: row ``t``'s normalised CDF is shifted by ``t``
    so the concatenation is monotone (float64 keeps the resolution for T * L up to ~1e12).
    """
    t, length = weights.shape
    cdf = weights.double().cumsum(1)
    total = cdf[:, -1:]
    cdf = torch.where(total > 0, cdf / total, torch.ones_like(cdf))
    cdf += torch.arange(t, device=weights.device, dtype=torch.float64).unsqueeze(1)
    u = torch.rand(rows.shape, generator=generator, device=weights.device, dtype=torch.float64)
    target = rows.double() + u * (1.0 - 1e-12)
    idx = torch.searchsorted(cdf.reshape(-1), target, right=True)
    return torch.minimum(idx - rows * length, torch.full_like(idx, length - 1))


def _sample_torch(
    Y: Tensor,
    Z: Tensor,
    Bx: Tensor,
    eps: float,
    causal: bool,
    visible: Tensor,
    valid: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Device-generic sampler from torch ops (used on GPUs and on CPUs without numba)."""
    if causal:
        return _sample_torch_causal(Y, Z, Bx, eps, visible, valid, _seed_from(generator, Y.device))
    bsz, heads, n, k = Y.shape
    m = Z.shape[2]
    p = bsz * heads
    dev = Y.device
    Yf, Zf, Bf = Y.reshape(p, n, k), Z.reshape(p, m, k), Bx.reshape(p, k, k)
    # fastRG: Poisson edge count per block pair (a, b), then query ~ Y[:, a], key ~ Z[:, b].
    rates = Yf.sum(1).unsqueeze(2) * Bf * Zf.sum(1).unsqueeze(1)  # (P, K, K)
    counts = torch.poisson(rates.double(), generator=generator).long().reshape(-1)
    block = torch.repeat_interleave(torch.arange(p * k * k, device=dev), counts)  # (E0,)
    pair, a, b = block // (k * k), (block // k) % k, block % k
    qi = _categorical(Yf.transpose(1, 2).reshape(p * k, n), pair * k + a, generator)
    kj = _categorical(Zf.transpose(1, 2).reshape(p * k, m), pair * k + b, generator)
    # Exploration layer: Poisson(eps * #visible pairs) uniform draws among the visible pairs.
    seq_total = visible.sum(1)  # (B,)
    n_er = torch.poisson(
        (eps * seq_total.double()).repeat_interleave(heads), generator=generator
    ).long()
    er_pair = torch.repeat_interleave(torch.arange(p, device=dev), n_er)
    er_seq = er_pair // heads
    u = torch.rand(er_pair.shape, generator=generator, device=dev, dtype=torch.float64)
    flat = torch.minimum((u * seq_total[er_seq].double()).long(), seq_total[er_seq] - 1)
    cum = visible.cumsum(1)  # (B, N), row i covers flat indices [cum[i] - visible[i], cum[i])
    big = int(seq_total.max().item()) + 1 if bsz else 1
    offs = torch.arange(bsz, device=dev).unsqueeze(1) * big
    er_i = (
        torch.searchsorted((cum + offs).reshape(-1), flat + er_seq * big, right=True) - er_seq * n
    )
    er_pos = flat - (cum[er_seq, er_i] - visible[er_seq, er_i])
    er_j = valid[er_seq, er_pos]
    # Collapse duplicates and sort by (pair, query, key).
    key = torch.cat([(pair * n + qi) * m + kj, (er_pair * n + er_i) * m + er_j])
    key = torch.unique(key)
    rows = key // m
    idt = index_dtype(key.numel(), p * max(n, m) + 1)
    crow = torch.zeros(p * n + 1, dtype=idt, device=dev)
    crow[1:] = torch.bincount(rows, minlength=p * n).cumsum(0)
    return crow, (key % m).to(idt)


# ------------------------------------------------------------------- strictly causal (torch)
# Causal rows must not depend on later tokens, not even through the random stream: with one
# shared generator, how many numbers earlier draws consume depends on every row's rates. So the
# causal torch sampler takes its random numbers from a counter-based generator: SplitMix64 of
# (seed, stream, element, draw), computed with int64 tensor arithmetic (which wraps modulo 2^64).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _srl(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: Tensor) -> Tensor:
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def _counter_uniform(seed: int, stream: int, *counters: Tensor) -> Tensor:
    """float64 uniforms in [0, 1), a pure function of (seed, stream, counters...)."""
    h = _mix64(torch.full_like(counters[0], (seed ^ (stream * 0x632BE59BD9B4E019)) & (2**63 - 1)))
    for c in counters:
        h = _mix64(h ^ (c * _GOLDEN))
    return _srl(h, 11).double() * (1.0 / 9007199254740992.0)


def _counter_poisson(rates: Tensor, seed: int, stream: int) -> Tensor:
    """Exact Poisson draws (int64, like ``rates``) from counter-based uniforms per element.

    Inversion for rates < 10 (one uniform), PTRS (Hoermann 1993) otherwise, vectorised over the
    elements still drawing.
    """
    flat = rates.reshape(-1).double()
    index = torch.arange(flat.numel(), device=flat.device)
    out = torch.zeros_like(index)
    small = (flat > 0) & (flat < 10)
    if small.any():
        lam, ids = flat[small], index[small]
        u = _counter_uniform(seed, stream, ids, torch.zeros_like(ids))
        p = torch.exp(-lam)
        cdf = p.clone()
        k = torch.zeros_like(ids)
        active = u > cdf
        while active.any():
            k = k + active
            p = torch.where(active, p * lam / k.clamp_min(1), p)
            cdf = torch.where(active, cdf + p, cdf)
            active = active & (u > cdf) & (p > 0)
        out[small] = k
    large = flat >= 10
    if large.any():
        lam, ids = flat[large], index[large]
        result = torch.full_like(ids, -1)
        slam, loglam = lam.sqrt(), lam.log()
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        vr = 0.9277 - 3.6224 / (b - 2.0)
        attempt = 0
        todo = torch.ones_like(ids, dtype=torch.bool)
        while todo.any():
            att = torch.full_like(ids, 2 * attempt + 1)
            uu = _counter_uniform(seed, stream, ids, att) - 0.5
            v = _counter_uniform(seed, stream, ids, att + 1)
            us = 0.5 - uu.abs()
            kk = torch.floor((2 * a / us + b) * uu + lam + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            bad = (kk < 0) | ((us < 0.013) & (v > us))
            lhs = torch.log(v) + torch.log(invalpha) - torch.log(a / (us * us) + b)
            rhs = -lam + kk * loglam - torch.lgamma(kk.clamp_min(0) + 1.0)
            accept = todo & (quick | (~bad & (lhs <= rhs)))
            result = torch.where(accept, kk.long(), result)
            todo = todo & ~accept
            attempt += 1
        out[large] = result
    return out.reshape(rates.shape)


def _sample_torch_causal(
    Y: Tensor, Z: Tensor, Bx: Tensor, eps: float, visible: Tensor, valid: Tensor, seed: int
) -> tuple[Tensor, Tensor]:
    """Causal sampling: row i draws Poisson(u_ib * sum_{j<=i} Z_jb) keys of cluster b from its
    prefix by inverse CDF, and Poisson(eps * visible_i) uniform visible keys; all random numbers
    are keyed by (row, component, draw), so row i depends on tokens j <= i only."""
    bsz, heads, n, k = Y.shape
    p = bsz * heads
    dev = Y.device
    u = Y.reshape(p, n, k).double() @ Bx.reshape(p, k, k).double()  # (P, N, K)
    zcum = Z.reshape(p, n, k).double().cumsum(1)  # (P, N, K): prefix mass of each cluster
    seq = torch.arange(p, device=dev) // heads
    rates = torch.cat(
        [u * zcum, (eps * visible[seq].double()).unsqueeze(-1)], dim=-1
    )  # (P, N, K+1)
    counts = _counter_poisson(rates, seed, 1).reshape(-1)
    element = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts)
    starts = torch.cumsum(counts, 0) - counts
    draw = torch.arange(element.numel(), device=dev) - starts[element]
    x = _counter_uniform(seed, 2, element, draw)
    kk = k + 1
    pair, rest = element // (n * kk), element % (n * kk)
    qi, comp = rest // kk, rest % kk
    key = torch.empty_like(qi)
    sbm = comp < k
    if sbm.any():
        ps, qs, bs = pair[sbm], qi[sbm], comp[sbm]
        target = x[sbm] * zcum[ps, qs, bs]
        cdf = zcum.permute(0, 2, 1).reshape(p * k, n)  # (P*K, N) cumulative weights per cluster
        big = float(cdf[:, -1].max()) + 1.0 if cdf.numel() else 1.0
        row = ps * k + bs
        shifted = (
            cdf + torch.arange(p * k, device=dev, dtype=torch.float64).unsqueeze(1) * big
        ).reshape(-1)
        pos = torch.searchsorted(shifted, row.double() * big + target, right=True) - row * n
        key[sbm] = torch.minimum(pos, qs)  # rounding can only push past i; never beyond the row
    er = ~sbm
    if er.any():
        vis = visible[seq[pair[er]], qi[er]]
        slot = torch.minimum((x[er] * vis.double()).long(), vis - 1)
        key[er] = valid[seq[pair[er]], slot]
    flat_key = torch.unique((pair * n + qi) * n + key)
    rows = flat_key // n
    idt = index_dtype(flat_key.numel(), p * n + 1)
    crow = torch.zeros(p * n + 1, dtype=idt, device=dev)
    crow[1:] = torch.bincount(rows, minlength=p * n).cumsum(0)
    return crow, (flat_key % n).to(idt)


# --------------------------------------------------------------------- Bernoulli by thinning
#: Rows whose bound on ``lambda_ij + eps`` reaches this are drawn pair by pair (O(M K) each);
#: the others are thinned from Poisson proposals at most ``-log(1 - T) / T`` = 2.56 times
#: denser than the result.
BERNOULLI_DENSE_ROW = 0.9

#: Edges (or dense-row entries) handled per chunk when computing ``lambda`` on them.
_CHUNK_ELEMENTS = 1 << 16


def _edge_rates(u: Tensor, Z: Tensor, pair: Tensor, row: Tensor, key: Tensor) -> Tensor:
    """``lambda_e = u[pair, row] . Z[pair, key]`` for each edge, float64, in O(E K) by chunks."""
    out = torch.empty(row.numel(), dtype=torch.float64, device=u.device)
    k = u.shape[-1]
    step = max(1, (_CHUNK_ELEMENTS * 16) // max(k, 1))
    for first in range(0, row.numel(), step):
        s = slice(first, first + step)
        out[s] = (u[pair[s], row[s]].double() * Z[pair[s], key[s]].double()).sum(-1)
    return out


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
    """
    bsz, heads, n, k = Y.shape
    m = Z.shape[2]
    p = bsz * heads
    dev = Y.device
    u = (Y.reshape(p, n, k) @ Bx.reshape(p, k, k)).reshape(bsz, heads, n, k)  # (B, H, N, K)
    if causal:
        zmax = Z.cummax(2).values  # (B, H, N, K) prefix maxima
        bound = (u * zmax).sum(-1)
    else:
        bound = (u @ Z.amax(2).unsqueeze(-1)).squeeze(-1)  # (B, H, N)
    # >= max_j lambda_ij + eps: a margin above the rounding of K-term float32 sums
    bound = bound.double() * (1.0 + 1e-4) + eps
    dense = bound >= BERNOULLI_DENSE_ROW
    x = bound.clamp(min=1e-12, max=BERNOULLI_DENSE_ROW)
    c = torch.where(dense, 0.0, (-torch.log1p(-x) / x).clamp(min=1.0))  # (B, H, N)
    c_top = -math.log1p(-BERNOULLI_DENSE_ROW) / BERNOULLI_DENSE_ROW
    proposal = _sample_poisson(
        Y * c.unsqueeze(-1).to(Y.dtype), Z, Bx, c_top * eps if eps > 0 else 0.0,
        key_padding_mask, causal, generator,
    )  # fmt: skip
    seed = _seed_from(generator, dev)
    crow, col = proposal.crow_indices, proposal.col_indices
    up, zp, cp = u.reshape(p, n, k), Z.reshape(p, m, k), c.reshape(p * n)
    if use_numba(Y):
        from sbm_transformer import _numba_sampler

        crow_np, col_np = _numba_sampler.thin_csr(
            seed, crow.numpy(), col.numpy(), up.reshape(p * n, k).contiguous().numpy(),
            zp.reshape(p * m, k).contiguous().numpy(), cp.numpy(),
            dense.reshape(-1).numpy(), n, m, float(eps), c_top,
        )  # fmt: skip
        crow, col = torch.from_numpy(crow_np), torch.from_numpy(col_np)
    else:
        rows = torch.repeat_interleave(torch.arange(p * n, device=dev), crow[1:] - crow[:-1])
        pair, qi, key = rows // n, rows % n, col.long()
        lam = _edge_rates(up, zp, pair, qi, key)
        q = -torch.expm1(-(cp[rows] * lam + c_top * eps))
        uniform = _counter_uniform(seed, 3, pair, qi, key)
        keep = (uniform * q < lam + eps) & ~dense.reshape(-1)[rows]
        crow = torch.zeros_like(crow)
        crow[1:] = torch.bincount(rows[keep], minlength=p * n).cumsum(0)
        col = col[keep]
    dense_rows = dense.reshape(-1).nonzero().squeeze(1)
    if dense_rows.numel():  # merged in: every edge of these rows comes from here
        d_rows, d_col = _dense_rows_bernoulli(
            up, zp, dense_rows, n, m, eps, key_padding_mask, causal, heads, seed
        )
        rows = torch.repeat_interleave(torch.arange(p * n, device=dev), crow[1:] - crow[:-1])
        rows = torch.cat([rows, d_rows])
        col = torch.cat([col, d_col.to(col.dtype)])
        order = torch.argsort(rows, stable=True)  # keeps each row's keys in their order
        col = col[order]
        crow = torch.zeros_like(crow)
        crow[1:] = torch.bincount(rows, minlength=p * n).cumsum(0)
    return Graph(crow, col, (bsz, heads, n, m), tile_shift=proposal.tile_shift)


def _dense_rows_bernoulli(
    u: Tensor,
    Z: Tensor,
    rows: Tensor,
    n: int,
    m: int,
    eps: float,
    key_padding_mask: Tensor | None,
    causal: bool,
    heads: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Global rows and keys of the edges of ``rows`` (global row ids), each pair drawn once."""
    out_rows, out_cols = [], []
    step = max(1, _CHUNK_ELEMENTS * 16 // max(m * u.shape[-1], 1))
    keys = torch.arange(m, device=u.device)
    for first in range(0, rows.numel(), step):
        r = rows[first : first + step]
        pair, qi = r // n, r % n
        lam = torch.einsum("rk,rmk->rm", u[pair, qi].double(), Z[pair].double())  # (R, M)
        prob = (lam + eps).clamp(max=1.0)
        if key_padding_mask is not None:
            prob = prob.masked_fill(key_padding_mask[pair // heads], 0.0)
        if causal:
            prob = prob.masked_fill(keys.unsqueeze(0) > qi.unsqueeze(1), 0.0)
        uni = _counter_uniform(
            seed, 3, pair.unsqueeze(1).expand_as(prob), qi.unsqueeze(1).expand_as(prob),
            keys.unsqueeze(0).expand_as(prob),
        )  # fmt: skip
        hit = (uni < prob).nonzero()
        out_rows.append(r[hit[:, 0]])
        out_cols.append(hit[:, 1])
    return torch.cat(out_rows), torch.cat(out_cols)
