"""Typed run configuration: presets, YAML, overrides and their errors."""

from __future__ import annotations

import pytest

from sbm_transformer.config import RunConfig, apply_overrides, from_dict, load_yaml, preset


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
