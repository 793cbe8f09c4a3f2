"""Training runs: run directory, exact resume, evaluation, comparison, CLI errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sbm_transformer import training
from sbm_transformer.checkpoint import CheckpointError, load_checkpoint
from sbm_transformer.cli import main
from sbm_transformer.config import apply_overrides, preset
from sbm_transformer.tensorboard import read_scalars
from sbm_transformer.training import RunDirError, evaluate_run, train

SMALL = [
    "data.vocab=24", "data.min_length=12", "data.max_length=20", "data.train_size=96",
    "data.val_size=32", "data.test_size=32", "model.dim=16", "model.heads=2", "model.mlp_dim=32",
    "model.num_clusters=4", "model.dropout=0.1", "model.attention_dropout=0.1", "train.steps=12",
    "train.batch_size=16", "train.eval_every=4", "train.log_every=2", "train.warmup=2",
]  # fmt: skip


def config(attention: str = "sbm", extra: list[str] | None = None):
    cfg = preset("tiny", "repeat")
    cfg.model.attention = attention
    return apply_overrides(cfg, SMALL + (extra or []))


def metric_rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [
            {k: r[k] for k in ("step", "split", "loss", "accuracy", "density")}
            for r in csv.DictReader(f)
        ]


def test_run_directory_contents(tmp_path) -> None:
    summary = train(config(), tmp_path / "run", quiet=True, echo=lambda s: None)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.csv",
        "density.csv",
        "summary.json",
        "plots/curves.png",
        "plots/density.png",
        "plots/graph.png",
        "checkpoints/best.json",
        "checkpoints/last.json",
    ):
        assert (run / name).exists(), name
    saved = json.loads((run / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in (
        "test_accuracy",
        "val_accuracy",
        "test_density",
        "test_density_per_layer_head",
        "train_seconds",
        "steps_per_s",
        "peak_memory_bytes",
    ):
        assert key in saved
    assert (
        len(saved["test_density_per_layer_head"]) == 2
        and len(saved["test_density_per_layer_head"][0]) == 2
    )
    assert 0 < saved["test_density"] < 1
    tags = {t for t, _, _ in read_scalars(run / "tensorboard")}
    assert {"loss/train", "accuracy/val", "density/train"} <= tags
    state, step = load_checkpoint(run / "checkpoints", "last")
    assert step == 12 and "model" in state and "optimizer" in state


def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    cfg = config()
    full = train(cfg, tmp_path / "full", quiet=True, echo=lambda s: None)
    calls = {"n": 0}
    real = training.make_batch

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        # call 1: the warm-up step; 2-5: steps 1-4; 6-7: evaluation at step 4; 8: step 5;
        # 9: step 6 -> stop after step 5, between two log lines (log_every=2), so the unlogged
        # window must be restored
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "make_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", quiet=True, echo=lambda s: None)
    monkeypatch.setattr(training, "make_batch", real)
    _, step = load_checkpoint(tmp_path / "cut" / "checkpoints", "last")
    assert step == 5
    resumed = train(cfg, tmp_path / "cut", resume=True, quiet=True, echo=lambda s: None)
    assert metric_rows(tmp_path / "cut") == metric_rows(tmp_path / "full")
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["test_density"] == full["test_density"]


def test_run_directory_protection(tmp_path) -> None:
    run = tmp_path / "run"
    train(config("softmax"), run, quiet=True, echo=lambda s: None)
    with pytest.raises(RunDirError, match="exists; pass --resume to continue it or --overwrite"):
        train(config("softmax"), run, quiet=True, echo=lambda s: None)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not a run directory"):
        train(config("softmax"), other, overwrite=True, quiet=True, echo=lambda s: None)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(RunDirError, match=r"only train\.steps may change"):
        train(
            config("softmax", ["model.dim=32"]), run, resume=True, quiet=True, echo=lambda s: None
        )
    train(config("softmax"), run, overwrite=True, quiet=True, echo=lambda s: None)


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path) -> None:
    run = tmp_path / "run"
    train(config("softmax"), run, quiet=True, echo=lambda s: None)
    index = run / "checkpoints" / "last.json"
    tensors = next((run / "checkpoints").glob("last-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-10])
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(config("softmax"), run, resume=True, quiet=True, echo=lambda s: None)
    after = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert before == after and index.exists()


def test_eval_reproduces_the_best_checkpoint(tmp_path) -> None:
    run = tmp_path / "run"
    summary = train(config(), run, quiet=True, echo=lambda s: None)
    result = evaluate_run(run, split="val", echo=lambda s: None)
    assert result.accuracy == pytest.approx(summary["val_accuracy"])
    averaged = evaluate_run(run, split="val", samples=3, echo=lambda s: None)
    assert 0.0 <= averaged.accuracy <= 1.0


def test_cli_train_compare_eval_data(tmp_path, capsys) -> None:
    sets = ["--set", *SMALL]
    assert (
        main(
            [
                "train",
                "--task",
                "repeat",
                "--attention",
                "softmax",
                "--run-dir",
                str(tmp_path / "a"),
                "--quiet",
                *sets,
            ]
        )
        == 0
    )
    assert main(["eval", str(tmp_path / "a")]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert (
        main(
            [
                "compare",
                "--task",
                "repeat",
                "--attention",
                "sbm,linear",
                "--out",
                str(tmp_path / "c"),
                "--quiet",
                *sets,
            ]
        )
        == 0
    )
    table = (tmp_path / "c" / "comparison.md").read_text()
    assert "| sbm |" in table and "| linear |" in table
    assert (tmp_path / "c" / "comparison.png").exists()
    assert (
        main(
            [
                "data",
                "listops",
                "--out",
                str(tmp_path / "d"),
                "--set",
                "data.train_size=20",
                "data.val_size=5",
                "data.test_size=5",
                "data.min_length=10",
                "data.max_length=40",
            ]
        )
        == 0
    )
    assert (tmp_path / "d" / "basic_train.tsv").exists()
    assert main(["data", "listops", "--out", str(tmp_path / "d")]) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--task", "sudoku"], "unknown task 'sudoku'; valid: listops"),
        (["train", "--attention", "flash"], "unknown attention 'flash'; valid: sbm, softmax"),
        (["train", "--preset", "huge"], "unknown preset 'huge'; valid: tiny, lra"),
        (["train", "--set", "model.dimm=3"], "unknown config key 'model.dimm'"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_cli_errors_list_valid_choices(argv, message, capsys, tmp_path) -> None:
    assert main([*argv, "--run-dir", str(tmp_path / "x")] if argv[0] == "train" else argv) == 2
    assert message in capsys.readouterr().err


def test_quick_demo(tmp_path, capsys) -> None:
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "| sbm |" in out and "| softmax |" in out and "most common label" in out
    assert (tmp_path / "demo" / "sbm" / "plots" / "density.png").exists()


@pytest.mark.parametrize(
    ("task", "attention", "extra"),
    [
        ("listops", "sbm", ["data.min_length=10", "data.max_length=40"]),
        ("retrieval", "sbm", ["data.min_length=24", "data.max_length=40", "data.vocab=8"]),
        ("lm", "sbm", ["data.min_length=10", "data.max_length=40"]),
        ("lm", "linear", ["data.min_length=10", "data.max_length=40"]),
    ],
)
def test_every_task_kind_trains(tmp_path, task: str, attention: str, extra: list[str]) -> None:
    cfg = preset("tiny", task)
    cfg.model.attention = attention
    apply_overrides(
        cfg,
        [
            *SMALL[3:],
            "train.steps=4",
            "train.eval_every=2",
            "train.batch_size=8",
            "data.train_size=32",
            "data.val_size=8",
            "data.test_size=8",
            *extra,
        ],
    )
    summary = train(cfg, tmp_path / "run", quiet=True, echo=lambda s: None)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert (summary["test_density"] is not None) == (attention == "sbm")


def test_warm_up_leaves_the_model_and_random_state_alone() -> None:
    task, splits, model = training.build(config(), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    training.warm_up(model, splits["train"], task.kind, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_compare_stops_when_a_run_fails(tmp_path, capsys) -> None:
    existing = tmp_path / "c" / "softmax"
    existing.mkdir(parents=True)
    (existing / "config.yaml").write_text("a run the user keeps\n")
    argv = ["compare", "--task", "repeat", "--attention", "softmax,none", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "c"), "--set", *SMALL]) == 2
    assert "the softmax run" in capsys.readouterr().err
    assert (existing / "config.yaml").read_text() == "a run the user keeps\n"
    assert not (tmp_path / "c" / "none").exists()


def test_sparsity_weight_schedule() -> None:
    from sbm_transformer.config import TrainConfig
    from sbm_transformer.training import sparsity_weight_at

    constant = TrainConfig(sparsity_weight=0.1)
    assert [sparsity_weight_at(constant, s) for s in (0, 5)] == [0.1, 0.1]
    delayed = TrainConfig(sparsity_weight=0.1, sparsity_start=10, sparsity_ramp=4)
    weights = [sparsity_weight_at(delayed, s) for s in (0, 9, 10, 11, 13, 100)]
    assert weights == pytest.approx([0.0, 0.0, 0.025, 0.05, 0.1, 0.1])
