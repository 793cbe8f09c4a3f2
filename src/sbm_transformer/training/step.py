"""One optimizer step: batches, loss, the sparsity term, schedule, mixed precision, seeds."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sbm_transformer.config import TrainConfig
from sbm_transformer.data.base import IGNORE_INDEX, Batch, SequenceData, collate_fn
from sbm_transformer.models import ModelOutput, is_stochastic, set_sampling_seed
from sbm_transformer.training.distributed import Distributed


def resolve_device(name: str, dist: Distributed | None = None) -> torch.device:
    """``train.device`` as a torch.device; under torchrun on GPUs, the process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but CUDA is not available")
        if dist is not None and dist.enabled and device.index is None:
            device = torch.device("cuda", dist.local_rank)
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` with ``auto`` decided: bf16 on GPUs that support it, off elsewhere."""
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"train.amp must be auto, off, bf16 or fp16, got {amp!r}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 or off on a CPU")
    return amp


def autocast_context(amp: str, device: torch.device) -> tuple[Any, bool]:
    """(autocast context factory, whether a GradScaler is needed) for ``train.amp``."""
    amp = resolve_amp(amp, device)
    if amp == "off":
        return nullcontext, False
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), amp == "fp16"


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base learning rate over ``warmup`` steps, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def sparsity_weight_at(t: TrainConfig, step: int) -> float:
    """The sparsity term's weight at ``step`` (0-based): 0 for ``sparsity_start`` steps, then a
    linear ramp over ``sparsity_ramp`` steps to ``sparsity_weight``."""
    if step < t.sparsity_start:
        return 0.0
    if t.sparsity_ramp <= 0:
        return t.sparsity_weight
    return t.sparsity_weight * min(1.0, (step - t.sparsity_start + 1) / t.sparsity_ramp)


def batch_order(n: int, batch_size: int, seed: int, start: int) -> Iterator[Tensor]:
    """Index batches from batch number ``start`` on: epoch e is a permutation seeded by (seed, e).

    Deterministic in (seed, batch number), so a resumed run gets exactly the next batch.
    """
    if n < batch_size:
        raise ValueError(
            f"the training split has {n} examples, fewer than train.batch_size={batch_size}"
        )
    per_epoch = n // batch_size
    epoch, perm = -1, torch.empty(0, dtype=torch.long)
    b = start
    while True:
        e, i = divmod(b, per_epoch)
        if e != epoch:
            epoch = e
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        yield perm[i * batch_size : (i + 1) * batch_size]
        b += 1


def make_batch(data: SequenceData, indices: Tensor, kind: str) -> Batch:
    return collate_fn(kind)([data[int(i)] for i in indices])  # type: ignore[arg-type]


def task_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean cross-entropy, number correct, number predicted) for sequence or token labels."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    valid = flat_labels != IGNORE_INDEX
    correct = ((flat_logits.argmax(-1) == flat_labels) & valid).sum()
    return loss, correct, valid.sum()


# --------------------------------------------------------------------------------- seeds
def derived_seed(*parts: int) -> int:
    """A 62-bit seed determined by ``parts`` alone (``numpy.random.SeedSequence``)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) >> 2


def seed_micro_batch(model: nn.Module, seed: int, step: int, shard: int) -> None:
    """Seed what micro-batch ``shard`` (its index in the global batch) of step ``step + 1``
    draws: dropout (torch's global generator) and the graphs of stochastic attentions.

    Random state is then a function of (seed, step, micro-batch), not of the history: a resumed
    run draws what an uninterrupted one would have, and the same examples get the same dropout
    masks and graphs whatever the number of processes (two processes with one micro-batch each
    train like one process with two).
    """
    torch.manual_seed(derived_seed(seed, step, shard, 0))
    if is_stochastic(model):
        set_sampling_seed(model, derived_seed(seed, step, shard, 1))


def rng_state() -> dict[str, Any]:
    """The random states of torch, Python and NumPy (tensors and JSON values)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------- step
@dataclass
class StepStats:
    """Training metrics of one optimizer step (over all processes once reduced)."""

    loss: float  # mean task loss over the step's examples
    correct: float
    count: float  # predictions scored
    examples: int
    per_layer_head: list[list[float]] | None  # mean density (sampled-graph attentions)

    @property
    def density(self) -> float | None:
        if not self.per_layer_head:
            return None
        return float(np.mean(self.per_layer_head))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    autocast: Callable[[], Any],
    data: SequenceData,
    kind: str,
    indices: Tensor,
    t: TrainConfig,
    step: int,
    device: torch.device,
    *,
    dist: Distributed | None = None,
) -> StepStats:
    """Training step ``step + 1`` on the examples ``indices`` of ``data`` (the global batch).

    The batch is split into ``t.grad_accum`` micro-batches per process; each process takes its
    share of them (``dist``; ``model`` is then DistributedDataParallel and gradients are
    averaged once, at the last micro-batch). The loss is the task loss plus the sparsity weight
    at ``step`` times the mean density; then gradient clipping (``t.clip``), the optimizer step
    and the scheduler step. The returned statistics are this process's (see
    :meth:`Distributed.reduce_step`).
    """
    dist = dist or Distributed()
    sparsity_weight = sparsity_weight_at(t, step)
    optimizer.zero_grad(set_to_none=True)
    micro_batches = indices.chunk(t.grad_accum * dist.world_size)
    mine = list(range(dist.rank * t.grad_accum, (dist.rank + 1) * t.grad_accum))
    local = sum(len(micro_batches[i]) for i in mine)
    step_loss = step_correct = step_count = 0.0
    step_density: list[Tensor] = []
    for n, shard in enumerate(mine):
        micro = micro_batches[shard]
        seed_micro_batch(model, t.seed, step, shard)
        batch = make_batch(data, micro, kind).to(device)
        sync = n == len(mine) - 1 or not hasattr(model, "no_sync")
        with nullcontext() if sync else model.no_sync():  # type: ignore[operator]
            with autocast():
                out: ModelOutput = model(batch.tokens, batch.padding_mask)
            loss, correct, count = task_loss(out.logits, batch.labels)
            density = out.mean_density()
            total = loss if density is None else loss + sparsity_weight * density.float()
            total = total * (len(micro) / local)
            (scaler.scale(total) if scaler else total).backward()
        step_loss += float(loss.detach()) * len(micro) / local
        step_correct += float(correct)
        step_count += float(count)
        if out.densities:
            step_density.append(torch.stack([d.detach().float() for d in out.densities]))
    if is_stochastic(model):
        set_sampling_seed(model, None)
    if scaler:
        scaler.unscale_(optimizer)
    if t.clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), t.clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    densities = torch.stack(step_density) if step_density else None  # (micro, layers, H)
    return StepStats(
        loss=step_loss,
        correct=step_correct,
        count=step_count,
        examples=local,
        per_layer_head=None if densities is None else densities.mean(0).tolist(),
    )
