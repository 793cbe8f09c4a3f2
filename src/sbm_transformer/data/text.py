"""Byte-level text tasks on user-supplied files: classification, retrieval pairs, language model.

Tokens are UTF-8 bytes ``b`` -> ``b + 1`` (vocabulary 257); files are read as bytes, so any
encoding works. Every document is truncated to ``cfg.max_len`` or, when 0, to 4000 bytes (LRA's
byte-level text and retrieval length).

``cfg.source`` is a directory with one file per split: ``train.tsv``; ``val.tsv``, ``dev.tsv`` or
``eval.tsv``; ``test.tsv`` (also LRA's ``<name>.train.tsv``, ``<name>.eval.tsv``,
``<name>.test.tsv``). Blank lines are skipped; there is no header and no quoting.

* ``text`` (IMDB-style): ``label<TAB>text`` a line, label an integer >= 0 (the text may contain
  tabs); classes = largest label + 1 (at least 2).
* ``retrieval`` (LRA's AAN format): ``label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`` a line, label
  0/1 (``1.0`` and ``0.0`` accepted, as LRA reads it as a float); the ids are ignored.
* ``lm``: causal language modelling. With ``cfg.source`` a text file: the bytes' first 90% are
  train, the next 5% val, the last 5% test, each cut into pieces of ``cfg.max_len`` (or
  ``cfg.max_length``) bytes. Without it: one generated ListOps expression a document, written
  as its model tokens and its value, e.g. ``[MAX 2 9 4 ] = 9``; prepared as ``lm_<split>.txt``,
  one document a line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sbm_transformer.data import listops
from sbm_transformer.data.base import DataConfig, SequenceData, TaskInfo
from sbm_transformer.data.common import (
    SPLITS,
    Progress,
    check_writable,
    data_error,
    find_prepared,
    make_info,
    parse_int,
    read_lines,
    user_source,
)

BYTE_VOCAB = 257
TEXT_MAX_LEN = 4000
LM_SPLIT = (0.90, 0.05)  # train and val fractions of an lm source file; test is the rest
SPLIT_NAMES = {
    "train": ("train.tsv", "*.train.tsv"),
    "val": ("val.tsv", "dev.tsv", "eval.tsv", "*.val.tsv", "*.dev.tsv", "*.eval.tsv"),
    "test": ("test.tsv", "*.test.tsv"),
}
LM_FILES = {split: f"lm_{split}.txt" for split in SPLITS}


def encode_bytes(data: bytes, max_len: int = TEXT_MAX_LEN) -> Tensor:
    """Byte tokens (``byte + 1``) of ``data``, truncated to ``max_len`` bytes (0: no limit)."""
    if max_len > 0:
        data = data[:max_len]
    if not data:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + 1


def split_files(source: str | Path) -> dict[str, Path]:
    """The train, val and test files of a source directory (see the module docstring)."""
    directory = Path(source)
    if not directory.is_dir():
        raise FileNotFoundError(f"data.source {directory} is not a directory")
    files = {}
    for split, patterns in SPLIT_NAMES.items():
        for pattern in patterns:
            found = sorted(directory.glob(pattern))
            if len(found) > 1:
                raise ValueError(
                    f"several {split} files in {directory}: {', '.join(map(str, found))}"
                )
            if found:
                files[split] = found[0]
                break
        else:
            raise FileNotFoundError(
                f"no {split} file in {directory} (looked for {', '.join(patterns)})"
            )
    return files


def read_text_file(path: str | Path, max_len: int = TEXT_MAX_LEN) -> tuple[list[Tensor], Tensor]:
    """Documents and labels of a ``label<TAB>text`` file; ValueError names ``path:line``."""
    path = Path(path)
    documents, labels = [], []
    for number, line in read_lines(path):
        label, tab, text = line.partition(b"\t")
        if not tab:
            raise data_error(path, number, "expected label<TAB>text")
        if not text:
            raise data_error(path, number, "empty text")
        labels.append(parse_int(path, number, label, "label", range(1 << 31)))
        documents.append(encode_bytes(text, max_len))
    return documents, torch.tensor(labels, dtype=torch.long)


def read_pairs_file(path: str | Path, max_len: int = TEXT_MAX_LEN) -> SequenceData:
    """Document pairs and labels of an AAN-format file; ValueError names ``path:line``."""
    path = Path(path)
    firsts, seconds, labels = [], [], []
    for number, line in read_lines(path):
        fields = line.split(b"\t")
        if len(fields) != 5:
            raise data_error(path, number, f"expected 5 tab-separated fields, got {len(fields)}")
        if not fields[3] or not fields[4]:
            raise data_error(path, number, "empty text")
        labels.append(_binary_label(path, number, fields[0]))
        firsts.append(encode_bytes(fields[3], max_len))
        seconds.append(encode_bytes(fields[4], max_len))
    return SequenceData([firsts, seconds], torch.tensor(labels, dtype=torch.long))


def _binary_label(path: Path, number: int, field: bytes) -> int:
    try:
        value = float(field)
    except ValueError:
        shown = field[:40].decode(errors="replace")
        raise data_error(path, number, f"label {shown!r} is not a number") from None
    if value not in (0.0, 1.0):
        raise data_error(path, number, f"label {value:g} is not 0 or 1")
    return int(value)


def _require_source(cfg: DataConfig) -> str:
    source = user_source(cfg)
    if not source:
        raise ValueError(
            f"task {cfg.task!r} needs data.source: a directory with train.tsv, val.tsv (or "
            "dev.tsv) and test.tsv in the format of docs/data.md"
        )
    return source


def _text_max_len(cfg: DataConfig) -> int:
    return cfg.max_len or TEXT_MAX_LEN


def load_text(
    cfg: DataConfig, progress: Progress | None = None
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    """Byte-level text classification from ``cfg.source``'s split files."""
    source = _require_source(cfg)
    read = {s: read_text_file(p, _text_max_len(cfg)) for s, p in split_files(source).items()}
    top = max((int(labels.max()) for _, labels in read.values() if len(labels)), default=0)
    splits = {s: SequenceData([documents], labels) for s, (documents, labels) in read.items()}
    classes = max(2, top + 1)
    info = make_info("text", "classify", BYTE_VOCAB, classes, splits, f"byte-level text, {source}")
    return info, splits


def load_pairs(cfg: DataConfig) -> tuple[TaskInfo, dict[str, SequenceData]]:
    """Byte-level document matching from ``cfg.source``'s AAN-format split files."""
    source = _require_source(cfg)
    splits = {s: read_pairs_file(p, _text_max_len(cfg)) for s, p in split_files(source).items()}
    info = make_info("retrieval", "match", BYTE_VOCAB, 2, splits, f"byte-level pairs, {source}")
    return info, splits


# --------------------------------------------------------------------------------------- lm
def _chunks(tokens: Tensor, length: int) -> list[Tensor]:
    return [c for c in tokens.split(length) if len(c) >= 2]


def _lm_file_splits(path: Path, length: int) -> dict[str, SequenceData]:
    tokens = encode_bytes(path.read_bytes(), 0)
    train_end = int(len(tokens) * LM_SPLIT[0])
    val_end = train_end + int(len(tokens) * LM_SPLIT[1])
    parts = {
        "train": tokens[:train_end],
        "val": tokens[train_end:val_end],
        "test": tokens[val_end:],
    }
    splits = {s: SequenceData([_chunks(t, length)], None) for s, t in parts.items()}
    if any(len(d) == 0 for d in splits.values()):
        raise ValueError(f"{path} is too small to split into train, val and test sequences")
    return splits


def listops_documents(cfg: DataConfig, progress: Progress | None = None) -> dict[str, list[bytes]]:
    """Generated ListOps expressions as lm documents, ``[MAX 2 9 4 ] = 9``, per split."""
    return {
        split: [f"{' '.join(listops.tokenize(e))} = {v}".encode() for e, v in examples]
        for split, examples in listops.generate_splits(cfg, progress).items()
    }


def _read_documents(path: Path) -> list[bytes]:
    return [line for _, line in read_lines(path)]


def load_lm(
    cfg: DataConfig, progress: Progress | None = None
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    """Byte-level lm over ``cfg.source`` (a text file), else over ListOps expressions."""
    source = user_source(cfg)
    length = cfg.max_len or cfg.max_length
    if source:
        splits = _lm_file_splits(Path(source), length)
        origin = f"{source}, {length}-byte pieces"
    else:
        files = find_prepared(cfg.dir, LM_FILES, "lm")
        documents = (
            listops_documents(cfg, progress)
            if files is None
            else {s: _read_documents(p) for s, p in files.items()}
        )
        splits = {
            s: SequenceData([[encode_bytes(d, cfg.max_len) for d in docs]], None)
            for s, docs in documents.items()
        }
        origin = "ListOps expressions"
    info = make_info("lm", "lm", BYTE_VOCAB, BYTE_VOCAB, splits, f"byte-level lm, {origin}")
    return info, splits


def prepare_lm(
    cfg: DataConfig, out_dir: Path, progress: Progress | None, overwrite: bool
) -> list[Path]:
    """Write generated ListOps lm documents to ``out_dir/lm_{train,val,test}.txt``."""
    paths = [out_dir / LM_FILES[split] for split in SPLITS]
    check_writable(paths, overwrite)
    for path, docs in zip(paths, listops_documents(cfg, progress).values(), strict=True):
        path.write_bytes(b"".join(d + b"\n" for d in docs))
    return paths
