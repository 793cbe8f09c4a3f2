"""Attention mechanisms by name, all with one interface, for models and comparisons.

Every mechanism is an ``nn.Module`` doing multi-head self-attention on ``(B, N, E)`` inputs:
``forward(x, key_padding_mask=None) -> AttentionResult``. The result carries the output and,
for mechanisms that sample a graph, the differentiable per-head density; models and the training
loop read ``result.density`` without knowing which mechanism produced it.

Names (:data:`ATTENTIONS`): ``sbm`` (this package), ``softmax`` (full attention through
``scaled_dot_product_attention``), ``linear`` (Katharopoulos et al. 2020), ``performer``
(FAVOR+, Choromanski et al. 2021), ``linformer`` (Wang et al. 2020), ``nystromformer``
(Xiong et al. 2021) and ``none`` (no token mixing: the block is its MLP only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sbm_transformer.attention import DEFAULT_RATE_SCALE, SBMAttention
from sbm_transformer.attention_result import AttentionResult
from sbm_transformer.baselines import (
    LinearAttention,
    LinformerAttention,
    NystromAttention,
    PerformerAttention,
)


def _check_options(name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for attention {name!r}; valid: {sorted(allowed)}"
        )


class SBMSelfAttention(nn.Module):
    """:class:`~sbm_transformer.SBMAttention` behind the common interface."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        max_len: int = 0,
        num_clusters: int = 128,
        exploration: float = 0.01,
        backend: str = "auto",
        init_density: float | None = None,
        distribution: str = "poisson",
        rate_scale: float | None = DEFAULT_RATE_SCALE,
    ) -> None:
        super().__init__()
        self.attn = SBMAttention(
            dim, heads, num_clusters, dropout=dropout, exploration=exploration, causal=causal,
            backend=backend, init_density=init_density, distribution=distribution,
            rate_scale=rate_scale,
        )  # fmt: skip
        self.generator: torch.Generator | None = None  # set by evaluation for fixed graphs

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> AttentionResult:
        out, stats = self.attn(x, key_padding_mask=key_padding_mask, generator=self.generator)
        return AttentionResult(out, stats.density, stats.graph)


class SoftmaxAttention(nn.Module):
    """Full softmax attention (``torch.nn.functional.scaled_dot_product_attention``)."""

    def __init__(
        self, dim: int, heads: int, *, causal: bool = False, dropout: float = 0.0, max_len: int = 0
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> AttentionResult:
        b, n, e = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if key_padding_mask is not None or self.causal:
            # additive float mask: a fully padded row stays finite (never NaN)
            mask = torch.zeros(b, 1, n, n, dtype=q.dtype, device=x.device)
            if key_padding_mask is not None:
                mask = mask.masked_fill(
                    key_padding_mask[:, None, None, :], torch.finfo(q.dtype).min
                )
            if self.causal:
                future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
                mask = mask.masked_fill(future, torch.finfo(q.dtype).min)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return AttentionResult(self.out(out.transpose(1, 2).reshape(b, n, e)))


class NoAttention(nn.Module):
    """No token mixing: returns zeros, so a block reduces to its MLP."""

    def __init__(
        self, dim: int, heads: int, *, causal: bool = False, dropout: float = 0.0, max_len: int = 0
    ) -> None:
        super().__init__()

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> AttentionResult:
        return AttentionResult(torch.zeros_like(x))


#: Constructors by name: ``(dim, heads, *, causal, dropout, max_len, **options)``.
ATTENTIONS: dict[str, type[nn.Module]] = {
    "sbm": SBMSelfAttention,
    "softmax": SoftmaxAttention,
    "linear": LinearAttention,
    "performer": PerformerAttention,
    "linformer": LinformerAttention,
    "nystromformer": NystromAttention,
    "none": NoAttention,
}

#: Fraction of query-key pairs that each mechanism without a sampled graph mixes: every pair (the
#: approximations of full attention too) or none. Sampled-graph mechanisms report their density.
FIXED_DENSITY: dict[str, float] = {
    "softmax": 1.0, "linear": 1.0, "performer": 1.0, "linformer": 1.0, "nystromformer": 1.0,
    "none": 0.0,
}  # fmt: skip


def attention_density(name: str, measured: float | None) -> float | None:
    """The density to report for a run of mechanism ``name``: the measured one, else the fixed."""
    return measured if measured is not None else FIXED_DENSITY.get(name)


#: Mechanisms that support ``causal=True``.
CAUSAL_ATTENTIONS = ("sbm", "softmax", "linear", "none")


def build_attention(
    name: str,
    dim: int,
    heads: int,
    *,
    causal: bool = False,
    dropout: float = 0.0,
    max_len: int = 0,
    **options: Any,
) -> nn.Module:
    """Build the mechanism ``name`` (see :data:`ATTENTIONS`); ``options`` are its own settings.

    Raises ValueError naming the valid choices for an unknown name, a mechanism that cannot be
    causal, or an unknown option.
    """
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; valid: {', '.join(ATTENTIONS)}")
    if causal and name not in CAUSAL_ATTENTIONS:
        raise ValueError(
            f"attention {name!r} cannot be causal; causal attentions: "
            f"{', '.join(CAUSAL_ATTENTIONS)}"
        )
    cls = ATTENTIONS[name]
    try:
        return cls(dim, heads, causal=causal, dropout=dropout, max_len=max_len, **options)
    except TypeError as err:
        import inspect

        params = inspect.signature(cls.__init__).parameters
        allowed = tuple(p for p in params if p not in ("self", "dim", "heads"))
        _check_options(name, options, allowed)
        raise err


__all__ = [
    "ATTENTIONS",
    "CAUSAL_ATTENTIONS",
    "FIXED_DENSITY",
    "AttentionResult",
    "NoAttention",
    "SBMSelfAttention",
    "SoftmaxAttention",
    "attention_density",
    "build_attention",
]
