"""Optional numba acceleration: one place that decides whether the fused CPU kernels are used.

numba is an optional dependency (``pip install sbm-transformer[numba]``). Without it, or with the
environment variable ``SBMT_DISABLE_NUMBA=1``, every CPU operation falls back to plain torch ops,
which compute the same thing more slowly.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import weakref

import numpy as np
import torch

_NUMBA_INSTALLED = importlib.util.find_spec("numba") is not None


def numba_installed() -> bool:
    """Whether numba can be imported (checked once, at import, without importing it)."""
    return _NUMBA_INSTALLED


def numba_enabled() -> bool:
    """Whether the numba kernels may be used: installed, and not disabled by the environment."""
    return numba_installed() and os.environ.get("SBMT_DISABLE_NUMBA", "0") in ("", "0")


def use_numba(*tensors: torch.Tensor) -> bool:
    """True when the numba kernels should handle these tensors (all on the CPU, numba enabled).

    When true, numba's thread count is first matched to torch's (:func:`sync_threads`): every
    numba kernel is reached through this check.
    """
    if numba_enabled() and all(t.device.type == "cpu" for t in tensors):
        if not torch.compiler.is_compiling():  # compiled: the kernels' custom ops sync
            sync_threads()
        return True
    return False


def sync_threads() -> None:
    """Give numba's parallel loops the same thread count as torch, and keep torch's.

    With numba's ``omp`` threading layer, numba and torch share one OpenMP runtime: numba's first
    parallel loop (and ``numba.set_num_threads``) set the runtime's thread count for the calling
    thread to numba's own (all CPUs), which silently undid ``torch.set_num_threads(1)``.
    """
    import numba

    want = torch.get_num_threads()
    n = min(want, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


class _Workspace(threading.local):
    """Scratch arrays reused across calls (per thread).

    Freshly allocated memory is paid for again at first touch (page faults: measured ~0.2 ms
    per MiB here, e.g. ~50 ms for the per-edge scratch of one backward pass at 5M edges).
    Scratch that never leaves a call is therefore kept and reused; it grows to the largest size
    requested, with 1/16 to spare: sizes that follow the sampled edge count move a little at every
    call, and grown to fit each new maximum exactly, six per-edge arrays were allocated afresh
    every few steps (64-128 MiB each at N = 64k, 128 edges per query). :func:`release_workspace`
    frees it.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        key = (name, dt.str)
        buf = self.buffers.get(key)
        if buf is None or buf.size < size:
            self.buffers.pop(key, None)
            del buf  # the old array is freed before its successor is allocated
            buf = np.empty(size + size // 16, dt)
            self.buffers[key] = buf
        return buf[:size].reshape(shape)


_WORKSPACE = _Workspace()


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A reusable uninitialised array for scratch that does not outlive the calling kernel."""
    return _WORKSPACE.get(name, shape, dtype)


def release_workspace() -> None:
    """Free the scratch arrays kept between calls by the numba kernels of this thread, and the
    pooled blocks no longer in use."""
    _WORKSPACE.buffers.clear()
    with _POOL_LOCK:
        _FREE_BLOCKS.clear()


#: Arrays of at least this many bytes come from :func:`recycled` (glibc maps blocks above 32 MiB
#: fresh at every allocation, and unmaps them when freed).
RECYCLE_BYTES = 32 << 20
#: Pooled blocks that nothing uses: a block is in this list only between the moment the last
#: tensor or array on it is freed and the moment it is handed out again.
_FREE_BLOCKS: list[np.ndarray] = []
_POOL_LOCK = threading.Lock()


def _give_back(block: np.ndarray) -> None:
    """Return ``block`` to the pool; called when the last user of its storage is freed."""
    with _POOL_LOCK:
        _FREE_BLOCKS.append(block)


def _take_block(nbytes: int) -> np.ndarray:
    with _POOL_LOCK:
        fits = [i for i, b in enumerate(_FREE_BLOCKS) if b.nbytes >= nbytes]
        if fits:  # the smallest that fits (by index: `==` on arrays compares elements)
            return _FREE_BLOCKS.pop(min(fits, key=lambda i: _FREE_BLOCKS[i].nbytes))
        # a new block with room for the next call's few more edges; free blocks too small for
        # this request are dropped (sizes follow the sampled edge count, which mostly grows)
        _FREE_BLOCKS[:] = [b for b in _FREE_BLOCKS if b.nbytes > nbytes]
    return np.empty(nbytes + nbytes // 16, np.uint8)


def _pooled_tensor(size: int, dt: np.dtype) -> torch.Tensor:
    """A 1-D tensor of ``size`` items on a pooled block. The block returns to the pool when the
    tensor's storage is freed, i.e. when no tensor, view or array made from it is left: every
    view holds the storage, and so does every array from ``Tensor.numpy()`` (its base is the
    tensor). Ownership is the storage's lifetime, not a reference count read from CPython."""
    block = _take_block(size * dt.itemsize)
    tensor = torch.from_numpy(block[: size * dt.itemsize].view(dt))
    done = weakref.finalize(tensor.untyped_storage(), _give_back, block)
    done.atexit = False
    return tensor


def recycled(size: int, dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised 1-D array of ``size`` items for a result that outlives the call (the
    graph's keys, the softmax weights kept for backward), from a pool of large blocks.

    Scratch (:func:`scratch`) serves memory used within one call; results can live on (a graph
    the user keeps, several layers' weights alive until backward). A block is handed out again
    only after the storage made on it is freed (see :func:`_pooled_tensor`). Reusing blocks
    spares the page faults of fresh memory: at N = 64k, 128 edges per query, each of these
    arrays is 64 MiB. Small requests are plain ``np.empty``.
    """
    dt = np.dtype(dtype)
    if size * dt.itemsize < RECYCLE_BYTES:
        return np.empty(size, dt)
    return _pooled_tensor(size, dt).numpy()


def recycled_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device: pooled (see
    :func:`recycled`) on the CPU for float32 and float64, else ``torch.empty``."""
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return like.new_empty(shape)
    size = 1
    for d in shape:
        size *= d
    dt = np.dtype(np.float32 if like.dtype == torch.float32 else np.float64)
    if size * dt.itemsize < RECYCLE_BYTES:
        return like.new_empty(shape)
    return _pooled_tensor(size, dt).view(shape)
