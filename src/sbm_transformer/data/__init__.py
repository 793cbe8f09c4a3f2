"""Task data: a registry of tasks, :func:`load_task` and :func:`prepare`.

Tasks (formats and token ids in docs/data.md):

* ``listops``: LRA's ListOps, generated or read from ``basic_*.tsv`` (classify, 10 classes).
* ``repeat``: repeated-token tagging, generated (tag, 2 classes).
* ``image``: Fashion-MNIST pixels, or CIFAR-10 grey when ``source`` is a CIFAR-10 batches
  directory (classify, 10 classes).
* ``text``: byte-level text classification from user files (classify).
* ``retrieval``: byte-level AAN-format pairs when ``source`` is set, else the synthetic matching
  task (match, 2 classes).
* ``pathfinder``: LRA's pathfinder32 images from ``source`` (classify, 2 classes).
* ``lm``: byte-level causal language model over the text file ``source``, else over generated
  ListOps expressions (lm).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sbm_transformer.data import images, listops, pathfinder, synthetic, text
from sbm_transformer.data.base import (
    IGNORE_INDEX,
    PAD_ID,
    Batch,
    DataConfig,
    SequenceData,
    TaskInfo,
    TaskKind,
    collate_fn,
    pad_sequences,
)
from sbm_transformer.data.common import (
    Progress,
    check_dir,
    check_sequences,
    check_writable,
    manifest_path,
    user_source,
    write_manifest,
)

#: ``loader(cfg, progress)``; ``progress(done, total)`` is called as examples are generated or read.
Loader = Callable[[DataConfig, Progress | None], tuple[TaskInfo, dict[str, SequenceData]]]
Preparer = Callable[[DataConfig, Path, Progress | None, bool], list[Path]]


def _load_retrieval(
    cfg: DataConfig, progress: Progress | None = None
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    return text.load_pairs(cfg) if user_source(cfg) else synthetic.load_match(cfg, progress)


#: Task name -> ``loader(cfg) -> (TaskInfo, {"train", "val", "test": SequenceData})``.
TASKS: dict[str, Loader] = {
    "listops": listops.load,
    "repeat": synthetic.load_repeat,
    "image": images.load,
    "text": text.load_text,
    "retrieval": _load_retrieval,
    "pathfinder": pathfinder.load,
    "lm": text.load_lm,
}


#: Tasks whose data is always the user's (or a system package's): with ``data.dir`` set they
#: need the manifest that ``prepare`` writes there.
_SOURCE_TASKS = ("image", "text", "pathfinder")


def load_task(
    cfg: DataConfig, progress: Progress | None = None
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    """The task ``cfg.task``: its :class:`TaskInfo` and its ``train``, ``val``, ``test`` splits.

    Generated tasks read the files that :func:`prepare` wrote when ``cfg.dir`` is set, else
    generate the data in memory from ``cfg.seed``; ``progress(done, total)`` is called as
    examples are generated (or, for pathfinder, read).

    Raises:
        ValueError: unknown task; an empty sequence (naming the file and line, or the split and
            example); malformed files (naming the file and line).
        FileNotFoundError: ``cfg.dir`` is set but does not exist or holds no data for the task.
    """
    loader = _loader(cfg.task)
    if cfg.dir:
        check_dir(cfg.dir)
        manifest = manifest_path(cfg.dir, cfg.task)
        if cfg.task in _SOURCE_TASKS and not cfg.source and not manifest.is_file():
            raise FileNotFoundError(
                f"data.dir {cfg.dir} has no {manifest.name} for task {cfg.task!r}; write it "
                f"with `sbmt data {cfg.task} --out {cfg.dir} --set data.source=PATH`, or set "
                "data.source instead of data.dir"
            )
    info, splits = loader(cfg, progress)
    check_sequences(info.name, splits)
    return info, splits


def _loader(task: str) -> Loader:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    return TASKS[task]


def _prepare_manifest(
    cfg: DataConfig, out_dir: Path, progress: Progress | None, overwrite: bool
) -> list[Path]:
    """Check a user-supplied source by loading it; record it in ``<task>.json``."""
    check_writable([manifest_path(out_dir, cfg.task)], overwrite)
    info, splits = _loader(cfg.task)(cfg, progress)
    check_sequences(info.name, splits)
    if progress is not None:
        progress(sum(map(len, splits.values())), sum(map(len, splits.values())))
    return [write_manifest(out_dir, user_source(cfg), info, splits)]


def _by_source(with_source: Preparer, without: Preparer) -> Preparer:
    def prepare_task(
        cfg: DataConfig, out_dir: Path, progress: Progress | None, overwrite: bool
    ) -> list[Path]:
        chosen = with_source if user_source(cfg) else without
        return chosen(cfg, out_dir, progress, overwrite)

    return prepare_task


_PREPARERS: dict[str, Preparer] = {
    "listops": listops.prepare,
    "repeat": synthetic.prepare_repeat,
    "image": _prepare_manifest,
    "text": _prepare_manifest,
    "retrieval": _by_source(_prepare_manifest, synthetic.prepare_match),
    "pathfinder": _prepare_manifest,
    "lm": _by_source(_prepare_manifest, text.prepare_lm),
}


def prepare(
    cfg: DataConfig,
    out_dir: str | Path,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write task ``cfg.task``'s data files into ``out_dir`` and return their paths.

    Generated tasks (listops, repeat, synthetic retrieval, lm without a source) are generated and
    written; tasks on user files (image, text, retrieval and lm with a source, pathfinder) are
    loaded to check them and recorded in ``<task>.json``, which lets ``load_task`` find the
    source from ``cfg.dir``. ``progress(done, total)`` is called as examples are made.

    Raises:
        ValueError: unknown task.
        FileExistsError: a file to write exists and ``overwrite`` is False (checked first).
    """
    _loader(cfg.task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _PREPARERS[cfg.task](cfg, out, progress, overwrite)


__all__ = [
    "IGNORE_INDEX",
    "PAD_ID",
    "TASKS",
    "Batch",
    "DataConfig",
    "SequenceData",
    "TaskInfo",
    "TaskKind",
    "collate_fn",
    "load_task",
    "pad_sequences",
    "prepare",
]
