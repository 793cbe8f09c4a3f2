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

import torch
from torch import Tensor

from sbm_transformer._numba import sync_threads, use_numba
from sbm_transformer.graph import Graph, index_dtype

__all__ = [
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
) -> Tensor:
    """The exact probability that :func:`sample_graph` makes each edge, ``(B, H, N, M)`` (dense).

    ``1 - exp(-(lambda_ij + exploration))`` for visible pairs and 0 for padded keys or, with
    ``causal``, future keys. Arguments as in :func:`sample_graph`.
    """
    _check_sbm_inputs(Y, Z, B, exploration, key_padding_mask, causal)
    lam = expected_adjacency(Y, Z, B)
    prob = -torch.expm1(-(lam + exploration))
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
) -> Graph:
    """Sample one bipartite query-key graph per (batch, head) from a mixed-membership SBM.

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

    Returns:
        A :class:`Graph`; each edge is present independently with :func:`edge_probability`.
    """
    Bx = _check_sbm_inputs(Y, Z, B, exploration, key_padding_mask, causal)
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
    visible = _visible_counts(key_padding_mask, causal, bsz, n, m, Y.device)
    valid = _valid_keys(key_padding_mask, bsz, m, Y.device)
    if bsz * heads * n * m == 0:
        crow = torch.zeros(bsz * heads * n + 1, dtype=torch.int32, device=Y.device)
        return Graph(crow, crow.new_zeros(0), (bsz, heads, n, m))
    if use_numba(Y):
        crow, col = _sample_numba(Yw, Zw, Bw, exploration, causal, visible, valid, generator)
    else:
        crow, col = _sample_torch(Yw, Zw, Bw, exploration, causal, visible, valid, generator)
    return Graph(crow, col, (bsz, heads, n, m))


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
) -> tuple[Tensor, Tensor]:
    from sbm_transformer import _numba_sampler

    bsz, heads, n, k = Y.shape
    m = Z.shape[2]
    p = bsz * heads
    seed = _seed_from(generator, Y.device)
    u = torch.bmm(Y.reshape(p, n, k), Bx.reshape(p, k, k))  # (P, N, K): u_ib = sum_a Y_ia B_ab
    zt = Z.reshape(p, m, k).transpose(1, 2).contiguous()  # (P, K, M)
    sync_threads()
    crow, col = _numba_sampler.sample_csr(
        seed,
        u.numpy(),
        zt.numpy(),
        valid.numpy(),
        visible.numpy(),
        float(eps),
        bool(causal),
        heads,
    )
    return torch.from_numpy(crow), torch.from_numpy(col)


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
    if causal:  # thinning a Poisson process by a fixed indicator keeps it Poisson on j <= i
        keep = kj <= qi
        pair, qi, kj = pair[keep], qi[keep], kj[keep]
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
