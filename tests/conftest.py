"""Shared test helpers: random SBM inputs and the kernel/sampler implementations to cover."""

from __future__ import annotations

import pytest
import torch

from sbm_transformer._numba import numba_enabled, numba_installed

#: Sparse backends every parity test runs against the dense reference.
SPARSE_BACKENDS = ["sparse-torch"] + (["sparse-numba"] if numba_enabled() else [])


@pytest.fixture(params=["torch", "numba"])
def sampler_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with the torch sampler and once with the numba sampler."""
    if request.param == "numba":
        if not numba_installed():
            pytest.skip("numba not installed")
        monkeypatch.setenv("SBMT_DISABLE_NUMBA", "0")
    else:
        monkeypatch.setenv("SBMT_DISABLE_NUMBA", "1")
    return str(request.param)


@pytest.fixture
def deadline():
    """Fail instead of hanging: the call under test must return within 60 s."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("the call hung")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def sbm_inputs(
    bsz: int,
    heads: int,
    n: int,
    m: int,
    k: int,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Memberships in (0, 1) and a block matrix summing to ``scale`` per head."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.rand(bsz, heads, n, k, generator=g, dtype=dtype)
    Z = torch.rand(bsz, heads, m, k, generator=g, dtype=dtype)
    B = torch.softmax(torch.randn(heads, k * k, generator=g, dtype=dtype), -1).reshape(heads, k, k)
    return Y, Z, B * scale


def padding_mask(bsz: int, m: int, seed: int = 0) -> torch.Tensor:
    """A (bsz, m) padding mask with a padded tail on even rows and a padded hole on odd rows."""
    mask = torch.zeros(bsz, m, dtype=torch.bool)
    for b in range(bsz):
        if b % 2 == 0:
            mask[b, m - 1 - b % 3 :] = True
        else:
            mask[b, (seed + b) % m] = True
    return mask
