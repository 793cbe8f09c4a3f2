"""SBM attention in Hugging Face transformers models (extra ``hf``: ``pip install -e ".[hf]"``).

:func:`sbmify` gives every attention module of a transformers model that dispatches through
``transformers.AttentionInterface`` its own SBM parameters (a submodule ``sbm``, an
:class:`SBMHead`) and switches the model to the attention function registered as ``"sbm"``. The
model's own projections, rotary embeddings, masks, causal flag, scaling and head layout (grouped
key/value heads are repeated to the query heads) are used as they are; only the softmax over all
keys is replaced by the softmax over each query's sampled SBM edges.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = sbmify(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=4, intermediate_size=64, vocab_size=100)), num_clusters=8)
    >>> out = model(torch.randint(0, 100, (2, 10)))
    >>> [d.shape for d in sbm_density(model)]
    [torch.Size([4]), torch.Size([4])]

Reference: Cho et al., "Transformers meet Stochastic Block Models: Attention with Data-Adaptive
Sparsity and Cost", NeurIPS 2022, arXiv:2210.15541.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

try:
    from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
    from transformers import __version__ as transformers_version
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sbm_transformer.integrations.huggingface needs transformers>=5 (GPT-2, Llama and "
        'Qwen2 work from 4.56): pip install -e ".[hf]" (or pip install "transformers>=5")'
    ) from error

from sbm_transformer.attention import DEFAULT_RATE_SCALE, _sigmoid_product, initial_rate_scale
from sbm_transformer.functional import BACKENDS, SBMStats, attend
from sbm_transformer.graph import Graph
from sbm_transformer.ops.memberships import MembershipInputs
from sbm_transformer.sampling import block_matrix, check_distribution, check_exploration

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SBM_OPTIONS",
    "SBMHead",
    "sbm_attention_forward",
    "sbm_density",
    "sbm_graphs",
    "sbm_heads",
    "sbmify",
]

#: The name under which the attention function (and its mask) is registered with transformers.
ATTN_IMPLEMENTATION = "sbm"

#: Keyword options of :func:`sbmify` besides ``num_clusters`` and ``exploration`` (see
#: :class:`SBMHead`).
SBM_OPTIONS = ("backend", "distribution", "rate_scale", "init_density", "max_edges")

#: Keyword arguments some models pass to their attention function that SBM attention cannot honour,
#: with what each one is.
_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping",
    "position_bias": "an additive position bias (relative attention)",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}

#: An additive float mask entry at or below this blocks its pair (exp of it is 0 in float32).
_BLOCKED = -1e4


def _check_positive(name: str, value: object, kind: type) -> None:
    """Raise unless ``value`` is a finite number > 0 of ``kind`` (an int passes as a float)."""
    kinds = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


class SBMHead(nn.Module):
    """The SBM parameters of one attention module of a transformers model, and its attention.

    The same model as :class:`~sbm_transformer.SBMAttention` without the projections (the host
    module keeps its own): per head h, clusters ``C_h`` (K, D) (Kaiming-normal init), a node MLP
    ``Linear(D, D) -> ReLU -> Linear(D, D)`` shared by the heads, memberships
    ``Y = sigmoid(MLP(q) C_h^T)``, ``Z = sigmoid(MLP(k) C_h^T)``, block matrix
    ``B_h = softmax(C_h C_h^T)`` and a learned rate scale ``s_h`` (optional).

    Args:
        num_heads: query heads H of the host module.
        head_dim: head size D of queries and keys.
        num_clusters: clusters K per head.
        exploration: rate ``eps`` of the uniform exploration layer (paper: 0.01).
        backend: one of :data:`~sbm_transformer.functional.BACKENDS`.
        distribution: ``"poisson"`` or ``"bernoulli"``, the law of the sampled edges.
        rate_scale: initial rate scale ``s_h`` (learned, log-parameterised), or None for none.
        init_density: start near this expected edge density instead (see
            :class:`~sbm_transformer.SBMAttention`).
        max_edges: raise before sampling when a call's expected edge count exceeds this.
        device, dtype: factory arguments for the parameters.

    The :class:`~sbm_transformer.SBMStats` of its calls in the model's latest forward are in
    :attr:`stats` (several when a model calls one attention module more than once; ``[]`` when
    it did not run in that forward) and :attr:`last_stats`.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_clusters: int = 128,
        *,
        exploration: float = 0.01,
        backend: str = "auto",
        distribution: str = "poisson",
        rate_scale: float | None = DEFAULT_RATE_SCALE,
        init_density: float | None = None,
        max_edges: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("num_clusters", num_clusters),
        ):
            _check_positive(name, value, int)
        check_exploration(exploration)
        check_distribution(distribution)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if rate_scale is not None:
            _check_positive("rate_scale", rate_scale, float)
        if max_edges is not None:
            _check_positive("max_edges", max_edges, int)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_clusters = num_clusters
        self.exploration = float(exploration)
        self.backend = backend
        self.distribution = distribution
        self.rate_scale = rate_scale
        self.init_density = init_density
        self.max_edges = max_edges
        initial = (
            initial_rate_scale(init_density, distribution, self.exploration)
            if init_density is not None
            else rate_scale
        )
        factory: dict = {"device": device, "dtype": dtype}
        self.clusters = nn.Parameter(torch.empty(num_heads, num_clusters, head_dim, **factory))
        self.node_mlp = nn.Sequential(
            nn.Linear(head_dim, head_dim, **factory),
            nn.ReLU(),
            nn.Linear(head_dim, head_dim, **factory),
        )
        self.log_rate_scale: nn.Parameter | None = None
        if initial is not None:
            self.log_rate_scale = nn.Parameter(torch.empty(num_heads, **factory))
        self._initial_scale = initial
        self._stats: list[SBMStats] = []
        # The model's forward tracker (set by sbmify); None: every call replaces ``stats``.
        self._scope: _ForwardScope | None = None
        self._generation = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as :class:`~sbm_transformer.SBMAttention`: Kaiming-normal clusters."""
        nn.init.kaiming_normal_(self.clusters)
        for module in self.node_mlp:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        if self.log_rate_scale is not None:
            assert self._initial_scale is not None
            with torch.no_grad():
                self.log_rate_scale.fill_(math.log(self._initial_scale))

    def extra_repr(self) -> str:
        parts = [
            f"num_heads={self.num_heads}",
            f"head_dim={self.head_dim}",
            f"num_clusters={self.num_clusters}",
            f"exploration={self.exploration}",
            f"backend={self.backend!r}",
            f"distribution={self.distribution!r}",
        ]
        if self.init_density is not None:
            parts.append(f"init_density={self.init_density}")
        else:
            parts.append(f"rate_scale={self.rate_scale}")
        return ", ".join(parts)

    @property
    def stats(self) -> list[SBMStats]:
        """The stats of this head's calls in the model's latest forward (``[]`` if none)."""
        if self._scope is not None and self._generation != self._scope.generation:
            return []  # recorded in an earlier forward of the model: stale
        return list(self._stats)

    @property
    def last_stats(self) -> SBMStats | None:
        """The stats of this head's last call in the model's latest forward (None if none)."""
        stats = self.stats
        return stats[-1] if stats else None

    def block_matrix(self) -> Tensor:
        """Block matrices ``(H, K, K)`` times each head's rate scale (when there is one)."""
        blocks = block_matrix(self.clusters)
        if self.log_rate_scale is not None:
            blocks = blocks * self.log_rate_scale.exp()[:, None, None]
        return blocks

    def memberships(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Memberships ``Y`` (B, H, N, K) of queries ``q`` (B, H, N, D) and ``Z`` of keys ``k``."""
        centers = self.clusters.transpose(-1, -2)  # (H, D, K)
        return torch.sigmoid(self.node_mlp(q) @ centers), torch.sigmoid(self.node_mlp(k) @ centers)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
        dropout_p: float = 0.0,
        graph: Graph | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, SBMStats]:
        """Attend along a graph sampled from this head's SBM, as ``SBMAttention.attend`` does.

        Args:
            q: ``(B, H, N, D)``; k: ``(B, H, M, D)``; v: ``(B, H, M, Dv)`` (heads already
                repeated for grouped-query attention).
            key_padding_mask: ``(B, M)`` bool, True = padding (never attended).
            causal: only keys ``j <= i`` (needs N == M).
            scale: score scale, default ``1 / sqrt(D)``.
            dropout_p: attention dropout on the normalised edge weights.
            graph: attend along these edges instead of sampling.
            generator: torch.Generator for the graph and dropout.

        Returns:
            ``(out (B, H, N, Dv), SBMStats)``; the stats are also recorded in :attr:`stats`.
        """
        if q.dim() != 4 or q.shape[1] != self.num_heads or q.shape[3] != self.head_dim:
            raise ValueError(
                f"q must have shape (B, H={self.num_heads}, N, D={self.head_dim}) for this SBM "
                f"head, got {tuple(q.shape)}"
            )
        fq, fk = self.node_mlp(q), self.node_mlp(k)
        with torch.no_grad():
            centers = self.clusters.transpose(-1, -2)
            Y, Z = _sigmoid_product(fq, centers), _sigmoid_product(fk, centers)
        out, stats = attend(
            q, k, v, Y, Z, self.block_matrix(),
            graph=graph, key_padding_mask=key_padding_mask, exploration=self.exploration,
            causal=causal, dropout_p=dropout_p, backend=self.backend, generator=generator,
            scale=scale, max_edges=self.max_edges, distribution=self.distribution,
            inputs=MembershipInputs(fq, fk, self.clusters),
        )  # fmt: skip
        self._record(stats)
        return out, stats

    def _record(self, stats: SBMStats) -> None:
        scope = self._scope
        if scope is None or scope.depth == 0:
            # Called outside a forward of the model (directly, or recomputed by gradient
            # checkpointing during backward): keep this call only, so the list cannot grow.
            self._stats = [stats]
            if scope is not None:
                self._generation = scope.generation
            return
        if self._generation != scope.generation:
            self._stats = []
            self._generation = scope.generation
        self._stats.append(stats)


class _ForwardScope:
    """Tracks the forwards of one sbmified model: a new generation starts when its outermost
    forward starts, which makes every head's stats of the forward before stale."""

    def __init__(self) -> None:
        self.depth = 0
        self.generation = 0

    def enter(self, module: nn.Module, args: Any) -> None:
        if self.depth == 0:
            self.generation += 1
        self.depth += 1

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth = max(0, self.depth - 1)


# ----------------------------------------------------------------------------------------- masks
@dataclass(frozen=True)
class _MaskPlan:
    """What a transformers attention mask means for :func:`~sbm_transformer.functional.attend`."""

    key_padding_mask: Tensor | None  # (B, M) True = never attended, None = no padding
    causal: bool
    num_keys: int  # attend to the first num_keys keys only (sdpa's upper-left causal crop)


class _PlanCache:
    """The plan of the last mask seen: the layers of one forward share one mask tensor, so the
    checks run once per forward instead of once per layer."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.mask: weakref.ReferenceType[Tensor] | None = None
        self.plan: _MaskPlan | None = None

    def get(self, mask: Tensor, key: tuple[Any, ...]) -> _MaskPlan | None:
        if self.mask is not None and self.mask() is mask and self.key == key:
            return self.plan
        return None

    def put(self, mask: Tensor, key: tuple[Any, ...], plan: _MaskPlan) -> None:
        self.mask, self.key, self.plan = weakref.ref(mask), key, plan


_PLAN_CACHE = _PlanCache()


def _allowed_pairs(mask: Tensor) -> Tensor:
    """A boolean mask (True = attend) from a boolean or additive float mask."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"attention_mask must be boolean or floating point, got {mask.dtype}")
    allowed = mask == 0
    if not torch.all(allowed | (mask <= _BLOCKED)):
        raise ValueError(
            "SBM attention supports additive float masks of 0 (attend) and large negative values "
            "(masked) only; this mask holds other values (an additive attention bias such as "
            "ALiBi or a relative position bias?), which the sampled graph cannot apply"
        )
    return allowed


def _mask_plan(
    mask: Tensor | None, batch: int, queries: int, keys: int, is_causal: bool
) -> _MaskPlan:
    """Turn a transformers attention mask into a key padding mask and a causal flag.

    ``None`` means what it means to ``sdpa_attention_forward``: causal when the module is causal
    and there is more than one query (upper-left aligned: the first ``queries`` keys), else no
    mask. A 4D mask (B or 1, 1 or H, N, M), boolean (True = attend) or additive float, must be key
    padding, optionally intersected with the causal triangle; anything else raises.
    """
    if mask is None:
        causal = bool(is_causal) and queries > 1
        return _MaskPlan(None, causal, queries if causal and keys > queries else keys)
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"SBM attention takes a 4D tensor attention mask or None, got {type(mask).__name__}"
        )
    if mask.dim() != 4:
        raise ValueError(
            "SBM attention takes a 4D attention mask (batch, 1 or heads, queries, keys) or None, "
            f"got shape {tuple(mask.shape)}"
        )
    if mask.shape[0] not in (1, batch) or mask.shape[2] != queries or mask.shape[3] < keys:
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not fit {batch} sequences of "
            f"{queries} queries and {keys} keys"
        )
    version = -1 if mask.is_inference() else mask._version
    cache_key = (batch, queries, keys, version)
    plan = _PLAN_CACHE.get(mask, cache_key)
    if plan is None:
        # A mask sized for a longer (static) cache: its first keys, as sdpa slices it.
        allowed = _allowed_pairs(mask[..., :keys])
        plan = _plan_of_mask(allowed, batch, queries, keys)
        _PLAN_CACHE.put(mask, cache_key, plan)
    return plan


def _plan_of_mask(allowed: Tensor, batch: int, queries: int, keys: int) -> _MaskPlan:
    if allowed.shape[1] > 1 and not torch.equal(allowed, allowed[:, :1].expand_as(allowed)):
        raise ValueError("SBM attention does not support attention masks that differ by head")
    allowed = allowed[:, 0].expand(batch, queries, keys)
    visible = allowed.any(dim=1)  # (B, M): the keys some query may attend
    causal, num_keys = False, keys
    # One query: any allowed set of keys is key padding (decoding with a cache).
    if queries > 1 and not torch.equal(allowed, visible[:, None, :].expand_as(allowed)):
        ones = torch.ones(queries, keys, dtype=torch.bool, device=allowed.device)
        if torch.equal(allowed, visible[:, None, :] & ones.tril()):
            causal, num_keys = True, queries  # keys past the queries are never visible here
            visible = visible[:, :queries]
        elif keys > queries and torch.equal(
            allowed, visible[:, None, :] & ones.tril(diagonal=keys - queries)
        ):
            raise ValueError(
                "SBM attention's causal mode needs queries and keys to start at the same "
                f"position; this mask has {queries} queries after {keys - queries} cached keys "
                "(chunked prefill, or continuing generation from past_key_values with several "
                "new tokens). Feed one new token at a time, or run the whole sequence at once"
            )
        else:
            raise ValueError(
                "SBM attention supports attention masks made of key padding, optionally with "
                "the causal triangle, only; this mask is something else (sliding-window or "
                "chunked attention, packed sequences (position_ids restarting within a row), a "
                "bidirectional block inside a causal mask, or a custom 4D mask)"
            )
    padding = ~visible
    return _MaskPlan(padding if bool(padding.any()) else None, causal, num_keys)


# ------------------------------------------------------------------------- attention function
def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, M, D) -> (B, H_kv * groups, M, D), each key/value head repeated ``groups`` times
    in a row (transformers' ``repeat_kv``)."""
    if groups == 1:
        return x
    b, h, m, d = x.shape
    return x[:, :, None].expand(b, h, groups, m, d).reshape(b, h * groups, m, d)


def sbm_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function registered with transformers as ``"sbm"``.

    Args:
        module: the calling attention module; it must own an :class:`SBMHead` as ``module.sbm``.
        query: ``(B, H, N, D)``.
        key, value: ``(B, H_kv, M, D)`` and ``(B, H_kv, M, Dv)``; H must be a multiple of H_kv
            (grouped-query attention: each key/value head is repeated for its query heads).
        attention_mask: None, or a 4D boolean (True = attend) or additive float mask of key
            padding, optionally with the causal triangle (see the module's docs).
        scaling: score scale, default ``1 / sqrt(D)``.
        dropout: attention dropout, applied while ``module.training``.
        **kwargs: ``is_causal`` (overrides ``module.is_causal`` when the mask is None); the rest is
            ignored, except features SBM attention cannot honour (soft-capping, attention sinks,
            position biases), which raise.

    Returns:
        ``(out (B, N, H, Dv), None)``: the layout ``eager_attention_forward`` returns; no attention
        weights (the sampled graphs are in ``module.sbm.stats``).
    """
    head = getattr(module, "sbm", None)
    if not isinstance(head, SBMHead):
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation={ATTN_IMPLEMENTATION!r} but "
            "has no SBM head (module.sbm): call sbmify(model) on the model that holds it"
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{type(module).__name__} passes {name!r} ({what}), which SBM attention does not "
                "support"
            )
    heads, kv_heads = query.shape[1], key.shape[1]
    if value.shape[1] != kv_heads or kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"{type(module).__name__}: query heads ({heads}) must be a multiple of the key/value "
            f"heads (key {kv_heads}, value {value.shape[1]})"
        )
    key = _repeat_kv(key, heads // kv_heads)
    value = _repeat_kv(value, heads // kv_heads)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)  # sdpa_attention_forward's default
    plan = _mask_plan(attention_mask, query.shape[0], query.shape[2], key.shape[2], is_causal)
    if plan.num_keys < key.shape[2]:
        key, value = key[:, :, : plan.num_keys], value[:, :, : plan.num_keys]
    out, _ = head.attend(
        query,
        key,
        value,
        key_padding_mask=plan.key_padding_mask,
        causal=plan.causal,
        scale=scaling,
        dropout_p=dropout if module.training else 0.0,
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Register the attention function, and sdpa's masks (boolean, None when plain causal or
    unpadded) for it: without a mask function transformers would build no mask at all."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sbm_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


_register()


# ------------------------------------------------------------------------------------- sbmify
def _dispatches_through_interface(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module calling ``ALL_ATTENTION_FUNCTIONS``."""
    if isinstance(module, PreTrainedModel) or not hasattr(module, "config"):
        return False
    forward = getattr(type(module), "forward", None)
    code = getattr(inspect.unwrap(forward), "__code__", None) if forward is not None else None
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _positive_int(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _head_layout(name: str, module: nn.Module) -> tuple[int, int]:
    """Query heads and head size of an attention module, from its attributes or its config."""
    config = module.config
    heads = _positive_int(module, "num_heads", "num_attention_heads") or _positive_int(
        config, "num_attention_heads"
    )
    if heads is None:
        raise ValueError(f"cannot tell the number of heads of {name} ({type(module).__name__})")
    dim = _positive_int(module, "head_dim", "attention_head_size") or _positive_int(
        config, "head_dim"
    )
    hidden = _positive_int(config, "hidden_size")
    if dim is None and hidden is not None and hidden % heads == 0:
        dim = hidden // heads
    if dim is None:
        raise ValueError(f"cannot tell the head size of {name} ({type(module).__name__})")
    return heads, dim


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every config of the model: its modules' and, recursively, their sub-configs."""
    found: dict[int, PretrainedConfig] = {}
    stack: list[PretrainedConfig] = [
        config
        for m in model.modules()
        if isinstance(config := getattr(m, "config", None), PretrainedConfig)
    ]
    while stack:
        config = stack.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for sub in getattr(config, "sub_configs", {}) or {}:
            child = getattr(config, sub, None)
            if isinstance(child, PretrainedConfig):
                stack.append(child)
    return list(found.values())


def _use_sbm_attention(model: PreTrainedModel, targets: list[tuple[str, nn.Module]]) -> None:
    """Switch the model and all its sub-models to the registered attention function."""
    setter = getattr(model, "set_attn_implementation", None)  # transformers >= 4.56
    if callable(setter):
        setter(ATTN_IMPLEMENTATION)
    # Models that refuse to switch dynamically (their check inspects source code) still read the
    # config at every call, as does every transformers version: set it everywhere.
    for config in _configs(model):
        if config._attn_implementation != ATTN_IMPLEMENTATION:
            config._attn_implementation = ATTN_IMPLEMENTATION
    stuck = [
        name
        for name, m in targets
        if cast(PretrainedConfig, m.config)._attn_implementation != ATTN_IMPLEMENTATION
    ]
    if stuck:
        raise RuntimeError(f"could not switch {stuck} to attn_implementation='sbm'")


def sbmify(
    model: PreTrainedModel,
    *,
    num_clusters: int = 128,
    exploration: float = 0.01,
    **sbm_options: Any,
) -> PreTrainedModel:
    """Give every attention module of a transformers model SBM attention, in place.

    Each module that dispatches through ``transformers.AttentionInterface`` gets its own
    :class:`SBMHead` as submodule ``sbm`` (parameters ``<module>.sbm.clusters``,
    ``<module>.sbm.node_mlp.*``, ``<module>.sbm.log_rate_scale``), created on the device and
    in the dtype of the module's parameters and in its train/eval mode, and the model is
    switched to ``attn_implementation="sbm"``.

    Args:
        model: a ``transformers.PreTrainedModel`` whose attention uses the attention interface.
        num_clusters: clusters K per head.
        exploration: rate of the uniform exploration layer (paper: 0.01).
        **sbm_options: ``backend``, ``distribution``, ``rate_scale``, ``init_density``,
            ``max_edges`` (see :class:`SBMHead`).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a transformers model, or an option is unknown.
        ValueError: a bad option value, a model without attention modules that dispatch through
            the attention interface, or one already sbmified.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"sbmify takes a transformers PreTrainedModel, got {type(model).__name__} (for a "
            "plain PyTorch model use sbm_transformer.SBMAttention)"
        )
    unknown = sorted(set(sbm_options) - set(SBM_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown SBM option(s) {unknown}; expected num_clusters, exploration or one of "
            f"{list(SBM_OPTIONS)}"
        )
    # Check the option values before the model: the same errors whatever the model.
    SBMHead(1, 1, num_clusters, exploration=exploration, **sbm_options)
    targets = [(n, m) for n, m in model.named_modules() if _dispatches_through_interface(m)]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no attention module that calls transformers' "
            "AttentionInterface (ALL_ATTENTION_FUNCTIONS), so SBM attention cannot be plugged in "
            f"(transformers {transformers_version}; this model may predate the interface)"
        )
    done = [n for n, m in targets if isinstance(getattr(m, "sbm", None), SBMHead)]
    if done:
        raise ValueError(f"the model is already sbmified (SBM heads in {done[:3]}...)")
    taken = [n for n, m in targets if hasattr(m, "sbm")]
    if taken:
        raise ValueError(f"attention modules {taken[:3]} already have an attribute named 'sbm'")
    heads: list[SBMHead] = []
    for name, module in targets:  # every head first: a bad option leaves the model untouched
        num_heads, head_dim = _head_layout(name, module)
        param = next(module.parameters(), None)
        floating = param is not None and param.is_floating_point()
        heads.append(
            SBMHead(
                num_heads,
                head_dim,
                num_clusters,
                exploration=exploration,
                device=param.device if param is not None else None,
                dtype=param.dtype if floating and param is not None else None,
                **sbm_options,
            ).train(module.training)
        )
    _register()
    scope = _ForwardScope()
    for (_, module), head in zip(targets, heads, strict=True):
        head._scope = scope
        module.add_module("sbm", head)
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            sub.register_forward_pre_hook(scope.enter)
            sub.register_forward_hook(scope.exit, always_call=True)
    _use_sbm_attention(model, targets)
    return model


# ---------------------------------------------------------------------------------- read-outs
def sbm_heads(model: nn.Module) -> dict[str, SBMHead]:
    """The SBM heads of a model by module name (``"...self_attn.sbm"``), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SBMHead)}


def _latest_stats(model: nn.Module) -> list[SBMStats]:
    heads = sbm_heads(model)
    if not heads:
        raise ValueError(f"{type(model).__name__} has no SBM heads: call sbmify(model) first")
    stats = [s for head in heads.values() for s in head.stats]
    if not stats:
        raise RuntimeError(
            "no SBM attention ran in the model's latest forward: run a forward pass first"
        )
    return stats


def sbm_density(model: nn.Module) -> list[Tensor]:
    """Edge densities of the model's latest forward, for the sparsity term of the loss.

    One ``(H,)`` tensor per attention call of the latest forward of the model (normally one per
    layer), in module order; differentiable through the straight-through estimator, so
    ``loss + w * torch.cat(sbm_density(model)).mean()`` trains the heads sparser. Each forward of
    the model starts afresh: layers that did not run in the latest forward (e.g. an encoder
    skipped while generating) are absent, never left over from an earlier forward.

    Args:
        model: a model passed to :func:`sbmify`.

    Returns:
        The densities, a list of ``(H,)`` tensors.

    Raises:
        ValueError: the model has no SBM heads. RuntimeError: no SBM attention ran yet.
    """
    return [s.density for s in _latest_stats(model)]


def sbm_graphs(model: nn.Module) -> list[Graph]:
    """The sampled graphs of the model's latest forward, in the order of :func:`sbm_density`."""
    return [s.graph for s in _latest_stats(model)]
