"""Optional numba acceleration: one place that decides whether the fused CPU kernels are used.

numba is an optional dependency (``pip install sbm-transformer[numba]``). Without it, or with the
environment variable ``SBMT_DISABLE_NUMBA=1``, every CPU operation falls back to plain torch ops,
which compute the same thing more slowly.
"""

from __future__ import annotations

import functools
import importlib.util
import os

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
