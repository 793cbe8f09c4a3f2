"""What every attention mechanism of :mod:`sbm_transformer.mechanisms` returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sbm_transformer.graph import Graph


@dataclass
class AttentionResult:
    """What every mechanism returns.

    Attributes:
        output: ``(B, N, E)``.
        density: ``(H,)`` differentiable edge density per head for sampled-graph mechanisms
            (SBM), else None. The training loss adds ``w * mean(density)`` over layers.
        graph: the sampled graph (SBM), else None.
    """

    output: Tensor
    density: Tensor | None = None
    graph: Graph | None = None
