"""Ctrl-C for real: SIGINT sent to ``sbmt train`` and ``sbmt compare`` processes at chosen and at
random moments, then ``--resume``: the result must be the uninterrupted run's, bit for bit
(weights and optimizer state; metrics.csv but for its timing columns)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sbm_transformer.checkpoint import load_checkpoint

# A tiny model; 20 steps, evaluation every 10 on a large validation split, so that evaluation is
# a good part of the run and an interrupt can land in it.
SETTINGS = [
    "data.vocab=24", "data.min_length=12", "data.max_length=20", "data.train_size=96",
    "data.val_size=480", "data.test_size=32", "model.dim=16", "model.heads=2", "model.mlp_dim=32",
    "model.num_clusters=4", "model.dropout=0.1", "model.attention_dropout=0.1", "train.steps=20",
    "train.batch_size=16", "train.eval_every=10", "train.log_every=2", "train.warmup=2",
    "train.threads=2",  # a fixed thread count: parallel reductions split work by thread count
]  # fmt: skip
TRAIN = ["train", "--task", "repeat", "--attention", "sbm", "--quiet"]
TIMING = ("seconds", "steps_per_s")


def sbmt(*args: str) -> list[str]:
    return [sys.executable, "-m", "sbm_transformer.cli", *args]


def start(argv: list[str], log: Path, *, session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        argv,
        stdout=open(log.with_suffix(".out"), "w"),
        stderr=open(log.with_suffix(".err"), "w"),
        env=env,
        start_new_session=session,
    )


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str, str]:
    rc = proc.wait(timeout=300)
    return rc, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def metric_lines(run: Path) -> list[str]:
    path = run / "metrics.csv"
    return path.read_text().splitlines()[1:] if path.exists() else []


def has_row(run: Path, step: int, split: str) -> Callable[[], bool]:
    return lambda: any(line.startswith(f"{step},{split},") for line in metric_lines(run))


def comparable_metrics(run: Path) -> list[list[str]]:
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in TIMING]
    return [[row[i] for i in keep] for row in (line.split(",") for line in lines)]


def assert_same_run(a: Path, b: Path) -> None:
    sa, step_a = load_checkpoint(a / "checkpoints", "last")
    sb, step_b = load_checkpoint(b / "checkpoints", "last")
    assert step_a == step_b
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for i, moments in sa["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, sb["optimizer"]["state"][i][key]), (i, key)
    assert comparable_metrics(a) == comparable_metrics(b)
    assert (a / "density.csv").read_text() == (b / "density.csv").read_text()


def interrupt(
    argv: list[str], run: Path, log: Path, moment: Callable[[subprocess.Popen], None]
) -> tuple[int, str, str]:
    """Run ``argv``, send it SIGINT when ``moment`` returns, and wait for it to exit."""
    proc = start(argv, log)
    moment(proc)
    proc.send_signal(signal.SIGINT)
    return finish(proc, log)


def after_row(run: Path, step: int, split: str) -> Callable[[subprocess.Popen], None]:
    return lambda proc: wait_for(has_row(run, step, split), proc, f"row {step},{split}")


def after_delay(log: Path, seconds: float) -> Callable[[subprocess.Popen], None]:
    """``seconds`` after the run directory is set up (its first line, ``run: ...``): from
    there on Ctrl-C is handled by the loop (before, it stops the process as any program)."""

    def moment(proc: subprocess.Popen) -> None:
        out = log.with_suffix(".out")
        wait_for(lambda: out.exists() and "run: " in out.read_text(), proc, "the run to start")
        time.sleep(seconds)

    return moment


def check_interrupted(rc: int, out: str, err: str, run: Path) -> int:
    """The process ended cleanly after one Ctrl-C: exit 130, no traceback, a checkpoint at the
    step the message names (in the loop), or a complete training (in the final evaluation).
    Returns the step of the last checkpoint."""
    assert rc == 130, (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    step = load_checkpoint(run / "checkpoints", "last")[1]
    if "interrupted during the final evaluation" in out:
        assert f"training is complete (checkpoint at step {step})" in out
        assert f"sbmt train --resume {run} runs the final evaluation" in out
        return step
    assert f"interrupted: saved a checkpoint at step {step}" in out
    assert f"continue with: sbmt train --resume {run}" in out
    assert "Ctrl-C: stopping after the step in progress" in err
    return step


class Reference:
    """The uninterrupted run, trained in its own process alongside the test's first steps."""

    def __init__(self, run: Path) -> None:
        self.path = run
        self.log = run.parent / "log"
        self.proc = start(sbmt(*TRAIN, "--run-dir", str(run), "--set", *SETTINGS), self.log)

    def run(self) -> Path:
        rc, _, err = finish(self.proc, self.log)
        assert rc == 0, err
        return self.path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(tmp_path_factory.mktemp("reference") / "run")


def test_sigint_during_evaluation_then_at_random_resumes_exactly(tmp_path, reference) -> None:
    run = tmp_path / "run"
    fresh = sbmt(*TRAIN, "--run-dir", str(run), "--set", *SETTINGS)
    resume = sbmt("train", "--resume", str(run), "--quiet")
    # 1. right after the train row of step 10: in the evaluation at step 10, which must still
    # write its row and its best and last checkpoints
    rc, out, err = interrupt(fresh, run, tmp_path / "a", after_row(run, 10, "train"))
    assert check_interrupted(rc, out, err, run) == 10
    assert has_row(run, 10, "val")()
    assert load_checkpoint(run / "checkpoints", "best")[1] == 10
    # 2. the resumed run, at a random moment of its loop
    delay = random.Random(0).uniform(0.0, 0.3)
    rc, out, err = interrupt(resume, run, tmp_path / "b", after_delay(tmp_path / "b", delay))
    assert check_interrupted(rc, out, err, run) >= 10
    # 3. to the end
    rc, out, err = finish(start(resume, tmp_path / "c"), tmp_path / "c")
    assert rc == 0 and "Traceback" not in err, err
    assert_same_run(run, reference.run())


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_sigint_at_random_moments_resumes_exactly(tmp_path, reference, seed: int) -> None:
    run = tmp_path / "run"
    rng = random.Random(seed)
    argv = sbmt(*TRAIN, "--run-dir", str(run), "--set", *SETTINGS)
    for i in range(3):
        log = tmp_path / f"{i}"
        rc, out, err = interrupt(argv, run, log, after_delay(log, rng.uniform(0, 1.5)))
        if rc == 0 or "summary: " in out:  # the run ended before the signal (or as it came)
            break
        check_interrupted(rc, out, err, run)
        argv = sbmt("train", "--resume", str(run), "--quiet")
    else:
        rc, out, err = finish(start(argv, tmp_path / "end"), tmp_path / "end")
        assert rc == 0, err
    assert_same_run(run, reference.run())


@pytest.mark.slow
def test_second_sigint_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, reference) -> None:
    run = tmp_path / "run"
    proc = start(sbmt(*TRAIN, "--run-dir", str(run), "--set", *SETTINGS), tmp_path / "a")
    wait_for(has_row(run, 12, "train"), proc, "step 12")
    proc.send_signal(signal.SIGINT)
    notice = (tmp_path / "a").with_suffix(".err")
    wait_for(lambda: "Ctrl-C: stopping" in notice.read_text(), proc, "the first SIGINT")
    proc.send_signal(signal.SIGINT)  # (two signals sent at once would arrive as one)
    rc, out, err = finish(proc, tmp_path / "a")
    assert rc == 130 and "Traceback" not in err, err
    assert "interrupted again: stopped at once" in out
    step = load_checkpoint(run / "checkpoints", "last")[1]
    assert f"the last checkpoint (step {step}) is kept" in out
    rc, out, err = finish(start(sbmt("train", "--resume", str(run), "--quiet"), tmp_path / "b"),
                          tmp_path / "b")  # fmt: skip
    assert rc == 0, err
    assert_same_run(run, reference.run())


def compare_argv(out: Path, attentions: str) -> list[str]:
    return [
        "compare", "--task", "repeat", "--attention", attentions, "--out", str(out), "--quiet",
        "--set", *SETTINGS,
    ]  # fmt: skip


def interrupt_compare(out: Path, attentions: str, log: Path, delay: float) -> tuple[str, str]:
    """``sbmt compare`` interrupted as a terminal does it: SIGINT to the whole process group
    (the command and the process training the first run)."""
    proc = start(sbmt(*compare_argv(out, attentions)), log, session=True)
    first = out / attentions.split(",")[0]
    text = log.with_suffix(".out")
    wait_for(lambda: f"run: {first}" in text.read_text(), proc, "the first run to start")
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    rc, stdout, stderr = finish(proc, log)
    assert rc == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    assert f"continue with: sbmt compare (the same options) --out {out} --resume" in stdout
    return stdout, stderr


def test_interrupted_compare_ends_cleanly_and_resumes(tmp_path, reference, capfd) -> None:
    from sbm_transformer.cli import main

    out = tmp_path / "cmp"
    interrupt_compare(out, "sbm", tmp_path / "a", delay=0.1)
    step = load_checkpoint(out / "sbm" / "checkpoints", "last")[1]
    capfd.readouterr()
    assert main([*compare_argv(out, "sbm"), "--resume"]) == 0
    printed = capfd.readouterr().out
    assert f"compare --resume: sbm resuming from step {step}" in printed
    assert "| sbm |" in (out / "comparison.md").read_text()
    assert_same_run(out / "sbm", reference.run())
    assert main([*compare_argv(out, "sbm"), "--resume"]) == 0  # nothing left to train
    assert "compare --resume: sbm finished, skipped" in capfd.readouterr().out


@pytest.mark.slow
def test_interrupted_compare_of_two_attentions(tmp_path, reference, capfd) -> None:
    from sbm_transformer.cli import main

    out = tmp_path / "cmp"
    interrupt_compare(out, "sbm,softmax", tmp_path / "a", delay=0.3)
    assert not (out / "softmax").exists()
    capfd.readouterr()
    assert main([*compare_argv(out, "sbm,softmax"), "--resume"]) == 0
    printed = capfd.readouterr().out
    assert "sbm resuming from step" in printed and "softmax starting" in printed
    assert_same_run(out / "sbm", reference.run())
    table = (out / "comparison.md").read_text()
    assert "| sbm |" in table and "| softmax |" in table
