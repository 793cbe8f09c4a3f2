"""Checkpoints: atomic, verified, loaded without executing code, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from sbm_transformer.checkpoint import (
    CheckpointError,
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
