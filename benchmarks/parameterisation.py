"""An alternative SBM parameterisation, measured against the package's on the demo task.

The package's head (``SBMAttention``): sigmoid memberships in (0, 1), a block matrix that sums to
1 (softmax over its K*K entries) and a learned per-head rate scale. The alternative studied here,
as issue 18 asks: memberships on the simplex (a softmax over the K clusters, so each token's
memberships sum to 1) and a non-negative, unbounded block matrix ``B = exp(beta)`` of free
parameters. Under it a pair inside one cluster can be sure (``B_aa`` large) while pairs across
clusters stay rare (``B_ab`` small) without any scale; the rate ``Y_i B Z_j^T`` is a weighted mean
of B's entries. It starts as dense as the default (``B = 16 / 4 = 4`` everywhere, plus noise).

It lives in this script, not in the package, because it did not win (docs/results.md). Run:

    python benchmarks/parameterisation.py --seed 0 --out runs/param/simplex-s0 [--set KEY=VALUE ...]

with the same ``--set`` overrides as ``sbmt train --task repeat --preset tiny``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from sbm_transformer import mechanisms
from sbm_transformer.attention import SBMAttention
from sbm_transformer.config import apply_overrides, preset
from sbm_transformer.demo import demo_config
from sbm_transformer.functional import SBMStats, attend
from sbm_transformer.graph import Graph
from sbm_transformer.training import train

INITIAL_RATE = 4.0  # the default form's start: scale 16 times a rate of about 1/4


class SimplexSBMAttention(SBMAttention):
    """Softmax memberships over the clusters and a block matrix ``exp(beta)`` (no rate scale)."""

    def __init__(self, embed_dim: int, num_heads: int, num_clusters: int, **kw: object) -> None:
        super().__init__(embed_dim, num_heads, num_clusters, rate_scale=None, **kw)  # type: ignore[arg-type]
        self.log_blocks = nn.Parameter(
            math.log(INITIAL_RATE) + 0.1 * torch.randn(num_heads, num_clusters, num_clusters)
        )

    def block_matrix(self) -> Tensor:
        return self.log_blocks.exp()

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
        centers = self.clusters.transpose(-1, -2)  # (H, D, K)
        Y = torch.softmax(self.node_mlp(q) @ centers, dim=-1)  # (B, H, N, K), rows sum to 1
        Z = torch.softmax(self.node_mlp(k) @ centers, dim=-1)
        return attend(
            q, k, v, Y, Z, self.block_matrix(), graph=graph, key_padding_mask=key_padding_mask,
            exploration=self.exploration, causal=self.causal,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
            generator=generator, distribution=self.distribution,
        )  # fmt: skip


class SimplexSelfAttention(mechanisms.SBMSelfAttention):
    num_clusters = 16

    def __init__(self, dim: int, heads: int, **kw: object) -> None:
        super().__init__(dim, heads, num_clusters=self.num_clusters, **kw)  # type: ignore[arg-type]
        self.attn = SimplexSBMAttention(dim, heads, self.num_clusters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--set", nargs="*", default=[])
    a = p.parse_args()
    mechanisms.ATTENTIONS["sbm-simplex"] = SimplexSelfAttention
    cfg = preset("tiny", "repeat")
    apply_overrides(cfg, [*demo_config(), f"train.seed={a.seed}", *a.set])
    SimplexSelfAttention.num_clusters = cfg.model.num_clusters
    cfg.model.attention = "sbm-simplex"
    train(cfg, Path(a.out), overwrite=True, quiet=True)


if __name__ == "__main__":
    main()
