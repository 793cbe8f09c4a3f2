"""Encoder models with a pluggable attention mechanism and the heads of each task kind.

``build_model(task, cfg)`` returns one of:

* :class:`SequenceClassifier`: one sequence -> class (mean or CLS pooling);
* :class:`DualClassifier`: two sequences -> class, from ``[x0, x1, x0*x1, x0-x1]`` of the pooled
  encodings (as LRA's retrieval task);
* :class:`TokenClassifier`: one label per token;
* :class:`CausalLM`: next-token prediction with causal attention.

All share :class:`Encoder`: token embedding, learned positional embedding, pre-LayerNorm blocks
(attention, then a GELU MLP), final LayerNorm. Every model returns :class:`ModelOutput`: the
logits and the per-layer densities of sampled-graph attentions, which the training loop adds to
the loss without knowing which attention is inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sbm_transformer.attention import SBM_FORMS
from sbm_transformer.config import ModelConfig
from sbm_transformer.data.base import PAD_ID, TaskInfo
from sbm_transformer.graph import Graph
from sbm_transformer.mechanisms import AttentionResult, build_attention


@dataclass
class ModelOutput:
    """Logits and what the attention layers report.

    Attributes:
        logits: ``(B, C)`` for sequence-level heads, ``(B, L, C)`` for token-level heads.
        densities: per layer, ``(H,)`` differentiable densities of sampled-graph attentions
            (empty for other mechanisms).
        graphs: per layer, the sampled graphs (None entries for other mechanisms).
    """

    logits: Tensor
    densities: list[Tensor] = field(default_factory=list)
    graphs: list[Graph | None] = field(default_factory=list)

    def mean_density(self) -> Tensor | None:
        """Mean density over layers and heads (None when no layer samples graphs)."""
        if not self.densities:
            return None
        return torch.stack([d.mean() for d in self.densities]).mean()


def attention_options(cfg: ModelConfig) -> dict[str, object]:
    """The mechanism-specific options of ``cfg.attention`` taken from the model config."""
    options: dict[str, dict[str, object]] = {
        "sbm": {
            "num_clusters": cfg.num_clusters,
            "exploration": cfg.exploration,
            "init_density": cfg.init_density,
            "backend": cfg.backend,
            **sbm_form(cfg),
        },
        "performer": {"num_features": cfg.performer_features, "kernel": cfg.performer_kernel},
        "linformer": {"proj_len": cfg.linformer_k},
        "nystromformer": {
            "num_landmarks": cfg.nystrom_landmarks,
            "conv_kernel_size": cfg.nystrom_conv,
        },
    }
    return options.get(cfg.attention, {})


def sbm_form(cfg: ModelConfig) -> dict[str, object]:
    """``distribution`` and ``rate_scale`` of the SBM form ``cfg.sbm`` (see ``SBM_FORMS``)."""
    if cfg.sbm not in SBM_FORMS:
        raise ValueError(f"unknown model.sbm {cfg.sbm!r}; valid: {', '.join(SBM_FORMS)}")
    own: dict[str, object] = {"distribution": cfg.distribution, "rate_scale": cfg.rate_scale}
    if cfg.sbm == "default":
        return own
    form, defaults = SBM_FORMS[cfg.sbm], SBM_FORMS["default"]
    changed = sorted(k for k, v in own.items() if v != defaults[k] and v != form[k])
    if changed:
        raise ValueError(
            f"model.sbm={cfg.sbm} sets {', '.join(changed)} itself; leave "
            f"{' and '.join('model.' + k for k in changed)} at the default or use model.sbm=default"
        )
    return dict(form)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, cfg: ModelConfig, max_len: int, causal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = build_attention(
            cfg.attention, cfg.dim, cfg.heads, causal=causal, dropout=cfg.attention_dropout,
            max_len=max_len, **attention_options(cfg),
        )  # fmt: skip
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_dim, cfg.dim),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, AttentionResult]:
        result: AttentionResult = self.attn(self.norm1(x), key_padding_mask=padding_mask)
        x = x + self.drop(result.output)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, result


class Encoder(nn.Module):
    """Embeddings and a stack of :class:`Block`; ``(B, L)`` tokens -> ``(B, L, dim)``.

    With ``cls=True`` a learned CLS vector is prepended (position 0) and the output keeps it.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        max_len: int,
        *,
        causal: bool = False,
        cls: bool = False,
    ) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(
                f"model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads})"
            )
        self.cls = cls
        self.max_len = max_len
        length = max_len + int(cls)
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(length, cfg.dim) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cls else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, length, causal) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(
        self, tokens: Tensor, padding_mask: Tensor
    ) -> tuple[Tensor, Tensor, list[AttentionResult]]:
        """Returns hidden states ``(B, L', dim)``, the padding mask of them and layer results."""
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the model's max_len {self.max_len}")
        x = self.embed(tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, 1, -1), x], dim=1)
            padding_mask = torch.cat([padding_mask.new_zeros(b, 1), padding_mask], dim=1)
        x = self.drop(x + self.pos[: x.shape[1]])
        results = []
        for block in self.blocks:
            x, result = block(x, padding_mask)
            results.append(result)
        return self.norm(x), padding_mask, results


def _output(logits: Tensor, results: list[AttentionResult]) -> ModelOutput:
    return ModelOutput(
        logits,
        [r.density for r in results if r.density is not None],
        [r.graph for r in results],
    )


def _pool(h: Tensor, mask: Tensor, mode: str) -> Tensor:
    if mode == "cls":
        return h[:, 0]
    keep = (~mask).unsqueeze(-1).to(h.dtype)  # mean over real tokens only
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def _head(dim_in: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class SequenceClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig, task: TaskInfo, max_len: int) -> None:
        super().__init__()
        if cfg.pooling not in ("mean", "cls"):
            raise ValueError(f"model.pooling must be 'mean' or 'cls', got {cfg.pooling!r}")
        self.pooling = cfg.pooling
        self.encoder = Encoder(cfg, task.vocab_size, max_len, cls=cfg.pooling == "cls")
        self.head = _head(cfg.dim, cfg.mlp_dim, task.num_classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> ModelOutput:
        h, mask, results = self.encoder(tokens, padding_mask)
        return _output(self.head(_pool(h, mask, self.pooling)), results)


class DualClassifier(nn.Module):
    """Two sequences ``(2, B, L)`` -> class from ``[x0, x1, x0*x1, x0-x1]`` (LRA retrieval)."""

    def __init__(self, cfg: ModelConfig, task: TaskInfo, max_len: int) -> None:
        super().__init__()
        if cfg.pooling not in ("mean", "cls"):
            raise ValueError(f"model.pooling must be 'mean' or 'cls', got {cfg.pooling!r}")
        self.pooling = cfg.pooling
        self.encoder = Encoder(cfg, task.vocab_size, max_len, cls=cfg.pooling == "cls")
        self.head = _head(4 * cfg.dim, cfg.mlp_dim, task.num_classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> ModelOutput:
        b = tokens.shape[1]
        h, mask, results = self.encoder(tokens.flatten(0, 1), padding_mask.flatten(0, 1))
        pooled = _pool(h, mask, self.pooling)
        x0, x1 = pooled[:b], pooled[b:]
        return _output(self.head(torch.cat([x0, x1, x0 * x1, x0 - x1], dim=-1)), results)


class TokenClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig, task: TaskInfo, max_len: int) -> None:
        super().__init__()
        self.encoder = Encoder(cfg, task.vocab_size, max_len)
        self.head = nn.Linear(cfg.dim, task.num_classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> ModelOutput:
        h, _, results = self.encoder(tokens, padding_mask)
        return _output(self.head(h), results)


class CausalLM(nn.Module):
    """Next-token prediction; the attention is causal (SBM with ``causal=True``)."""

    def __init__(self, cfg: ModelConfig, task: TaskInfo, max_len: int) -> None:
        super().__init__()
        self.encoder = Encoder(cfg, task.vocab_size, max_len, causal=True)
        self.head = nn.Linear(cfg.dim, task.num_classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> ModelOutput:
        h, _, results = self.encoder(tokens, padding_mask)
        return _output(self.head(h), results)


HEADS: dict[str, type[nn.Module]] = {
    "classify": SequenceClassifier,
    "match": DualClassifier,
    "tag": TokenClassifier,
    "lm": CausalLM,
}


def build_model(task: TaskInfo, cfg: ModelConfig, max_len: int | None = None) -> nn.Module:
    """The model for a task kind with the configured attention."""
    if task.kind not in HEADS:
        raise ValueError(f"unknown task kind {task.kind!r}; valid: {', '.join(HEADS)}")
    return HEADS[task.kind](cfg, task, max_len or task.max_len)


def set_sampling_seed(model: nn.Module, seed: int | None) -> None:
    """Fix (or, with None, release) the graphs that stochastic attention layers sample.

    Each such layer (one with a ``generator`` attribute) gets its own generator seeded from
    ``seed`` and its position, so evaluation sees the same graphs every time.
    """
    index = 0
    for module in model.modules():
        if hasattr(module, "generator"):
            generator = None
            if seed is not None:
                device = next(model.parameters()).device
                generator = torch.Generator(device=device).manual_seed(seed + 1000 * index)
            setattr(module, "generator", generator)  # noqa: B010 - any module's attribute
            index += 1


def is_stochastic(model: nn.Module) -> bool:
    """Whether some attention layer samples (so evaluation may average several samples)."""
    return any(hasattr(m, "generator") for m in model.modules())


__all__ = [
    "HEADS",
    "PAD_ID",
    "CausalLM",
    "DualClassifier",
    "Encoder",
    "ModelOutput",
    "SequenceClassifier",
    "TokenClassifier",
    "build_model",
    "is_stochastic",
    "set_sampling_seed",
]
