"""Typed run configuration: presets, YAML, overrides and their errors."""

from __future__ import annotations

from typing import get_args

import pytest
import yaml

from sbm_transformer.config import (
    CHOICES,
    PRESETS,
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
        ("train.device=gpu", r"^train.device 'gpu' is not a device name"),
    ],
)
def test_validate_names_the_key(item: str, match: str) -> None:
    cfg = apply_overrides(preset("tiny", "listops"), [item])
    with pytest.raises(ValueError, match=match):
        validate(cfg)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("model.attention", "flash", r"^unknown model.attention 'flash'; valid: sbm, softmax"),
        ("model.pooling", "max", r"^unknown model.pooling 'max'; valid: mean, cls$"),
        ("model.sbm", "new", r"^unknown model.sbm 'new'; valid: default, paper, original$"),
        ("train.amp", "fp8", r"^unknown train.amp 'fp8'; valid: auto, off, bf16, fp16$"),
        ("data.task", "sudoku", r"^unknown data.task 'sudoku'; valid: listops"),
        ("model.distribution", "gauss", r"^unknown model.distribution 'gauss'; valid: poisson"),
        ("model.backend", "cuda", r"^unknown model.backend 'cuda'; valid: auto, dense, sparse"),
        ("model.performer_kernel", "exp", r"^unknown model.performer_kernel 'exp'; valid: relu"),
    ],
)
def test_validate_checks_the_choices_of_a_config_built_in_python(
    key: str, value: str, match: str
) -> None:
    # A RunConfig built in Python bypasses the load-time checks; validate catches its choices.
    cfg = preset("tiny", "listops")
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match=match):
        validate(cfg)


# ------------------------------------------------------------------------- typed loading
def test_literals_mirror_their_registries() -> None:
    from sbm_transformer import config
    from sbm_transformer.attention import SBM_FORMS
    from sbm_transformer.baselines import PERFORMER_KERNELS
    from sbm_transformer.data import TASKS
    from sbm_transformer.data.base import TaskName
    from sbm_transformer.functional import BACKENDS
    from sbm_transformer.mechanisms import ATTENTIONS
    from sbm_transformer.sampling import DISTRIBUTIONS

    assert get_args(config.AttentionName) == tuple(ATTENTIONS)
    assert get_args(config.BackendName) == tuple(BACKENDS)
    assert get_args(config.SBMForm) == tuple(SBM_FORMS)
    assert get_args(config.DistributionName) == tuple(DISTRIBUTIONS)
    assert get_args(config.PerformerKernel) == tuple(PERFORMER_KERNELS)
    assert get_args(TaskName) == tuple(TASKS)
    assert get_args(config.AmpMode) == ("auto", "off", "bf16", "fp16")
    assert get_args(config.PoolingName) == ("mean", "cls")
    # every Literal field is in CHOICES, with its Literal's values
    expected = {
        "data.task": get_args(TaskName),
        "model.attention": get_args(config.AttentionName),
        "model.pooling": get_args(config.PoolingName),
        "model.sbm": get_args(config.SBMForm),
        "model.distribution": get_args(config.DistributionName),
        "model.backend": get_args(config.BackendName),
        "model.performer_kernel": get_args(config.PerformerKernel),
        "train.amp": get_args(config.AmpMode),
    }
    assert expected == CHOICES


def _one_line_naming(message: str, *parts: str) -> None:
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_typo_in_a_choice_fails_at_load_time(key: str, tmp_path) -> None:
    valid = CHOICES[key]
    listed = "valid: " + ", ".join(valid)
    typo = valid[0] + "x"
    with pytest.raises(ValueError) as err:
        apply_overrides(RunConfig(), [f"{key}={typo}"])
    _one_line_naming(
        str(err.value), f"--set {key}={typo}: ", f"invalid value {typo!r} for {key}; ", listed
    )
    assert str(err.value).endswith(listed)
    section, name = key.split(".")
    path = tmp_path / "typo.yaml"
    path.write_text(f"{section}:\n  {name}: {typo}\n")
    with pytest.raises(ValueError) as err:
        load_yaml(RunConfig(), path)
    _one_line_naming(str(err.value), f"{path}: ", f"invalid value {typo!r} for {key}; ", listed)
    with pytest.raises(ValueError) as err:
        from_dict({section: {name: typo}})
    _one_line_naming(str(err.value), "config: ", f"{typo!r} for {key}; ", listed)
    for value in valid:  # and every valid value loads
        assert getattr(getattr(from_dict({section: {name: value}}), section), name) == value


def test_a_typo_in_the_task_of_a_preset() -> None:
    with pytest.raises(ValueError, match=r"invalid value 'sudoku' for data.task; valid: listops"):
        preset("tiny", "sudoku")


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("model.dim=2.5", r"^--set model.dim=2.5: model.dim: expected an integer, got 2.5$"),
        ("model.dim=null", r"^--set model.dim=null: model.dim: expected an integer, got null$"),
        ("model.dim=.inf", r"model.dim: expected an integer, got inf$"),
        ("model.dim=[1, 2]", r"model.dim: expected an integer, got \[1, 2\]$"),
        ("train.lr=true", r"^--set train.lr=true: train.lr: expected a number, got true$"),
        ("train.lr=null", r"train.lr: expected a number, got null$"),
        ("model.rate_scale=abc", r"model.rate_scale: expected a number or null, got 'abc'$"),
        ("train.device=null", r"train.device: expected a string, got null$"),
        ("data.dir=[1]", r"data.dir: expected a string or null, got \[1\]$"),
        ("model.attention=null", r"invalid value null for model.attention; valid: sbm, softmax"),
        ("model.attention=3", r"invalid value 3 for model.attention; valid: sbm, softmax"),
    ],
)
def test_type_errors_name_the_key_value_and_type(item: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        apply_overrides(RunConfig(), [item])
    assert "\n" not in str(err.value)


def test_values_are_typed_at_load_time(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    # PyYAML reads 1e-3 and 2e-2 (no dot) as strings; an int for a float is fine; 128.0 is 128
    path.write_text(
        "train:\n  lr: 1e-3\n  clip: 1\n  steps: 20.0\n"
        "model:\n  rate_scale: 2e-2\n  init_density: null\n  dim: 128.0\n"
        "data:\n  dir: null\n  source: ${HOME}/data\n"
    )
    cfg = load_yaml(RunConfig(), path)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.clip == 1.0 and isinstance(cfg.train.clip, float)
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.model.rate_scale == 2e-2 and cfg.model.init_density is None
    assert cfg.model.dim == 128 and isinstance(cfg.model.dim, int)
    assert cfg.data.dir is None
    assert cfg.data.source == "${HOME}/data"  # taken literally: no OmegaConf interpolation
    assert apply_overrides(RunConfig(), ["model.rate_scale=null"]).model.rate_scale is None
    assert apply_overrides(RunConfig(), ["data.dir=a\\${b}"]).data.dir == "a\\${b}"


def test_unknown_keys_in_a_file_name_the_file_and_the_valid_keys(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 5\n  lr_warmup: 10\n")
    with pytest.raises(ValueError) as err:
        load_yaml(RunConfig(), path)
    _one_line_naming(
        str(err.value),
        f"{path}: unknown config key 'train.lr_warmup'; valid keys in 'train': steps, ",
        "warmup",
    )
    path.write_text("training:\n  steps: 5\n")
    with pytest.raises(ValueError, match=r"unknown config section 'training'; valid: data, model"):
        load_yaml(RunConfig(), path)
    path.write_text("model:\n")
    with pytest.raises(ValueError, match=r"section 'model' must be a mapping, got None"):
        load_yaml(RunConfig(), path)


def test_a_failed_load_changes_nothing(tmp_path) -> None:
    cfg = preset("tiny", "listops")
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  dim: 32\n  attention: sbn\n")
    with pytest.raises(ValueError, match=r"invalid value 'sbn' for model\.attention"):
        load_yaml(cfg, path)
    assert cfg == preset("tiny", "listops")


def test_round_trip_and_older_run_configs(tmp_path) -> None:
    from sbm_transformer.data import TASKS

    for name in PRESETS:
        for task in TASKS:
            cfg = preset(name, task)
            assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    cfg = apply_overrides(
        preset("tiny", "repeat"),
        [
            "model.attention=performer",
            "model.sbm=paper",
            "model.rate_scale=null",
            "model.distribution=bernoulli",
            "model.pooling=cls",
            "model.backend=sparse-torch",
            "model.performer_kernel=softmax",
            "model.init_density=0.05",
            "train.amp=bf16",
            "train.lr=3e-4",
            "data.dir=/tmp/data",
        ],
    )
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_yaml(RunConfig(), saved) == cfg
    # an older run directory's config.yaml lacks newer keys: they take their defaults
    old = yaml.safe_load(cfg.to_yaml())
    for key in ("sbm", "backend", "init_density"):
        del old["model"][key]
    del old["train"]["sparsity_ramp"]
    loaded = from_dict(old, source=str(saved))
    assert loaded.model.sbm == "default" and loaded.model.backend == "auto"
    assert loaded.model.init_density is None and loaded.train.sparsity_ramp == 0
    assert loaded.model.attention == "performer" and loaded.train.lr == 3e-4
    assert from_dict({}) == RunConfig()


def test_a_mechanism_registered_by_a_script_loads_and_validates(monkeypatch) -> None:
    from sbm_transformer import mechanisms

    monkeypatch.setitem(mechanisms.ATTENTIONS, "sbm-test", mechanisms.ATTENTIONS["sbm"])
    cfg = apply_overrides(preset("tiny", "repeat"), ["model.attention=sbm-test"])
    assert validate(cfg).model.attention == "sbm-test"
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ValueError, match=r"valid: sbm, softmax, .*, none, sbm-test$"):
        apply_overrides(cfg, ["model.attention=sbm-tset"])


@pytest.mark.parametrize("name", ["tiny", "lra"])
def test_repeat_preset_has_balanced_labels(name: str) -> None:
    from sbm_transformer.data.synthetic import repeat_rate

    d = preset(name, "repeat").data
    assert 0.5 < repeat_rate(d.vocab, d.min_length, d.max_length) < 0.65  # not ~99 % ones


def test_off_is_a_choice_not_a_boolean(tmp_path) -> None:
    # YAML 1.1 reads "off" as false; train.amp's choice "off" is meant
    cfg = apply_overrides(preset("tiny", "listops"), ["train.amp=off"])
    assert cfg.train.amp == "off"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n")
    assert load_yaml(preset("tiny", "listops"), path).train.amp == "off"
    assert from_dict(yaml.safe_load(cfg.to_yaml())).train.amp == "off"
