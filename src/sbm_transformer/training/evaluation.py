"""Evaluation with fixed graphs, and the throwaway warm-up step."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sbm_transformer.config import RunConfig
from sbm_transformer.data.base import IGNORE_INDEX, SequenceData, TaskInfo
from sbm_transformer.models import ModelOutput, is_stochastic, set_sampling_seed
from sbm_transformer.training.distributed import Distributed
from sbm_transformer.training.step import make_batch, rng_state, set_rng_state, task_loss


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    density: float | None
    per_layer_head: list[list[float]]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: SequenceData,
    task: TaskInfo,
    cfg: RunConfig,
    device: torch.device,
    *,
    samples: int | None = None,
    max_batches: int | None = None,
    autocast: Callable[[], Any] = nullcontext,
    progress: Callable[[int, int], None] | None = None,
    dist: Distributed | None = None,
) -> EvalResult:
    """Loss and accuracy of ``model`` on ``data``.

    Stochastic attentions sample graphs with fixed seeds (``train.eval_seed`` and the batch
    number), so the same checkpoint always gets the same score, with any number of processes;
    with ``samples`` > 1 the predicted probabilities are averaged over that many graphs per
    input. With ``dist``, each process evaluates every ``world_size``-th batch and the totals
    are summed over processes (every rank must call this). ``progress(done, total)`` is called
    after each batch.
    """
    dist = dist or Distributed()
    samples = cfg.train.eval_samples if samples is None else samples
    if samples < 1:
        raise ValueError(f"eval samples must be >= 1, got {samples}")
    if not is_stochastic(model):
        samples = 1
    max_batches = max_batches if max_batches is not None else cfg.train.eval_batches
    was_training = model.training
    model.eval()
    bs = cfg.train.batch_size
    batches = [torch.arange(i, min(i + bs, len(data))) for i in range(0, len(data), bs)]
    if max_batches:
        batches = batches[:max_batches]
    mine = list(range(dist.rank, len(batches), dist.world_size))
    total_loss = total_correct = total_count = 0.0
    density_sum: Tensor | None = None
    density_n = 0
    for done, bi in enumerate(mine):
        batch = make_batch(data, batches[bi], task.kind).to(device)
        probs = None
        for s in range(samples):
            set_sampling_seed(model, cfg.train.eval_seed + 7919 * s + 104729 * bi)
            with autocast():
                out: ModelOutput = model(batch.tokens, batch.padding_mask)
            p = out.logits.float().softmax(-1)
            probs = p if probs is None else probs + p
            if out.densities:
                d = torch.stack([x.float() for x in out.densities]).cpu()  # (layers, H)
                density_sum = d if density_sum is None else density_sum + d
                density_n += 1
        assert probs is not None
        probs = probs / samples
        flat = probs.reshape(-1, probs.shape[-1])
        labels = batch.labels.reshape(-1)
        valid = labels != IGNORE_INDEX
        nll = -torch.log(flat[valid].gather(1, labels[valid, None]).clamp_min(1e-12))
        total_loss += float(nll.sum())
        total_correct += float((flat.argmax(-1)[valid] == labels[valid]).sum())
        total_count += float(valid.sum())
        if progress is not None:
            progress(done + 1, len(mine))
    set_sampling_seed(model, None)
    model.train(was_training)
    if dist.enabled:  # totals over all processes (a rank may have had no batch)
        parts = dist.gather((total_loss, total_correct, total_count, density_sum, density_n))
        total_loss, total_correct, total_count = (sum(p[i] for p in parts) for i in range(3))
        sums = [p[3] for p in parts if p[3] is not None]
        density_sum = torch.stack(sums).sum(0) if sums else None
        density_n = sum(p[4] for p in parts)
    per = None if density_sum is None else density_sum / max(density_n, 1)  # (layers, H)
    return EvalResult(
        loss=total_loss / max(total_count, 1),
        accuracy=total_correct / max(total_count, 1),
        density=None if per is None else float(per.mean()),
        per_layer_head=[] if per is None else per.tolist(),
    )


def majority_accuracy(data: SequenceData, task: TaskInfo) -> float | None:
    """Accuracy of always predicting the most common label of ``data`` (None for ``lm``)."""
    if task.kind == "lm" or len(data) == 0:
        return None
    labels = data.labels
    if isinstance(labels, Tensor):
        flat = labels.reshape(-1)
    else:
        assert labels is not None
        flat = torch.cat([torch.as_tensor(x).reshape(-1) for x in labels])
    flat = flat[flat != IGNORE_INDEX]
    return float(torch.bincount(flat).max()) / max(flat.numel(), 1)


def warm_up(
    model: nn.Module,
    data: SequenceData,
    kind: str,
    device: torch.device,
    autocast: Callable[[], Any] = nullcontext,
) -> None:
    """One throwaway training and evaluation step on a copy of ``model`` with two examples.

    It pays the process's one-off costs (numba kernel compilation, library and thread-pool
    start-up: about 150 MiB of resident memory on a CPU) before the run's peak memory is
    measured, so that the first run of a process (in ``sbmt compare``, the first attention) is
    not charged for them. ``model`` and every random state are left as they were.
    """
    state = rng_state()
    clone = copy.deepcopy(model).train()
    batch = make_batch(data, torch.arange(min(2, len(data))), kind).to(device)
    with autocast():
        out: ModelOutput = clone(batch.tokens, batch.padding_mask)
    loss, _, _ = task_loss(out.logits, batch.labels)
    density = out.mean_density()
    (loss if density is None else loss + density.float()).backward()
    optimizer = torch.optim.AdamW(clone.parameters())
    nn.utils.clip_grad_norm_(clone.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad(), autocast():
        clone.eval()(batch.tokens, batch.padding_mask)
    set_rng_state(state)
