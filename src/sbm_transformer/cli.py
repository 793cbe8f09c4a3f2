"""The ``sbmt`` command: argparse subcommands over the library (imported by nothing).

sbmt demo                       SBM vs full attention on a task generated on the spot
sbmt train --task T --attention A [--preset tiny|lra] [--config F] [--set k=v ...]
sbmt train --resume RUN_DIR     continue a stopped run exactly
sbmt eval RUN_DIR               re-evaluate a run's checkpoint
sbmt compare --task T --attention sbm,softmax,linear,... [--resume]
sbmt data TASK --out DIR        generate or prepare a task's data
sbmt bench attention            speed and memory benchmark
sbmt bench contention           trainings alone, beside a busy process, two at once

Under torchrun, ``torchrun --nproc_per_node=N -m sbm_transformer.cli train ...`` trains with
DistributedDataParallel (see docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sbm_transformer.config import PRESETS
from sbm_transformer.errors import USER_ERRORS, error_message


class UsageError(ValueError):
    """A command line argparse rejects (reported like every user error, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    commands: Mapping[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


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


def _configs(a: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    from sbm_transformer.compare import comparison_configs

    return comparison_configs(
        a.task, names, preset_name=a.preset, config_file=a.config, overrides=a.set or [],
        eval_samples=a.eval_samples,
    )  # fmt: skip


# ------------------------------------------------------------------------------ commands
def cmd_train(a: argparse.Namespace) -> int:
    """Train one attention (or several, comma-separated: then like ``sbmt compare``)."""
    from sbm_transformer.config import apply_overrides
    from sbm_transformer.training import check_run_dir, load_run_config, train

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
    names = _names(a.attention)
    configs = _configs(a, names)
    if len(names) > 1:
        return _compare(a, configs, a.run_dir, resume=False)
    run_dir = Path(a.run_dir or f"runs/{a.task}-{names[0]}")
    train(configs[names[0]], run_dir, overwrite=a.overwrite, quiet=a.quiet)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """Train several attentions on the same data and seed; write one comparison table and plot."""
    return _compare(a, _configs(a, _names(a.attention)), a.out, resume=a.resume)


def _compare(a: argparse.Namespace, configs: dict[str, Any], out: str | None, resume: bool) -> int:
    from sbm_transformer.compare import compare

    compare(
        configs, out or f"runs/compare-{a.task}", resume=resume, overwrite=a.overwrite,
        quiet=a.quiet,
    )  # fmt: skip
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    """Re-evaluate a run's checkpoint."""
    from sbm_transformer.training import evaluate_run

    evaluate_run(
        a.run_dir, split=a.split, checkpoint=a.checkpoint, samples=a.eval_samples, quiet=a.quiet
    )
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    """Generate (ListOps, synthetic) or check and prepare (user files) a task's data."""
    from tqdm.auto import tqdm

    from sbm_transformer.config import apply_overrides, preset, validate
    from sbm_transformer.data import TASKS, prepare

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


def cmd_bench(a: argparse.Namespace) -> int:
    """Benchmarks: ``sbmt bench attention|contention [options]`` (see --help of each)."""
    if a.which == "contention":
        from sbm_transformer.bench_contention import run as run_contention

        run_contention(list(a.args))
        return 0
    from sbm_transformer.bench import run

    run(list(a.args))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """SBM vs full softmax attention, trained side by side on a task generated on the spot."""
    from sbm_transformer.demo import run_demo

    run_demo(Path(a.out), quick=a.quick, quiet=a.quiet)
    return 0


# -------------------------------------------------------------------------------- parser
def build_parser() -> _Parser:
    """The ``sbmt`` parser: one subcommand per ``cmd_*`` function (``func`` in the result)."""
    parser = _Parser(
        prog="sbmt",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--out", default="runs/demo", help="directory for the runs, table and plots")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    _add_config_args(p)
    p.add_argument("--attention", default="sbm", help="name, or comma-separated names to compare")
    p.add_argument("--run-dir", help="run directory (default runs/<task>-<attention>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run where it stopped")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help=cmd_compare.__doc__, description=cmd_compare.__doc__)
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
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--eval-samples", type=int, help="graphs averaged per prediction")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help=cmd_data.__doc__, description=cmd_data.__doc__)
    p.add_argument("task", help="the task (see sbmt train --help)")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument(
        "--preset", default="tiny", help=f"sizes from this preset ({', '.join(PRESETS)})"
    )
    p.add_argument("--set", nargs="*", metavar="data.KEY=VALUE", help="e.g. data.train_size=10000")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help=cmd_bench.__doc__, description=cmd_bench.__doc__)
    p.add_argument("which", choices=["attention", "contention"], help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its options (sbmt bench WHICH --help)")
    p.set_defaults(func=cmd_bench)
    parser.commands = sub.choices
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sbmt`` with ``argv``; returns the exit code (0, 2 for a user error, 130 after
    Ctrl-C). User errors are one line, ``sbmt <command>: error: ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    commands = parser.commands
    if not argv[0].startswith("-") and argv[0] not in commands:
        print(
            f"sbmt: unknown command {argv[0]!r}; expected one of: {', '.join(commands)}",
            file=sys.stderr,
        )
        return 2
    command = argv[0] if argv[0] in commands else ""
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return int(args.func(args))
    except USER_ERRORS as err:
        if os.environ.get("SBMT_TRACEBACK"):
            raise
        if isinstance(err, UsageError) and command:
            print(commands[command].format_usage().rstrip(), file=sys.stderr)
        print(f"sbmt {command or ''}".rstrip() + f": error: {error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
