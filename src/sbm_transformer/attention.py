"""SBMAttention: a batch-first multi-head attention module with SBM-sampled sparse attention.

Drop-in for ``nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`` (self- and
cross-attention, ``key_padding_mask`` with True = padding), except that it returns
``(output, SBMStats)``: add ``w * stats.density.mean()`` to the loss to train heads sparser.

Reference: Cho et al., "Transformers meet Stochastic Block Models: Attention with Data-Adaptive
Sparsity and Cost", NeurIPS 2022, arXiv:2210.15541.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sbm_transformer._numba import recycled_empty
from sbm_transformer.functional import BACKENDS, SBMStats, attend
from sbm_transformer.graph import Graph
from sbm_transformer.ops.memberships import MembershipInputs
from sbm_transformer.sampling import (
    block_matrix,
    check_distribution,
    check_exploration,
    edge_probability_of_rate,
    rate_for_probability,
)

__all__ = ["DEFAULT_RATE_SCALE", "SBM_FORMS", "SBMAttention"]

#: Initial rate scale of :class:`SBMAttention`: a dense start (see its ``rate_scale``).
DEFAULT_RATE_SCALE = 16.0

#: Named forms of the SBM head (``model.sbm`` in a run configuration): the settings of
#: :class:`SBMAttention` each implies. ``"default"``: this package's (a learned rate scale from a
#: dense start, Poisson edges); ``"paper"``: the paper's model (fastRG Poisson edges, no scale);
#: ``"original"``: the released code's (Bernoulli(min(1, lambda + eps)) edges, no scale).
SBM_FORMS: dict[str, dict[str, object]] = {
    "default": {"distribution": "poisson", "rate_scale": DEFAULT_RATE_SCALE},
    "paper": {"distribution": "poisson", "rate_scale": None},
    "original": {"distribution": "bernoulli", "rate_scale": None},
}


class SBMAttention(nn.Module):
    """Multi-head attention where each head samples its own sparse query-key graph.

    Every head h owns ``num_clusters`` cluster embeddings ``C_h`` (K, D) (Kaiming-normal init);
    a node MLP ``Linear(D, D) -> ReLU -> Linear(D, D)`` is shared by all heads. For projected
    queries q and keys k of a head: memberships ``Y = sigmoid(MLP(q) C_h^T)``,
    ``Z = sigmoid(MLP(k) C_h^T)``, block matrix ``B_h = softmax(C_h C_h^T)`` over all K*K
    entries, a learned rate scale ``s_h``, and a graph is sampled with edge probability
    ``1 - exp(-(s_h Y_i B_h Z_j^T + eps))`` (or ``min(1, s_h Y_i B_h Z_j^T + eps)`` with
    ``distribution="bernoulli"``; :func:`~sbm_transformer.sampling.sample_graph`); attention runs
    along its edges only.

    Args:
        embed_dim: model dimension E (= num_heads * head dimension).
        num_heads: number of heads H; must divide ``embed_dim``.
        num_clusters: clusters K per head (the paper's LRA runs use 128).
        dropout: attention dropout on the normalised edge weights (training only).
        exploration: rate ``eps`` of the uniform exploration layer (paper: 0.01). It adds about
            ``eps * M`` edges per query, a quadratic floor: use 0 or a tiny value for long inputs.
        causal: queries attend only to keys at positions ``<=`` their own (self-attention).
        backend: ``"auto"``, ``"dense"``, ``"sparse"``, ``"sparse-torch"``, ``"sparse-numba"``
            or ``"sparse-triton"`` (see :data:`~sbm_transformer.functional.BACKENDS`).
        bias: add biases to the input and output projections.
        kdim, vdim: feature sizes of key and value inputs (default ``embed_dim``).
        distribution: ``"poisson"`` (the paper's fastRG graph: P = 1 - exp(-(rate + eps))) or
            ``"bernoulli"`` (the released code's: P = min(1, rate + eps)); see
            :func:`~sbm_transformer.sampling.sample_graph`.
        rate_scale: initial value of a learnable per-head factor ``s_h > 0`` on the SBM rate,
            ``rate_ij = s_h * Y_i B_h Z_j^T`` (log-parameterised: ``s_h = exp(log_rate_scale_h)``).
            With B summing to 1 and memberships in (0, 1), ``Y_i B Z_j^T < 1``: without a scale
            no edge is ever sure. ``None``: no scale (the paper's and released code's model).
            The default starts dense (about 1 - exp(-4) ~ 98 % at initialisation, memberships
            sitting near 1/2) so that a head can find the edges that matter and then prune; on
            long sequences use ``init_density`` instead (a dense start is quadratic work).
        init_density: start near this expected edge density instead: the initial scale is set
            so that the rate ``s_h / 4`` (memberships near 1/2 at initialisation) gives this
            density. For ``e`` edges per query on sequences of length ``L``, pass ``e / L``.
            Must exceed the exploration floor.
        max_edges: raise before sampling when the expected edge count of a call exceeds this.
        device, dtype: factory arguments for the parameters.

    Shapes:
        query ``(B, N, E)``, key ``(B, M, kdim)``, value ``(B, M, vdim)``,
        key_padding_mask ``(B, M)`` bool; output ``(B, N, E)``.

    Examples:
        >>> import torch
        >>> attn = SBMAttention(embed_dim=64, num_heads=2, num_clusters=16)
        >>> x = torch.randn(3, 100, 64)
        >>> out, stats = attn(x)
        >>> out.shape, stats.density.shape
        (torch.Size([3, 100, 64]), torch.Size([2]))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_clusters: int = 128,
        *,
        dropout: float = 0.0,
        exploration: float = 0.01,
        causal: bool = False,
        backend: str = "auto",
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        distribution: str = "poisson",
        rate_scale: float | None = DEFAULT_RATE_SCALE,
        init_density: float | None = None,
        max_edges: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_clusters", num_clusters),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_exploration(exploration)
        check_distribution(distribution)
        if rate_scale is not None and not (math.isfinite(rate_scale) and rate_scale > 0):
            raise ValueError(f"rate_scale must be a finite number > 0 or None, got {rate_scale}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        factory: dict = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_clusters = num_clusters
        self.dropout = dropout
        self.exploration = float(exploration)
        self.causal = causal
        self.backend = backend
        self.max_edges = max_edges
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        d = self.head_dim
        self.clusters = nn.Parameter(torch.empty(num_heads, num_clusters, d, **factory))
        self.node_mlp = nn.Sequential(
            nn.Linear(d, d, **factory), nn.ReLU(), nn.Linear(d, d, **factory)
        )
        self.distribution = distribution
        self.rate_scale = rate_scale
        self.init_density = init_density
        if init_density is not None:
            self._initial_scale(init_density)  # fail early on a bad value
        self.log_rate_scale: nn.Parameter | None = None
        if rate_scale is not None or init_density is not None:
            self.log_rate_scale = nn.Parameter(torch.empty(num_heads, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the original code: Kaiming-normal clusters, default Linear init."""
        nn.init.kaiming_normal_(self.clusters)
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            layer.reset_parameters()
        for module in self.node_mlp:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        if self.log_rate_scale is not None:
            scale = (
                self._initial_scale(self.init_density)
                if self.init_density is not None
                else self.rate_scale
            )
            assert scale is not None
            with torch.no_grad():
                self.log_rate_scale.fill_(math.log(scale))

    def _initial_scale(self, density: float) -> float:
        """The scale whose initial expected density is ``density`` (memberships near 1/2)."""
        return initial_rate_scale(density, self.distribution, self.exploration)

    def extra_repr(self) -> str:
        parts = [
            f"embed_dim={self.embed_dim}",
            f"num_heads={self.num_heads}",
            f"num_clusters={self.num_clusters}",
            f"exploration={self.exploration}",
            f"dropout={self.dropout}",
            f"causal={self.causal}",
            f"backend={self.backend!r}",
        ]
        if self.distribution != "poisson":
            parts.append(f"distribution={self.distribution!r}")
        if self.init_density is not None:
            parts.append(f"init_density={self.init_density}")
        elif self.rate_scale != DEFAULT_RATE_SCALE:
            parts.append(f"rate_scale={self.rate_scale}")
        return ", ".join(parts)

    def block_matrix(self) -> Tensor:
        """Block matrices ``(H, K, K)`` times the rate scale ``s_h`` of each head (when it has one):
        the kernels see the scaled matrix, so sampling and the estimator need nothing more."""
        blocks = block_matrix(self.clusters)
        if self.log_rate_scale is not None:
            blocks = blocks * self.log_rate_scale.exp()[:, None, None]
        return blocks

    def memberships(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Memberships ``Y`` (B, H, N, K) of queries ``q`` (B, H, N, D) and ``Z`` of keys ``k``."""
        centers = self.clusters.transpose(-1, -2)  # (H, D, K)
        # In place: the product is not needed for backward, and (B, H, N, K) is the largest
        # tensor of the layer (K > D): one copy fewer of it in memory.
        Y = torch.sigmoid_(self.node_mlp(q) @ centers)
        Z = torch.sigmoid_(self.node_mlp(k) @ centers)
        return Y, Z

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        graph: Graph | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, SBMStats]:
        """The attention core on projected heads: memberships, graph, attention.

        Args:
            q: ``(B, H, N, D)``; k: ``(B, H, M, D)``; v: ``(B, H, M, Dv)``.
            key_padding_mask, graph, generator: as in :meth:`forward`.

        Returns:
            ``(out (B, H, N, Dv), SBMStats)``. Same values and gradients as
            :func:`~sbm_transformer.functional.sbm_attention` with :meth:`memberships`; the
            sparse backend takes the memberships' gradients straight to the node features and
            the clusters (no (B, H, L, K) gradient tensors).
        """
        fq, fk = self.node_mlp(q), self.node_mlp(k)
        with torch.no_grad():
            centers = self.clusters.transpose(-1, -2)
            Y, Z = _sigmoid_product(fq, centers), _sigmoid_product(fk, centers)
        return attend(
            q, k, v, Y, Z, self.block_matrix(),
            graph=graph, key_padding_mask=key_padding_mask, exploration=self.exploration,
            causal=self.causal, dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend, generator=generator, max_edges=self.max_edges,
            distribution=self.distribution, inputs=MembershipInputs(fq, fk, self.clusters),
        )  # fmt: skip

    def _split_heads(self, x: Tensor) -> Tensor:
        b, length, _ = x.shape
        return x.reshape(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        for name, t, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(
                    f"{name} must have shape (batch, length, {width}) (batch first), "
                    f"got {tuple(t.shape)}"
                )
        if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
            raise ValueError(
                f"query, key and value must share the batch size, got {query.shape[0]}, "
                f"{key.shape[0]}, {value.shape[0]}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(
                f"key and value must have the same length, got {key.shape[1]} and {value.shape[1]}"
            )

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        *,
        graph: Graph | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, SBMStats]:
        """Attend; self-attention when ``key`` is None (``value`` defaults to ``key``).

        Args:
            query: ``(B, N, E)``.
            key: ``(B, M, kdim)``, default ``query``.
            value: ``(B, M, vdim)``, default ``key``.
            key_padding_mask: ``(B, M)`` bool, True = padding (never attended).
            graph: attend along these edges instead of sampling.
            generator: torch.Generator for the sampled graph and dropout.

        Returns:
            ``(output (B, N, E), SBMStats)``.
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))
        out, stats = self.attend(
            q, k, v, key_padding_mask=key_padding_mask, graph=graph, generator=generator
        )
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.embed_dim)
        return self.out_proj(out), stats


def initial_rate_scale(density: float, distribution: str, exploration: float) -> float:
    """The rate scale whose expected edge density at initialisation is ``density``.

    Args:
        density: target density in (0, 1); must exceed the exploration floor.
        distribution: ``"poisson"`` or ``"bernoulli"``, the law of the sampled edges.
        exploration: rate ``eps`` of the uniform exploration layer.

    Returns:
        ``s`` such that a head with memberships near 1/2 (as at initialisation) has this density.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"init_density must be a float, got {type(density).__name__}")
    if not 0.0 < density < 1.0:
        raise ValueError(f"init_density must be in (0, 1), got {density}")
    rate = rate_for_probability(density, distribution) - exploration
    if rate <= 0:
        floor = float(edge_probability_of_rate(exploration, distribution))
        raise ValueError(
            f"init_density={density} is at or below the exploration floor "
            f"(exploration={exploration} gives density {floor:.4g}); "
            "lower exploration or raise init_density"
        )
    return 4.0 * rate  # memberships ~1/2 at init and B sums to 1, so lambda ~ scale / 4


#: :func:`_sigmoid_product` works by row blocks of about this many bytes of its result.
_SIGMOID_CHUNK_BYTES = 1 << 20


def _sigmoid_product(features: Tensor, centers: Tensor) -> Tensor:
    """``sigmoid(features @ centers)`` without autograd. On the CPU, in recycled memory (each of
    Y and Z is 64 MiB at N = 64k, K = 128, 2 heads, and would be faulted in at every step), and
    by row blocks of ``_SIGMOID_CHUNK_BYTES``, so that the sigmoid finds each block of the product
    still in cache: 21.7 ms instead of 30.5 per call at N = 64k (16k: 6.8-7.2 ms against
    6.8-8.0, 31 alternating rounds)."""
    if (
        features.device.type != "cpu"
        or features.dtype != centers.dtype
        or torch.is_autocast_enabled(features.device.type)
        or features.numel() == 0
    ):
        return torch.sigmoid_(features @ centers)
    batch = torch.broadcast_shapes(features.shape[:-2], centers.shape[:-2])
    rows, dim, k = features.shape[-2], features.shape[-1], centers.shape[-1]
    out = recycled_empty((*batch, rows, k), features)
    f = features.expand(*batch, rows, dim).reshape(-1, rows, dim)
    c = centers.expand(*batch, dim, k).reshape(-1, dim, k)
    o = out.view(-1, rows, k)
    step = max(1, _SIGMOID_CHUNK_BYTES // (k * out.element_size()))
    for p in range(o.shape[0]):
        for first in range(0, rows, step):
            block = slice(first, first + step)
            torch.sigmoid_(torch.mm(f[p, block], c[p], out=o[p, block]))
    return out
