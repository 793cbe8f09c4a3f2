"""Several attentions trained on the same data and seed, one table and one plot (``sbmt
compare``, ``sbmt demo``).

:func:`compare` takes one configuration per attention and an output directory; each run trains in
a fresh process (:func:`train_in_own_process`) and the directory can be resumed after an
interrupt (:func:`plan_comparison_run`). :func:`comparison_configs` builds the configurations the
way the CLI does (preset, YAML file, ``key=value`` overrides).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sbm_transformer.config import RunConfig, apply_overrides, load_yaml, preset, validate
from sbm_transformer.errors import USER_ERRORS, error_message
from sbm_transformer.mechanisms import ATTENTIONS, attention_density
from sbm_transformer.training import (
    RunDirError,
    checkpoint_step,
    config_differences,
    load_run_config,
    metric_rows,
    train,
)


def comparison_configs(
    task: str,
    attentions: Sequence[str],
    *,
    preset_name: str = "tiny",
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    eval_samples: int | None = None,
) -> dict[str, RunConfig]:
    """One validated configuration per attention: ``preset_name`` for ``task``, then
    ``config_file``, then the attention, then ``overrides`` (``key=value``).

    Raises:
        ValueError: an unknown task, attention or preset, or an invalid value (one line).
    """
    from sbm_transformer.data import TASKS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if not attentions:
        raise ValueError("no attention to train; give one or more names")
    for name in attentions:
        if name not in ATTENTIONS:
            raise ValueError(f"unknown attention {name!r}; valid: {', '.join(ATTENTIONS)}")
    if len(set(attentions)) != len(attentions):
        raise ValueError(f"an attention is named twice: {', '.join(attentions)}")
    configs = {}
    for name in attentions:
        cfg = preset(preset_name, task)
        if config_file:
            load_yaml(cfg, config_file)
        cfg.model.attention = name  # type: ignore[assignment]  # checked against ATTENTIONS
        apply_overrides(cfg, list(overrides))
        if eval_samples is not None:
            cfg.train.eval_samples = eval_samples
        cfg.data.task = task  # type: ignore[assignment]  # checked against TASKS
        configs[name] = validate(cfg)
    return configs


def compare(
    configs: Mapping[str, RunConfig],
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    title: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train one run per entry of ``configs`` (name -> configuration) under ``out/<name>/`` and
    write ``comparison.md``, ``comparison.csv`` and ``comparison.png`` to ``out``.

    Every configuration and directory is checked before anything is trained. With ``resume``,
    finished runs are skipped and interrupted ones resumed (see :func:`plan_comparison_run`).
    Ctrl-C stops the run in progress with a checkpoint and raises KeyboardInterrupt. Progress
    and the table go to ``echo``; each run's own output to the terminal (it runs in a child).

    Returns:
        The runs' summaries (``summary.json``), in the order of ``configs``.
    """
    from sbm_transformer.plots import plot_comparison

    echo = echo or stdout_line
    out = Path(out)
    plans = [
        plan_comparison_run(name, validate(cfg), out / name, resume=resume, overwrite=overwrite)
        for name, cfg in configs.items()
    ]
    task = next(iter(configs.values())).data.task if configs else "?"
    if resume:
        echo("compare --resume: " + "; ".join(f"{p.name} {p.note or 'starting'}" for p in plans))
    out.mkdir(parents=True, exist_ok=True)
    hint = f"sbmt compare (the same options) --out {out} --resume"
    rows = []
    for i, plan in enumerate(plans):
        note = f" ({plan.note})" if plan.note else ""
        echo(f"\n=== {task}: {plan.name} attention{note} ===")
        if plan.action == "skip":
            rows.append(json.loads((plan.run_dir / "summary.json").read_text()))
            continue
        try:
            rows.append(
                train_in_own_process(
                    plan.cfg,
                    plan.run_dir,
                    overwrite=overwrite or plan.action == "restart",
                    resume=plan.action == "resume",
                    quiet=quiet,
                    resume_hint=hint,
                )
            )
        except KeyboardInterrupt:
            done = ", ".join(p.name for p in plans[:i])
            echo(
                f"\ncomparison interrupted in the {plan.name} run"
                + (f" (finished: {done})" if done else "")
                + f"; continue with: {hint}"
            )
            raise
    table = comparison_table(rows)
    (out / "comparison.md").write_text(table + "\n")
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot = plot_comparison(rows, out / "comparison.png", title or f"{task}: attention comparison")
    echo("\n" + table)
    echo(f"\ntable: {out / 'comparison.md'}; plot: {plot}; runs: {out}/<attention>/")
    return rows


def stdout_line(text: str) -> None:
    """Write a line to stdout at once (the runs' child processes write to the same terminal)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


#: Columns of comparison.csv.
CSV_FIELDS = [
    "attention", "test_accuracy", "val_accuracy", "test_density", "seconds_per_step", "amp",
    "peak_memory_bytes", "parameters", "train_seconds", "steps",
]  # fmt: skip


def _precision(summary: dict[str, Any]) -> str:
    """The table's precision column: float32, or the autocast type (summaries before it was
    recorded trained without autocast on a CPU)."""
    amp = summary.get("amp", "off")
    return "float32" if amp == "off" else f"{amp} autocast"


@dataclass
class PlannedRun:
    """What ``sbmt compare`` does with one attention's run directory."""

    name: str
    cfg: RunConfig
    run_dir: Path
    action: str  # "start", "skip", "resume" or "restart"
    note: str = ""


def plan_comparison_run(
    name: str, cfg: RunConfig, run_dir: Path, *, resume: bool, overwrite: bool
) -> PlannedRun:
    """Decide, before anything is trained, what to do with ``run_dir`` (one run of a comparison).

    Without ``resume``, an existing run is an error unless ``overwrite``. With ``resume``: a
    finished run (``summary.json``, the same configuration) is skipped, an interrupted one
    resumed from its last checkpoint (``train.steps`` may differ, to train longer), a missing
    one started, and one that stopped before its first step started over.

    Raises:
        RunDirError: the directory is not a run, its configuration differs, or it cannot be
            resumed; the message names the attention.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return PlannedRun(name, cfg, run_dir, "start")
    if not resume:
        if overwrite:
            return PlannedRun(name, cfg, run_dir, "start", "replacing the old run")
        raise RunDirError(
            f"the {name} run: {run_dir} exists; pass --resume to continue the comparison "
            "(finished runs are skipped) or --overwrite to retrain every run"
        )
    if not (run_dir / "config.yaml").exists():
        raise RunDirError(
            f"the {name} run: {run_dir} is not a run directory (no config.yaml); move it away"
        )
    try:
        saved = load_run_config(run_dir)
    except ValueError as err:
        raise RunDirError(f"the {name} run: {err}") from err
    changed = config_differences(saved, cfg)
    if changed - {"train.steps"}:
        raise RunDirError(
            f"the {name} run in {run_dir} has a different configuration "
            f"({', '.join(sorted(changed - {'train.steps'}))} differ); only train.steps may "
            "change on --resume; use --overwrite to retrain every run, or another --out"
        )
    step = checkpoint_step(run_dir / "checkpoints", "last")
    if (run_dir / "summary.json").exists() and not changed:
        return PlannedRun(name, cfg, run_dir, "skip", "finished, skipped")
    if step is not None:
        return PlannedRun(name, cfg, run_dir, "resume", f"resuming from step {step}")
    trained = metric_rows(run_dir / "metrics.csv") or (
        checkpoint_step(run_dir / "checkpoints", "best") is not None
    )
    if not trained:
        return PlannedRun(name, cfg, run_dir, "restart", "starting over: stopped before step 1")
    raise RunDirError(
        f"the {name} run in {run_dir} has metrics but no last checkpoint "
        "(checkpoints/last.json), so it cannot be resumed; use --overwrite to retrain every run"
    )


def train_in_own_process(
    cfg: RunConfig,
    run_dir: Path,
    *,
    overwrite: bool,
    quiet: bool,
    resume: bool = False,
    resume_hint: str | None = None,
) -> dict[str, Any]:
    """Train one run of a comparison in a fresh process and return its summary.

    Every run then pays the same one-off costs, and its peak memory is its own: a process's
    resident set does not shrink back after a run, so a later run in the same process would
    reuse memory an earlier one freed and appear to need none.

    Ctrl-C in a terminal reaches both processes. The child handles it (it finishes its step,
    saves a checkpoint and exits with 130; a second Ctrl-C stops it at once); this process
    waits for it, then raises KeyboardInterrupt. A third Ctrl-C terminates the child.
    """
    proc = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(cfg, str(run_dir), overwrite, resume, quiet, resume_hint)
    )
    interrupts = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts >= 3:
            raise KeyboardInterrupt

    install = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    )
    previous = signal.signal(signal.SIGINT, on_sigint) if install else None
    try:
        proc.start()
        proc.join()
    except KeyboardInterrupt:
        proc.terminate()
        proc.join()
        raise
    finally:
        if install:
            signal.signal(
                signal.SIGINT, previous if previous is not None else signal.default_int_handler
            )
    if proc.exitcode == 130 or (interrupts and proc.exitcode != 0):
        raise KeyboardInterrupt
    if proc.exitcode != 0:
        raise ChildProcessError(
            f"the {cfg.model.attention} run in {run_dir} failed (exit code {proc.exitcode}); "
            "its message is above"
        )
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    if interrupts:  # the run ended before the signal reached its loop: stop after it
        raise KeyboardInterrupt
    return summary


def _train_child(
    cfg: RunConfig,
    run_dir: str,
    overwrite: bool,
    resume: bool,
    quiet: bool,
    resume_hint: str | None,
) -> None:
    """Body of :func:`train_in_own_process`; exit codes as ``sbmt``'s (2: a user error, 130:
    Ctrl-C)."""
    try:
        train(
            cfg,
            Path(run_dir),
            overwrite=overwrite,
            resume=resume,
            quiet=quiet,
            resume_hint=resume_hint,
        )
    except USER_ERRORS as err:
        if os.environ.get("SBMT_TRACEBACK"):
            raise
        sys.stderr.write(f"sbmt: error: {error_message(err)}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        sys.stdout.flush()


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of run summaries."""
    lines = [
        "| attention | test acc | val acc | density | ms / step | precision | peak memory "
        "| parameters |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        measured = r.get("test_density")
        value = attention_density(r["attention"], measured)
        if measured is not None:
            density = f"{measured:.2%}"
        else:
            density = "-" if value is None else {1.0: "1 (full)", 0.0: "0 (none)"}.get(value, "-")
        lines.append(
            f"| {r['attention']} | {r['test_accuracy']:.4f} | {r['val_accuracy']:.4f} | "
            f"{density} | "
            f"{r['seconds_per_step'] * 1000:.0f} | {_precision(r)} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB | "
            f"{r['parameters']:,} |"
        )
    majority = rows[0].get("majority_accuracy") if rows else None
    if majority:
        lines.append(f"\nAlways predicting the most common label scores {majority:.4f}.")
    return "\n".join(lines)


__all__ = [
    "PlannedRun",
    "compare",
    "comparison_configs",
    "comparison_table",
    "plan_comparison_run",
    "train_in_own_process",
]
