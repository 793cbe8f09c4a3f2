"""Contention benchmark: one training alone, beside a busy process, and two trainings at once.

Each training is a fresh process (``python -m sbm_transformer.bench_contention _child``) that
trains the demo's model on the repeated-tokens task for a fixed number of steps and reports its
steps per second, measured after the first log windows (so start-up, data generation and kernel
loading do not count). The busy process is a pure-Python loop: an editor, a browser or a data
worker in miniature. On a machine with C cores, C trainings at once should each keep about 1/C of
the speed of one alone; threads that spin-wait between parallel regions instead take the cores
from the other processes and every process slows down by 10-300x (docs/benchmarks.md).

Arms: ``package`` (the defaults: the trainer's :class:`~sbm_transformer.threads.AdaptiveThreads`
follows the free CPUs), ``fixed`` (``train.threads`` = all CPUs: what the package did before),
``passive`` (fixed, with ``OMP_WAIT_POLICY=PASSIVE``) and ``spin=N`` (fixed, with
``GOMP_SPINCOUNT=N``). Each arm is measured alone, beside the busy process and two at once, in
``--rounds`` rounds.

Run ``sbmt bench contention`` (about 4 minutes per arm and round on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The OpenMP variables an arm may set; all are removed from a child's environment first.
_OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
ARMS = ("package", "fixed", "passive", "spin=N")


def arm_settings(arm: str) -> tuple[dict[str, str], int]:
    """The environment and ``train.threads`` of a child process for ``arm``."""
    env = {k: v for k, v in os.environ.items() if k not in _OPENMP_VARS}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    fixed = cpus or 1
    if arm == "package":
        return env, 0
    if arm == "fixed":
        return env, fixed
    if arm == "passive":
        return {**env, "OMP_WAIT_POLICY": "PASSIVE"}, fixed
    if arm.startswith("spin="):
        count = arm.removeprefix("spin=")
        if not count.isdigit():
            raise ValueError(f"arm {arm!r}: spin=N takes a whole number of spins")
        return {**env, "GOMP_SPINCOUNT": count}, fixed
    raise ValueError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")


@dataclass
class ArmResult:
    """Steps per second of each condition, one value per round (two per round when paired)."""

    arm: str
    alone: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    two: list[float] = field(default_factory=list)

    def ratio(self, condition: str) -> float:
        """Median speed under ``condition`` over the median speed alone."""
        values = getattr(self, condition)
        return statistics.median(values) / statistics.median(self.alone)


def _child_command(attention: str, steps: int, threads: int, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "sbm_transformer.bench_contention", "_child",
        "--attention", attention, "--steps", str(steps), "--threads", str(threads),
        "--run-dir", str(run_dir),
    ]  # fmt: skip


def _busy_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _speed(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise ChildProcessError(f"a contention child failed (exit code {proc.returncode})")
    return float(json.loads(out.strip().splitlines()[-1])["steps_per_s"])


def measure_arm(
    arm: str, attention: str, steps: int, rounds: int, log: Callable[[str], None]
) -> ArmResult:
    """Run the three conditions of one arm ``rounds`` times, interleaved."""
    env, threads = arm_settings(arm)
    result = ArmResult(arm)
    with tempfile.TemporaryDirectory(prefix="sbmt-contention-") as tmp:

        def start(name: str) -> subprocess.Popen[str]:
            cmd = _child_command(attention, steps, threads, Path(tmp) / name)
            return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)

        for r in range(rounds):
            result.alone.append(_speed(start("alone")))
            busy = _busy_process()
            try:
                result.busy.append(_speed(start("busy")))
            finally:
                busy.kill()
                busy.wait()
            a, b = start("two-a"), start("two-b")
            result.two += [_speed(a), _speed(b)]
            log(
                f"{arm:>12} round {r + 1}: alone {result.alone[-1]:.2f} steps/s, beside a busy "
                f"process {result.busy[-1]:.2f}, two at once {result.two[-2]:.2f} and "
                f"{result.two[-1]:.2f}"
            )
    return result


def markdown(results: list[ArmResult], command: str, attention: str, steps: int) -> str:
    lines = [
        f"`{command}` ({os.cpu_count()} CPUs; {attention} attention, demo model, {steps} steps "
        "per training; medians over rounds; ratios to the same arm alone).",
        "",
        "| arm | alone (steps/s) | beside a busy process | ratio | two at once (each) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.arm} | {statistics.median(r.alone):.2f} | {statistics.median(r.busy):.2f} | "
            f"{r.ratio('busy'):.2f}x | {statistics.median(r.two):.2f} | {r.ratio('two'):.2f}x |"
        )
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> list[ArmResult]:
    p = argparse.ArgumentParser(prog="sbmt bench contention", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arms", nargs="+", default=["package", "fixed"],
        help=f"{', '.join(ARMS)} (default: package fixed)",
    )  # fmt: skip
    p.add_argument("--attention", default="sbm")
    p.add_argument("--steps", type=int, default=80, help="training steps per child (>= 40)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", help="write the markdown table here")
    a = p.parse_args(argv)
    if a.steps < 40:
        p.error("--steps must be at least 40 (the first 20 steps are not timed)")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    for arm in a.arms:
        arm_settings(arm)  # unknown arms fail before anything runs
    results = [measure_arm(arm, a.attention, a.steps, a.rounds, log) for arm in a.arms]
    command = "sbmt bench contention " + " ".join(argv if argv is not None else sys.argv[1:])
    report = markdown(results, command.strip(), a.attention, a.steps)
    log(report)
    if a.out:
        Path(a.out).write_text(report + "\n")
        log(f"report: {a.out}")
    for r in results:
        if r.arm == "package":
            ratio = min(statistics.median(r.two[i::2]) for i in (0, 1)) / statistics.median(r.alone)
            log(
                "target: each of two trainings at once keeps >= 0.4x the speed of one alone "
                f"(package arm, the slower of the two): {ratio:.2f}x -> "
                f"{'met' if ratio >= 0.4 else 'NOT MET'}"
            )
    return results


def _child(argv: Sequence[str]) -> None:
    """Train the demo model for ``--steps`` steps; print ``{"steps_per_s": ...}``."""
    p = argparse.ArgumentParser()
    p.add_argument("--attention", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    a = p.parse_args(argv)
    from sbm_transformer import training
    from sbm_transformer.config import apply_overrides, preset
    from sbm_transformer.demo import REPEAT_TASK

    cfg = preset("tiny", "repeat")
    cfg.model.attention = a.attention
    apply_overrides(
        cfg,
        [
            *REPEAT_TASK,
            "data.train_size=2000", "data.val_size=64", "data.test_size=64",
            f"train.steps={a.steps}", f"train.eval_every={a.steps}", "train.log_every=10",
            f"train.threads={a.threads}",
        ],
    )  # fmt: skip
    training.train(cfg, a.run_dir, overwrite=True, quiet=True, echo=lambda _: None)
    with open(Path(a.run_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    timed = [float(r["steps_per_s"]) for r in rows[2:]]  # 10 steps per row; skip the first 20
    print(json.dumps({"steps_per_s": len(timed) / sum(1 / s for s in timed)}))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        _child(argv[1:])
        return
    run(argv)


if __name__ == "__main__":
    main()
