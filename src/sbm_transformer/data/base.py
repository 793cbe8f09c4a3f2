"""The contract between tasks, models and the training loop.

Every task turns into three in-memory splits of :class:`SequenceData` plus a :class:`TaskInfo`.
Token id 0 (:data:`PAD_ID`) is reserved for padding in every vocabulary; data tokens start at 1,
so a black pixel or a digit 0 is never mistaken for padding. Padding masks come from sequence
lengths, never from token values.

Task kinds:

* ``"classify"``: one sequence -> one label (ListOps, text, image, pathfinder).
* ``"match"``: two sequences -> one label (retrieval).
* ``"tag"``: one sequence -> one label per token (the repeated-tokens task).
* ``"lm"``: one sequence -> next-token prediction (causal language model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

PAD_ID = 0
IGNORE_INDEX = -100  # labels at padding (cross_entropy's ignore_index)

TaskKind = Literal["classify", "match", "tag", "lm"]

#: The names of :data:`sbm_transformer.data.TASKS` (``data.task`` of a run configuration;
#: tests/test_config.py checks that the two agree).
TaskName = Literal["listops", "repeat", "image", "text", "retrieval", "pathfinder", "lm"]


@dataclass(frozen=True)
class TaskInfo:
    """What a model needs to know about a task.

    Attributes:
        name: task name.
        kind: ``"classify"``, ``"match"``, ``"tag"`` or ``"lm"``.
        vocab_size: number of token ids including :data:`PAD_ID`.
        num_classes: classes (classify, match), tags per token (tag) or vocabulary (lm).
        max_len: longest sequence (of one document for ``"match"``).
        description: one line for logs and reports.
    """

    name: str
    kind: TaskKind
    vocab_size: int
    num_classes: int
    max_len: int
    description: str = ""


@dataclass
class DataConfig:
    """Where a task's data comes from and how big generated data is.

    Attributes:
        task: task name (see :data:`sbm_transformer.data.TASKS`).
        dir: directory of prepared data (``sbmt data <task> --out DIR``); generated tasks are
            generated in memory when it is unset or holds no files for the task.
        source: a user-supplied file or directory (text, retrieval, image in CIFAR format,
            pathfinder), in the formats documented in docs/data.md.
        train_size, val_size, test_size: examples per split for generated tasks.
        min_length, max_length: length bounds of generated sequences.
        vocab: distinct data tokens of synthetic tasks.
        seed: generation seed.
        max_len: truncate longer sequences to this length (0 = the task's default).
    """

    task: TaskName = "listops"
    dir: str | None = None
    source: str | None = None
    train_size: int = 2000
    val_size: int = 500
    test_size: int = 500
    min_length: int = 100
    max_length: int = 500
    vocab: int = 16
    seed: int = 0
    max_len: int = 0


class SequenceData(Dataset):
    """In-memory examples.

    Args:
        sequences: one list of 1-D int64 token tensors per input (one list, or two for
            ``"match"``), all lists the same length.
        labels: int64 tensor ``(n,)`` of labels (classify, match), or a list of 1-D int64 tensors
            of per-token labels (tag); ignored (may be None) for ``"lm"``.

    ``dataset[i]`` is ``(tokens..., label)``: a tuple with one token tensor per input and the label.
    """

    def __init__(
        self, sequences: Sequence[Sequence[Tensor]], labels: Tensor | Sequence[Tensor] | None
    ) -> None:
        if not sequences or any(len(s) != len(sequences[0]) for s in sequences):
            raise ValueError("SequenceData needs one or two equally long lists of sequences")
        self.sequences = [list(s) for s in sequences]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.sequences[0])

    def __getitem__(self, index: int) -> tuple:
        tokens = tuple(s[index] for s in self.sequences)
        label = None if self.labels is None else self.labels[index]
        return (*tokens, label)

    def lengths(self) -> Tensor:
        """Length of each example's (first) sequence."""
        return torch.tensor([len(t) for t in self.sequences[0]], dtype=torch.long)


@dataclass
class Batch:
    """A padded batch.

    Attributes:
        tokens: ``(B, L)`` int64 with :data:`PAD_ID` at padding; ``(2, B, L)`` for ``"match"``.
        padding_mask: bool like ``tokens``, True = padding.
        labels: ``(B,)`` (classify, match) or ``(B, L)`` with :data:`IGNORE_INDEX` at padding
            (tag, lm: the next token).
    """

    tokens: Tensor
    padding_mask: Tensor
    labels: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            tokens=self.tokens.to(device),
            padding_mask=self.padding_mask.to(device),
            labels=self.labels.to(device),
            extra={k: v.to(device) for k, v in self.extra.items()},
        )

    @property
    def size(self) -> int:
        return self.labels.shape[0]


def pad_sequences(seqs: Sequence[Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack 1-D token tensors into ``(B, L)`` padded with PAD_ID, and the padding mask."""
    longest = max((len(s) for s in seqs), default=0)
    length = longest if length is None else length
    tokens = torch.full((len(seqs), length), PAD_ID, dtype=torch.long)
    mask = torch.ones(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = min(len(s), length)
        tokens[i, :n] = s[:n]
        mask[i, :n] = False
    return tokens, mask


def collate_fn(kind: TaskKind) -> Callable[[list[tuple]], Batch]:
    """The function that turns a list of examples of this kind into a :class:`Batch`."""

    def collate(examples: list[tuple]) -> Batch:
        if kind == "match":
            a, ma = pad_sequences([ex[0] for ex in examples])
            b, mb = pad_sequences([ex[1] for ex in examples])
            length = max(a.shape[1], b.shape[1])
            a, ma = pad_sequences([ex[0] for ex in examples], length)
            b, mb = pad_sequences([ex[1] for ex in examples], length)
            labels = torch.tensor([int(ex[2]) for ex in examples], dtype=torch.long)
            return Batch(torch.stack([a, b]), torch.stack([ma, mb]), labels)
        tokens, mask = pad_sequences([ex[0] for ex in examples])
        if kind == "classify":
            labels = torch.tensor([int(ex[1]) for ex in examples], dtype=torch.long)
        elif kind == "tag":
            labels = torch.full_like(tokens, IGNORE_INDEX)
            for i, ex in enumerate(examples):
                n = min(len(ex[1]), tokens.shape[1])
                labels[i, :n] = ex[1][:n]
        else:  # lm: predict the next token; nothing to predict after the last one
            labels = torch.full_like(tokens, IGNORE_INDEX)
            labels[:, :-1] = tokens[:, 1:]
            labels[:, :-1][mask[:, 1:]] = IGNORE_INDEX
        return Batch(tokens, mask, labels)

    return collate
