"""The ``sbmt`` command.

sbmt demo                       SBM vs full attention on a task generated on the spot
sbmt train --task T --attention A [--preset tiny|lra] [--config F] [--set k=v ...]
sbmt train --resume RUN_DIR     continue a stopped run exactly
sbmt eval RUN_DIR               re-evaluate a run's checkpoint
sbmt compare --task T --attention sbm,softmax,linear,... [--resume]
sbmt data TASK --out DIR        generate or prepare a task's data
sbmt bench attention            speed and memory benchmark
sbmt bench contention           trainings alone, beside a busy process, two at once
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sbm_transformer.config import PRESETS, RunConfig, apply_overrides, load_yaml, preset, validate

#: Errors a user can cause (bad options, configuration, data, run directories, checkpoints, a
#: full disk or a read-only directory): reported as one line, ``sbmt <command>: error: ...``,
#: exit code 2. Set SBMT_TRACEBACK=1 to see the traceback instead.
USER_ERRORS = (ValueError, OSError)


def error_message(err: BaseException) -> str:
    """One line for a user error; an OSError with a file names the file and the reason."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return (str(err) or type(err).__name__).replace("\n", " ")


def _config_from_args(args: argparse.Namespace, attention: str) -> RunConfig:
    cfg = preset(args.preset, args.task)
    if args.config:
        load_yaml(cfg, args.config)
    cfg.model.attention = attention
    apply_overrides(cfg, list(args.set or []))
    if getattr(args, "eval_samples", None) is not None:
        cfg.train.eval_samples = args.eval_samples
    cfg.data.task = args.task
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from sbm_transformer.data import TASKS

    p.add_argument("--task", default="listops", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--config", help="YAML file with data/model/train sections")
    p.add_argument(
        "--set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. model.dim=128 train.lr=1e-3"
    )
    p.add_argument("--eval-samples", type=int, help="graphs averaged per prediction in evaluation")
    p.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def _check_task_and_attention(task: str, attentions: list[str]) -> None:
    from sbm_transformer.data import TASKS
    from sbm_transformer.mechanisms import ATTENTIONS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    for name in attentions:
        if name not in ATTENTIONS:
            raise ValueError(f"unknown attention {name!r}; valid: {', '.join(ATTENTIONS)}")


def cmd_train(argv: Sequence[str]) -> int:
    """Train one attention (or several, comma-separated: then like ``sbmt compare``)."""
    from sbm_transformer.training import check_run_dir, load_run_config, train

    p = argparse.ArgumentParser(prog="sbmt train", description=cmd_train.__doc__)
    _add_config_args(p)
    p.add_argument("--attention", default="sbm", help="name, or comma-separated names to compare")
    p.add_argument("--run-dir", help="run directory (default runs/<task>-<attention>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run where it stopped")
    a = p.parse_args(argv)
    if a.resume:
        extra = [s for s in (a.set or []) if not s.startswith("train.steps=")]
        if extra or a.config:
            raise ValueError(
                "--resume takes the run's own configuration; only --set train.steps=N may change it"
            )
        run_dir = Path(a.resume)
        check_run_dir(run_dir, resume=True, overwrite=a.overwrite)
        cfg = load_run_config(run_dir)
        apply_overrides(cfg, list(a.set or []))
        train(cfg, run_dir, resume=True, quiet=a.quiet)
        return 0
    names = [n.strip() for n in a.attention.split(",") if n.strip()]
    _check_task_and_attention(a.task, names)
    if len(names) > 1:
        a.resume = False
        return _compare(a, names)
    cfg = _config_from_args(a, names[0])
    run_dir = Path(a.run_dir or f"runs/{a.task}-{names[0]}")
    train(cfg, run_dir, overwrite=a.overwrite, quiet=a.quiet)
    return 0


def cmd_compare(argv: Sequence[str]) -> int:
    """Train several attentions on the same data and seed; write one comparison table and plot."""
    p = argparse.ArgumentParser(prog="sbmt compare", description=cmd_compare.__doc__)
    _add_config_args(p)
    p.add_argument("--attention", default="sbm,softmax", help="comma-separated names")
    p.add_argument(
        "--out", help="directory for the runs and the table (default runs/compare-<task>)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted comparison: skip finished runs, resume interrupted ones, "
        "start the missing ones",
    )
    a = p.parse_args(argv)
    names = [n.strip() for n in a.attention.split(",") if n.strip()]
    _check_task_and_attention(a.task, names)
    return _compare(a, names)


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
    from sbm_transformer.training import (
        RunDirError,
        checkpoint_step,
        config_differences,
        load_run_config,
        metric_rows,
    )

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


def _compare(a: argparse.Namespace, names: list[str], title: str | None = None) -> int:
    from sbm_transformer.plots import plot_comparison

    out = Path(getattr(a, "out", None) or getattr(a, "run_dir", None) or f"runs/compare-{a.task}")
    resume = bool(getattr(a, "resume", False))
    plans = []
    for name in names:  # every configuration and directory checked before anything is trained
        cfg = validate(_config_from_args(a, name))
        plans.append(
            plan_comparison_run(name, cfg, out / name, resume=resume, overwrite=a.overwrite)
        )
    if resume:
        print("compare --resume: " + "; ".join(f"{p.name} {p.note or 'starting'}" for p in plans))
    out.mkdir(parents=True, exist_ok=True)
    hint = f"sbmt compare (the same options) --out {out} --resume"
    rows = []
    for i, plan in enumerate(plans):
        note = f" ({plan.note})" if plan.note else ""
        print(f"\n=== {a.task}: {plan.name} attention{note} ===", flush=True)
        if plan.action == "skip":
            rows.append(json.loads((plan.run_dir / "summary.json").read_text()))
            continue
        try:
            rows.append(
                _train_in_own_process(
                    plan.cfg,
                    plan.run_dir,
                    overwrite=a.overwrite or plan.action == "restart",
                    resume=plan.action == "resume",
                    quiet=a.quiet,
                    resume_hint=hint,
                )
            )
        except KeyboardInterrupt:
            done = ", ".join(p.name for p in plans[:i])
            print(
                f"\ncomparison interrupted in the {plan.name} run"
                + (f" (finished: {done})" if done else "")
                + f"; continue with: {hint}",
                flush=True,
            )
            raise
    table = comparison_table(rows)
    (out / "comparison.md").write_text(table + "\n")
    with open(out / "comparison.csv", "w", newline="") as f:
        fields = [
            "attention",
            "test_accuracy",
            "val_accuracy",
            "test_density",
            "seconds_per_step",
            "peak_memory_bytes",
            "parameters",
            "train_seconds",
            "steps",
        ]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot = plot_comparison(rows, out / "comparison.png", title or f"{a.task}: attention comparison")
    print("\n" + table)
    print(f"\ntable: {out / 'comparison.md'}; plot: {plot}; runs: {out}/<attention>/")
    return 0


def _train_in_own_process(
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
    """Body of :func:`_train_in_own_process` (exit codes as :func:`main`)."""
    from sbm_transformer.training import train

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
        print(f"sbmt: error: {error_message(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        sys.stdout.flush()


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of run summaries."""
    lines = [
        "| attention | test acc | val acc | density | ms / step | peak memory | parameters |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    from sbm_transformer.mechanisms import attention_density

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
            f"{r['seconds_per_step'] * 1000:.0f} | {r['peak_memory_bytes'] / 2**20:.0f} MiB | "
            f"{r['parameters']:,} |"
        )
    majority = rows[0].get("majority_accuracy") if rows else None
    if majority:
        lines.append(f"\nAlways predicting the most common label scores {majority:.4f}.")
    return "\n".join(lines)


def cmd_eval(argv: Sequence[str]) -> int:
    """Re-evaluate a run's checkpoint."""
    from sbm_transformer.training import evaluate_run

    p = argparse.ArgumentParser(prog="sbmt eval", description=cmd_eval.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--eval-samples", type=int, help="graphs averaged per prediction")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    evaluate_run(
        a.run_dir, split=a.split, checkpoint=a.checkpoint, samples=a.eval_samples, quiet=a.quiet
    )
    return 0


def cmd_data(argv: Sequence[str]) -> int:
    """Generate (ListOps, synthetic) or check and prepare (user files) a task's data."""
    from tqdm.auto import tqdm

    from sbm_transformer.data import TASKS, prepare

    p = argparse.ArgumentParser(prog="sbmt data", description=cmd_data.__doc__)
    p.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument(
        "--preset", default="tiny", help=f"sizes from this preset ({', '.join(PRESETS)})"
    )
    p.add_argument("--set", nargs="*", metavar="data.KEY=VALUE", help="e.g. data.train_size=10000")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.task not in TASKS:
        raise ValueError(f"unknown task {a.task!r}; valid: {', '.join(TASKS)}")
    cfg = preset(a.preset, a.task)
    apply_overrides(cfg, list(a.set or []))
    validate(cfg)
    bar = tqdm(unit="example", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        files = prepare(cfg.data, a.out, progress=progress, overwrite=a.overwrite)
    finally:
        bar.close()
    for f in files:
        print(f)
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    """Benchmarks: ``sbmt bench attention|contention [options]`` (see --help)."""
    if not argv or argv[0] not in ("attention", "contention"):
        print(
            "usage: sbmt bench attention|contention [options]   (sbmt bench attention --help)",
            file=sys.stderr,
        )
        return 2
    if argv[0] == "contention":
        from sbm_transformer.bench_contention import run as run_contention

        run_contention(list(argv[1:]))
        return 0
    from sbm_transformer.bench import run

    run(list(argv[1:]))
    return 0


def cmd_demo(argv: Sequence[str]) -> int:
    """SBM vs full softmax attention, trained side by side on a task generated on the spot."""
    from sbm_transformer.demo import run_demo

    p = argparse.ArgumentParser(prog="sbmt demo", description=cmd_demo.__doc__)
    p.add_argument("--out", default="runs/demo", help="directory for the runs, table and plots")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    run_demo(Path(a.out), quick=a.quick, quiet=a.quiet)
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "data": cmd_data,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"sbmt: unknown command {argv[0]!r}; expected one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except USER_ERRORS as err:
        if os.environ.get("SBMT_TRACEBACK"):
            raise
        print(f"sbmt {argv[0]}: error: {error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["COMMANDS", "USER_ERRORS", "comparison_table", "error_message", "main"]
