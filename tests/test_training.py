"""Training runs: run directory, exact resume, evaluation, comparison, CLI errors."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal

import pytest
import torch

from sbm_transformer import training
from sbm_transformer.checkpoint import CheckpointError, load_checkpoint
from sbm_transformer.cli import main
from sbm_transformer.config import apply_overrides, preset
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


def metric_rows(run_dir, *, lr: bool = False) -> list[dict[str, str]]:
    """metrics.csv without its timing columns (and without ``lr`` unless asked)."""
    keys = ("step", "split", "loss", "accuracy", "density") + (("lr",) if lr else ())
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: r[k] for k in keys} for r in csv.DictReader(f)]


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
    events = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = events.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "accuracy/val", "density/train", "density_val/layer1_head1"} <= tags
    assert [e.step for e in acc.Scalars("accuracy/val")] == [4, 8, 12]
    state, step = load_checkpoint(run / "checkpoints", "last")
    assert step == 12 and "model" in state and "optimizer" in state


def final_state(run_dir) -> dict[str, torch.Tensor]:
    """The model and optimizer tensors of a run's last checkpoint, by name."""
    state, _ = load_checkpoint(run_dir / "checkpoints", "last")
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    for i, moments in state["optimizer"]["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in moments.items()})
    return tensors


def assert_same_run(a, b) -> None:
    """Bit-identical final weights and optimizer state; equal metrics but for timing columns."""
    wa, wb = final_state(a), final_state(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [
        k for k in wa if not torch.equal(wa[k], wb[k])
    ]
    assert metric_rows(a, lr=True) == metric_rows(b, lr=True)
    assert (a / "density.csv").read_text() == (b / "density.csv").read_text()


def interrupt_at(monkeypatch, calls_to_interrupt: dict[int, int]) -> None:
    """Send this process SIGINT (``count`` times) from ``make_batch`` call number ``n``."""
    calls = {"n": 0}
    real = training.step.make_batch

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        for _ in range(calls_to_interrupt.get(calls["n"], 0)):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(training.step, "make_batch", interrupting)  # steps
    monkeypatch.setattr(training.evaluation, "make_batch", interrupting)  # evaluation, warm-up


def exact_config():
    """config() with the thread count fixed (to the current one), so that runs compared bit for
    bit split their parallel reductions alike."""
    return config(extra=[f"train.threads={torch.get_num_threads()}"])


# make_batch calls with config(): 1 the warm-up step; 2-5 steps 1-4; 6-7 the evaluation at step 4
# (32 val examples, batches of 16); 8 step 5; 9 step 6; ...


def test_ctrl_c_stops_at_a_step_boundary_and_resume_is_exact(tmp_path, monkeypatch) -> None:
    cfg = exact_config()
    full = train(cfg, tmp_path / "full", quiet=True, echo=lambda s: None)
    # Ctrl-C while step 5 runs: the step is finished and saved, between two log lines
    # (log_every=2), so the unlogged metrics window must be saved and restored too
    interrupt_at(monkeypatch, {8: 1})
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", quiet=True, echo=said.append)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    _, step = load_checkpoint(tmp_path / "cut" / "checkpoints", "last")
    assert step == 5
    assert (
        f"saved a checkpoint at step 5; continue with: sbmt train --resume {tmp_path / 'cut'}"
        in said[-1]
    )
    resumed = train(cfg, tmp_path / "cut", resume=True, quiet=True, echo=lambda s: None)
    assert_same_run(tmp_path / "cut", tmp_path / "full")
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["test_density"] == full["test_density"]


def test_ctrl_c_during_evaluation_keeps_its_row_and_checkpoints(tmp_path, monkeypatch) -> None:
    cfg = exact_config()
    train(cfg, tmp_path / "full", quiet=True, echo=lambda s: None)
    interrupt_at(monkeypatch, {6: 1})  # in the evaluation at step 4
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", quiet=True, echo=lambda s: None)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints", "last")[1] == 4
    assert load_checkpoint(tmp_path / "cut" / "checkpoints", "best")[1] == 4
    assert {"step": "4", "split": "val"}.items() <= metric_rows(tmp_path / "cut")[-1].items()
    train(cfg, tmp_path / "cut", resume=True, quiet=True, echo=lambda s: None)
    assert_same_run(tmp_path / "cut", tmp_path / "full")


def test_second_ctrl_c_stops_at_once_without_saving(tmp_path, monkeypatch) -> None:
    cfg = exact_config()
    train(cfg, tmp_path / "full", quiet=True, echo=lambda s: None)
    interrupt_at(monkeypatch, {8: 2})  # twice in step 5: stop in the middle of it
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", quiet=True, echo=said.append)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert load_checkpoint(tmp_path / "cut" / "checkpoints", "last")[1] == 4  # the last good one
    assert "interrupted again" in said[-1] and "the last checkpoint (step 4) is kept" in said[-1]
    train(cfg, tmp_path / "cut", resume=True, quiet=True, echo=lambda s: None)
    assert_same_run(tmp_path / "cut", tmp_path / "full")


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
        (["data", "listops", "--out", "unused", "--set", "data.train_size=-3"], "train_size must"),
        (["eval", "no/such/run"], "no/such/run is not a run directory (no config.yaml)"),
        (["train", "--resume", "x", "--overwrite"], "--resume and --overwrite exclude each other"),
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


def test_resume_without_a_last_checkpoint_is_an_error(tmp_path) -> None:
    run = tmp_path / "run"
    train(config("softmax"), run, quiet=True, echo=lambda s: None)
    (run / "checkpoints" / "last.json").unlink()
    metrics = (run / "metrics.csv").read_text()
    with pytest.raises(RunDirError) as info:
        train(config("softmax"), run, resume=True, quiet=True, echo=lambda s: None)
    message = str(info.value)
    assert "no last checkpoint (checkpoints/last.json)" in message
    assert "a best checkpoint at step" in message and "metrics up to step 12" in message
    assert f"--run-dir {run} --overwrite" in message
    assert (run / "metrics.csv").read_text() == metrics  # nothing discarded


def test_resume_with_fewer_steps_than_the_checkpoint_is_an_error(tmp_path) -> None:
    run = tmp_path / "run"
    train(config("softmax"), run, quiet=True, echo=lambda s: None)
    with pytest.raises(RunDirError, match=r"train\.steps=8: its last checkpoint is at step 12"):
        train(config("softmax", ["train.steps=8"]), run, resume=True, echo=lambda s: None)


def test_longer_resume_recomputes_the_schedule_and_says_so(tmp_path) -> None:
    run = tmp_path / "run"
    train(config("softmax"), run, quiet=True, echo=lambda s: None)
    said: list[str] = []
    train(config("softmax", ["train.steps=20"]), run, resume=True, quiet=True, echo=said.append)
    message = next(s for s in said if "train.steps changed" in s)
    assert "changed from 12 to 20: the learning-rate schedule is recomputed for 20 steps" in message
    assert "the 12-step schedule was at 0" in message
    rows = metric_rows(run, lr=True)
    lrs = {int(r["step"]): float(r["lr"]) for r in rows if r["split"] == "train"}
    lr = config().train.lr
    assert lrs[12] == 0.0  # the first 12 steps decayed to 0 ...
    assert lrs[14] == pytest.approx(lr * (20 - 14) / (20 - 2), rel=1e-5)  # ... then the new one
    assert lrs[20] == 0.0


def test_reschedule_sets_the_next_rate_from_the_new_schedule() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    old = torch.optim.AdamW(params, lr=1.0)
    old_schedule = torch.optim.lr_scheduler.LambdaLR(old, training.lr_lambda(2, 10))
    for _ in range(10):
        old.step()
        old_schedule.step()
    new = torch.optim.AdamW(params, lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(new, training.lr_lambda(2, 20))
    new.load_state_dict(old.state_dict())
    schedule.load_state_dict(old_schedule.state_dict())
    assert new.param_groups[0]["lr"] == 0.0  # what LambdaLR alone would use for step 11
    t = config().train
    t.warmup, t.steps = 2, 20
    training._reschedule(new, schedule, t, 10)
    rates = []
    for _ in range(10):
        rates.append(new.param_groups[0]["lr"])
        new.step()
        schedule.step()
    assert rates == pytest.approx([(20 - s) / 18 for s in range(10, 20)])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.log_every=0"], "train.log_every must be >= 1, got 0"),
        (["train.eval_every=0"], "train.eval_every must be >= 1, got 0"),
        (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
        (["train.batch_size=15", "train.grad_accum=2"], "must be a multiple of train.grad_accum"),
        (["train.batch_size=200"], "the training split has 96 examples, fewer than"),
        (["data.val_size=0"], "the val split is empty"),
        (["data.dir=/nonexistent/data"], "data.dir /nonexistent/data does not exist"),
        (["model.attention=flash"], "invalid value 'flash' for model.attention; valid: sbm,"),
    ],
)
def test_user_errors_are_one_line_and_leave_no_run_directory(
    tmp_path, capsys, extra: list[str], message: str
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--task", "repeat", "--attention", "softmax", "--run-dir", str(run)]
    assert main([*argv, "--quiet", "--set", *SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sbmt train: error: ") and message in err and err.count("\n") == 1
    assert not run.exists()  # the corrected command is not blocked by a half-made run


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, capsys, monkeypatch
) -> None:
    from sbm_transformer import checkpoint

    real, calls = checkpoint.save_file, {"n": 0}

    def fills_up(*args, **kwargs):  # the checkpoints at step 4 fit, then the disk is full
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    run = tmp_path / "run"
    argv = ["train", "--task", "repeat", "--attention", "softmax", "--run-dir", str(run)]
    assert main([*argv, "--quiet", "--set", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sbmt train: error: cannot write checkpoint")
    assert f"(step 8) in {run / 'checkpoints'}: No space left on device" in err
    assert load_checkpoint(run / "checkpoints", "last")[1] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best-00000004.safetensors",
        "best.json",
        "last-00000004.safetensors",
        "last.json",
    ]


def test_unwritable_run_directory_is_one_line(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["train", "--task", "repeat", "--attention", "softmax", "--run-dir", str(blocker / "r")]
    assert main([*argv, "--quiet", "--set", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err == f"sbmt train: error: {blocker / 'r'}: Not a directory\n"


def test_compare_plan_skips_resumes_and_starts(tmp_path) -> None:
    from sbm_transformer.compare import plan_comparison_run

    cfg = config("softmax")

    def run_dir(name: str, *files: str, cfg_text: str | None = None):
        path = tmp_path / name
        (path / "checkpoints").mkdir(parents=True)
        (path / "config.yaml").write_text(cfg_text or cfg.to_yaml())
        for f in files:
            content = {"summary.json": "{}", "checkpoints/last.json": '{"step": 7}'}.get(f, "")
            (path / f).write_text(content)
        return path

    def plan(path, resume=True, overwrite=False):
        return plan_comparison_run("softmax", cfg, path, resume=resume, overwrite=overwrite)

    assert plan(tmp_path / "missing").action == "start"
    done = run_dir("done", "summary.json", "checkpoints/last.json")
    assert (plan(done).action, plan(done).note) == ("skip", "finished, skipped")
    cut = run_dir("cut", "checkpoints/last.json")
    assert (plan(cut).action, plan(cut).note) == ("resume", "resuming from step 7")
    longer = run_dir("longer", "summary.json", "checkpoints/last.json")
    cfg.train.steps = 20  # a finished run trained further: resumed, not skipped
    assert plan(longer).action == "resume"
    cfg.train.steps = 12
    assert plan(run_dir("early")).action == "restart"  # stopped before its first step
    with_rows = run_dir("rows")
    (with_rows / "metrics.csv").write_text("step,split,loss\n2,train,0.5\n")
    with pytest.raises(RunDirError, match="has metrics but no last checkpoint"):
        plan(with_rows)
    other = run_dir("other", cfg_text=config("softmax", ["model.dim=32"]).to_yaml())
    with pytest.raises(RunDirError, match=r"the softmax run .* \(model.dim differ\)"):
        plan(other)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not a run directory"):
        plan(stranger)
    with pytest.raises(RunDirError, match="exists; pass --resume to continue the comparison"):
        plan(done, resume=False)
    assert plan(done, resume=False, overwrite=True).action == "start"
    with pytest.raises(RunDirError, match="exclude each other"):
        plan(done, overwrite=True)


def test_evaluation_and_data_generation_report_progress(tmp_path, capsys) -> None:
    cfg = config()
    seen: list[tuple[int, int]] = []
    task, splits, model = training.build(cfg, torch.device("cpu"), lambda d, t: seen.append((d, t)))
    assert seen[-1] == (160, 160)  # 96 + 32 + 32 examples generated
    seen.clear()
    training.evaluate(
        model,
        splits["val"],
        task,
        cfg,
        torch.device("cpu"),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(1, 2), (2, 2)]
    run = tmp_path / "run"
    train(config("softmax"), run, quiet=True)
    out = capsys.readouterr()
    assert (
        "data: 160 examples ..." in out.out and "final evaluation of the best checkpoint" in out.out
    )
    assert out.err == ""  # quiet: no progress bars
    assert main(["eval", str(run)]) == 0
    assert "eval test" in capsys.readouterr().err  # the bar over the test batches


def test_resume_of_a_comparison_directory_points_to_compare(tmp_path, capsys) -> None:
    (tmp_path / "cmp" / "sbm").mkdir(parents=True)
    (tmp_path / "cmp" / "sbm" / "config.yaml").write_text(config().to_yaml())
    assert main(["train", "--resume", str(tmp_path / "cmp")]) == 2
    assert (
        f"runs sbm of a comparison: continue it with sbmt compare ... --out {tmp_path / 'cmp'}"
        in (capsys.readouterr().err)
    )


@pytest.mark.parametrize("backend", ["sparse-numba", "sparse-torch"])
def test_bf16_autocast_on_the_cpu_with_the_sparse_backends(tmp_path, backend) -> None:
    from sbm_transformer.compare import comparison_table
    from sbm_transformer.mechanisms import SBMSelfAttention

    cfg = config(extra=["train.amp=bf16", f"model.backend={backend}", "train.steps=4"])
    task, splits, model = training.build(cfg, torch.device("cpu"))
    seen: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, SBMSelfAttention):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.output.dtype))
    autocast, needs_scaler = training.autocast_context("bf16", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_lambda(1, 4))
    stats = training.train_step(
        model, optimizer, scheduler, None, autocast, splits["train"], task.kind,
        torch.arange(16), cfg.train, 0, torch.device("cpu"),
    )  # fmt: skip
    assert not needs_scaler and seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(stats.loss)) and stats.density is not None
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not bf16 weights
    summary = train(cfg, tmp_path / "run", quiet=True, echo=lambda s: None)
    assert summary["amp"] == "bf16" and 0 < summary["test_density"] < 1
    assert "| bf16 autocast |" in comparison_table([summary])
