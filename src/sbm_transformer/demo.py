"""``sbmt demo`` (``make demo``): SBM and full attention trained side by side, in minutes on a CPU.

The task is generated on the spot: the repeated-tokens task (does this token occur anywhere else
in the sequence?), which only attention between arbitrary, input-dependent positions solves. Both
models share data, seed and every setting but the attention; the demo prints the comparison table
(accuracy, learned density, time per step, memory) and where the plots are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sbm_transformer.compare import compare, comparison_configs, stdout_line

#: The repeated-tokens setting shared by the demo and docs/results.md (section a).
REPEAT_TASK = [
    "data.task=repeat",
    "data.min_length=48",
    "data.max_length=64",
    "data.vocab=64",  # ~58 % of tokens repeat: a balanced-ish binary label per token
    "model.num_clusters=16",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.warmup=80",
    "train.sparsity_weight=1e-4",  # the paper's weight
]


def demo_config(quick: bool = False) -> list[str]:
    """The ``--set`` overrides of the demo on top of the ``tiny`` preset."""
    return [
        *REPEAT_TASK,
        f"data.train_size={800 if quick else 16000}",
        f"data.val_size={200 if quick else 1000}",
        f"data.test_size={200 if quick else 1000}",
        f"train.steps={60 if quick else 2500}",
        f"train.eval_every={30 if quick else 500}",
        *(["train.warmup=10"] if quick else []),
    ]


def run_demo(
    out: Path,
    *,
    quick: bool = False,
    quiet: bool = False,
    echo: Callable[[str], None] | None = None,
) -> None:
    """Train the demo's two runs under ``out`` (replacing an earlier demo there); the
    introduction, progress and comparison table go to ``echo``."""
    echo = echo or stdout_line
    configs = comparison_configs("repeat", ["sbm", "softmax"], overrides=demo_config(quick))
    echo(
        "sbm-transformer demo: SBM attention vs full softmax attention on the repeated-tokens "
        "task\n"
        "(label each token: does it occur elsewhere in the sequence?). About 58 % of tokens do,\n"
        "so always answering 'yes' scores 0.58. Two small models, 2500 steps each: about 5 "
        "minutes.\n"
    )
    compare(
        configs, out, overwrite=True, quiet=quiet,
        title="repeated tokens: SBM vs full attention", echo=echo,
    )  # fmt: skip
    echo(
        f"\nper-run plots: {out}/sbm/plots/ (curves.png; density.png: the learned density per "
        "layer and head; graph.png: a sampled graph next to its edge probabilities)"
    )
