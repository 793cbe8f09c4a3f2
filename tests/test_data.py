"""Tests of the task data layer (sbm_transformer.data): generators, loaders, registry."""

from __future__ import annotations

import os
import pickle
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sbm_transformer.data import (
    IGNORE_INDEX,
    TASKS,
    DataConfig,
    SequenceData,
    collate_fn,
    images,
    listops,
    load_task,
    prepare,
    synthetic,
    text,
)
from sbm_transformer.data.listops import END

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = dict(train_size=12, val_size=6, test_size=6, min_length=6, max_length=40, vocab=24)


def small(task: str, **kw: object) -> DataConfig:
    return replace(DataConfig(task=task, **SMALL), **kw)  # type: ignore[arg-type]


def op(name: str, *args: listops.Tree) -> listops.Tree:
    """A ListOps tree built as LRA builds it."""
    tree: listops.Tree = (name, args[0])
    for a in args[1:]:
        tree = (tree, a)
    return (tree, END)


def as_tuples(data: SequenceData) -> set[tuple[int, ...]]:
    return {tuple(t.tolist()) for t in data.sequences[0]}


# ----------------------------------------------------------------------------------- ListOps
@pytest.mark.parametrize(
    ("tree", "value"),
    [
        (op("[MIN", 4, 2, 9), 2),
        (op("[MAX", 2, 9, 4), 9),
        (op("[MED", 1, 7, 3), 3),
        (op("[MED", 1, 2, 3, 4), 2),  # median 2.5 -> int 2
        (op("[MED", 8, 9), 8),  # 8.5 -> 8
        (op("[SM", 9, 8, 6), 3),  # 23 % 10
        (op("[SM", 3, op("[MIN", 7, 5), 8, 6), 2),
        (op("[MAX", op("[MED", 0, 0, 9), op("[SM", 5, 5)), 0),
    ],
)
def test_listops_values(tree: listops.Tree, value: int) -> None:
    assert listops.to_value(tree) == value
    assert listops.evaluate(listops.to_string(tree)) == value


def test_listops_string_format_is_lra() -> None:
    assert listops.to_string(op("[MAX", 2, 9, 4)) == "( ( ( ( [MAX 2 ) 9 ) 4 ) ] )"
    assert listops.tokenize("( ( ( ( [MAX 2 ) 9 ) 4 ) ] )") == ["[MAX", "2", "9", "4", "]"]
    assert listops.encode("( ( ( ( [MAX 2 ) 9 ) 4 ) ] )").tolist() == [12, 3, 10, 5, 15]
    assert listops.VOCAB_SIZE == 16 and listops.TOKEN_IDS["0"] == 1 and listops.TOKEN_IDS["]"] == 15


def test_generate_tree_is_a_leaf_at_max_depth() -> None:
    tree, length = listops.generate_tree(random.Random(0), depth=listops.MAX_DEPTH)
    assert isinstance(tree, int) and 0 <= tree <= 9 and length == 1


def test_generated_examples_parse_back_within_bounds() -> None:
    examples = listops.generate_examples(40, random.Random(1), min_length=5, max_length=60)
    assert len(examples) == 40
    for expression, value in examples:
        assert 5 < len(listops.tokenize(expression)) < 60
        assert listops.evaluate(expression) == value
        assert len(listops.encode(expression)) == len(listops.tokenize(expression))


def test_generation_dedups_and_is_reproducible() -> None:
    def run(seed: int) -> list[tuple[str, int]]:
        return listops.generate_examples(60, random.Random(seed), min_length=3, max_length=6)

    first = run(0)
    assert len({e for e, _ in first}) == 60  # lengths 4-5 only: duplicates are frequent
    assert run(0) == first
    assert run(1) != first


def test_generation_gives_up_when_too_few_expressions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listops, "MAX_MISSES", 2000)
    with pytest.raises(ValueError, match="no new expression"):
        listops.generate_examples(11, random.Random(0), min_length=0, max_length=2)  # 10 leaves
    with pytest.raises(ValueError, match="strictly between"):
        listops.generate_examples(1, random.Random(0), min_length=5, max_length=6)


def test_listops_splits_disjoint_and_seeded() -> None:
    cfg = small("listops", min_length=3, max_length=7, train_size=40, val_size=20, test_size=20)
    info, splits = load_task(cfg)
    assert (info.kind, info.vocab_size, info.num_classes) == ("classify", 16, 10)
    sets = [as_tuples(splits[s]) for s in ("train", "val", "test")]
    assert sum(map(len, sets)) == 80 and len(set.union(*sets)) == 80
    again = load_task(cfg)[1]
    assert all(
        torch.equal(a, b)
        for a, b in zip(splits["train"].labels, again["train"].labels, strict=True)
    )
    assert as_tuples(load_task(replace(cfg, seed=1))[1]["train"]) != sets[0]


def test_listops_tsv_round_trip(tmp_path: Path) -> None:
    examples = listops.generate_examples(10, random.Random(2), min_length=5, max_length=40)
    path = tmp_path / "basic_train.tsv"
    listops.write_tsv(path, examples)
    assert path.read_bytes().startswith(b"Source\tTarget\r\n")
    sequences, targets = listops.read_tsv(path)
    assert [s.tolist() for s in sequences] == [listops.encode(e).tolist() for e, _ in examples]
    assert targets.tolist() == [v for _, v in examples]


def test_listops_prepare_then_load(tmp_path: Path) -> None:
    cfg = small("listops")
    seen: list[tuple[int, int]] = []
    files = prepare(cfg, tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert [f.name for f in files] == ["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"]
    assert seen[-1] == (24, 24)
    read = load_task(replace(cfg, dir=str(tmp_path)))[1]
    generated = load_task(cfg)[1]
    for split in ("train", "val", "test"):
        assert torch.equal(read[split].labels, generated[split].labels)
        assert as_tuples(read[split]) == as_tuples(generated[split])


def test_listops_loader_on_lra_fixture(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        shutil.copy(FIXTURES / "listops_basic.tsv", tmp_path / f"basic_{split}.tsv")
    info, splits = load_task(DataConfig(task="listops", dir=str(tmp_path)))
    assert splits["test"].labels.tolist() == [9, 2, 5, 2]
    assert splits["train"][0][0].tolist() == [12, 3, 10, 5, 15]
    assert info.max_len == max(len(t) for t in splits["val"].sequences[0])
    truncated = load_task(DataConfig(task="listops", dir=str(tmp_path), max_len=8))[0]
    assert truncated.max_len == 8


def test_listops_incomplete_prepared_dir(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "listops_basic.tsv", tmp_path / "basic_train.tsv")
    with pytest.raises(FileNotFoundError, match=r"basic_val.tsv"):
        load_task(DataConfig(task="listops", dir=str(tmp_path)))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("( ( [MAX 2 ) 9 ) ]\t9\textra", "2 tab-separated fields"),
        ("( ( [MAX 2 ) 9 ) ]", "2 tab-separated fields"),
        ("( ( [MAX 2 ) 19 ) ]\t9", "unknown token '19'"),
        ("( ( [MAX 2 ) 9 ) ]\t10", "target 10 outside 0..9"),
        ("( ( [MAX 2 ) 9 ) ]\tx", "not an integer"),
        ("( )\t3", "empty expression"),
        ("\t3", "empty expression"),
    ],
)
def test_listops_malformed_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "basic_val.tsv"
    path.write_text(f"Source\tTarget\n( ( [MIN 1 ) 2 ) ]\t1\n{line}\n")
    with pytest.raises(ValueError, match=f"basic_val.tsv:3: .*{message}"):
        listops.read_tsv(path)


@pytest.mark.parametrize("task", ["listops", "repeat", "retrieval", "lm", "image"])
def test_missing_data_dir_is_an_error(tmp_path: Path, task: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"^data.dir {missing} does not exist$"):
        load_task(small(task, dir=str(missing)))


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("listops", r"holds none of basic_train.tsv, .*`sbmt data listops --out"),
        ("repeat", r"holds none of repeat_train.tsv, .*leave data.dir unset"),
        ("retrieval", r"holds none of retrieval_train.tsv"),
        ("lm", r"holds none of lm_train.txt"),
        ("image", r"has no image.json for task 'image'"),
        ("text", r"has no text.json for task 'text'"),
    ],
)
def test_data_dir_without_the_task_is_an_error(tmp_path: Path, task: str, message: str) -> None:
    with pytest.raises(FileNotFoundError, match=message):
        load_task(small(task, dir=str(tmp_path)))


def test_empty_sequences_are_refused_naming_split_and_example() -> None:
    from sbm_transformer.data.common import check_sequences

    good = SequenceData([[torch.tensor([1, 2])]], None)
    bad = SequenceData([[torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long)]], None)
    check_sequences("lm", {"train": good})
    with pytest.raises(ValueError, match="task lm: example 1 of the val split is an empty"):
        check_sequences("lm", {"train": good, "val": bad})


def test_load_task_reports_generation_progress() -> None:
    for task in ("listops", "repeat", "retrieval", "lm"):
        seen: list[tuple[int, int]] = []
        load_task(small(task), lambda done, total: seen.append((done, total)))  # noqa: B023
        assert seen and seen[-1] == (24, 24), task


def test_listops_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "basic_test.tsv"
    path.write_text("( ( [MIN 1 ) 2 ) ]\t1\n")
    with pytest.raises(ValueError, match=r"basic_test.tsv:1: expected the header"):
        listops.read_tsv(path)


# ------------------------------------------------------------------------- synthetic tasks
def test_repeat_labels_brute_force_and_determinism() -> None:
    info, splits = load_task(small("repeat"))
    assert (info.kind, info.num_classes, info.vocab_size) == ("tag", 2, 25)
    for tokens, labels in zip(*splits["train"].sequences, splits["train"].labels, strict=True):
        seq = tokens.tolist()
        assert 6 <= len(seq) <= 40 and min(seq) >= 1 and max(seq) <= 24
        assert labels.tolist() == [int(seq.count(t) > 1) for t in seq]
    again = load_task(small("repeat"))[1]
    assert as_tuples(again["val"]) == as_tuples(splits["val"])


def test_repeat_balance_matches_formula() -> None:
    cfg = small("repeat", train_size=300, vocab=48, min_length=30, max_length=40)
    labels = torch.cat(list(load_task(cfg)[1]["train"].labels))
    expected = synthetic.repeat_rate(48, 30, 40)
    assert 0.4 < expected < 0.6  # vocab ≈ 1.4 x length: roughly balanced
    assert abs(labels.float().mean().item() - expected) < 0.03


def test_matching_balanced_and_defined_by_shared_span() -> None:
    info, splits = load_task(small("retrieval", train_size=40))
    assert (info.kind, info.num_classes) == ("match", 2)
    data = splits["train"]
    assert data.labels.sum().item() == 20
    k = synthetic.match_span(24, 6, 40)
    for a, b, label in zip(*data.sequences, data.labels.tolist(), strict=True):
        assert synthetic.shares_span(a, b, k) == bool(label)
    assert synthetic.match_span(24, 6, 40) == 4
    with pytest.raises(ValueError, match="min_length"):
        synthetic.match_span(2, 6, 40)


def test_synthetic_prepare_round_trip_and_no_overwrite(tmp_path: Path) -> None:
    for task in ("repeat", "retrieval"):
        cfg = small(task)
        files = prepare(cfg, tmp_path)
        assert [f.name for f in files] == [f"{task}_{s}.tsv" for s in ("train", "val", "test")]
        with pytest.raises(FileExistsError, match=f"{task}_train.tsv"):
            prepare(cfg, tmp_path)
        prepare(cfg, tmp_path, overwrite=True)
        read = load_task(replace(cfg, dir=str(tmp_path)))[1]
        generated = load_task(cfg)[1]
        for split in ("train", "test"):
            for x, y in zip(read[split].sequences[-1], generated[split].sequences[-1], strict=True):
                assert torch.equal(x, y)


def test_synthetic_tasks_refuse_to_truncate() -> None:
    with pytest.raises(ValueError, match=r"exceed data.max_len 20"):
        load_task(small("repeat", max_len=20))


def test_repeat_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "repeat_train.tsv"
    path.write_text("tokens\tlabels\n1 2 1\t1 0 1\n3 4\t0\n")
    with pytest.raises(ValueError, match=r"repeat_train.tsv:3: 2 tokens but 1 labels"):
        synthetic.read_repeat(path)
    path.write_text("tokens\tlabels\n0 2\t0 0\n")
    with pytest.raises(ValueError, match=":2: token 0 outside 1"):
        synthetic.read_repeat(path)


# ------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def fashion() -> tuple:
    if not all(
        (images.FASHION_MNIST_DIR / f"{n}.gz").is_file()
        for p in images.FASHION_FILES.values()
        for n in p
    ):
        pytest.skip("dataset-fashion-mnist is not installed")
    return load_task(DataConfig(task="image", train_size=20, val_size=5, test_size=7))


def test_fashion_mnist_shapes_labels_and_black_pixels(fashion: tuple) -> None:
    info, splits = fashion
    assert (info.kind, info.vocab_size, info.num_classes, info.max_len) == (
        "classify",
        257,
        10,
        784,
    )
    assert {s: len(d) for s, d in splits.items()} == {"train": 20, "val": 5, "test": 7}
    batch = collate_fn("classify")([splits["train"][i] for i in range(8)])
    assert batch.tokens.shape == (8, 784) and int(batch.tokens.min()) == 1
    assert (batch.tokens == 1).any()  # black pixels are there ...
    assert not batch.padding_mask.any()  # ... and are not padding
    assert batch.labels.min() >= 0 and batch.labels.max() <= 9


def test_fashion_mnist_missing_names_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        load_task(DataConfig(task="image", source=str(tmp_path)))
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(e.value)


def test_idx_magic_checked(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes((0x0803).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match="magic number"):
        images.read_idx(path, images.LABELS_MAGIC)


def _cifar_batch(path: Path, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump(
            {b"data": data, b"labels": [int(x) for x in rng.integers(0, 10, n)]}, f, protocol=2
        )
    return data


def test_cifar_loader_on_fixture(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    first = _cifar_batch(root / "data_batch_1", 10, 0)
    _cifar_batch(root / "data_batch_2", 10, 1)
    _cifar_batch(root / "test_batch", 4, 2)
    info, splits = load_task(DataConfig(task="image", source=str(tmp_path), train_size=0))
    assert (info.vocab_size, info.num_classes, info.max_len) == (257, 10, 1024)
    assert {s: len(d) for s, d in splits.items()} == {"train": 18, "val": 2, "test": 4}
    r, g, b = (first[0, c * 1024 : (c + 1) * 1024].astype(np.float64) / 255 for c in range(3))
    expected = np.floor((0.2989 * r + 0.5870 * g + 0.1140 * b) * 255.5).astype(np.int64) + 1
    assert np.abs(splits["train"][0][0].numpy() - expected).max() <= 1  # float32 rounding
    pure = np.zeros((3, 3072), np.uint8)
    pure[0, :1024], pure[1, 1024:2048], pure[2] = 255, 255, 255
    assert images.rgb_to_grayscale(pure)[:, 0].tolist() == [76, 149, 255]


def test_cifar_rejects_other_pickles(tmp_path: Path) -> None:
    (tmp_path / "evil").write_bytes(pickle.dumps(os.getcwd, protocol=2))
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        images.read_cifar_batch(tmp_path / "evil")
    (tmp_path / "wrong").write_bytes(pickle.dumps({b"data": [1, 2], b"labels": [0]}))
    with pytest.raises(ValueError, match="2-D uint8"):
        images.read_cifar_batch(tmp_path / "wrong")


# --------------------------------------------------------------------------------------- text
def test_text_loader_on_fixtures() -> None:
    info, splits = load_task(DataConfig(task="text", source=str(FIXTURES / "text")))
    assert (info.kind, info.vocab_size, info.num_classes) == ("classify", 257, 2)
    assert {s: len(d) for s, d in splits.items()} == {"train": 4, "val": 2, "test": 2}
    text_2 = "Café scenes shot beautifully; a quiet masterpiece.".encode()
    assert splits["train"][2][0].tolist() == [b + 1 for b in text_2]
    assert splits["train"][1][0].tolist()[:3] == [ord("T") + 1, ord("w") + 1, ord("o") + 1]
    short = load_task(DataConfig(task="text", source=str(FIXTURES / "text"), max_len=10))[0]
    assert short.max_len == 10


def test_retrieval_loader_on_aan_fixtures() -> None:
    info, splits = load_task(DataConfig(task="retrieval", source=str(FIXTURES / "aan")))
    assert (info.kind, info.num_classes, info.vocab_size) == ("match", 2, 257)
    assert splits["train"].labels.tolist() == [1, 0, 1]
    first, _, label = splits["val"][1]
    assert bytes(first.sub(1).tolist()) == b"Accurate unlexicalized parsing." and label == 1
    batch = collate_fn("match")([splits["test"][0], splits["test"][1]])
    assert batch.tokens.shape[:2] == (2, 2)
    assert not batch.padding_mask[1, 0, : len(splits["test"][0][1])].any()


@pytest.mark.parametrize(
    ("task", "line", "message"),
    [
        ("text", "no tab here", "expected label<TAB>text"),
        ("text", "x\tsome text", "label 'x' is not an integer"),
        ("text", "1\t", "empty text"),
        ("retrieval", "1\ta\tb\tonly four", "expected 5 tab-separated fields, got 4"),
        ("retrieval", "2\ta\tb\tx\ty", "label 2 is not 0 or 1"),
    ],
)
def test_text_malformed_line(tmp_path: Path, task: str, line: str, message: str) -> None:
    good = "1\ta fine line\n" if task == "text" else "1.0\ta\tb\tone\ttwo\n"
    for name in ("train.tsv", "val.tsv", "test.tsv"):
        (tmp_path / name).write_text(good)
    (tmp_path / "val.tsv").write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"val.tsv:3: {message}"):
        load_task(DataConfig(task=task, source=str(tmp_path)))


def test_text_needs_source_and_split_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs data.source"):
        load_task(DataConfig(task="text"))
    (tmp_path / "train.tsv").write_text("1\tx\n")
    with pytest.raises(FileNotFoundError, match="no val file"):
        load_task(DataConfig(task="text", source=str(tmp_path)))


def test_manifest_records_source(tmp_path: Path) -> None:
    cfg = DataConfig(task="text", source=str(FIXTURES / "text"))
    (manifest,) = prepare(cfg, tmp_path)
    assert manifest.name == "text.json"
    with pytest.raises(FileExistsError, match=r"text.json"):
        prepare(cfg, tmp_path)
    splits = load_task(DataConfig(task="text", dir=str(tmp_path)))[1]
    assert len(splits["train"]) == 4


# ----------------------------------------------------------------------------------------- lm
def test_lm_on_a_text_file() -> None:
    cfg = DataConfig(
        task="lm", source=str(FIXTURES / "aan" / "new_aan_pairs.train.tsv"), max_len=16
    )
    info, splits = load_task(cfg)
    assert (info.kind, info.vocab_size, info.num_classes, info.max_len) == ("lm", 257, 257, 16)
    raw = (FIXTURES / "aan" / "new_aan_pairs.train.tsv").read_bytes()
    assert bytes(splits["train"][0][0].sub(1).tolist()) == raw[:16]
    assert sum(len(t) for d in splits.values() for t in d.sequences[0]) >= len(raw) - 3
    batch = collate_fn("lm")([splits["test"][0], splits["test"][-1]])
    assert torch.equal(batch.labels[0, :-1], batch.tokens[0, 1:])
    assert (batch.labels[batch.padding_mask] == IGNORE_INDEX).all()


def test_lm_file_too_small(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_bytes(b"abc")
    with pytest.raises(ValueError, match="too small"):
        load_task(DataConfig(task="lm", source=str(tmp_path / "tiny.txt")))


def test_lm_on_listops_text(tmp_path: Path) -> None:
    cfg = small("lm", max_length=20)
    splits = load_task(cfg)[1]
    document = bytes(splits["train"][0][0].sub(1).tolist()).decode()
    expression, value = document.rsplit(" = ", 1)
    assert listops.evaluate(expression) == int(value)
    prepare(cfg, tmp_path)
    read = load_task(replace(cfg, dir=str(tmp_path)))[1]
    assert as_tuples(read["val"]) == as_tuples(splits["val"])


# --------------------------------------------------------------------------------- pathfinder
def test_pathfinder_on_fixture(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "metadata").mkdir()
    (tmp_path / "imgs" / "0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = []
    for meta in range(2):
        lines = []
        for i in range(5):
            name = f"sample_{meta * 5 + i}.png"
            image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "imgs" / "0" / name)
            pixels.append(image)
            lines.append(f"imgs/0 {name} 0 {i % 2} 2 14\n")
        (tmp_path / "metadata" / f"{9 + meta}.npy").write_text("".join(lines))  # 9 before 10
    info, splits = load_task(DataConfig(task="pathfinder", source=str(tmp_path), train_size=0))
    assert (info.num_classes, info.vocab_size, info.max_len) == (2, 257, 1024)
    assert {s: len(d) for s, d in splits.items()} == {"train": 8, "val": 1, "test": 1}
    assert splits["train"][1][0].tolist() == (pixels[1].reshape(-1).astype(int) + 1).tolist()
    test_tokens, test_label = splits["test"][0]
    assert test_tokens.tolist() == (pixels[9].reshape(-1).astype(int) + 1).tolist()
    assert test_label.item() == 0 and splits["train"][1][1].item() == 1


# ----------------------------------------------------------------------------------- registry
def test_unknown_task_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'; valid: listops, repeat, image"):
        load_task(DataConfig(task="nope"))
    with pytest.raises(ValueError, match="pathfinder, lm"):
        prepare(DataConfig(task="nope"), tmp_path)
    assert set(TASKS) == {"listops", "repeat", "image", "text", "retrieval", "pathfinder", "lm"}


def test_text_module_encodes_bytes() -> None:
    assert text.encode_bytes(b"\x00\xff", 0).tolist() == [1, 256]
    assert text.encode_bytes(b"abcdef", 2).tolist() == [98, 99]
    assert text.encode_bytes(b"").tolist() == []
