"""Image classification as pixel sequences: Fashion-MNIST (default) and CIFAR-10.

An image becomes its pixels in row-major order, pixel value ``p`` (0-255) -> token ``p + 1``
(vocabulary 257). Black pixels are data (token 1), never padding.

* Fashion-MNIST: 28x28 grey images (784 tokens), 10 classes, from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or from ``cfg.source``, a
  directory with the same idx files (gzipped or not).
* CIFAR-10: ``cfg.source`` is a ``cifar-10-batches-py`` directory (or its parent) of the "python
  version" (``data_batch_1`` ... ``data_batch_5``, ``test_batch``; every ``data_batch_*`` present
  is used), which the user supplies. Images are turned grey as LRA's image task does with
  ``tf.image.rgb_to_grayscale``: weights 0.2989, 0.5870, 0.1140 on the pixels scaled to [0, 1],
  then back to uint8 by TensorFlow's conversion (multiply by 255.5 and truncate); 1024 tokens.

Splits as LRA: validation is the last 10% of the training file(s), train the first 90%, test
the test file. ``cfg.train_size``, ``val_size`` and ``test_size`` cap each split (its first
examples) when smaller than it; 0 means no cap.

Batches are Python pickles, which can run code when loaded; they are read with an unpickler that
only accepts the numpy array constructors such a file needs, and then checked for the expected
structure.
"""

from __future__ import annotations

import gzip
import importlib
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbm_transformer.data.base import DataConfig, SequenceData, TaskInfo
from sbm_transformer.data.common import Progress, make_info, truncate, user_source

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
PIXEL_VOCAB = 257
NUM_CLASSES = 10
VAL_FRACTION = 0.1
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
CIFAR_PIXELS = 3 * 32 * 32

Arrays = tuple[np.ndarray, np.ndarray]  # images (n, pixels) uint8, labels (n,) int64


# ------------------------------------------------------------------------------ Fashion-MNIST
def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """An idx array (gzipped when the name ends in .gz) after checking its magic number."""
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(np.int64)
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} bytes of data for shape {tuple(dims)}")
    return body.reshape(tuple(dims))


def _find_idx(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_arrays(directory: str | Path = FASHION_MNIST_DIR) -> dict[str, Arrays]:
    """Fashion-MNIST's ``train`` and ``test`` images ``(n, 784)`` and labels.

    Raises:
        FileNotFoundError: naming the Debian package and the paths looked at.
    """
    directory = Path(directory)
    out = {}
    for split, (images_name, labels_name) in FASHION_FILES.items():
        images_path = _find_idx(directory, images_name)
        labels_path = _find_idx(directory, labels_name)
        if images_path is None or labels_path is None:
            looked = ", ".join(
                str(directory / f"{n}.gz") for pair in FASHION_FILES.values() for n in pair
            )
            raise FileNotFoundError(
                f"Fashion-MNIST not found (looked for {looked}, also without .gz). Install it "
                "with `apt-get install dataset-fashion-mnist`, or set data.source to a "
                "directory with these files or to a CIFAR-10 cifar-10-batches-py directory."
            )
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
        if len(images) != len(labels) or labels.max(initial=0) >= NUM_CLASSES:
            raise ValueError(f"{images_path} and {labels_path} do not match or labels exceed 9")
        out[split] = (images.reshape(len(images), -1), labels)
    return out


# ----------------------------------------------------------------------------------- CIFAR-10
#: What a pickled numpy array may reference, under ``numpy._core.`` (numpy 2) or ``numpy.core.``.
_NUMPY_CORE = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other class or function."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3 with protocol 2
            return importlib.import_module("_codecs").encode
        for prefix in ("numpy._core.", "numpy.core."):
            sub = module.removeprefix(prefix)
            if module.startswith(prefix) and (sub, name) in _NUMPY_CORE:
                return getattr(_numpy_core(sub), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def _numpy_core(sub: str) -> Any:
    try:
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:  # numpy < 2
        return importlib.import_module(f"numpy.core.{sub}")


def read_cifar_batch(path: str | Path) -> Arrays:
    """``data`` ``(n, 3072)`` uint8 and ``labels`` of one CIFAR-10 python-version batch.

    Raises:
        ValueError: the file is not a pickled dict with those entries of those types.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise ValueError(f"{path}: 'data' must be a 2-D uint8 array")
    if data.shape[1] != CIFAR_PIXELS:
        raise ValueError(
            f"{path}: 'data' rows have {data.shape[1]} values, expected {CIFAR_PIXELS}"
        )
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise ValueError(f"{path}: 'labels' must be a list of {len(data)} ints")
    label_array = np.asarray(labels)
    if (
        label_array.dtype.kind not in "iu"
        or not ((label_array >= 0) & (label_array < NUM_CLASSES)).all()
    ):
        raise ValueError(f"{path}: labels must be integers 0-9")
    return data, label_array.astype(np.int64)


def rgb_to_grayscale(data: np.ndarray) -> np.ndarray:
    """CIFAR rows ``(n, 3072)`` (red, green, blue planes) -> grey ``(n, 1024)`` uint8, as TF."""
    rgb = data.reshape(len(data), 3, -1).transpose(0, 2, 1).astype(np.float32) * np.float32(1 / 255)
    gray = rgb @ np.asarray(GRAY_WEIGHTS, dtype=np.float32)
    return (gray * np.float32(255.5)).astype(np.uint8)


def cifar_dir(directory: str | Path) -> Path | None:
    """The CIFAR-10 batches directory at or directly under ``directory``, or None."""
    directory = Path(directory)
    for candidate in (directory, directory / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file():
            return candidate
    return None


def _batch_number(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def load_cifar_arrays(directory: str | Path) -> dict[str, Arrays]:
    """Grey CIFAR-10 ``train`` (all ``data_batch_<n>`` in order) and ``test`` arrays."""
    directory = Path(directory)
    batches = sorted(
        (p for p in directory.glob("data_batch_*") if re.fullmatch(r"data_batch_\d+", p.name)),
        key=_batch_number,
    )
    if not batches:
        raise FileNotFoundError(f"no data_batch_<n> files in {directory}")
    parts = [read_cifar_batch(p) for p in batches]
    test = read_cifar_batch(directory / "test_batch")
    train = (np.concatenate([d for d, _ in parts]), np.concatenate([y for _, y in parts]))
    return {split: (rgb_to_grayscale(d), y) for split, (d, y) in (("train", train), ("test", test))}


# ------------------------------------------------------------------------------------ loading
def _cap(arrays: Arrays, size: int) -> Arrays:
    images, labels = arrays
    n = len(images) if size <= 0 else min(size, len(images))
    return images[:n], labels[:n]


def _to_data(arrays: Arrays, max_len: int) -> SequenceData:
    images, labels = arrays
    tokens = torch.from_numpy(images.astype(np.int64)) + 1
    return SequenceData(
        [[truncate(t, max_len) for t in tokens.unbind(0)]], torch.from_numpy(labels)
    )


def split_arrays(arrays: dict[str, Arrays], cfg: DataConfig) -> dict[str, Arrays]:
    """Train (first 90%), val (last 10% of train) and test, each capped by ``cfg``'s sizes."""
    images, labels = arrays["train"]
    cut = len(images) - int(len(images) * VAL_FRACTION)
    return {
        "train": _cap((images[:cut], labels[:cut]), cfg.train_size),
        "val": _cap((images[cut:], labels[cut:]), cfg.val_size),
        "test": _cap(arrays["test"], cfg.test_size),
    }


def load(
    cfg: DataConfig, progress: Progress | None = None
) -> tuple[TaskInfo, dict[str, SequenceData]]:
    """Fashion-MNIST, or CIFAR-10 when the source is a CIFAR-10 batches directory."""
    source = user_source(cfg)
    directory = Path(source) if source else FASHION_MNIST_DIR
    cifar = cifar_dir(directory)
    if cifar is not None:
        arrays, name = load_cifar_arrays(cifar), f"CIFAR-10 grey, {cifar}"
    else:
        arrays, name = load_fashion_arrays(directory), f"Fashion-MNIST, {directory}"
    splits = {s: _to_data(a, cfg.max_len) for s, a in split_arrays(arrays, cfg).items()}
    return make_info("image", "classify", PIXEL_VOCAB, NUM_CLASSES, splits, name), splits
