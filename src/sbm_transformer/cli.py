"""The ``sbmt`` command.

sbmt demo                       SBM vs full attention on a task generated on the spot
sbmt train --task T --attention A [--preset tiny|lra] [--config F] [--set k=v ...]
sbmt train --resume RUN_DIR     continue a stopped run exactly
sbmt eval RUN_DIR               re-evaluate a run's checkpoint
sbmt compare --task T --attention sbm,softmax,linear,...
sbmt data TASK --out DIR        generate or prepare a task's data
sbmt bench attention            speed and memory benchmark
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sbm_transformer.checkpoint import CheckpointError
from sbm_transformer.config import PRESETS, RunConfig, apply_overrides, load_yaml, preset


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
    from sbm_transformer.training import load_run_config, train

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
        cfg = load_run_config(run_dir)
        apply_overrides(cfg, list(a.set or []))
        train(cfg, run_dir, resume=True, quiet=a.quiet)
        return 0
    names = [n.strip() for n in a.attention.split(",") if n.strip()]
    _check_task_and_attention(a.task, names)
    if len(names) > 1:
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
    a = p.parse_args(argv)
    names = [n.strip() for n in a.attention.split(",") if n.strip()]
    _check_task_and_attention(a.task, names)
    return _compare(a, names)


def _compare(a: argparse.Namespace, names: list[str], title: str | None = None) -> int:
    from sbm_transformer.plots import plot_comparison

    out = Path(getattr(a, "out", None) or getattr(a, "run_dir", None) or f"runs/compare-{a.task}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        print(f"\n=== {a.task}: {name} attention ===", flush=True)
        cfg = _config_from_args(a, name)
        rows.append(_train_in_own_process(cfg, out / name, overwrite=a.overwrite, quiet=a.quiet))
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
    cfg: RunConfig, run_dir: Path, *, overwrite: bool, quiet: bool
) -> dict[str, Any]:
    """Train one run of a comparison in a fresh process and return its summary.

    Every run then pays the same one-off costs, and its peak memory is its own: a process's
    resident set does not shrink back after a run, so a later run in the same process would
    reuse memory an earlier one freed and appear to need none.
    """
    proc = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(cfg, str(run_dir), overwrite, quiet)
    )
    proc.start()
    try:
        proc.join()
    except KeyboardInterrupt:
        proc.join()  # the child got the signal too: let it save its checkpoint
        raise
    if proc.exitcode == 130:
        raise KeyboardInterrupt
    if proc.exitcode != 0:
        raise ChildProcessError(
            f"the {cfg.model.attention} run in {run_dir} failed (exit code {proc.exitcode}); "
            "its message is above"
        )
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary


def _train_child(cfg: RunConfig, run_dir: str, overwrite: bool, quiet: bool) -> None:
    """Body of :func:`_train_in_own_process` (exit codes as :func:`main`)."""
    from sbm_transformer.training import train

    try:
        train(cfg, Path(run_dir), overwrite=overwrite, quiet=quiet)
    except (ValueError, FileExistsError, FileNotFoundError, CheckpointError) as err:
        print(f"sbmt: error: {err}", file=sys.stderr)
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
    a = p.parse_args(argv)
    evaluate_run(a.run_dir, split=a.split, checkpoint=a.checkpoint, samples=a.eval_samples)
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
    """Benchmarks: ``sbmt bench attention [options]`` (see --help)."""
    if not argv or argv[0] != "attention":
        print(
            "usage: sbmt bench attention [options]   (sbmt bench attention --help)", file=sys.stderr
        )
        return 2
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
    except (
        ValueError,
        FileExistsError,
        FileNotFoundError,
        CheckpointError,
        ChildProcessError,
    ) as err:
        print(f"sbmt {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["COMMANDS", "comparison_table", "main"]
