"""Multi-process training under torchrun (gloo on the CPU) against one process."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sbm_transformer.checkpoint import load_checkpoint
from sbm_transformer.config import apply_overrides, preset
from sbm_transformer.training import train

SMALL = [
    "data.vocab=24", "data.min_length=12", "data.max_length=20", "data.train_size=96",
    "data.val_size=40", "data.test_size=40", "model.dim=16", "model.heads=2", "model.mlp_dim=32",
    "model.num_clusters=4", "model.dropout=0.1", "model.attention_dropout=0.1", "train.steps=8",
    "train.batch_size=16", "train.eval_every=4", "train.log_every=2", "train.warmup=2",
    "train.threads=1",
]  # fmt: skip


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
ENV["OMP_NUM_THREADS"] = "1"


def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=2 -m sbm_transformer.cli ARGS``."""
    return subprocess.run(
        [*TORCHRUN, "-m", "sbm_transformer.cli", *args],
        env=ENV, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_close_runs(a: Path, b: Path, rtol: float) -> None:
    ra, rb = rows(a), rows(b)
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "accuracy", "density", "lr"):
            if x[key] or y[key]:
                assert float(x[key]) == pytest.approx(float(y[key]), rel=rtol, abs=1e-6), (
                    key,
                    x,
                    y,
                )
    if rtol == 0:
        assert (a / "density.csv").read_text() == (b / "density.csv").read_text()
    wa = load_checkpoint(a / "checkpoints", "last")[0]["model"]
    wb = load_checkpoint(b / "checkpoints", "last")[0]["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=1e-5 if rtol else 0)


@pytest.mark.parametrize("attention", ["sbm", "softmax"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, attention) -> None:
    # one process, the global batch of 16 in 2 micro-batches of 8: what 2 processes of 8 do
    cfg = apply_overrides(preset("tiny", "repeat"), [*SMALL, "train.grad_accum=2"])
    cfg.model.attention = attention  # type: ignore[assignment]
    single = train(cfg, tmp_path / "one", quiet=True, echo=lambda _: None)
    run = tmp_path / "two"
    argv = ["train", "--task", "repeat", "--attention", attention, "--run-dir", str(run)]
    done = torchrun([*argv, "--quiet", "--set", *SMALL])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # rank 0 alone prints
    assert "processes: 2 (DistributedDataParallel)" in done.stdout
    two = json.loads((run / "summary.json").read_text())
    assert two["world_size"] == 2 and single["world_size"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one run directory
    # the same examples, dropout masks and graphs: equal up to the order of float additions
    assert_close_runs(run, tmp_path / "one", rtol=1e-4)
    assert two["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-6)
    if attention == "sbm":
        assert two["test_density"] == pytest.approx(single["test_density"], rel=1e-4)


def test_ctrl_c_under_torchrun_saves_and_resume_is_exact(tmp_path) -> None:
    """A real SIGINT to torchrun's process group (as Ctrl-C in a terminal): every rank stops
    at the same step boundary, rank 0 saves, and the resumed run ends as an uninterrupted one."""
    longer = [*SMALL, "train.steps=200", "train.eval_every=50", "model.dropout=0.1"]
    argv = ["train", "--task", "repeat", "--attention", "sbm", "--quiet", "--set", *longer]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert torchrun([*argv, "--run-dir", str(full)]).returncode == 0
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "sbm_transformer.cli", *argv, "--run-dir", str(cut)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_lines(cut / "metrics.csv")) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "interrupted: saved a checkpoint at step" in out, err[-3000:]
    step = load_checkpoint(cut / "checkpoints", "last")[1]
    assert 0 < step < 200 and not (cut / "summary.json").exists()
    resumed = torchrun(["train", "--resume", str(cut), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step} of 200" in resumed.stdout
    assert_close_runs(cut, full, rtol=0)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_batch_not_divisible_by_processes_is_a_clear_error(tmp_path) -> None:
    argv = ["train", "--task", "repeat", "--attention", "softmax", "--quiet"]
    bad = [*SMALL, "train.batch_size=15"]
    done = torchrun([*argv, "--run-dir", str(tmp_path / "r"), "--set", *bad])
    assert done.returncode != 0
    assert "train.batch_size (15) must be a multiple of" in done.stderr
    assert not (tmp_path / "r").exists()
