"""The trainer: set-up, the loop, checkpoints and the final evaluation of one run.

:func:`train` is the entry point; :class:`Trainer` holds a run's pieces (model, optimizer,
schedule, data, sinks, the resumable :class:`TrainState`) and its loop calls the step
(:mod:`.step`), evaluation (:mod:`.evaluation`), checkpointing (:meth:`Trainer.save`) and the
metric sinks (:mod:`.metrics`) in turn. The same code runs in one process and under torchrun
(:mod:`.distributed`): every rank trains on its share of each batch, rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbm_transformer._memory import PeakMemory
from sbm_transformer.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from sbm_transformer.config import RunConfig, TrainConfig, validate
from sbm_transformer.data import load_task
from sbm_transformer.data.base import SequenceData, TaskInfo
from sbm_transformer.models import build_model
from sbm_transformer.threads import AdaptiveThreads
from sbm_transformer.training.distributed import Distributed
from sbm_transformer.training.evaluation import EvalResult, evaluate, majority_accuracy, warm_up
from sbm_transformer.training.interrupt import StopRequest
from sbm_transformer.training.metrics import (
    ConsoleSink,
    CsvSink,
    MetricRecord,
    Sinks,
    TaskBar,
    TensorBoardSink,
    tensorboard_available,
)
from sbm_transformer.training.rundir import (
    RunDirError,
    check_run_dir,
    checkpoint_step,
    config_differences,
    create_run_dir,
    load_run_config,
    no_last_checkpoint,
)
from sbm_transformer.training.step import (
    StepStats,
    autocast_context,
    batch_order,
    lr_lambda,
    resolve_amp,
    resolve_device,
    seed_everything,
    train_step,
)


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


def check_splits(splits: dict[str, SequenceData], cfg: RunConfig, world_size: int = 1) -> None:
    """Raise ValueError unless the splits can train and evaluate with ``cfg``."""
    for name in ("val", "test"):
        if len(splits[name]) == 0:
            raise ValueError(f"the {name} split is empty (data.{name}_size?)")
    t = cfg.train
    n, bs = len(splits["train"]), t.batch_size
    if n < bs:
        raise ValueError(f"the training split has {n} examples, fewer than train.batch_size={bs}")
    if bs % (t.grad_accum * world_size):
        raise ValueError(
            f"train.batch_size ({bs}) must be a multiple of train.grad_accum ({t.grad_accum}) "
            f"times the number of processes ({world_size})"
        )


# --------------------------------------------------------------------------------- state
def _new_window() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "density": 0.0, "n": 0}


@dataclass
class TrainState:
    """What a checkpoint saves beyond model and optimizer: the step, the best validation score,
    the training time, and the metrics accumulated since the last log line (so that a resumed
    run logs the same numbers as an uninterrupted one)."""

    step: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"accuracy": -math.inf, "step": -1})
    elapsed: float = 0.0  # training seconds of earlier sessions
    window: dict[str, float] = field(default_factory=_new_window)

    def add(self, stats: StepStats) -> None:
        w = self.window
        w["loss"] += stats.loss
        w["correct"] += stats.correct
        w["count"] += stats.count
        w["density"] += stats.density or 0.0
        w["n"] += 1


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
        raise no_last_checkpoint(run_dir, saved)
    state, step = load_checkpoint(ckpt_dir, "last")
    if step > cfg.train.steps:
        raise RunDirError(
            f"cannot resume {run_dir} with train.steps={cfg.train.steps}: its last checkpoint is "
            f"at step {step}"
        )
    return _Resume(state, step, saved.train.steps)


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


# ------------------------------------------------------------------------------- trainer
class Trainer:
    """One run: built by :meth:`set_up` (which writes nothing), trained by :meth:`fit`,
    finished by :meth:`finish`. :func:`train` drives it."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        dist: Distributed,
        device: torch.device,
        quiet: bool,
        echo: Callable[[str], None],
    ) -> None:
        self.cfg, self.run_dir, self.dist, self.device = cfg, run_dir, dist, device
        self.ckpt_dir = run_dir / "checkpoints"
        self.quiet = quiet
        self.echo = echo if dist.is_main else (lambda _: None)
        self.amp = resolve_amp(cfg.train.amp, device)
        self.autocast, needs_scaler = autocast_context(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        self.state = TrainState()
        self.last_saved: int | None = None  # step of the last "last" checkpoint written or loaded
        self.stopped = False  # fit ended on a stop request (of any process)

    # ---------------------------------------------------------------------------- set-up
    def set_up(self, resume: bool) -> _Resume | None:
        """Load the checkpoint to resume, the data and the model, and run one throwaway step:
        everything that can fail on the user's input, before anything is written."""
        cfg, t = self.cfg, self.cfg.train
        resumed = _load_resume(self.run_dir, cfg) if resume else None
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        elif self.dist.enabled and self.device.type == "cpu":
            torch.set_num_threads(self.dist.default_threads())
        data_bar = TaskBar("data", "example", self.quiet or not self.dist.is_main, self.echo)
        try:
            self.task, self.splits, self.model = build(cfg, self.device, data_bar)
        finally:
            data_bar.close()
        check_splits(self.splits, cfg, self.dist.world_size)
        warm_up(self.model, self.splits["train"], self.task.kind, self.device, self.autocast)
        self.memory = PeakMemory(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup, t.steps)
        )
        if resumed is not None:
            self._load(resumed)
        self.trained: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        return resumed

    def _load(self, resumed: _Resume) -> None:
        state = resumed.state
        load_model_state(self.model, state["model"], str(self.ckpt_dir / "last.json"))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"checkpoint {self.ckpt_dir / 'last.json'}: optimizer state does not fit: {err}"
            ) from err
        self.state = TrainState(
            step=resumed.step,
            best=state["best"],
            elapsed=float(state.get("elapsed", 0.0)),
            window=dict(state["window"]),
        )
        self.last_saved = resumed.step

    def describe(self) -> None:
        splits, cfg = self.splits, self.cfg
        self.echo(f"run: {self.run_dir}")
        self.echo(
            f"task: {self.task.name} ({self.task.kind}, {self.task.description}); train/val/test"
            f" = {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])}"
        )
        self.echo(
            f"model: {type(self.model).__name__} with {cfg.model.attention} attention, "
            f"{count_parameters(self.model):,} parameters, device {self.device}"
            + (f", amp {self.amp}" if self.amp != "off" else "")
        )
        if self.dist.enabled:
            self.echo(
                f"processes: {self.dist.world_size} (DistributedDataParallel); global batch "
                f"{cfg.train.batch_size}, {cfg.train.batch_size // self.dist.world_size} per "
                "process"
            )
        self.echo("config:\n" + "\n".join("  " + line for line in cfg.to_yaml().splitlines()))

    # ------------------------------------------------------------------------ checkpoint
    def save(self, name: str, elapsed: float) -> None:
        """Checkpoint ``name`` (``last`` or ``best``), written by rank 0."""
        if name == "last":
            self.last_saved = self.state.step
        if not self.dist.is_main:
            return
        save_checkpoint(
            self.ckpt_dir,
            name,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "best": self.state.best,
                "elapsed": elapsed,
                "window": self.state.window,
            },
            step=self.state.step,
        )

    # ------------------------------------------------------------------------------ loop
    def _sinks(self, resume: bool) -> Sinks:
        if not self.dist.is_main:
            return Sinks([])
        truncate = self.state.step if resume else None
        sinks: list[Any] = [CsvSink(self.run_dir, truncate)]
        if tensorboard_available():
            sinks.append(TensorBoardSink(self.run_dir / "tensorboard", resume_step=truncate))
        sinks.append(ConsoleSink(self.cfg.train.steps, self.state.step, self.quiet, self.echo))
        return Sinks(sinks)

    def _reduce(self, stats: StepStats) -> StepStats:
        """The step's statistics over all processes."""
        if not self.dist.enabled:
            return stats
        plh = torch.tensor(stats.per_layer_head or [], dtype=torch.float64)
        head = [stats.loss * stats.examples, stats.correct, stats.count, stats.examples]
        values = torch.cat([torch.tensor(head, dtype=torch.float64), plh.flatten()])
        values = self.dist.sum(values.to(self.device)).cpu()
        examples = int(values[3])
        per_layer_head = None
        if stats.per_layer_head:
            per_layer_head = (values[4:].reshape(plh.shape) / self.dist.world_size).tolist()
        return StepStats(
            loss=float(values[0]) / max(examples, 1),
            correct=float(values[1]),
            count=float(values[2]),
            examples=examples,
            per_layer_head=per_layer_head,
        )

    def fit(self, resume: bool, stop: StopRequest) -> float:
        """Train from the state's step to ``train.steps`` (logging, evaluating and
        checkpointing), or until ``stop`` is requested on some process: then the step in
        progress is finished and ``last`` is saved. Returns the training time in seconds (of
        this and earlier sessions)."""
        t, state = self.cfg.train, self.state
        sinks = self._sinks(resume)
        batches = batch_order(len(self.splits["train"]), t.batch_size, t.seed, state.step)
        t_start = t_window = time.perf_counter()
        # train.threads = 0: use the CPUs other processes leave free (spinning threads on busy
        # cores made trainings 10x slower; see threads.AdaptiveThreads). Not under torchrun:
        # ranks with different thread counts would round differently and drift apart.
        adaptive = t.threads == 0 and self.device.type == "cpu" and not self.dist.enabled
        governor = AdaptiveThreads() if adaptive else None
        stopping = False

        def elapsed() -> float:
            return state.elapsed + time.perf_counter() - t_start

        try:
            self.trained.train()
            while state.step < t.steps:
                # every process stops at the same step boundary, whichever got the Ctrl-C
                stopping = self.dist.any(stop.requested, self.device)
                if stopping:
                    break
                stats = train_step(
                    self.trained, self.optimizer, self.scheduler, self.scaler, self.autocast,
                    self.splits["train"], self.task.kind, next(batches), t, state.step,
                    self.device, dist=self.dist,
                )  # fmt: skip
                stats = self._reduce(stats)
                state.step += 1
                if governor is not None:
                    governor.poll()
                state.add(stats)
                if state.step % t.log_every == 0 or state.step == t.steps:
                    now = time.perf_counter()
                    sinks.write(self._train_record(stats, elapsed(), now - t_window))
                    state.window = _new_window()
                    t_window = now
                if state.step % t.eval_every == 0 or state.step == t.steps:
                    self._evaluate(sinks, elapsed)
            # a Ctrl-C after the last step's check (in its evaluation) still stops here
            stopping = stopping or self.dist.any(stop.requested, self.device)
            if stopping and self.last_saved != state.step:
                self.save("last", elapsed())
            self.stopped = stopping
        finally:
            sinks.close()
            if governor is not None:
                governor.restore()
        return elapsed()

    def _train_record(self, stats: StepStats, elapsed: float, window_s: float) -> MetricRecord:
        w = self.state.window
        n = max(int(w["n"]), 1)
        return MetricRecord(
            step=self.state.step,
            split="train",
            loss=w["loss"] / n,
            accuracy=w["correct"] / max(w["count"], 1),
            density=w["density"] / n if stats.per_layer_head else None,
            lr=float(self.scheduler.get_last_lr()[0]),
            seconds=elapsed,
            steps_per_s=n / max(window_s, 1e-9),
            per_layer_head=stats.per_layer_head,
        )

    def _evaluate(self, sinks: Sinks, elapsed: Callable[[], float]) -> None:
        """Validation at the current step, its metrics line, and the checkpoints."""
        bar = TaskBar(
            "val", "batch", self.quiet or not self.dist.is_main, self.echo, announce=False
        )
        try:
            result = evaluate(
                self.model, self.splits["val"], self.task, self.cfg, self.device,
                autocast=self.autocast, progress=bar, dist=self.dist,
            )  # fmt: skip
        finally:
            bar.close()
        state = self.state
        sinks.write(
            MetricRecord(
                step=state.step,
                split="val",
                loss=result.loss,
                accuracy=result.accuracy,
                density=result.density,
                seconds=elapsed(),
                per_layer_head=result.per_layer_head or None,
            )
        )
        if result.accuracy > state.best["accuracy"]:
            state.best = {"accuracy": result.accuracy, "step": state.step}
            self.save("best", elapsed())
        self.save("last", elapsed())

    # ---------------------------------------------------------------------------- finish
    def finish(self, train_seconds: float) -> dict[str, Any]:
        """Test the best checkpoint, write the plots and, last, summary.json (a run with a
        summary is complete)."""
        cfg, model, echo = self.cfg, self.model, self.echo
        self.dist.barrier()  # rank 0 has written the best checkpoint
        best_state, best_step = load_checkpoint(self.ckpt_dir, "best")
        load_model_state(model, best_state["model"], str(self.ckpt_dir / "best.json"))
        if self.quiet:
            echo(f"final evaluation of the best checkpoint (step {best_step}) on val and test")
        results: dict[str, EvalResult] = {}
        for split in ("val", "test"):
            bar = TaskBar(
                f"final {split}", "batch", self.quiet or not self.dist.is_main, echo,
                announce=False,
            )  # fmt: skip
            try:
                results[split] = evaluate(
                    model, self.splits[split], self.task, cfg, self.device,
                    autocast=self.autocast, progress=bar, dist=self.dist,
                )  # fmt: skip
            finally:
                bar.close()
        val, test = results["val"], results["test"]
        steps = cfg.train.steps
        summary = {
            "task": self.task.name,
            "attention": cfg.model.attention,
            "best_step": best_step,
            "val_accuracy": val.accuracy,
            "val_loss": val.loss,
            "test_accuracy": test.accuracy,
            "test_loss": test.loss,
            "test_density": test.density,
            "test_density_per_layer_head": test.per_layer_head,
            "train_seconds": train_seconds,
            "steps": steps,
            "steps_per_s": steps / max(train_seconds, 1e-9),
            "seconds_per_step": train_seconds / max(steps, 1),
            "peak_memory_bytes": self.memory.peak(),
            "parameters": count_parameters(model),
            "eval_samples": cfg.train.eval_samples,
            "majority_accuracy": majority_accuracy(self.splits["test"], self.task),
            "amp": self.amp,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        }
        if not self.dist.is_main:
            return summary
        from sbm_transformer import plots

        made = plots.plot_run(
            self.run_dir, model=model, data=self.splits["val"], task=self.task, device=self.device
        )
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        echo(
            f"test accuracy {test.accuracy:.4f} (best val {val.accuracy:.4f} at step {best_step})"
            + ("" if test.density is None else f", density {test.density:.2%}")
            + f"; {train_seconds / max(steps, 1) * 1000:.0f} ms/step"
        )
        echo(f"summary: {self.run_dir / 'summary.json'}; plots: " + ", ".join(map(str, made)))
        return summary


# --------------------------------------------------------------------------------- train
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

    Under torchrun (``RANK``/``WORLD_SIZE`` set) every process calls this with the same
    arguments: the model is wrapped in DistributedDataParallel, each process trains on its
    share of every batch and evaluates its share of the batches, and rank 0 alone writes the
    run directory and prints. The run directory must be one all processes can read (on several
    machines, a shared file system): each loads the checkpoints rank 0 wrote.

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
    dist = Distributed.from_env()
    device = resolve_device(cfg.train.device, dist)
    started = dist.start(device)
    try:
        return _train(cfg, run_dir, dist, device, resume, overwrite, quiet, echo, resume_hint)
    finally:
        if started:
            dist.stop()


def _train(
    cfg: RunConfig,
    run_dir: Path,
    dist: Distributed,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    echo: Callable[[str], None],
    resume_hint: str | None,
) -> dict[str, Any]:
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    hint = resume_hint or f"sbmt train --resume {run_dir}"
    trainer = Trainer(cfg, run_dir, dist=dist, device=device, quiet=quiet, echo=echo)
    echo = trainer.echo
    try:
        resumed = trainer.set_up(resume)
    except KeyboardInterrupt:
        echo("\ninterrupted before training started; nothing was written")
        raise
    dist.barrier()  # every rank has checked the directory before rank 0 changes it
    state = trainer.state
    with StopRequest(announce=dist.is_main) as stop:
        try:
            if dist.is_main:
                if not resume:
                    create_run_dir(run_dir, overwrite=overwrite)
                (run_dir / "config.yaml").write_text(cfg.to_yaml())
            trainer.describe()
            if resumed is not None:
                echo(f"resuming at step {state.step} of {cfg.train.steps}")
                if resumed.saved_steps != cfg.train.steps:
                    message = _reschedule(
                        trainer.optimizer, trainer.scheduler, cfg.train, resumed.saved_steps
                    )
                    echo(message)
            dist.barrier()  # the run directory exists
            train_seconds = trainer.fit(resume, stop)
        except KeyboardInterrupt:
            # a second Ctrl-C (or one outside the handler): the step in progress is half done,
            # so nothing is saved from it and the last checkpoint written stays the one to use
            saved = checkpoint_step(trainer.ckpt_dir, "last")
            kept = (
                f"the last checkpoint (step {saved}) is kept; continue with: {hint}"
                if saved is not None
                else f"no checkpoint was saved; start again with --overwrite --run-dir {run_dir}"
            )
            echo(f"\ninterrupted again: stopped at once, after step {state.step}, unsaved; {kept}")
            raise
    # one process: a Ctrl-C until here stops (the agreed flag of all processes otherwise)
    if trainer.stopped or (stop.requested and not dist.enabled):
        done = "; training is complete, resuming runs the final evaluation" * (
            state.step == cfg.train.steps
        )
        echo(f"\ninterrupted: saved a checkpoint at step {state.step}{done}; continue with: {hint}")
        raise KeyboardInterrupt
    try:
        return trainer.finish(train_seconds)
    except KeyboardInterrupt:
        echo(
            "\ninterrupted during the final evaluation; training is complete (checkpoint at "
            f"step {state.step}); {hint} runs the final evaluation"
        )
        raise


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
    data_bar = TaskBar("data", "example", quiet, echo)
    try:
        task, splits, model = build(cfg, device, data_bar)
    finally:
        data_bar.close()
    load_model_state(model, state["model"], str(run_dir / "checkpoints" / f"{checkpoint}.json"))
    bar = TaskBar(f"eval {split}", "batch", quiet, echo, announce=False)
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
