"""Checkpoints that are safe to write and to load.

A checkpoint named ``last`` or ``best`` lives in a run's ``checkpoints/`` directory as

* ``<name>-<step>.safetensors``: every tensor (model, optimizer moments, RNG states), loaded
  with ``safetensors`` (no code is ever executed on load, unlike ``pickle``);
* ``<name>.json``: the small rest (step, scheduler and optimizer hyper-parameters, RNG states of
  Python and NumPy, best metric, ...), the name of its tensors file and that file's SHA-256.

Writes are atomic: the tensors go to a new file, then ``<name>.json`` is replaced in one
``os.replace``, and only then is the previous tensors file removed. A crash at any point leaves
either the old or the new checkpoint, complete; so does a failed write (a full disk, a read-only
directory), which raises :class:`CheckpointWriteError` naming the path and removes what it
had written. Loading checks the hash and every tensor's shape and raises
:class:`CheckpointError` naming the file and the problem; nothing is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only directory, ...); the previous
    checkpoint of that name is intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and one ``os.replace``: readers see
    the old or the new content, never a part. The temporary file is removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_state(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors of a nested state into ``tensors`` (keyed by path); return the JSON rest."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_json_key(k), _split_state(f"{prefix}.{k}", v, tensors)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [_split_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def _json_key(key: Any) -> Any:
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    raise TypeError(f"cannot store a state key of type {type(key).__name__}")


def _join_state(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"{where}: tensor {key!r} is missing from the tensors file")
            return tensors[key]
        if "__dict__" in obj:
            return {k: _join_state(v, tensors, where) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join_state(v, tensors, where) for v in obj["__tuple__"])
        return {k: _join_state(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors, where) for v in obj]
    return obj


def save_checkpoint(directory: str | Path, name: str, state: dict[str, Any], *, step: int) -> Path:
    """Atomically save ``state`` (nested dicts/lists of tensors and JSON values) as ``name``.

    Returns the path of ``<name>.json``.

    Raises:
        CheckpointWriteError: the directory or a file cannot be written (one line naming the
            path and the reason); the previous checkpoint ``name`` is left as it was.
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    rest = _split_state("state", state, tensors)
    index = directory / f"{name}.json"
    previous = _read_index(index)["tensors"] if index.exists() else None
    tensor_file = _new_tensor_file(directory, name, step, previous)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_tensors(tensors, tensor_file)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "tensors": tensor_file.name,
            "sha256": _sha256(tensor_file),
            "state": rest,
        }
        atomic_write_text(index, json.dumps(meta, indent=1))
    except BaseException as err:
        if _indexed_file(index) != tensor_file.name:  # (an interrupt may land after the replace)
            with suppress(OSError):
                tensor_file.unlink(missing_ok=True)
        if isinstance(err, (OSError, SafetensorError)):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            kept = f"; the previous {name!r} checkpoint is kept" if previous else ""
            raise CheckpointWriteError(
                f"cannot write checkpoint {name!r} (step {step}) in {directory}: {reason}{kept}"
            ) from err
        raise
    if previous and previous != tensor_file.name:
        still_used = {_read_index(p)["tensors"] for p in directory.glob("*.json") if p != index}
        if previous not in still_used:
            (directory / previous).unlink(missing_ok=True)
    return index


def _new_tensor_file(directory: Path, name: str, step: int, previous: str | None) -> Path:
    """``<name>-<step>.safetensors``, or with a suffix when the current index uses that name
    (saving the same step again must not replace the file the intact index points to)."""
    path = directory / f"{name}-{step:08d}.safetensors"
    suffix = 1
    while path.name == previous:
        path = directory / f"{name}-{step:08d}-{suffix}.safetensors"
        suffix += 1
    return path


def _indexed_file(index: Path) -> str | None:
    try:
        return str(json.loads(index.read_text())["tensors"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_index(index: Path) -> dict[str, Any]:
    try:
        meta = json.loads(index.read_text())
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {index}: {err}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"checkpoint {index} is not valid JSON (line {err.lineno}): {err.msg}"
        ) from err
    if (
        not isinstance(meta, dict)
        or meta.get("format_version") != FORMAT_VERSION
        or "tensors" not in meta
    ):
        raise CheckpointError(
            f"checkpoint {index} has an unknown format (expected format_version {FORMAT_VERSION})"
        )
    return meta


def load_checkpoint(directory: str | Path, name: str) -> tuple[dict[str, Any], int]:
    """Load checkpoint ``name``: ``(state, step)``. Raises CheckpointError when unusable."""
    index = Path(directory) / f"{name}.json"
    if not index.exists():
        raise CheckpointError(f"no checkpoint {name!r} in {directory} (missing {index.name})")
    meta = _read_index(index)
    tensor_file = Path(directory) / meta["tensors"]
    if not tensor_file.exists():
        raise CheckpointError(f"checkpoint {index}: its tensors file {tensor_file.name} is missing")
    if _sha256(tensor_file) != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {index}: {tensor_file.name} does not match its recorded SHA-256 "
            "(corrupt or modified)"
        )
    try:
        tensors = load_file(str(tensor_file))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {tensor_file}: {err}") from err
    return _join_state(meta["state"], tensors, str(index)), int(meta["step"])


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict``, raising an error that lists missing, extra and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:8]))
        raise CheckpointError(f"checkpoint {where} does not fit the model: " + ", ".join(parts))
    model.load_state_dict(state)
