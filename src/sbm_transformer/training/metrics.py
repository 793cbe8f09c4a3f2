"""Metric records and where they go: metrics.csv and density.csv (always), TensorBoard events
(when the ``tensorboard`` package is installed), and the console (a progress bar or lines).

The trainer builds one :class:`MetricRecord` of numbers per log or evaluation and hands it to
each sink; a sink formats it its own way. Only rank 0 of a multi-process run has sinks.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sbm_transformer.training.rundir import metric_rows

#: Columns of metrics.csv.
METRIC_FIELDS = ["step", "split", "loss", "accuracy", "density", "lr", "seconds", "steps_per_s"]
DENSITY_FIELDS = ["step", "split", "layer", "head", "density"]


@dataclass
class MetricRecord:
    """One line of metrics: the training window since the last line, or one evaluation."""

    step: int
    split: str  # "train" or "val"
    loss: float
    accuracy: float
    density: float | None = None  # mean over layers and heads (sampled-graph attentions)
    lr: float | None = None
    seconds: float | None = None  # training time so far
    steps_per_s: float | None = None
    per_layer_head: list[list[float]] | None = None  # density per layer and head


class MetricSink(Protocol):
    def write(self, record: MetricRecord) -> None: ...

    def close(self) -> None: ...


def _fmt(value: float | None, spec: str = ".6g") -> str:
    return "" if value is None else format(value, spec)


class CsvSink:
    """metrics.csv and density.csv of a run directory; rows after ``truncate_after`` (a resumed
    run's checkpoint step) are dropped, so that a resumed run logs them again."""

    def __init__(self, run_dir: Path, truncate_after: int | None) -> None:
        self.metrics_path = run_dir / "metrics.csv"
        self.density_path = run_dir / "density.csv"
        for path, header in (
            (self.metrics_path, METRIC_FIELDS),
            (self.density_path, DENSITY_FIELDS),
        ):
            rows = []
            if truncate_after is not None:
                rows = [r for r in metric_rows(path) if int(r["step"]) <= truncate_after]
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(rows)

    def write(self, record: MetricRecord) -> None:
        row = {
            "step": record.step,
            "split": record.split,
            "loss": _fmt(record.loss),
            "accuracy": _fmt(record.accuracy),
            "density": _fmt(record.density),
            "lr": _fmt(record.lr),
            "seconds": _fmt(record.seconds, ".3f"),
            "steps_per_s": _fmt(record.steps_per_s, ".4g"),
        }
        with open(self.metrics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(row)
        if record.per_layer_head:
            with open(self.density_path, "a", newline="") as f:
                w = csv.writer(f)
                for layer, heads in enumerate(record.per_layer_head):
                    for head, d in enumerate(heads):
                        w.writerow([record.step, record.split, layer, head, f"{d:.6g}"])

    def close(self) -> None:
        pass


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardSink:
    """Scalars ``loss/train``, ``accuracy/val``, ``density/train``, ``lr/train``, ... and the
    density of every layer and head, through ``torch.utils.tensorboard``.

    A resumed run writes to the same directory with ``purge_step`` at its checkpoint, so
    TensorBoard hides the events of the steps it trains again.
    """

    def __init__(self, logdir: Path, *, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if resume_step is None and logdir.exists():
            shutil.rmtree(logdir)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(logdir), purge_step=purge)

    def write(self, record: MetricRecord) -> None:
        w, step, split = self.writer, record.step, record.split
        w.add_scalar(f"loss/{split}", record.loss, step)
        w.add_scalar(f"accuracy/{split}", record.accuracy, step)
        if record.density is not None:
            w.add_scalar(f"density/{split}", record.density, step)
        if record.lr is not None:
            w.add_scalar(f"lr/{split}", record.lr, step)
        if record.steps_per_s is not None:
            w.add_scalar(f"steps_per_s/{split}", record.steps_per_s, step)
        for layer, heads in enumerate(record.per_layer_head or []):
            for head, d in enumerate(heads):
                w.add_scalar(f"density_{split}/layer{layer}_head{head}", d, step)
        w.flush()

    def close(self) -> None:
        self.writer.close()


def format_record(record: MetricRecord, steps: int) -> str:
    """One console line: ``step 20/100  train  loss 0.6931  acc 0.5000  density 12.00% ...``."""
    parts = [
        f"step {record.step}/{steps}",
        record.split,
        f"loss {record.loss:.4f}",
        f"acc {record.accuracy:.4f}",
    ]
    if record.density is not None:
        parts.append(f"density {record.density:.2%}")
    if record.steps_per_s is not None:
        parts.append(f"{record.steps_per_s:.2f} steps/s")
    return "  ".join(parts)


class ConsoleSink:
    """A tqdm progress bar (loss, accuracy, density, steps/s, ETA) with evaluation lines above
    it; in quiet mode, one line per record instead."""

    def __init__(self, total: int, start: int, quiet: bool, echo: Callable[[str], None]) -> None:
        self.total, self.quiet, self.echo = total, quiet, echo
        self.bar: Any = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def write(self, record: MetricRecord) -> None:
        if self.bar is None:
            self.echo(format_record(record, self.total))
            return
        if record.split != "train":
            self.bar.write(format_record(record, self.total))
            return
        self.bar.update(record.step - self.last)
        self.last = record.step
        post = {"loss": f"{record.loss:.3f}", "acc": f"{record.accuracy:.3f}"}
        if record.density is not None:
            post["density"] = f"{record.density:.1%}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Sinks:
    """Every sink of a run, written to and closed together."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    def write(self, record: MetricRecord) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class TaskBar:
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
        self.desc, self.unit, self.quiet, self.echo = desc, unit, quiet, echo
        self.announce = announce
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
