"""Training: ``train(cfg, run_dir)`` and the pieces it is made of.

``train`` trains ``build_model(task, cfg.model)`` on ``load_task(cfg.data)`` with AdamW, linear
warm-up and decay, gradient accumulation and clipping, optional mixed precision, and the sparsity
term ``w * mean density`` of sampled-graph attentions. Every ``eval_every`` steps it evaluates on
the validation split, keeps the best checkpoint, and at the end reports the test metrics of the
best one. It is seeded and reproducible, and ``resume=True`` continues a stopped run exactly: the
next batch, the graphs and all metrics are those an uninterrupted run would have produced. Under
``torchrun`` it runs DistributedDataParallel (see :mod:`.distributed`).

A run directory holds ``config.yaml``, ``metrics.csv``, ``density.csv`` (per layer and head),
``tensorboard/`` (with the ``tensorboard`` extra), ``checkpoints/`` (see
:mod:`sbm_transformer.checkpoint`), ``summary.json`` and ``plots/``.

Modules: :mod:`.trainer` (set-up, loop, checkpoints, final evaluation), :mod:`.step` (one
optimizer step, batches, seeds, schedule), :mod:`.evaluation`, :mod:`.metrics` (records and
sinks), :mod:`.rundir`, :mod:`.interrupt` (Ctrl-C), :mod:`.distributed`.
"""

from sbm_transformer.training.distributed import Distributed
from sbm_transformer.training.evaluation import EvalResult, evaluate, majority_accuracy, warm_up
from sbm_transformer.training.interrupt import StopRequest
from sbm_transformer.training.metrics import METRIC_FIELDS, MetricRecord
from sbm_transformer.training.rundir import (
    RunDirError,
    check_run_dir,
    checkpoint_step,
    config_differences,
    create_run_dir,
    load_run_config,
    metric_rows,
)
from sbm_transformer.training.step import (
    StepStats,
    autocast_context,
    batch_order,
    lr_lambda,
    make_batch,
    resolve_amp,
    resolve_device,
    sparsity_weight_at,
    task_loss,
    train_step,
)
from sbm_transformer.training.trainer import (
    Trainer,
    TrainState,
    _reschedule,
    build,
    check_splits,
    count_parameters,
    evaluate_run,
    train,
)

__all__ = [
    "METRIC_FIELDS",
    "Distributed",
    "EvalResult",
    "MetricRecord",
    "RunDirError",
    "StepStats",
    "StopRequest",
    "TrainState",
    "Trainer",
    "_reschedule",
    "autocast_context",
    "batch_order",
    "build",
    "check_run_dir",
    "check_splits",
    "checkpoint_step",
    "config_differences",
    "count_parameters",
    "create_run_dir",
    "evaluate",
    "evaluate_run",
    "load_run_config",
    "lr_lambda",
    "majority_accuracy",
    "make_batch",
    "metric_rows",
    "resolve_amp",
    "resolve_device",
    "sparsity_weight_at",
    "task_loss",
    "train",
    "train_step",
    "warm_up",
]
