"""Checkpoints: atomic, verified, loaded without executing code, clear errors."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from sbm_transformer import checkpoint
from sbm_transformer.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)


def test_round_trip_and_old_files_removed(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "meta": {"best": 0.5, "t": (1, 2)},
    }
    save_checkpoint(tmp_path, "last", state, step=10)
    save_checkpoint(tmp_path, "best", state, step=10)
    save_checkpoint(tmp_path, "last", state, step=20)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == ["best-00000010.safetensors", "last-00000020.safetensors"]
    loaded, step = load_checkpoint(tmp_path, "last")
    assert step == 20 and loaded["meta"] == {"best": 0.5, "t": (1, 2)}
    other = torch.nn.Linear(3, 2)
    load_model_state(other, loaded["model"], "x")
    assert torch.equal(other.weight, model.weight)
    opt2 = torch.optim.AdamW(other.parameters())
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_corruption_is_detected(tmp_path) -> None:
    save_checkpoint(tmp_path, "last", {"w": torch.ones(3)}, step=1)
    tensors = next(tmp_path.glob("last-*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        load_checkpoint(tmp_path, "last")
    (tmp_path / "last.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path, "last")
    (tmp_path / "last.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="unknown format"):
        load_checkpoint(tmp_path, "last")
    with pytest.raises(CheckpointError, match="no checkpoint 'best'"):
        load_checkpoint(tmp_path, "best")


def test_incompatible_model_is_named(tmp_path) -> None:
    save_checkpoint(tmp_path, "last", {"model": torch.nn.Linear(3, 2).state_dict()}, step=1)
    state, _ = load_checkpoint(tmp_path, "last")
    with pytest.raises(
        CheckpointError, match=r"shape mismatch weight: saved \(2, 3\) vs model \(4, 3\)"
    ):
        load_model_state(torch.nn.Linear(3, 4), state["model"], "here")
    with pytest.raises(CheckpointError, match="missing"):
        load_model_state(torch.nn.Sequential(torch.nn.Linear(3, 2)), state["model"], "here")


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["tensors", "index"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where: str) -> None:
    save_checkpoint(tmp_path, "last", {"w": torch.ones(3)}, step=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    target = "save_file" if where == "tensors" else "atomic_write_text"
    monkeypatch.setattr(checkpoint, target, _full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path, "last", {"w": torch.zeros(3)}, step=2)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "No space left on device" in message and "previous 'last' checkpoint is kept" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written left
    state, step = load_checkpoint(tmp_path, "last")
    assert step == 1 and torch.equal(state["w"], torch.ones(3))


def test_saving_the_same_step_again_never_touches_the_indexed_file(tmp_path, monkeypatch) -> None:
    save_checkpoint(tmp_path, "last", {"w": torch.ones(3)}, step=5)
    monkeypatch.setattr(checkpoint, "atomic_write_text", _full_disk)
    with pytest.raises(CheckpointWriteError):
        save_checkpoint(tmp_path, "last", {"w": torch.zeros(3)}, step=5)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path, "last")[0]["w"], torch.ones(3))
    save_checkpoint(tmp_path, "last", {"w": torch.zeros(3)}, step=5)
    assert torch.equal(load_checkpoint(tmp_path, "last")[0]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["last-00000005-1.safetensors"]


def test_unwritable_directory_is_one_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointWriteError, match=f"cannot write checkpoint 'best' .*{blocker}"):
        save_checkpoint(blocker / "checkpoints", "best", {"w": torch.ones(1)}, step=1)
