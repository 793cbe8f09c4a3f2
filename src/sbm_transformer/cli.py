"""The ``sbmt`` command: ``sbmt demo``, ``sbmt bench attention``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sbm_transformer import SBMAttention, edge_probability
from sbm_transformer.plots import density_bar, plot_sampled_graph


def demo(argv: Sequence[str]) -> int:
    """Sample SBM attention graphs for a random input; print densities; plot one graph."""
    p = argparse.ArgumentParser(prog="sbmt demo", description=demo.__doc__)
    p.add_argument("--length", type=int, default=512, help="sequence length N")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128, help="model dimension")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="directory for the PNG")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    attn = SBMAttention(a.dim, a.heads, num_clusters=a.clusters)
    x = torch.randn(1, a.length, a.dim)
    t0 = time.perf_counter()
    out, stats = attn(x, generator=torch.Generator().manual_seed(a.seed))
    (out.square().mean() + 1e-4 * stats.density.mean()).backward()
    elapsed = time.perf_counter() - t0
    print(f"SBMAttention(embed_dim={a.dim}, num_heads={a.heads}, num_clusters={a.clusters}) on a "
          f"random input of length {a.length}")
    print(f"sampled {stats.num_edges:,} edges ({stats.edges_per_query:.1f} per query), "
          f"forward + backward in {elapsed * 1000:.0f} ms")
    print("density per head:")
    print(density_bar(stats.density))
    with torch.no_grad():
        q = attn._split_heads(attn.q_proj(x))
        k = attn._split_heads(attn.k_proj(x))
        Y, Z = attn.memberships(q, k)
        prob = edge_probability(Y, Z, attn.block_matrix(), exploration=attn.exploration)
    path = plot_sampled_graph(
        prob[0, 0], stats.graph.to_dense()[0, 0], Path(a.out) / "graph_head0.png",
        title=f"head 0 of a fresh SBMAttention, N = {a.length}",
    )  # fmt: skip
    print(f"plot of head 0 (edge probabilities and the sampled graph): {path}")
    return 0


def bench(argv: Sequence[str]) -> int:
    """Benchmarks: ``sbmt bench attention [options]`` (see --help)."""
    if not argv or argv[0] != "attention":
        print("usage: sbmt bench attention [options]   (sbmt bench attention --help)", file=sys.stderr)
        return 2
    from sbm_transformer.bench import run

    run(list(argv[1:]))
    return 0


COMMANDS = {"demo": demo, "bench": bench}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: sbmt <command> [options]; commands: {names}", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"sbmt: unknown command {argv[0]!r}; expected one of: {names}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
