"""Helpers shared by the task modules: split seeds, progress, file checks, manifests.

Nothing here knows about a particular task; see docs/data.md for the formats.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

from torch import Tensor

from sbm_transformer.data.base import DataConfig, SequenceData, TaskInfo, TaskKind

#: The splits every task returns, in this order.
SPLITS = ("train", "val", "test")

#: ``progress(done, total)``: examples done so far out of the total.
Progress = Callable[[int, int], None]


def split_seed(seed: int, task: str, split: str) -> int:
    """A 63-bit seed for one split of one task, so that splits use unrelated random streams."""
    digest = hashlib.sha256(f"{task}:{split}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ProgressCounter:
    """Counts examples and calls ``progress`` about a hundred times over ``total``."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0
        self.step = max(1, total // 100)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None and (self.done % self.step == 0 or self.done >= self.total):
            self.progress(self.done, self.total)


def data_error(path: str | Path, line: int, message: str) -> ValueError:
    """The error for a malformed line: ``path:line: message``."""
    return ValueError(f"{path}:{line}: {message}")


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of a file as ``(line number, bytes without the line ending)``."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield number, line


def parse_int(path: Path, line: int, field: bytes, what: str, valid: range) -> int:
    """An integer field in ``valid``, or a :func:`data_error`."""
    try:
        value = int(field)
    except ValueError:
        shown = field[:40].decode(errors="replace")
        raise data_error(path, line, f"{what} {shown!r} is not an integer") from None
    if value not in valid:
        raise data_error(path, line, f"{what} {value} outside {valid.start}..{valid.stop - 1}")
    return value


def truncate(seq: Tensor, max_len: int) -> Tensor:
    """The first ``max_len`` tokens (all of them when ``max_len`` is 0)."""
    return seq[:max_len] if max_len > 0 else seq


def longest(splits: Mapping[str, SequenceData]) -> int:
    """The longest sequence (of one document, for pairs) over all splits."""
    return max(
        (len(t) for data in splits.values() for seqs in data.sequences for t in seqs), default=0
    )


def make_info(
    name: str,
    kind: TaskKind,
    vocab_size: int,
    num_classes: int,
    splits: Mapping[str, SequenceData],
    description: str,
) -> TaskInfo:
    """A :class:`TaskInfo` whose ``max_len`` is the longest sequence in ``splits``."""
    return TaskInfo(name, kind, vocab_size, num_classes, longest(splits), description)


def check_writable(paths: Iterable[Path], overwrite: bool) -> None:
    """Raise FileExistsError for the first existing path unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")


def find_prepared(
    directory: str | None, names: Mapping[str, str], task: str = ""
) -> dict[str, Path] | None:
    """The prepared files ``names`` (split -> file name) in ``directory`` (``data.dir``).

    Returns None when ``directory`` is unset (the caller then generates the data).

    Raises:
        FileNotFoundError: ``directory`` does not exist, or holds none or only some of the
            files (a ``data.dir`` is never silently ignored).
    """
    if not directory:
        return None
    check_dir(directory)
    paths = {split: Path(directory) / name for split, name in names.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if len(missing) == len(paths):
        how = f"`sbmt data {task} --out {directory}`" if task else "`sbmt data TASK --out DIR`"
        raise FileNotFoundError(
            f"data.dir {directory} holds none of {', '.join(names.values())}; write them with "
            f"{how}, or leave data.dir unset to generate the data in memory"
        )
    if missing:
        raise FileNotFoundError(f"incomplete prepared data, missing: {', '.join(missing)}")
    return paths


def check_dir(directory: str | Path) -> None:
    """Raise FileNotFoundError naming ``data.dir`` unless it is an existing directory."""
    if not Path(directory).is_dir():
        what = "is not a directory" if Path(directory).exists() else "does not exist"
        raise FileNotFoundError(f"data.dir {directory} {what}")


def check_nonempty(path: str | Path, line: int, tokens: Sized, what: str = "sequence") -> None:
    """A :func:`data_error` for an empty sequence read from ``path:line``."""
    if len(tokens) == 0:
        raise data_error(path, line, f"empty {what} (every example needs at least one token)")


def check_sequences(task: str, splits: Mapping[str, SequenceData]) -> None:
    """Raise ValueError naming the split and example of the first empty sequence.

    An empty sequence has nothing to attend to; in a batch of them, the model would fail with an
    error about tensor shapes.
    """
    for split, data in splits.items():
        for seqs in data.sequences:
            for i, tokens in enumerate(seqs):
                if len(tokens) == 0:
                    raise ValueError(
                        f"task {task}: example {i} of the {split} split is an empty sequence "
                        "(every example needs at least one token)"
                    )


def manifest_path(directory: str | Path, task: str) -> Path:
    """Where :func:`write_manifest` puts a task's manifest."""
    return Path(directory) / f"{task}.json"


def user_source(cfg: DataConfig) -> str | None:
    """``cfg.source``, else the source recorded in ``cfg.dir``'s manifest for the task."""
    if cfg.source:
        return cfg.source
    if cfg.dir and manifest_path(cfg.dir, cfg.task).is_file():
        source = json.loads(manifest_path(cfg.dir, cfg.task).read_text()).get("source")
        return str(source) if source else None
    return None


def write_manifest(
    out_dir: Path, source: str | None, info: TaskInfo, splits: Mapping[str, SequenceData]
) -> Path:
    """Write ``<task>.json`` recording where a user-supplied task's data lives and its sizes."""
    manifest: dict[str, Any] = {
        "task": info.name,
        "source": str(Path(source).resolve()) if source else None,
        "splits": {name: len(data) for name, data in splits.items()},
        "vocab_size": info.vocab_size,
        "num_classes": info.num_classes,
        "max_len": info.max_len,
    }
    path = manifest_path(out_dir, info.name)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
