"""Figures: sampled attention graphs next to their edge probabilities, and more.

matplotlib is imported lazily with the non-interactive Agg backend, so importing this module
costs nothing and works on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sampled_graph(
    probability: Tensor,
    adjacency: Tensor,
    path: str | Path,
    *,
    title: str = "",
    max_size: int = 256,
) -> Path:
    """Save a PNG with one head's edge probabilities (left) and its sampled graph (right).

    Args:
        probability: ``(N, M)`` edge probabilities (e.g. ``edge_probability(...)[b, h]``).
        adjacency: ``(N, M)`` bool, the sampled edges (e.g. ``graph.to_dense()[b, h]``).
        path: where to write the PNG.
        title: figure title.
        max_size: show at most this many queries and keys (the top-left corner).

    Returns:
        The path written.
    """
    plt = _pyplot()
    prob = probability[:max_size, :max_size].detach().float().cpu()
    adj = adjacency[:max_size, :max_size].detach().cpu()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    im = axes[0].imshow(prob, cmap="viridis", vmin=0.0, vmax=max(float(prob.max()), 1e-6))
    axes[0].set_title("edge probability 1 - exp(-(λ + ε))")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    axes[1].imshow(adj.float(), cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[1].set_title(f"sampled graph ({int(adj.sum())} edges shown)")
    for ax in axes:
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def density_bar(density: Tensor, width: int = 40) -> str:
    """Text bars for per-head densities, e.g. for a terminal."""
    values = density.detach().float().cpu().tolist()
    top = max(max(values, default=0.0), 1e-12)
    return "\n".join(
        f"  head {h}: {d:7.2%} " + "#" * max(1, round(width * d / top)) for h, d in enumerate(values)
    )


__all__ = ["density_bar", "plot_sampled_graph"]
