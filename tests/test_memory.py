"""Reused memory: scratch within a call, recycled arrays for results that outlive it."""

from __future__ import annotations

import numpy as np
import torch

from sbm_transformer import _numba
from sbm_transformer._numba import recycled, recycled_empty, release_workspace


def test_recycled_arrays_are_reused_only_when_nothing_refers_to_them(monkeypatch) -> None:
    monkeypatch.setattr(_numba, "RECYCLE_BYTES", 1 << 16)
    monkeypatch.setattr(_numba, "_RECYCLED", [])
    n = 1 << 16  # 256 KiB of float32: pooled
    a = recycled(n, np.float32)
    kept = torch.from_numpy(a)[10:20]  # a view of a tensor made from it
    del a
    b = recycled(n, np.float32)
    assert not np.shares_memory(b, kept.numpy())  # still referred to: a fresh one
    kept_ptr = kept.data_ptr()
    del kept
    c = recycled(n // 2, np.int32)  # smaller, another dtype: the freed one again
    assert c.dtype == np.int32 and c.shape == (n // 2,)
    assert c.ctypes.data <= kept_ptr < c.ctypes.data + 4 * n
    assert not np.shares_memory(b, c)
    assert len(_numba._RECYCLED) == 2
    del b, c
    release_workspace()  # frees the unused ones
    assert _numba._RECYCLED == []


def test_small_requests_and_other_devices_are_plain_allocations(monkeypatch) -> None:
    monkeypatch.setattr(_numba, "_RECYCLED", [])
    assert recycled(10, np.float64).shape == (10,) and _numba._RECYCLED == []
    like = torch.zeros(1, dtype=torch.bfloat16)
    t = recycled_empty((2, 3), like)
    assert t.shape == (2, 3) and t.dtype == torch.bfloat16
    monkeypatch.setattr(_numba, "RECYCLE_BYTES", 16)
    t = recycled_empty((4, 5), torch.zeros(1, dtype=torch.float64))
    assert t.shape == (4, 5) and t.dtype == torch.float64 and len(_numba._RECYCLED) == 1
