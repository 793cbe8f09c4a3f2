"""Reused memory: scratch within a call, pooled blocks for results that outlive it."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from sbm_transformer import _numba
from sbm_transformer._numba import recycled, recycled_empty, release_workspace


@pytest.fixture
def small_pool(monkeypatch):
    """Pool requests of 64 KiB and more, in an empty pool."""
    monkeypatch.setattr(_numba, "RECYCLE_BYTES", 1 << 16)
    monkeypatch.setattr(_numba, "_FREE_BLOCKS", [])
    return _numba


def _inside(arr: np.ndarray, ptr: int) -> bool:
    return arr.ctypes.data <= ptr < arr.ctypes.data + arr.nbytes


def test_a_block_comes_back_only_after_its_last_user_is_freed(small_pool) -> None:
    n = 1 << 16  # 256 KiB of float32: pooled
    a = recycled(n, np.float32)
    kept = torch.from_numpy(a)[10:20]  # a view of a tensor made from it
    del a
    gc.collect()
    b = recycled(n, np.float32)
    assert not np.shares_memory(b, kept.numpy())  # still used: another block
    kept_ptr = kept.data_ptr()
    del kept
    c = recycled(n // 2, np.int32)  # smaller, another dtype: the freed block again
    assert c.dtype == np.int32 and c.shape == (n // 2,)
    assert _inside(c, kept_ptr)
    assert not np.shares_memory(b, c)
    del b, c
    assert len(small_pool._FREE_BLOCKS) == 2
    release_workspace()  # frees the unused ones
    assert small_pool._FREE_BLOCKS == []


def test_the_smallest_free_block_that_fits_is_taken(small_pool) -> None:
    n = 1 << 15
    big, small = recycled(4 * n, np.float32), recycled(2 * n, np.float32)
    big_ptr, small_ptr = big.ctypes.data, small.ctypes.data
    del big, small  # both free: the big one first in the pool
    assert len(small_pool._FREE_BLOCKS) == 2
    c = recycled(n, np.float32)
    assert _inside(c, small_ptr)
    d = recycled(n, np.float32)
    assert _inside(d, big_ptr) and small_pool._FREE_BLOCKS == []


def _hold(a: np.ndarray, hold: str) -> object:
    if hold == "numpy_view":
        return a[5:9]
    if hold == "tensor_view":
        return torch.from_numpy(a).view(256, 256)[3]
    if hold == "storage":
        return torch.from_numpy(a).untyped_storage()
    return torch.from_numpy(a)[100:200].numpy()[::2]


@pytest.mark.parametrize("hold", ["numpy_view", "tensor_view", "storage", "numpy_of_view"])
def test_every_kind_of_view_keeps_the_block(small_pool, hold) -> None:
    """Views made through numpy or torch, of any depth, keep the block out of the pool; this
    does not depend on CPython's reference counts (3.14 borrows references on the stack)."""
    n = 1 << 16
    a = recycled(n, np.float32)
    a[:] = 1.0
    ptr = a.ctypes.data
    held = _hold(a, hold)
    del a
    gc.collect()
    for _ in range(3):  # the pool hands out other blocks, and they are written
        other = recycled(n, np.float32)
        other[:] = 7.0
    if isinstance(held, torch.UntypedStorage):
        values = torch.tensor([], dtype=torch.float32).set_(held)
    else:
        values = torch.as_tensor(np.asarray(held))
    assert bool((values == 1.0).all())
    del held, values, other
    gc.collect()
    assert any(_inside(b, ptr) for b in small_pool._FREE_BLOCKS)  # back once nothing holds it


def test_recycled_empty_is_pooled_and_released(small_pool) -> None:
    t = recycled_empty((256, 128), torch.zeros(1))  # 128 KiB
    ptr = t.data_ptr()
    row = t[7]
    del t
    assert small_pool._FREE_BLOCKS == []  # the row still uses it
    del row
    assert len(small_pool._FREE_BLOCKS) == 1 and _inside(small_pool._FREE_BLOCKS[0], ptr)


def test_small_requests_and_other_dtypes_are_plain_allocations(small_pool) -> None:
    assert recycled(10, np.float64).shape == (10,)
    t = recycled_empty((2, 3), torch.zeros(1, dtype=torch.bfloat16))
    assert t.shape == (2, 3) and t.dtype == torch.bfloat16
    t = recycled_empty((4, 5), torch.zeros(1, dtype=torch.float64))  # 160 bytes: too small
    assert t.shape == (4, 5) and t.dtype == torch.float64
    del t
    assert small_pool._FREE_BLOCKS == []
