"""Optional numba acceleration: one place that decides whether the fused CPU kernels are used.

numba is an optional dependency (``pip install sbm-transformer[numba]``). Without it, or with the
environment variable ``SBMT_DISABLE_NUMBA=1``, every CPU operation falls back to plain torch ops,
which compute the same thing more slowly.
"""

from __future__ import annotations

import functools
import importlib.util
import os
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
    requested. :func:`release_workspace` frees it.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        key = (name, dt.str)
        buf = self.buffers.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(size, dt)
            self.buffers[key] = buf
        return buf[:size].reshape(shape)


_WORKSPACE = _Workspace()


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A reusable uninitialised array for scratch that does not outlive the calling kernel."""
    return _WORKSPACE.get(name, shape, dtype)


def release_workspace() -> None:
    """Free the scratch arrays kept between calls by the numba kernels of this thread."""
    _WORKSPACE.buffers.clear()
