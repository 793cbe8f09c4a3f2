"""Pathfinder (LRA's pathfinder32 release layout): are two dots connected by a dashed path?

``cfg.source`` is one difficulty's directory, e.g. ``lra_release/pathfinder32/curv_baseline``,
holding ``metadata/<n>.npy`` and the images. Despite the extension the metadata files are text,
one image a line, space-separated: ``imgs/<n> sample_<i>.png <x> <label> ...``; the image is
``<source>/<field 0>/<field 1>`` and the label (0/1) is field 3, as LRA reads them.

The metadata files are taken in numeric order and their lines in file order; the first 80% of the
examples are train, the next 10% val, the last 10% test (LRA's split proportions), each capped
by ``cfg.train_size``/``val_size``/``test_size`` (its first examples; 0 = no cap), so only the
images used are read. A 32x32 grey PNG (read with ``matplotlib.image.imread``; a colour PNG's
first channel) becomes 1024 tokens ``pixel + 1`` (vocabulary 257); 2 classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import image as mpimg
from torch import Tensor

from sbm_transformer.data.base import DataConfig, SequenceData, TaskInfo
from sbm_transformer.data.common import (
    Progress,
    ProgressCounter,
    data_error,
    make_info,
    read_lines,
    truncate,
    user_source,
)

PIXEL_VOCAB = 257
FRACTIONS = (0.8, 0.1)  # train, val; test is the rest

Example = tuple[Path, int]  # image path, label


def _order(path: Path) -> tuple[int, str]:
    return (int(path.stem), "") if path.stem.isdigit() else (1 << 62, path.stem)


def read_metadata(source: str | Path) -> list[Example]:
    """Image paths and labels listed by ``source/metadata/*.npy``."""
    source = Path(source)
    files = sorted((source / "metadata").glob("*.npy"), key=_order)
    if not files:
        raise FileNotFoundError(f"no metadata/*.npy files in {source} (see docs/data.md)")
    examples = []
    for path in files:
        for number, line in read_lines(path):
            fields = line.decode(errors="replace").split()
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise data_error(path, number, "expected '<dir> <file> <x> <label 0/1> ...'")
            examples.append((source / fields[0] / fields[1], int(fields[3])))
    return examples


def read_image(path: Path) -> Tensor:
    """Pixel tokens (0-255 + 1, row-major) of a PNG."""
    try:
        pixels = mpimg.imread(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    if pixels.dtype != np.uint8:  # PNGs read as floats in [0, 1]
        pixels = np.rint(pixels * 255).astype(np.uint8)
    return torch.from_numpy(pixels.reshape(-1).astype(np.int64)) + 1


def _split(examples: list[Example], cfg: DataConfig) -> dict[str, list[Example]]:
    n = len(examples)
    train_end = int(n * FRACTIONS[0])
    val_end = train_end + int(n * FRACTIONS[1])
    parts = {
        "train": (examples[:train_end], cfg.train_size),
        "val": (examples[train_end:val_end], cfg.val_size),
        "test": (examples[val_end:], cfg.test_size),
    }
    return {s: part[:cap] if cap > 0 else part for s, (part, cap) in parts.items()}


def load(
    cfg: DataConfig, progress: Progress | None = None
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    """Pathfinder from ``cfg.source`` (see the module docstring)."""
    source = user_source(cfg)
    if not source:
        raise ValueError("task 'pathfinder' needs data.source: a pathfinder32 difficulty directory")
    splits = {}
    chosen = _split(read_metadata(source), cfg)
    counter = ProgressCounter(progress, sum(map(len, chosen.values())))
    for split, examples in chosen.items():
        images = []
        for path, _ in examples:
            images.append(truncate(read_image(path), cfg.max_len))
            counter.advance()
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        splits[split] = SequenceData([images], labels)
    return make_info(
        "pathfinder", "classify", PIXEL_VOCAB, 2, splits, f"Pathfinder, {source}"
    ), splits
