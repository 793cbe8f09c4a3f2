"""Typed run configuration: presets, YAML files and ``key=value`` overrides.

A run is described by one :class:`RunConfig` (sections ``data``, ``model``, ``train``). It is built
from a preset (``tiny`` for a CPU, ``lra`` for the original Long Range Arena settings of each
task), then a YAML file, then command-line overrides such as ``--set model.dim=128``; it is
printed at the start of a run and saved with it (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sbm_transformer.attention import DEFAULT_RATE_SCALE
from sbm_transformer.data.base import DataConfig

# The closed choices, checked when a file or an override is read. A Literal is spelled out (type
# checkers read it), so each mirrors the registry named in its comment, which this module does not
# import (mechanisms and baselines pull in the models); tests/test_config.py checks they agree.
#: ``mechanisms.ATTENTIONS`` (a script may register more at run time: see ``_extra_attentions``).
AttentionName = Literal[
    "sbm", "softmax", "linear", "performer", "linformer", "nystromformer", "none"
]
#: ``functional.BACKENDS``.
BackendName = Literal["auto", "dense", "sparse", "sparse-torch", "sparse-numba", "sparse-triton"]
#: ``attention.SBM_FORMS``.
SBMForm = Literal["default", "paper", "original"]
#: ``sampling.DISTRIBUTIONS``.
DistributionName = Literal["poisson", "bernoulli"]
#: ``baselines.PERFORMER_KERNELS``.
PerformerKernel = Literal["relu", "softmax"]
#: Pooling of the classification heads (``models``).
PoolingName = Literal["mean", "cls"]
#: Mixed precision (``training``): bf16 on GPUs that support it with "auto".
AmpMode = Literal["auto", "off", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """The encoder and its attention (see ``sbm_transformer.models``)."""

    attention: AttentionName = "sbm"
    dim: int = 64
    heads: int = 2
    layers: int = 2
    mlp_dim: int = 128
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pooling: PoolingName = "mean"  # classification heads
    # SBM attention
    num_clusters: int = 128
    exploration: float = 0.01
    # "default", "paper" or "original" (attention.SBM_FORMS); the last two fix distribution
    # and rate_scale, which then must be left at their defaults
    sbm: SBMForm = "default"
    distribution: DistributionName = "poisson"  # the paper's or "bernoulli" (the released code's)
    rate_scale: float | None = (
        DEFAULT_RATE_SCALE  # initial learned scale on the SBM rate; null = no scale
    )
    init_density: float | None = None
    backend: BackendName = "auto"
    # baselines
    performer_features: int = 256
    performer_kernel: PerformerKernel = "relu"
    linformer_k: int = 256
    nystrom_landmarks: int = 32
    nystrom_conv: int = 35


@dataclass
class TrainConfig:
    """The optimisation loop (see ``sbm_transformer.training``)."""

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per step (batch_size is split into them)
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping; 0 disables
    sparsity_weight: float = 1e-4  # loss += w * mean density of sampled-graph attentions
    sparsity_start: int = 0  # steps with no sparsity term (a head first finds the edges it needs)
    sparsity_ramp: int = 0  # then the weight grows linearly to sparsity_weight over these steps
    eval_every: int = 100
    eval_batches: int = 0  # 0 = the whole split
    eval_samples: int = 1  # graphs averaged per prediction (stochastic attentions)
    eval_seed: int = 1234  # graphs sampled in evaluation use this seed
    log_every: int = 10
    amp: AmpMode = "auto"  # "auto" (bf16 on GPUs that support it), "off", "bf16", "fp16"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    seed: int = 0
    threads: int = 0  # torch threads on CPU; 0 = torch's default


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


# ------------------------------------------------------------------------------- presets
# The original SBM-Transformer LRA settings (sc782/SBM-Transformer code/lra_config.py): 2 layers,
# dim 64, 2 heads of 32, MLP 128, dropout 0.1, K = 128 clusters, AdamW with linear warm-up and
# decay, sparsity weight 1e-4; per task below. Batch sizes are the effective ones (the original
# split them into chunks that fit a GPU; here grad_accum does that).
_LRA_TASKS: dict[str, dict[str, dict[str, Any]]] = {
    "listops": {
        "data": {"max_len": 2000, "min_length": 500, "max_length": 2000, "train_size": 96000,
                 "val_size": 2000, "test_size": 2000},
        "train": {"batch_size": 128, "lr": 5e-4, "warmup": 1000, "steps": 5000, "eval_every": 50},
    },
    "text": {
        "data": {"max_len": 4000},
        "train": {"batch_size": 128, "lr": 5e-4, "warmup": 8000, "steps": 20000, "eval_every": 500},
    },
    "retrieval": {
        "data": {"max_len": 4000},
        "train": {"batch_size": 32, "lr": 1e-4, "warmup": 800, "steps": 30000, "eval_every": 300},
    },
    "image": {
        "data": {"max_len": 1024, "train_size": 0, "val_size": 0, "test_size": 0},
        "train": {"batch_size": 1024, "lr": 5e-4, "warmup": 175, "steps": 35000, "eval_every": 175},
    },
    "pathfinder": {
        "data": {"max_len": 1024, "train_size": 0, "val_size": 0, "test_size": 0},
        "train": {"batch_size": 1024, "lr": 5e-4, "warmup": 312, "steps": 62400, "eval_every": 312},
    },
}  # fmt: skip

_LRA_MODEL = {"dim": 64, "heads": 2, "layers": 2, "mlp_dim": 128, "dropout": 0.1,
              "attention_dropout": 0.1, "num_clusters": 128, "pooling": "mean"}  # fmt: skip

# A configuration that trains in minutes on a 2-core CPU: short sequences, small data.
_TINY: dict[str, dict[str, Any]] = {
    "data": {"train_size": 4000, "val_size": 500, "test_size": 500, "min_length": 32,
             "max_length": 128},
    "model": {"dim": 64, "heads": 2, "layers": 2, "mlp_dim": 128, "dropout": 0.0,
              "attention_dropout": 0.0, "num_clusters": 32},
    "train": {"steps": 600, "batch_size": 32, "lr": 1e-3, "warmup": 50, "eval_every": 100,
              "log_every": 10},
}  # fmt: skip

# Per task on top of _TINY. The repeated-tokens task with the tiny lengths (32-128) and the
# default vocabulary (16) labels ~99 % of tokens 1 (a repeat), so every model would score the
# majority answer: lengths 48-64 over 64 token ids label ~58 % 1 (the demo's setting,
# sbm_transformer.demo.REPEAT_TASK, with its learning rate and the baselines' sizes of
# docs/results.md).
_TINY_TASKS: dict[str, dict[str, dict[str, Any]]] = {
    "repeat": {
        "data": {"min_length": 48, "max_length": 64, "vocab": 64},
        "model": {"num_clusters": 16, "linformer_k": 32, "nystrom_landmarks": 16,
                  "performer_features": 64},
        "train": {"lr": 2e-3, "warmup": 80},
    },
}  # fmt: skip

# The repeated-tokens task under the lra preset (not an LRA task: the LRA model on the demo's
# data, whose labels are balanced).
_LRA_REPEAT_DATA = {"min_length": 48, "max_length": 64, "vocab": 64}

PRESETS = ("tiny", "lra")


def preset(name: str, task: str) -> RunConfig:
    """The configuration of a preset for a task. Raises ValueError listing the valid choices."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    cfg = RunConfig()
    set_value(cfg, "data.task", task, source=f"preset {name}")
    if name == "tiny":
        apply_dict(cfg, _TINY)
        apply_dict(cfg, _TINY_TASKS.get(task, {}))
    else:
        apply_dict(cfg, {"model": _LRA_MODEL, "train": {"sparsity_weight": 1e-4}})
        apply_dict(cfg, _LRA_TASKS.get(task, {}))
        if task == "repeat":
            apply_dict(cfg, {"data": _LRA_REPEAT_DATA})
    return cfg


# ----------------------------------------------------------------------------- overrides
# Values are merged with OmegaConf onto the structured schema of RunConfig, which checks keys,
# types (an int for a float field is fine; PyYAML's string "1e-3" is read as a float; null only
# for Optional fields) and the Literal choices; the result goes back to the dataclasses.
def _field_types(section: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in fields(section)}


_TYPES: dict[str, dict[str, Any]] = {name: _field_types(cls) for name, cls in SECTIONS.items()}
_SCHEMA: DictConfig | None = None


def _schema() -> DictConfig:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = OmegaConf.structured(RunConfig)
    return _SCHEMA


def _extra_attentions() -> tuple[str, ...]:
    """Mechanisms a script registered in ``mechanisms.ATTENTIONS`` beyond the built-in ones."""
    mechanisms = sys.modules.get("sbm_transformer.mechanisms")
    registry = getattr(mechanisms, "ATTENTIONS", {})
    return tuple(n for n in registry if n not in typing.get_args(AttentionName))


def _choices(tp: Any) -> tuple[str, ...] | None:
    """The values of a Literal field type (with registered extra attentions); None otherwise."""
    if typing.get_origin(tp) is Literal:
        extra = _extra_attentions() if tp == AttentionName else ()
        return (*typing.get_args(tp), *extra)
    return None


def _expected(tp: Any) -> str:
    """What a field of type ``tp`` takes, in words."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [_expected(t) for t in typing.get_args(tp) if t is not type(None)]
        return " or ".join([*options, "null"])
    return {int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _show(value: Any) -> str:
    """A value as it was written (YAML's null, true and false; Python's repr otherwise)."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]
    return repr(value)


def _escape(text: str) -> str:
    """``text`` with OmegaConf's interpolations (``${...}``) escaped: values are taken literally."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + r"\${", text)


def _error(err: OmegaConfBaseException, values: dict[str, Any], source: str) -> ValueError:
    """One line for an OmegaConf error: the source, the key, the value and what is valid."""
    key = str(getattr(err, "full_key", None) or "")
    section, _, name = key.partition(".")
    if section not in SECTIONS:  # not expected: apply_dict checks the sections first
        return ValueError(f"{source}: {key or 'config'}: {str(err).splitlines()[0]}")
    types_ = _TYPES[section]
    if name not in types_:
        return ValueError(
            f"{source}: unknown config key {key!r}; valid keys in {section!r}: {', '.join(types_)}"
        )
    value = values[section][name]
    valid = _choices(types_[name])
    if valid is not None:
        return ValueError(
            f"{source}: invalid value {_show(value)} for {key}; valid: {', '.join(valid)}"
        )
    return ValueError(f"{source}: {key}: expected {_expected(types_[name])}, got {_show(value)}")


def apply_dict(cfg: RunConfig, values: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Apply a nested ``{section: {field: value}}`` mapping (checked as a whole, then set).

    Raises:
        ValueError: one line naming ``source``, the key, the value and what the key takes (the
            valid keys, the choices of a Literal field, or its type).
    """
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    given: dict[str, Any] = {}  # what OmegaConf checks
    later: dict[tuple[str, str], Any] = {}  # registered extra attentions, set as they are
    for section, entries in values.items():
        if section not in SECTIONS:
            raise ValueError(
                f"{source}: unknown config section {section!r}; valid: {', '.join(SECTIONS)}"
            )
        if not isinstance(entries, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping, got {entries!r}")
        given[section] = {}
        for name, value in entries.items():
            tp = _TYPES[section].get(name)
            if tp is int and isinstance(value, float) and value.is_integer():
                value = int(value)  # 128.0 is 128; 0.5 is refused
            elif value is False and "off" in (_choices(tp) or ()):
                # YAML 1.1 reads `off` (and no, false) as False: `amp: off` is the choice "off"
                value = "off"
            elif isinstance(value, str):
                if value == "???":  # OmegaConf's "missing" marker
                    raise ValueError(f"{source}: {section}.{name}: '???' is not a value")
                if tp == AttentionName and value in _extra_attentions():
                    later[section, name] = value
                    continue
                value = _escape(value)
            given[section][name] = value
    try:
        merged = OmegaConf.to_object(OmegaConf.merge(_schema(), given))
    except OmegaConfBaseException as err:
        raise _error(err, values, source) from None
    assert isinstance(merged, RunConfig)
    for section, entries in given.items():
        for name in entries:
            setattr(getattr(cfg, section), name, getattr(getattr(merged, section), name))
    for (section, name), value in later.items():
        setattr(getattr(cfg, section), name, value)
    return cfg


def set_value(cfg: RunConfig, key: str, value: Any, *, source: str = "override") -> None:
    """Set ``section.field`` (e.g. ``"model.dim"``) with type checking."""
    if "." not in key:
        raise ValueError(
            f"{source}: config key {key!r} must look like section.field; "
            f"sections: {', '.join(SECTIONS)}"
        )
    section, name = key.split(".", 1)
    apply_dict(cfg, {section: {name: value}}, source=source)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` strings, values parsed as YAML scalars (``1e-3``, ``true``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
        set_value(cfg, key.strip(), value, source=f"--set {item}")
    return cfg


def load_yaml(cfg: RunConfig, path: str | Path) -> RunConfig:
    """Apply a YAML file (same nested layout as ``config.yaml`` of a run; keys may be missing)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read config file {path}: {err}") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML: {err}") from err
    return apply_dict(cfg, values or {}, source=str(path))


def from_dict(values: dict[str, Any], *, source: str = "config") -> RunConfig:
    """A RunConfig from a nested mapping (e.g. a saved ``config.yaml``); missing keys: defaults."""
    return apply_dict(RunConfig(), values, source=source)


# ---------------------------------------------------------------------------- validation
#: The choices of every Literal field (``section.field`` -> values), from the field types.
CHOICES: dict[str, tuple[str, ...]] = {
    f"{section}.{name}": typing.get_args(tp)
    for section, types_ in _TYPES.items()
    for name, tp in types_.items()
    if typing.get_origin(tp) is Literal
}

# (key, lowest value, whether the lowest value itself is allowed); None values are allowed for
# optional fields (model.rate_scale, model.init_density) and checked by the model.
_LOWER_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("data.train_size", 0, True), ("data.val_size", 0, True), ("data.test_size", 0, True),
    ("data.min_length", 0, True), ("data.max_length", 1, True), ("data.vocab", 1, True),
    ("data.max_len", 0, True),
    ("model.dim", 1, True), ("model.heads", 1, True), ("model.layers", 1, True),
    ("model.mlp_dim", 1, True), ("model.num_clusters", 1, True), ("model.exploration", 0, True),
    ("model.rate_scale", 0, False), ("model.init_density", 0, False),
    ("model.performer_features", 1, True), ("model.linformer_k", 1, True),
    ("model.nystrom_landmarks", 1, True), ("model.nystrom_conv", 0, True),
    ("train.steps", 1, True), ("train.batch_size", 1, True), ("train.grad_accum", 1, True),
    ("train.lr", 0, False), ("train.warmup", 0, True), ("train.weight_decay", 0, True),
    ("train.clip", 0, True), ("train.sparsity_weight", 0, True), ("train.sparsity_start", 0, True),
    ("train.sparsity_ramp", 0, True), ("train.eval_every", 1, True),
    ("train.eval_batches", 0, True), ("train.eval_samples", 1, True), ("train.log_every", 1, True),
    ("train.threads", 0, True),
)  # fmt: skip


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value of ``cfg`` that the run would otherwise trip over late.

    Numbers must be finite and in range (``train.batch_size`` >= 1, ``train.lr`` > 0, ...),
    names must be known (task, attention, SBM form, backend, ...), and a few fields must agree
    (``data.min_length <= data.max_length``, ``model.dim`` divisible by ``model.heads``,
    ``train.batch_size`` a multiple of ``train.grad_accum``). Nothing is created or loaded.

    Raises:
        ValueError: one line naming the key, its value and what is expected.
    """

    def value(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for section in SECTIONS:
        for key, v in getattr(cfg, section).__dict__.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{section}.{key} must be a finite number, got {v}")
    for key, low, inclusive in _LOWER_BOUNDS:
        v = value(key)
        if v is not None and (v < low or (v == low and not inclusive)):
            expected = f">= {low}" if inclusive else f"> {low}"
            raise ValueError(f"{key} must be {expected}, got {v}")
    for key in CHOICES:  # a RunConfig built in Python bypasses the checks of apply_dict
        section, name = key.split(".")
        valid = _choices(_TYPES[section][name])
        if valid is not None and value(key) not in valid:
            raise ValueError(f"unknown {key} {value(key)!r}; valid: {', '.join(valid)}")
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.min_length > d.max_length:
        raise ValueError(
            f"data.min_length ({d.min_length}) must be <= data.max_length ({d.max_length})"
        )
    for key in ("model.dropout", "model.attention_dropout"):
        if not 0 <= value(key) < 1:
            raise ValueError(f"{key} must be in [0, 1), got {value(key)}")
    if m.init_density is not None and m.init_density >= 1:
        raise ValueError(f"model.init_density must be in (0, 1) or null, got {m.init_density}")
    if m.nystrom_conv > 0 and m.nystrom_conv % 2 == 0:
        raise ValueError(f"model.nystrom_conv must be 0 or odd, got {m.nystrom_conv}")
    if m.dim % m.heads:
        raise ValueError(f"model.dim ({m.dim}) must be divisible by model.heads ({m.heads})")
    if t.batch_size % t.grad_accum:
        raise ValueError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum "
            f"({t.grad_accum})"
        )
    _check_device(t.device)
    return cfg


def _check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"train.device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)"
        ) from None


def replace(cfg: RunConfig, **sections: Any) -> RunConfig:
    """A copy with whole sections replaced."""
    return dataclasses.replace(cfg, **sections)
