"""The training loop: build, loop, log, evaluate, checkpoint.

``train(cfg, run_dir)`` trains ``build_model(task, cfg.model)`` on ``load_task(cfg.data)`` with
AdamW, linear warm-up and decay, gradient accumulation and clipping, optional mixed precision, and
the sparsity term ``w * mean density`` of sampled-graph attentions. Every ``eval_every`` steps it
evaluates on the validation split, keeps the best checkpoint, and at the end reports the test
metrics of the best one. It is seeded and reproducible, and ``resume=True`` continues a stopped
run exactly: the next batch and all metrics are those an uninterrupted run would have produced.

A run directory holds ``config.yaml``, ``metrics.csv`` (and TensorBoard events), ``density.csv``
(per layer and head), ``checkpoints/`` (see :mod:`sbm_transformer.checkpoint`), ``summary.json``
and ``plots/``.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sbm_transformer._memory import PeakMemory
from sbm_transformer.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from sbm_transformer.config import RunConfig, TrainConfig, from_dict, validate
from sbm_transformer.data import load_task
from sbm_transformer.data.base import IGNORE_INDEX, Batch, SequenceData, TaskInfo, collate_fn
from sbm_transformer.models import ModelOutput, build_model, is_stochastic, set_sampling_seed
from sbm_transformer.tensorboard import ScalarWriter
from sbm_transformer.threads import AdaptiveThreads

log = logging.getLogger(__name__)

METRIC_FIELDS = ["step", "split", "loss", "accuracy", "density", "lr", "seconds", "steps_per_s"]


class RunDirError(ValueError):
    """A run directory cannot be used as asked (exists without --resume/--overwrite, ...)."""


# ------------------------------------------------------------------------------ helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    return device


def autocast_context(amp: str, device: torch.device) -> tuple[Any, bool]:
    """(autocast context factory, whether a GradScaler is needed) for ``train.amp``."""
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"train.amp must be auto, off, bf16 or fp16, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "off":
        return nullcontext, False
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 or off on a CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), amp == "fp16"


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base learning rate over ``warmup`` steps, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (steps - step) / max(steps - warmup, 1))

    return factor


def sparsity_weight_at(t: TrainConfig, step: int) -> float:
    """The sparsity term's weight at ``step`` (0-based): 0 for ``sparsity_start`` steps, then a
    linear ramp over ``sparsity_ramp`` steps to ``sparsity_weight``."""
    if step < t.sparsity_start:
        return 0.0
    if t.sparsity_ramp <= 0:
        return t.sparsity_weight
    return t.sparsity_weight * min(1.0, (step - t.sparsity_start + 1) / t.sparsity_ramp)


def batch_order(n: int, batch_size: int, seed: int, start: int) -> Iterator[Tensor]:
    """Index batches from batch number ``start`` on: epoch e is a permutation seeded by (seed, e).

    Deterministic in (seed, batch number), so a resumed run gets exactly the next batch.
    """
    if n < batch_size:
        raise ValueError(
            f"the training split has {n} examples, fewer than train.batch_size={batch_size}"
        )
    per_epoch = n // batch_size
    epoch, perm = -1, torch.empty(0, dtype=torch.long)
    b = start
    while True:
        e, i = divmod(b, per_epoch)
        if e != epoch:
            epoch = e
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        yield perm[i * batch_size : (i + 1) * batch_size]
        b += 1


def make_batch(data: SequenceData, indices: Tensor, kind: str) -> Batch:
    return collate_fn(kind)([data[int(i)] for i in indices])  # type: ignore[arg-type]


def task_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean cross-entropy, number correct, number predicted) for sequence or token labels."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    valid = flat_labels != IGNORE_INDEX
    correct = ((flat_logits.argmax(-1) == flat_labels) & valid).sum()
    return loss, correct, valid.sum()


def rng_state() -> dict[str, Any]:
    """The random states of torch, Python and NumPy (tensors and JSON values)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    loss: float
    accuracy: float
    density: float | None
    per_layer_head: list[list[float]]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: SequenceData,
    task: TaskInfo,
    cfg: RunConfig,
    device: torch.device,
    *,
    samples: int | None = None,
    max_batches: int | None = None,
    autocast: Callable[[], Any] = nullcontext,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Loss and accuracy of ``model`` on ``data``.

    Stochastic attentions sample graphs with fixed seeds (``train.eval_seed``), so the same
    checkpoint always gets the same score; with ``samples`` > 1 the predicted probabilities are
    averaged over that many graphs per input. ``progress(done, total)`` is called after each
    batch.
    """
    samples = cfg.train.eval_samples if samples is None else samples
    if samples < 1:
        raise ValueError(f"eval samples must be >= 1, got {samples}")
    if not is_stochastic(model):
        samples = 1
    max_batches = max_batches if max_batches is not None else cfg.train.eval_batches
    was_training = model.training
    model.eval()
    bs = cfg.train.batch_size
    batches = [torch.arange(i, min(i + bs, len(data))) for i in range(0, len(data), bs)]
    if max_batches:
        batches = batches[:max_batches]
    total_loss = total_correct = total_count = 0.0
    densities: list[Tensor] = []
    for bi, idx in enumerate(batches):
        batch = make_batch(data, idx, task.kind).to(device)
        probs = None
        for s in range(samples):
            set_sampling_seed(model, cfg.train.eval_seed + 7919 * s + 104729 * bi)
            with autocast():
                out: ModelOutput = model(batch.tokens, batch.padding_mask)
            p = out.logits.float().softmax(-1)
            probs = p if probs is None else probs + p
            if out.densities:
                densities.append(torch.stack([d.float() for d in out.densities]))
        assert probs is not None
        probs = probs / samples
        flat = probs.reshape(-1, probs.shape[-1])
        labels = batch.labels.reshape(-1)
        valid = labels != IGNORE_INDEX
        nll = -torch.log(flat[valid].gather(1, labels[valid, None]).clamp_min(1e-12))
        total_loss += float(nll.sum())
        total_correct += float((flat.argmax(-1)[valid] == labels[valid]).sum())
        total_count += float(valid.sum())
        if progress is not None:
            progress(bi + 1, len(batches))
    set_sampling_seed(model, None)
    model.train(was_training)
    per = torch.stack(densities).mean(0) if densities else None  # (layers, H)
    return EvalResult(
        loss=total_loss / max(total_count, 1),
        accuracy=total_correct / max(total_count, 1),
        density=None if per is None else float(per.mean()),
        per_layer_head=[] if per is None else per.tolist(),
    )


# ------------------------------------------------------------------------------- run dir
def warm_up(
    model: nn.Module,
    data: SequenceData,
    kind: str,
    device: torch.device,
    autocast: Callable[[], Any] = nullcontext,
) -> None:
    """One throwaway training and evaluation step on a copy of ``model`` with two examples.

    It pays the process's one-off costs (numba kernel compilation, library and thread-pool
    start-up: about 150 MiB of resident memory on a CPU) before the run's peak memory is
    measured, so that the first run of a process (in ``sbmt compare``, the first attention) is
    not charged for them. ``model`` and every random state are left as they were.
    """
    state = rng_state()
    clone = copy.deepcopy(model).train()
    batch = make_batch(data, torch.arange(min(2, len(data))), kind).to(device)
    with autocast():
        out: ModelOutput = clone(batch.tokens, batch.padding_mask)
    loss, _, _ = task_loss(out.logits, batch.labels)
    density = out.mean_density()
    (loss if density is None else loss + density.float()).backward()
    optimizer = torch.optim.AdamW(clone.parameters())
    nn.utils.clip_grad_norm_(clone.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad(), autocast():
        clone.eval()(batch.tokens, batch.padding_mask)
    set_rng_state(state)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise RunDirError unless ``run_dir`` can be used as asked; changes nothing on disk."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if resume:
        if not (run_dir / "config.yaml").exists():
            runs = sorted(p.parent.name for p in run_dir.glob("*/config.yaml"))
            hint = (
                f"; it holds the runs {', '.join(runs)} of a comparison: continue it with "
                f"sbmt compare ... --out {run_dir} --resume"
                if runs
                else ""
            )
            raise RunDirError(
                f"cannot resume {run_dir}: it has no config.yaml (not a run directory){hint}"
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"run directory {run_dir} exists; pass --resume to continue it or --overwrite "
                "to replace it"
            )
        if not (run_dir / "config.yaml").exists():
            raise RunDirError(
                f"refusing to overwrite {run_dir}: it is not a run directory (no config.yaml)"
            )


def create_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Make ``run_dir`` (after :func:`check_run_dir`), replacing an old run when ``overwrite``."""
    if overwrite and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def checkpoint_step(ckpt_dir: Path, name: str) -> int | None:
    """The step of checkpoint ``name`` in ``ckpt_dir`` from its index, None when unreadable."""
    try:
        return int(json.loads((ckpt_dir / f"{name}.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _no_last_checkpoint(run_dir: Path, cfg: RunConfig) -> RunDirError:
    """The error for ``--resume`` on a run without ``checkpoints/last.json``: what is there, and
    how to start over (resuming from step 0 would silently discard its metrics)."""
    found = []
    best = checkpoint_step(run_dir / "checkpoints", "best")
    if best is not None:
        found.append(f"a best checkpoint at step {best} (sbmt eval {run_dir} evaluates it)")
    steps = [int(r["step"]) for r in metric_rows(run_dir / "metrics.csv")]
    if steps:
        found.append(f"metrics up to step {max(steps)}")
    what = "; it has " + " and ".join(found) if found else "; nothing was trained yet"
    return RunDirError(
        f"cannot resume {run_dir}: it has no last checkpoint (checkpoints/last.json){what}. "
        f"To start over: sbmt train --task {cfg.data.task} --attention {cfg.model.attention} "
        f"--config {run_dir / 'config.yaml'} --run-dir {run_dir} --overwrite"
    )


def metric_rows(path: Path) -> list[dict[str, str]]:
    """Complete rows of a metrics.csv (a row cut short by a crash is dropped)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    complete = []
    for row in rows:
        try:
            int(row["step"])
        except (TypeError, ValueError, KeyError):
            continue
        if None not in row.values():
            complete.append(row)
    return complete


class StopRequest:
    """Ctrl-C as a request to stop at the next step boundary (a context manager).

    While active (in the main thread, unless SIGINT is ignored), the first SIGINT only sets
    :attr:`requested`: the training loop finishes the step in progress, with its log row,
    evaluation and checkpoints when due, saves ``last`` and stops, so the checkpoint is one an
    uninterrupted run passes through. A second SIGINT raises KeyboardInterrupt at once; nothing
    is saved from the half-finished step. The previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not signal.SIG_IGN:
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _notify(
            "\nCtrl-C: stopping after the step in progress (with its evaluation if one is due) "
            "and saving a checkpoint; press Ctrl-C again to stop at once without saving\n"
        )


def _notify(text: str) -> None:
    # straight to file descriptor 2: print() from a signal handler can hit a stream the
    # interrupted code is writing to ("reentrant call")
    with suppress(OSError):
        os.write(2, text.encode())


class MetricLog:
    """metrics.csv, density.csv and TensorBoard events of a run; rows after ``truncate_after``
    (a resumed run's checkpoint step) are dropped so that a resumed run logs them again."""

    def __init__(self, run_dir: Path, truncate_after: int | None) -> None:
        self.metrics_path = run_dir / "metrics.csv"
        self.density_path = run_dir / "density.csv"
        self.tb_dir = run_dir / "tensorboard"
        for path, header in (
            (self.metrics_path, METRIC_FIELDS),
            (self.density_path, ["step", "split", "layer", "head", "density"]),
        ):
            rows = []
            if truncate_after is not None:
                rows = [r for r in metric_rows(path) if int(r["step"]) <= truncate_after]
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(rows)
        if self.tb_dir.exists():
            shutil.rmtree(self.tb_dir)
        self.tb = ScalarWriter(self.tb_dir)
        for row in self.rows():  # TensorBoard mirrors metrics.csv
            self._tb_row(row)

    def rows(self) -> list[dict[str, str]]:
        with open(self.metrics_path, newline="") as f:
            return list(csv.DictReader(f))

    def _tb_row(self, row: dict[str, Any]) -> None:
        for key in ("loss", "accuracy", "density", "lr"):
            if row.get(key) not in (None, ""):
                self.tb.add_scalar(f"{key}/{row['split']}", float(row[key]), int(row["step"]))

    def add(self, row: dict[str, Any], per_layer_head: list[list[float]] | None = None) -> None:
        with open(self.metrics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(
                {k: row.get(k, "") for k in METRIC_FIELDS}
            )
        self._tb_row(row)
        if per_layer_head:
            with open(self.density_path, "a", newline="") as f:
                w = csv.writer(f)
                for layer, heads in enumerate(per_layer_head):
                    for head, d in enumerate(heads):
                        w.writerow([row["step"], row["split"], layer, head, f"{d:.6g}"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


# ----------------------------------------------------------------------------------- train
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(
    cfg: RunConfig,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TaskInfo, dict[str, SequenceData], nn.Module]:
    """Load the task and build its model (seeded); ``progress(done, total)`` follows data
    generation."""
    task, splits = load_task(cfg.data, progress)
    seed_everything(cfg.train.seed)
    max_len = cfg.data.max_len or task.max_len
    model = build_model(task, cfg.model, max_len).to(device)
    return task, splits, model


def check_splits(splits: dict[str, SequenceData], cfg: RunConfig) -> None:
    """Raise ValueError unless the splits can train and evaluate with ``cfg``."""
    for name in ("val", "test"):
        if len(splits[name]) == 0:
            raise ValueError(f"the {name} split is empty (data.{name}_size?)")
    n, bs = len(splits["train"]), cfg.train.batch_size
    if n < bs:
        raise ValueError(f"the training split has {n} examples, fewer than train.batch_size={bs}")


@dataclass
class _Resume:
    """What ``--resume`` continues from."""

    state: dict[str, Any]
    step: int
    saved_steps: int  # train.steps of the saved configuration


def _load_resume(run_dir: Path, cfg: RunConfig) -> _Resume:
    saved = load_run_config(run_dir)
    changed = config_differences(saved, cfg) - {"train.steps"}
    if changed:
        raise RunDirError(
            f"cannot resume {run_dir} with a different configuration "
            f"({', '.join(sorted(changed))} differ); only train.steps may change"
        )
    ckpt_dir = run_dir / "checkpoints"
    if not (ckpt_dir / "last.json").exists():
        raise _no_last_checkpoint(run_dir, saved)
    state, step = load_checkpoint(ckpt_dir, "last")
    if step > cfg.train.steps:
        raise RunDirError(
            f"cannot resume {run_dir} with train.steps={cfg.train.steps}: its last checkpoint is "
            f"at step {step}"
        )
    return _Resume(state, step, saved.train.steps)


def _new_window() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "density": 0.0, "n": 0}


@dataclass
class _Run:
    """Everything a run's loop works on; :meth:`checkpoint` saves the resumable part."""

    cfg: RunConfig
    ckpt_dir: Path
    device: torch.device
    autocast: Callable[[], Any]
    task: TaskInfo
    splits: dict[str, SequenceData]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    memory: PeakMemory
    step: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"accuracy": -math.inf, "step": -1})
    elapsed_before: float = 0.0
    # training metrics accumulated since the last log line (saved with checkpoints, so that a
    # resumed run logs the same numbers as an uninterrupted one)
    window: dict[str, float] = field(default_factory=_new_window)
    last_saved: int | None = None  # step of the last "last" checkpoint written or loaded

    def checkpoint(self, name: str, elapsed: float) -> None:
        save_checkpoint(
            self.ckpt_dir,
            name,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "best": self.best,
                "elapsed": elapsed,
                "window": self.window,
            },
            step=self.step,
        )
        if name == "last":
            self.last_saved = self.step


def _set_up(
    cfg: RunConfig, run_dir: Path, resume: bool, quiet: bool, echo: Callable[[str], None]
) -> tuple[_Run, _Resume | None]:
    """Load the checkpoint to resume, the data and the model, and run one throwaway step:
    everything that can fail on the user's input, before anything is written."""
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    resumed = _load_resume(run_dir, cfg) if resume else None
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    autocast, needs_scaler = autocast_context(t.amp, device)
    data_bar = _TaskBar("data", "example", quiet, echo)
    try:
        task, splits, model = build(cfg, device, data_bar)
    finally:
        data_bar.close()
    check_splits(splits, cfg)
    warm_up(model, splits["train"], task.kind, device, autocast)
    memory = PeakMemory(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    run = _Run(
        cfg, ckpt_dir, device, autocast, task, splits, model, optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup, t.steps)),
        torch.amp.GradScaler("cuda") if needs_scaler else None, memory,
    )  # fmt: skip
    if resumed is not None:
        state = resumed.state
        load_model_state(model, state["model"], str(ckpt_dir / "last.json"))
        try:
            optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"checkpoint {ckpt_dir / 'last.json'}: optimizer state does not fit: {err}"
            ) from err
        run.step = run.last_saved = resumed.step
        run.best = state["best"]
        run.elapsed_before = float(state.get("elapsed", 0.0))
        run.window = dict(state["window"])
        set_rng_state(state["rng"])
    return run, resumed


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
    resume_hint: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate and write a run directory; returns the summary (also ``summary.json``).

    Everything that can be checked is checked before the run directory is created or changed:
    the configuration (:func:`sbm_transformer.config.validate`), the directory, the checkpoint
    to resume, the data and the model (one throwaway step). Ctrl-C stops at the next step
    boundary with a checkpoint (see :class:`StopRequest`) and raises KeyboardInterrupt;
    ``resume_hint`` is the command the message gives to continue (default
    ``sbmt train --resume RUN_DIR``).

    Raises:
        ValueError: an invalid configuration, data or model (one line naming the problem).
        RunDirError: the directory exists (without ``resume``/``overwrite``), is not a run, or
            cannot be resumed (no last checkpoint, a different configuration).
        CheckpointError: ``resume`` with a corrupt or incompatible checkpoint.
        OSError: a file cannot be written (``CheckpointWriteError`` for checkpoints).
        KeyboardInterrupt: after Ctrl-C, once the checkpoint is saved (or, on a second Ctrl-C,
            at once).
    """
    run_dir = Path(run_dir)
    validate(cfg)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    hint = resume_hint or f"sbmt train --resume {run_dir}"
    try:
        run, resumed = _set_up(cfg, run_dir, resume, quiet, echo)
    except KeyboardInterrupt:
        echo("\ninterrupted before training started; nothing was written")
        raise
    with StopRequest() as stop:
        try:
            if not resume:
                create_run_dir(run_dir, overwrite=overwrite)
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
            _describe(run, run_dir, echo)
            if resumed is not None:
                echo(f"resuming at step {run.step} of {cfg.train.steps}")
                if resumed.saved_steps != cfg.train.steps:
                    echo(_reschedule(run.optimizer, run.scheduler, cfg.train, resumed.saved_steps))
            train_seconds = _loop(run, run_dir, resume, stop, quiet, echo)
        except KeyboardInterrupt:
            # a second Ctrl-C (or one outside the handler): the step in progress is half done,
            # so nothing is saved from it and the last checkpoint written stays the one to use
            saved = checkpoint_step(run.ckpt_dir, "last")
            kept = (
                f"the last checkpoint (step {saved}) is kept; continue with: {hint}"
                if saved is not None
                else f"no checkpoint was saved; start again with --overwrite --run-dir {run_dir}"
            )
            echo(f"\ninterrupted again: stopped at once, after step {run.step}, unsaved; {kept}")
            raise
    if stop.requested:
        done = "; training is complete, resuming runs the final evaluation" * (
            run.step == cfg.train.steps
        )
        echo(f"\ninterrupted: saved a checkpoint at step {run.step}{done}; continue with: {hint}")
        raise KeyboardInterrupt
    try:
        return finish(
            run_dir, cfg, run.task, run.splits, run.model, run.device, run.autocast,
            train_seconds, run.memory.peak(), echo, quiet=quiet,
        )  # fmt: skip
    except KeyboardInterrupt:
        echo(
            "\ninterrupted during the final evaluation; training is complete (checkpoint at "
            f"step {run.step}); {hint} runs the final evaluation"
        )
        raise


def _describe(run: _Run, run_dir: Path, echo: Callable[[str], None]) -> None:
    splits, cfg = run.splits, run.cfg
    echo(f"run: {run_dir}")
    echo(
        f"task: {run.task.name} ({run.task.kind}, {run.task.description}); train/val/test = "
        f"{len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])}"
    )
    echo(
        f"model: {type(run.model).__name__} with {cfg.model.attention} attention, "
        f"{count_parameters(run.model):,} parameters, device {run.device}"
    )
    echo("config:\n" + "\n".join("  " + line for line in cfg.to_yaml().splitlines()))


def _loop(
    run: _Run,
    run_dir: Path,
    resume: bool,
    stop: StopRequest,
    quiet: bool,
    echo: Callable[[str], None],
) -> float:
    """Train from ``run.step`` to ``train.steps`` (logging, evaluating and checkpointing), or
    until ``stop`` is requested: then the step in progress is finished and ``last`` is saved.
    Returns the training time in seconds (of this and earlier sessions)."""
    cfg, t = run.cfg, run.cfg.train
    metrics = MetricLog(run_dir, truncate_after=run.step if resume else None)
    batches = batch_order(len(run.splits["train"]), t.batch_size, t.seed, run.step)
    progress = _Progress(t.steps, run.step, quiet)
    t_start = t_window = time.perf_counter()
    # train.threads = 0: use the CPUs other processes leave free (spinning threads on busy
    # cores made trainings 10x slower; see threads.AdaptiveThreads)
    governor = AdaptiveThreads() if t.threads == 0 and run.device.type == "cpu" else None

    def elapsed() -> float:
        return run.elapsed_before + time.perf_counter() - t_start

    try:
        run.model.train()
        while run.step < t.steps and not stop.requested:
            stats = train_step(
                run.model, run.optimizer, run.scheduler, run.scaler, run.autocast,
                run.splits["train"], run.task.kind, next(batches), t, run.step, run.device,
            )  # fmt: skip
            run.step += 1
            if governor is not None:
                governor.poll()
            window = run.window
            window["loss"] += stats.loss
            window["correct"] += stats.correct
            window["count"] += stats.count
            window["density"] += stats.density or 0.0
            window["n"] += 1
            if run.step % t.log_every == 0 or run.step == t.steps:
                now = time.perf_counter()
                n = max(int(window["n"]), 1)
                row = {
                    "step": run.step,
                    "split": "train",
                    "loss": f"{window['loss'] / n:.6g}",
                    "accuracy": f"{window['correct'] / max(window['count'], 1):.6g}",
                    "density": f"{window['density'] / n:.6g}" if stats.per_layer_head else "",
                    "lr": f"{run.scheduler.get_last_lr()[0]:.6g}",
                    "seconds": f"{elapsed():.3f}",
                    "steps_per_s": f"{n / max(now - t_window, 1e-9):.4g}",
                }
                metrics.add(row, stats.per_layer_head)
                progress.update(run.step, row)
                if quiet:
                    echo(_format_row(row, t.steps))
                run.window = _new_window()
                t_window = now
            if run.step % t.eval_every == 0 or run.step == t.steps:
                bar = _TaskBar("val", "batch", quiet, echo, announce=False)
                try:
                    result = evaluate(
                        run.model, run.splits["val"], run.task, cfg, run.device,
                        autocast=run.autocast, progress=bar,
                    )  # fmt: skip
                finally:
                    bar.close()
                row = {
                    "step": run.step,
                    "split": "val",
                    "loss": f"{result.loss:.6g}",
                    "accuracy": f"{result.accuracy:.6g}",
                    "density": "" if result.density is None else f"{result.density:.6g}",
                    "seconds": f"{elapsed():.3f}",
                }
                metrics.add(row, result.per_layer_head)
                if quiet:
                    echo(_format_row(row, t.steps))
                else:
                    progress.write(_format_row(row, t.steps))
                if result.accuracy > run.best["accuracy"]:
                    run.best = {"accuracy": result.accuracy, "step": run.step}
                    run.checkpoint("best", elapsed())
                run.checkpoint("last", elapsed())
        if stop.requested and run.last_saved != run.step:
            run.checkpoint("last", elapsed())
    finally:
        progress.close()
        metrics.close()
        if governor is not None:
            governor.restore()
    return elapsed()


@dataclass
class StepStats:
    """Training metrics of one optimizer step."""

    loss: float  # mean task loss over the step's examples
    correct: float
    count: float
    density: float | None  # mean attention density (sampled-graph attentions)
    per_layer_head: list[list[float]] | None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    autocast: Callable[[], Any],
    data: SequenceData,
    kind: str,
    indices: Tensor,
    t: TrainConfig,
    step: int,
    device: torch.device,
) -> StepStats:
    """Training step ``step + 1`` on the examples ``indices`` of ``data``.

    The examples are split into ``t.grad_accum`` micro-batches; the loss is the task loss plus
    the sparsity weight at ``step`` times the mean density; then gradient clipping
    (``t.clip``), the optimizer step and the scheduler step.
    """
    sparsity_weight = sparsity_weight_at(t, step)
    optimizer.zero_grad(set_to_none=True)
    step_loss = step_correct = step_count = 0.0
    step_density: list[Tensor] = []
    for micro in indices.chunk(t.grad_accum):
        batch = make_batch(data, micro, kind).to(device)
        with autocast():
            out: ModelOutput = model(batch.tokens, batch.padding_mask)
        loss, correct, count = task_loss(out.logits, batch.labels)
        density = out.mean_density()
        total = loss if density is None else loss + sparsity_weight * density.float()
        total = total * (len(micro) / len(indices))
        (scaler.scale(total) if scaler else total).backward()
        step_loss += float(loss.detach()) * len(micro) / len(indices)
        step_correct += float(correct)
        step_count += float(count)
        if out.densities:
            step_density.append(torch.stack([d.detach().float() for d in out.densities]))
    if scaler:
        scaler.unscale_(optimizer)
    if t.clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), t.clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    densities = torch.stack(step_density) if step_density else None  # (micro, layers, H)
    return StepStats(
        loss=step_loss,
        correct=step_correct,
        count=step_count,
        density=None if densities is None else float(densities.mean()),
        per_layer_head=None if densities is None else densities.mean(0).tolist(),
    )


def _reschedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    t: TrainConfig,
    saved_steps: int,
) -> str:
    """After loading a checkpoint of a run with ``saved_steps`` steps into a scheduler built for
    ``t.steps``: set the rate of the next step from the new schedule, and say what happened.

    LambdaLR saves its step count and last rates but not the schedule function, so the loaded
    scheduler follows the new ``t.steps`` from the next step on; without this, the first step
    after resuming would still use the saved rate (0 when the old run had finished).
    """
    step = scheduler.last_epoch
    old = optimizer.param_groups[0]["lr"]
    factor = lr_lambda(t.warmup, t.steps)(step)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor
    new = optimizer.param_groups[0]["lr"]
    return (
        f"train.steps changed from {saved_steps} to {t.steps}: the learning-rate schedule is "
        f"recomputed for {t.steps} steps; the rate at step {step} is {new:.3g} (the "
        f"{saved_steps}-step schedule was at {old:.3g}) and decays linearly to 0 at step "
        f"{t.steps}; steps before {step} keep the old schedule"
    )


def finish(
    run_dir: Path,
    cfg: RunConfig,
    task: TaskInfo,
    splits: dict[str, SequenceData],
    model: nn.Module,
    device: torch.device,
    autocast: Callable[[], Any],
    train_seconds: float,
    peak_memory: int,
    echo: Callable[[str], None],
    *,
    quiet: bool = True,
) -> dict[str, Any]:
    """Test the best checkpoint, write the plots and, last, summary.json (a run with a summary
    is complete)."""
    ckpt_dir = run_dir / "checkpoints"
    best_state, best_step = load_checkpoint(ckpt_dir, "best")
    load_model_state(model, best_state["model"], str(ckpt_dir / "best.json"))
    if quiet:
        echo(f"final evaluation of the best checkpoint (step {best_step}) on val and test")
    results = {}
    for split in ("val", "test"):
        bar = _TaskBar(f"final {split}", "batch", quiet, echo, announce=False)
        try:
            results[split] = evaluate(
                model, splits[split], task, cfg, device, autocast=autocast, progress=bar
            )
        finally:
            bar.close()
    val, test = results["val"], results["test"]
    summary = {
        "task": task.name,
        "attention": cfg.model.attention,
        "best_step": best_step,
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "test_density": test.density,
        "test_density_per_layer_head": test.per_layer_head,
        "train_seconds": train_seconds,
        "steps": cfg.train.steps,
        "steps_per_s": cfg.train.steps / max(train_seconds, 1e-9),
        "seconds_per_step": train_seconds / max(cfg.train.steps, 1),
        "peak_memory_bytes": peak_memory,
        "parameters": count_parameters(model),
        "eval_samples": cfg.train.eval_samples,
        "majority_accuracy": majority_accuracy(splits["test"], task),
        "device": str(device),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    from sbm_transformer import plots

    made = plots.plot_run(run_dir, model=model, data=splits["val"], task=task, device=device)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    echo(
        f"test accuracy {test.accuracy:.4f} (best val {val.accuracy:.4f} at step {best_step})"
        + ("" if test.density is None else f", density {test.density:.2%}")
        + f"; {train_seconds / max(cfg.train.steps, 1) * 1000:.0f} ms/step"
    )
    echo(f"summary: {run_dir / 'summary.json'}; plots: " + ", ".join(str(p) for p in made))
    return summary


def majority_accuracy(data: SequenceData, task: TaskInfo) -> float | None:
    """Accuracy of always predicting the most common label of ``data`` (None for ``lm``)."""
    if task.kind == "lm" or len(data) == 0:
        return None
    labels = data.labels
    if isinstance(labels, Tensor):
        flat = labels.reshape(-1)
    else:
        assert labels is not None
        flat = torch.cat([torch.as_tensor(x).reshape(-1) for x in labels])
    flat = flat[flat != IGNORE_INDEX]
    return float(torch.bincount(flat).max()) / max(flat.numel(), 1)


def load_run_config(run_dir: Path) -> RunConfig:
    """The configuration saved in a run directory."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml)")
    return from_dict(_load_yaml(path), source=str(path))


def config_differences(a: RunConfig, b: RunConfig) -> set[str]:
    da, db = a.to_dict(), b.to_dict()
    return {f"{s}.{k}" for s in da for k in da[s] if da[s][k] != db[s][k]}


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    checkpoint: str = "best",
    samples: int | None = None,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> EvalResult:
    """Re-evaluate a run's checkpoint (``sbmt eval``)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, val, test")
    if samples is not None and samples < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {samples}")
    state, step = load_checkpoint(run_dir / "checkpoints", checkpoint)
    device = resolve_device(cfg.train.device)
    autocast, _ = autocast_context(cfg.train.amp, device)
    data_bar = _TaskBar("data", "example", quiet, echo)
    try:
        task, splits, model = build(cfg, device, data_bar)
    finally:
        data_bar.close()
    load_model_state(model, state["model"], str(run_dir / "checkpoints" / f"{checkpoint}.json"))
    bar = _TaskBar(f"eval {split}", "batch", quiet, echo, announce=False)
    try:
        result = evaluate(
            model, splits[split], task, cfg, device, samples=samples, autocast=autocast,
            progress=bar,
        )  # fmt: skip
    finally:
        bar.close()
    echo(
        f"{run_dir} [{checkpoint} @ step {step}] {split}: accuracy {result.accuracy:.4f}, "
        f"loss {result.loss:.4f}"
        + ("" if result.density is None else f", density {result.density:.2%}")
    )
    return result


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RunDirError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(values, dict):
        raise RunDirError(f"{path}: expected a mapping of sections")
    return values


def _format_row(row: dict[str, Any], steps: int) -> str:
    parts = [
        f"step {row['step']}/{steps}",
        row["split"],
        f"loss {float(row['loss']):.4f}",
        f"acc {float(row['accuracy']):.4f}",
    ]
    if row.get("density"):
        parts.append(f"density {float(row['density']):.2%}")
    if row.get("steps_per_s"):
        parts.append(f"{float(row['steps_per_s']):.2f} steps/s")
    return "  ".join(parts)


class _Progress:
    """tqdm progress bar (loss, accuracy, density, steps/s, ETA); a no-op in quiet mode."""

    def __init__(self, total: int, start: int, quiet: bool) -> None:
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def update(self, step: int, row: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.last)
        self.last = step
        post = {"loss": f"{float(row['loss']):.3f}", "acc": f"{float(row['accuracy']):.3f}"}
        if row.get("density"):
            post["density"] = f"{float(row['density']):.1%}"
        self.bar.set_postfix(post, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _TaskBar:
    """A ``progress(done, total)`` callback that draws a tqdm bar, created on the first call
    (work that reports no progress shows nothing) and removed when closed.

    In quiet mode there is no bar; with ``announce``, one line says what started.
    """

    def __init__(
        self,
        desc: str,
        unit: str,
        quiet: bool,
        echo: Callable[[str], None],
        *,
        announce: bool = True,
    ) -> None:
        self.desc, self.unit, self.quiet, self.echo, self.announce = (
            desc,
            unit,
            quiet,
            echo,
            announce,
        )
        self.bar: Any = None
        self.started = False

    def __call__(self, done: int, total: int) -> None:
        if not self.started:
            self.started = True
            if self.quiet:
                if self.announce:
                    self.echo(f"{self.desc}: {total} {self.unit}s ...")
            else:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=total, desc=self.desc, unit=self.unit, leave=False, dynamic_ncols=True
                )
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
