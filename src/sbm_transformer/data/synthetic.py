"""Synthetic tasks: repeated tokens (tagging) and document matching (retrieval).

Both draw tokens uniformly from ids ``1..cfg.vocab`` and lengths uniformly from
``[cfg.min_length, cfg.max_length]`` (inclusive), with a ``torch.Generator`` per split seeded from
``cfg.seed``, so the data is a function of the configuration. Cutting a sequence would change
its labels, so ``cfg.max_len`` never truncates here: a longer sequence is an error.

Repeated tokens (kind ``"tag"``): the label of a token is 1 when the same id occurs anywhere
else in the sequence, else 0. A token of a length-``L`` sequence is unique with probability
``((V - 1) / V) ** (L - 1)`` ≈ ``exp(-(L - 1) / V)`` for vocabulary ``V``: about 37% zeros when
``V`` ≈ ``L``, 50% when ``V`` ≈ 1.44 ``L``; with ``V`` much smaller than ``L`` nearly every label
is 1 (see :func:`repeat_rate`).

Matching (kind ``"match"``): two independent random documents; for a positive pair a random
span of :func:`match_span` tokens of the first is copied over a random place in the second; a
negative pair's second document is redrawn until the two share no span of that length. The label
is therefore exactly "the documents share a span of ``k`` tokens", which neither document shows
on its own (each is uniformly random either way). Labels are balanced (half of each, in random
order); chance accuracy is 50%.

Prepared files (``<task>_<split>.tsv``, space-separated token ids):
``repeat``: header ``tokens<TAB>labels``, lines ``3 5 7 3<TAB>1 0 0 1``;
``retrieval``: header ``label<TAB>tokens1<TAB>tokens2``, lines ``1<TAB>4 2 9<TAB>7 4 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from sbm_transformer.data.base import DataConfig, SequenceData, TaskInfo
from sbm_transformer.data.common import (
    SPLITS,
    Progress,
    ProgressCounter,
    check_writable,
    data_error,
    find_prepared,
    make_info,
    parse_int,
    read_lines,
    split_seed,
)

REPEAT_HEADER = b"tokens\tlabels"
MATCH_HEADER = b"label\ttokens1\ttokens2"
#: Negative draws per pair before the matching generator gives up.
MAX_REDRAWS = 1000


def _check_sizes(vocab: int, min_length: int, max_length: int) -> None:
    if vocab < 1 or min_length < 1 or max_length < min_length:
        raise ValueError(
            f"need vocab >= 1 and 1 <= min_length <= max_length, got vocab {vocab}, "
            f"lengths {min_length}..{max_length}"
        )


def _random_sequence(gen: torch.Generator, vocab: int, min_length: int, max_length: int) -> Tensor:
    length = int(torch.randint(min_length, max_length + 1, (1,), generator=gen))
    return torch.randint(1, vocab + 1, (length,), generator=gen)


def _generators(cfg: DataConfig, task: str) -> dict[str, torch.Generator]:
    return {s: torch.Generator().manual_seed(split_seed(cfg.seed, task, s)) for s in SPLITS}


def _sizes(cfg: DataConfig) -> dict[str, int]:
    return {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}


# ------------------------------------------------------------------------- repeated tokens
def repeat_labels(tokens: Tensor) -> Tensor:
    """1 where a token's id occurs elsewhere in ``tokens``, else 0."""
    counts = torch.bincount(tokens)
    return (counts[tokens] > 1).long()


def repeat_rate(vocab: int, min_length: int, max_length: int) -> float:
    """Expected fraction of label 1 (a repeated token) over the length distribution."""
    lengths = range(min_length, max_length + 1)
    unique = sum(length * ((vocab - 1) / vocab) ** (length - 1) for length in lengths)
    return 1.0 - unique / sum(lengths)


def generate_repeat(
    count: int,
    gen: torch.Generator,
    vocab: int,
    min_length: int,
    max_length: int,
    counter: ProgressCounter | None = None,
) -> SequenceData:
    """``count`` repeated-token examples."""
    _check_sizes(vocab, min_length, max_length)
    sequences, labels = [], []
    for _ in range(count):
        tokens = _random_sequence(gen, vocab, min_length, max_length)
        sequences.append(tokens)
        labels.append(repeat_labels(tokens))
        if counter is not None:
            counter.advance()
    return SequenceData([sequences], labels)


def write_repeat(path: Path, data: SequenceData) -> None:
    """Write repeated-token examples as ``tokens<TAB>labels`` lines."""
    assert data.labels is not None
    with open(path, "w") as f:
        f.write(REPEAT_HEADER.decode() + "\n")
        for tokens, labels in zip(data.sequences[0], data.labels, strict=True):
            f.write(f"{_ids(tokens)}\t{_ids(labels)}\n")


def read_repeat(path: Path) -> SequenceData:
    """Read :func:`write_repeat`'s format; ValueError names ``path:line`` of a bad line."""
    sequences, labels = [], []
    for number, fields in _records(path, REPEAT_HEADER):
        tokens = _parse_ids(path, number, fields[0], "token", 1)
        tags = _parse_ids(path, number, fields[1], "label", 0, 1)
        if len(tags) != len(tokens):
            raise data_error(path, number, f"{len(tokens)} tokens but {len(tags)} labels")
        sequences.append(tokens)
        labels.append(tags)
    return SequenceData([sequences], labels)


def load_repeat(
    cfg: DataConfig, progress: Progress | None = None
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    """The repeated-tokens task from ``cfg.dir``'s ``repeat_*.tsv``, else generated."""
    return _load(cfg, "repeat", _repeat_splits, read_repeat, _repeat_info, progress)


def _repeat_splits(cfg: DataConfig, progress: Progress | None) -> dict[str, SequenceData]:
    sizes = _sizes(cfg)
    counter = ProgressCounter(progress, sum(sizes.values()))
    gens = _generators(cfg, "repeat")
    return {
        s: generate_repeat(sizes[s], gens[s], cfg.vocab, cfg.min_length, cfg.max_length, counter)
        for s in SPLITS
    }


def _repeat_info(cfg: DataConfig, vocab_size: int, splits: dict[str, SequenceData]) -> TaskInfo:
    rate = repeat_rate(cfg.vocab, cfg.min_length, cfg.max_length)
    description = f"repeated tokens, vocab {vocab_size - 1}, ~{rate:.0%} of labels 1 if generated"
    return make_info("repeat", "tag", vocab_size, 2, splits, description)


def prepare_repeat(
    cfg: DataConfig, out_dir: Path, progress: Progress | None, overwrite: bool
) -> list[Path]:
    """Generate the repeated-tokens task into ``out_dir/repeat_{train,val,test}.tsv``."""
    return _prepare(cfg, out_dir, "repeat", progress, overwrite, _repeat_splits, write_repeat)


# --------------------------------------------------------------------------------- matching
def match_span(vocab: int, min_length: int, max_length: int) -> int:
    """The shared span length: the smallest ``k >= 4`` with ``vocab**k >= 100 * max_length**2``.

    Two random documents then share some ``k``-token span by chance with probability about 1%
    or less (such negatives are redrawn). Raises ValueError when ``k`` exceeds ``min_length``.
    """
    _check_sizes(vocab, min_length, max_length)
    if vocab < 2:
        raise ValueError("the matching task needs vocab >= 2")
    k = max(4, math.ceil(math.log(100 * max_length**2) / math.log(vocab)))
    if k > min_length:
        raise ValueError(
            f"vocab {vocab} needs spans of {k} tokens, longer than min_length {min_length}: "
            "raise vocab or min_length"
        )
    return k


def _spans(tokens: Tensor, k: int) -> set[tuple[int, ...]]:
    return set(map(tuple, tokens.unfold(0, k, 1).tolist()))


def shares_span(a: Tensor, b: Tensor, k: int) -> bool:
    """Whether ``a`` and ``b`` have a common run of ``k`` tokens."""
    return not _spans(a, k).isdisjoint(_spans(b, k))


def _pair(
    gen: torch.Generator, positive: bool, vocab: int, lengths: tuple[int, int], k: int
) -> tuple[Tensor, Tensor]:
    a = _random_sequence(gen, vocab, *lengths)
    for _ in range(MAX_REDRAWS):
        b = _random_sequence(gen, vocab, *lengths)
        if positive:
            i = int(torch.randint(len(a) - k + 1, (1,), generator=gen))
            j = int(torch.randint(len(b) - k + 1, (1,), generator=gen))
            b[j : j + k] = a[i : i + k]
            return a, b
        if not shares_span(a, b, k):
            return a, b
    raise ValueError(f"could not draw a negative pair in {MAX_REDRAWS} tries; raise vocab")


def generate_match(
    count: int,
    gen: torch.Generator,
    vocab: int,
    min_length: int,
    max_length: int,
    counter: ProgressCounter | None = None,
) -> SequenceData:
    """``count`` document pairs, half of them sharing a span of :func:`match_span` tokens."""
    k = match_span(vocab, min_length, max_length)
    labels = (torch.arange(count) % 2)[torch.randperm(count, generator=gen)]
    firsts, seconds = [], []
    for label in labels.tolist():
        a, b = _pair(gen, bool(label), vocab, (min_length, max_length), k)
        firsts.append(a)
        seconds.append(b)
        if counter is not None:
            counter.advance()
    return SequenceData([firsts, seconds], labels)


def write_match(path: Path, data: SequenceData) -> None:
    """Write document pairs as ``label<TAB>tokens1<TAB>tokens2`` lines."""
    assert isinstance(data.labels, Tensor)
    with open(path, "w") as f:
        f.write(MATCH_HEADER.decode() + "\n")
        for label, a, b in zip(data.labels.tolist(), *data.sequences, strict=True):
            f.write(f"{label}\t{_ids(a)}\t{_ids(b)}\n")


def read_match(path: Path) -> SequenceData:
    """Read :func:`write_match`'s format; ValueError names ``path:line`` of a bad line."""
    firsts, seconds, labels = [], [], []
    for number, fields in _records(path, MATCH_HEADER):
        labels.append(parse_int(path, number, fields[0], "label", range(2)))
        firsts.append(_parse_ids(path, number, fields[1], "token", 1))
        seconds.append(_parse_ids(path, number, fields[2], "token", 1))
    return SequenceData([firsts, seconds], torch.tensor(labels, dtype=torch.long))


def load_match(
    cfg: DataConfig, progress: Progress | None = None
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    """The synthetic matching task from ``cfg.dir``'s ``retrieval_*.tsv``, else generated."""
    return _load(cfg, "retrieval", _match_splits, read_match, _match_info, progress)


def _match_splits(cfg: DataConfig, progress: Progress | None) -> dict[str, SequenceData]:
    sizes = _sizes(cfg)
    counter = ProgressCounter(progress, sum(sizes.values()))
    gens = _generators(cfg, "retrieval")
    return {
        s: generate_match(sizes[s], gens[s], cfg.vocab, cfg.min_length, cfg.max_length, counter)
        for s in SPLITS
    }


def _match_info(cfg: DataConfig, vocab_size: int, splits: dict[str, SequenceData]) -> TaskInfo:
    description = f"synthetic matching (shared span), vocab {vocab_size - 1}, chance 50%"
    return make_info("retrieval", "match", vocab_size, 2, splits, description)


def prepare_match(
    cfg: DataConfig, out_dir: Path, progress: Progress | None, overwrite: bool
) -> list[Path]:
    """Generate the matching task into ``out_dir/retrieval_{train,val,test}.tsv``."""
    return _prepare(cfg, out_dir, "retrieval", progress, overwrite, _match_splits, write_match)


# ------------------------------------------------------------------------------ shared I/O
def _ids(values: Tensor) -> str:
    return " ".join(map(str, values.tolist()))


def _parse_ids(
    path: Path, number: int, field: bytes, what: str, low: int, high: int | None = None
) -> Tensor:
    try:
        values = [int(v) for v in field.split()]
    except ValueError:
        raise data_error(path, number, f"{what}s must be space-separated integers") from None
    if not values:
        raise data_error(path, number, f"no {what}s")
    bad = [v for v in values if v < low or (high is not None and v > high)]
    if bad:
        top = "" if high is None else f"..{high}"
        raise data_error(path, number, f"{what} {bad[0]} outside {low}{top}")
    return torch.tensor(values, dtype=torch.long)


def _records(path: Path, header: bytes) -> list[tuple[int, list[bytes]]]:
    lines = read_lines(path)
    number, first = next(lines, (1, b""))
    if first != header:
        raise data_error(path, number, f"expected the header {header.decode()!r}")
    width = header.count(b"\t") + 1
    records = []
    for number, line in lines:
        fields = line.split(b"\t")
        if len(fields) != width:
            raise data_error(
                path, number, f"expected {width} tab-separated fields, got {len(fields)}"
            )
        records.append((number, fields))
    return records


def _files(task: str) -> dict[str, str]:
    return {split: f"{task}_{split}.tsv" for split in SPLITS}


def _load(
    cfg: DataConfig,
    task: str,
    generate: Callable[[DataConfig, Progress | None], dict[str, SequenceData]],
    read: Callable[[Path], SequenceData],
    info: Callable[[DataConfig, int, dict[str, SequenceData]], TaskInfo],
    progress: Progress | None,
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    files = find_prepared(cfg.dir, _files(task), task)
    if files is None:
        splits = generate(cfg, progress)
    else:
        splits = {split: read(path) for split, path in files.items()}
    task_info = info(cfg, max(cfg.vocab, _top_id(splits)) + 1, splits)
    if 0 < cfg.max_len < task_info.max_len:
        raise ValueError(
            f"{task} sequences of up to {task_info.max_len} tokens exceed data.max_len "
            f"{cfg.max_len}; cutting them would change their labels: lower data.max_length"
        )
    return task_info, splits


def _top_id(splits: dict[str, SequenceData]) -> int:
    return max(
        (int(t.max()) for d in splits.values() for seqs in d.sequences for t in seqs if len(t)),
        default=0,
    )


def _prepare(
    cfg: DataConfig,
    out_dir: Path,
    task: str,
    progress: Progress | None,
    overwrite: bool,
    generate: Callable[[DataConfig, Progress | None], dict[str, SequenceData]],
    write: Callable[[Path, SequenceData], None],
) -> list[Path]:
    paths = [out_dir / name for name in _files(task).values()]
    check_writable(paths, overwrite)
    for path, data in zip(paths, generate(cfg, progress).values(), strict=True):
        write(path, data)
    return paths
