"""Typed run configuration: presets, YAML, overrides and their errors."""

from __future__ import annotations

import pytest

from sbm_transformer.config import (
    RunConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    preset,
    validate,
)


def test_presets_and_round_trip(tmp_path) -> None:
    lra = preset("lra", "listops")
    assert (lra.model.dim, lra.model.heads, lra.model.layers, lra.model.mlp_dim) == (64, 2, 2, 128)
    assert lra.model.num_clusters == 128 and lra.train.sparsity_weight == 1e-4
    assert (lra.train.batch_size, lra.train.lr, lra.train.warmup) == (128, 5e-4, 1000)
    assert lra.data.max_len == 2000
    assert preset("lra", "text").data.max_len == 4000
    assert preset("lra", "image").train.batch_size == 1024
    tiny = preset("tiny", "listops")
    assert tiny.data.task == "listops" and tiny.data.max_length <= 200
    path = tmp_path / "config.yaml"
    path.write_text(lra.to_yaml())
    assert from_dict(__import__("yaml").safe_load(path.read_text())) == lra


def test_overrides_are_typed() -> None:
    cfg = apply_overrides(
        RunConfig(),
        [
            "model.dim=128",
            "train.lr=1e-3",
            "model.init_density=null",
            "train.clip=0",
            "model.attention=linear",
        ],
    )
    assert cfg.model.dim == 128 and cfg.train.lr == 1e-3 and cfg.model.init_density is None
    assert cfg.train.clip == 0.0 and isinstance(cfg.train.clip, float)
    assert apply_overrides(RunConfig(), ["model.init_density=0.05"]).model.init_density == 0.05


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("model.dimm=3", r"unknown config key 'model.dimm'; valid keys in 'model': attention, dim"),
        ("modle.dim=3", r"unknown config section 'modle'; valid: data, model, train"),
        ("model.dim=abc", r"model.dim: expected an integer, got 'abc'"),
        ("train.lr=fast", "expected a number"),
        ("dim=3", "must look like section.field"),
        ("model.dim", "expects key=value"),
    ],
)
def test_bad_overrides(item: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_overrides(RunConfig(), [item])


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid: tiny, lra"):
        preset("huge", "listops")


def test_yaml_file_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [1,\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\d+: invalid YAML"):
        load_yaml(RunConfig(), bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  heads: two\n")
    with pytest.raises(ValueError, match=r"wrong.yaml: model.heads: expected an integer"):
        load_yaml(RunConfig(), wrong)
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  steps: 7\n")
    assert load_yaml(RunConfig(), ok).train.steps == 7


def test_every_preset_is_valid() -> None:
    from sbm_transformer.data import TASKS

    for name in ("tiny", "lra"):
        for task in TASKS:
            validate(preset(name, task))


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("train.log_every=0", r"^train.log_every must be >= 1, got 0$"),
        ("train.eval_every=0", r"^train.eval_every must be >= 1, got 0$"),
        ("train.batch_size=0", r"^train.batch_size must be >= 1, got 0$"),
        ("train.batch_size=-4", r"^train.batch_size must be >= 1, got -4$"),
        ("train.steps=0", r"^train.steps must be >= 1"),
        ("train.grad_accum=0", r"^train.grad_accum must be >= 1"),
        ("train.lr=0", r"^train.lr must be > 0, got 0.0$"),
        ("train.lr=-1e-3", r"^train.lr must be > 0"),
        ("train.lr=.nan", r"^train.lr must be a finite number, got nan$"),
        ("train.warmup=-1", r"^train.warmup must be >= 0"),
        ("train.eval_samples=0", r"^train.eval_samples must be >= 1"),
        ("data.max_length=0", r"^data.max_length must be >= 1"),
        ("data.min_length=-1", r"^data.min_length must be >= 0"),
        ("data.val_size=-1", r"^data.val_size must be >= 0"),
        ("model.dim=0", r"^model.dim must be >= 1"),
        ("model.heads=0", r"^model.heads must be >= 1"),
        ("model.layers=0", r"^model.layers must be >= 1"),
        ("model.num_clusters=0", r"^model.num_clusters must be >= 1"),
        ("model.rate_scale=0", r"^model.rate_scale must be > 0"),
        ("model.dropout=1", r"^model.dropout must be in \[0, 1\), got 1.0$"),
        ("model.heads=3", r"^model.dim \(64\) must be divisible by model.heads \(3\)$"),
        ("train.grad_accum=3", r"^train.batch_size \(32\) must be a multiple of train.grad_accum"),
        ("data.min_length=500", r"^data.min_length \(500\) must be <= data.max_length \(128\)$"),
        ("model.attention=flash", r"^unknown model.attention 'flash'; valid: sbm, softmax"),
        ("model.pooling=max", r"^unknown model.pooling 'max'; valid: mean, cls$"),
        ("model.sbm=new", r"^unknown model.sbm 'new'; valid: default, paper, original$"),
        ("train.amp=fp8", r"^unknown train.amp 'fp8'; valid: auto, off, bf16, fp16$"),
        ("train.device=gpu", r"^train.device 'gpu' is not a device name"),
        ("data.task=sudoku", r"^unknown data.task 'sudoku'; valid: listops"),
    ],
)
def test_validate_names_the_key(item: str, match: str) -> None:
    cfg = apply_overrides(preset("tiny", "listops"), [item])
    with pytest.raises(ValueError, match=match):
        validate(cfg)


@pytest.mark.parametrize("name", ["tiny", "lra"])
def test_repeat_preset_has_balanced_labels(name: str) -> None:
    from sbm_transformer.data.synthetic import repeat_rate

    d = preset(name, "repeat").data
    assert 0.5 < repeat_rate(d.vocab, d.min_length, d.max_length) < 0.65  # not ~99 % ones
