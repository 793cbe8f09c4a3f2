"""Optional numba acceleration: one place that decides whether the fused CPU kernels are used.

numba is an optional dependency (``pip install sbm-transformer[numba]``). Without it, or with the
environment variable ``SBMT_DISABLE_NUMBA=1``, every CPU operation falls back to plain torch ops,
which compute the same thing more slowly.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading

import numpy as np
import torch


@functools.cache
def numba_installed() -> bool:
    """Whether numba can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("numba") is not None


def numba_enabled() -> bool:
    """Whether the numba kernels may be used: installed, and not disabled by the environment."""
    return numba_installed() and os.environ.get("SBMT_DISABLE_NUMBA", "0") in ("", "0")


def use_numba(*tensors: torch.Tensor) -> bool:
    """True when the numba kernels should handle these tensors (all on the CPU, numba enabled)."""
    return numba_enabled() and all(t.device.type == "cpu" for t in tensors)


def sync_threads() -> None:
    """Give numba's parallel loops the same thread count as torch."""
    import numba

    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


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
    recycled ones no longer in use."""
    _WORKSPACE.buffers.clear()
    with _RECYCLED_LOCK:
        _RECYCLED[:] = [b for b in _RECYCLED if sys.getrefcount(b) > _FREE_REFS]


#: Arrays of at least this many bytes come from :func:`recycled` (glibc maps blocks above 32 MiB
#: fresh at every allocation, and unmaps them when freed).
RECYCLE_BYTES = 32 << 20
_RECYCLED: list[np.ndarray] = []
_RECYCLED_LOCK = threading.Lock()
#: ``sys.getrefcount(b)`` of a pooled array ``b`` that nothing else holds, taken in a loop over
#: the pool: the list, the loop variable and the call's argument.
_FREE_REFS = 3


def recycled(size: int, dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised 1-D array of ``size`` items for a result that outlives the call (the
    graph's keys, the softmax weights kept for backward), taken from a pool of large arrays.

    Scratch (:func:`scratch`) serves memory used within one call; results can live on (a graph
    the user keeps, several layers' weights alive until backward). A pooled array is handed out
    again only once nothing but the pool refers to it: every tensor made from it with
    ``torch.from_numpy``, and every view, holds a reference until it is freed. Reusing them spares
    the page faults of fresh memory: at N = 64k, 128 edges per query, each of these arrays is 64
    MiB. Small requests are plain ``np.empty``.
    """
    dt = np.dtype(dtype)
    nbytes = size * dt.itemsize
    if nbytes < RECYCLE_BYTES:
        return np.empty(size, dt)
    with _RECYCLED_LOCK:
        free = [b for b in _RECYCLED if sys.getrefcount(b) <= _FREE_REFS and b.nbytes >= nbytes]
        if free:
            buf = min(free, key=lambda b: b.nbytes)
        else:  # a new one, with room for the next call's few more edges; drop unused smaller ones
            _RECYCLED[:] = [
                b for b in _RECYCLED if sys.getrefcount(b) > _FREE_REFS or b.nbytes > nbytes
            ]
            buf = np.empty(nbytes + nbytes // 16, np.uint8)
            _RECYCLED.append(buf)
    return buf[:nbytes].view(dt)


def recycled_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device: from
    :func:`recycled` on the CPU (float32 and float64), else ``torch.empty``."""
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return like.new_empty(shape)
    size = 1
    for d in shape:
        size *= d
    dt = np.float32 if like.dtype == torch.float32 else np.float64
    return torch.from_numpy(recycled(size, dt)).view(shape)
