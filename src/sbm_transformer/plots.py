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
    prob = probability[:max_size, :max_size].detach().float().cpu().numpy()
    adj = adjacency[:max_size, :max_size].detach().cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    im = axes[0].imshow(prob, cmap="viridis", vmin=0.0, vmax=max(float(prob.max()), 1e-6))
    axes[0].set_title("edge probability 1 - exp(-(λ + ε))")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    axes[1].imshow(adj.astype("float32"), cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest")
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
        f"  head {h}: {d:7.2%} " + "#" * max(1, round(width * d / top))
        for h, d in enumerate(values)
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(run_dir: Path, path: Path) -> Path | None:
    """Loss and accuracy, train and validation, against the step."""
    rows = _read_csv(run_dir / "metrics.csv")
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        sub = [r for r in rows if r["split"] == split]
        steps = [int(r["step"]) for r in sub]
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            ax.plot(steps, [float(r[key]) for r in sub], style, label=split, markersize=3)
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_density(run_dir: Path, path: Path) -> Path | None:
    """Edge density of every layer and head over training (sampled-graph attentions)."""
    rows = [r for r in _read_csv(run_dir / "density.csv") if r["split"] == "train"]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(int(r["layer"]), int(r["head"])) for r in rows})
    for layer, head in keys:
        sub = [r for r in rows if int(r["layer"]) == layer and int(r["head"]) == head]
        ax.plot(
            [int(r["step"]) for r in sub],
            [float(r["density"]) for r in sub],
            label=f"layer {layer}, head {head}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("edge density")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("SBM attention density per layer and head")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_model_graph(model: Any, data: Any, task: Any, device: Any, path: Path) -> Path | None:
    """One sampled attention graph of the first SBM layer next to its edge probabilities."""
    import torch

    from sbm_transformer.data.base import collate_fn
    from sbm_transformer.mechanisms import SBMSelfAttention
    from sbm_transformer.sampling import edge_probability

    layer = next((m for m in model.modules() if isinstance(m, SBMSelfAttention)), None)
    if layer is None or len(data) == 0:
        return None
    captured: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict, result: Any) -> None:
        x = args[0]
        mask = kwargs.get("key_padding_mask")
        attn = module.attn
        q = attn._split_heads(attn.q_proj(x))
        k = attn._split_heads(attn.k_proj(x))
        Y, Z = attn.memberships(q, k)
        captured["prob"] = edge_probability(
            Y, Z, attn.block_matrix(), exploration=attn.exploration, key_padding_mask=mask,
            causal=attn.causal,
        )  # fmt: skip
        captured["graph"] = result.graph

    batch = collate_fn(task.kind)([data[0]]).to(device)
    handle = layer.register_forward_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch.tokens, batch.padding_mask)
    finally:
        handle.remove()
        model.train(was_training)
    if "graph" not in captured:
        return None
    n = int((~batch.padding_mask.reshape(-1, batch.padding_mask.shape[-1])[0]).sum())
    prob = captured["prob"][0, 0, :n, :n]
    adj = captured["graph"].to_dense()[0, 0, :n, :n]
    return plot_sampled_graph(
        prob, adj, path, title=f"layer 0, head 0, one validation input (N = {n})"
    )


def plot_run(
    run_dir: str | Path,
    *,
    model: Any = None,
    data: Any = None,
    task: Any = None,
    device: Any = None,
) -> list[Path]:
    """All figures of a run into ``run_dir/plots``; returns the files written."""
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    made = [plot_curves(run_dir, out / "curves.png"), plot_density(run_dir, out / "density.png")]
    if model is not None:
        made.append(plot_model_graph(model, data, task, device, out / "graph.png"))
    return [p for p in made if p is not None]


def plot_comparison(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Bars of test accuracy, time per step and density for several attentions."""
    from sbm_transformer.mechanisms import attention_density

    plt = _pyplot()
    names = [r["attention"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [r["test_accuracy"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("test accuracy")
    majority = rows[0].get("majority_accuracy") if rows else None
    if majority:
        axes[0].axhline(majority, color="k", ls="--", lw=1, label="most common label")
        axes[0].legend(loc="lower right", framealpha=0.9)
    axes[1].bar(names, [r["seconds_per_step"] * 1000 for r in rows], color="tab:orange")
    axes[1].set_ylabel("ms per training step")
    densities = [attention_density(r["attention"], r.get("test_density")) for r in rows]
    axes[2].bar(names, [d or 0.0 for d in densities], color="tab:green")
    axes[2].set_ylabel("attention density (1 = every pair)")
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "density_bar",
    "plot_comparison",
    "plot_curves",
    "plot_density",
    "plot_model_graph",
    "plot_run",
    "plot_sampled_graph",
]
