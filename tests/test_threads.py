"""Thread counts: AdaptiveThreads follows the free CPUs; numba follows torch; the benchmark."""

from __future__ import annotations

import pytest
import torch

from sbm_transformer import AdaptiveThreads, SBMAttention, threads
from sbm_transformer._numba import numba_enabled
from sbm_transformer.bench_contention import ArmResult, arm_settings, markdown


class _Clock:
    """Fake /proc readings: ``others`` CPUs busy besides this process, one tick per 10 ms."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.t, self.busy, self.own, self.others = 0.0, 0, 0, 0.0
        monkeypatch.setattr(threads, "_machine_busy_ticks", lambda: self.busy)
        monkeypatch.setattr(threads, "_own_ticks", lambda: self.own)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)

    def advance(self, seconds: float, own_cpus: float = 1.0) -> None:
        self.t += seconds
        self.own += int(own_cpus * seconds * 100)
        self.busy += int((own_cpus + self.others) * seconds * 100)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_adaptive_threads_follow_the_free_cpus(monkeypatch, keep_threads) -> None:
    clock = _Clock(monkeypatch)
    torch.set_num_threads(4)
    gov = AdaptiveThreads(interval=1.0)
    gov.cpus = 4
    assert gov.poll() == 4  # no interval yet
    clock.advance(1.5)
    assert gov.poll() == 4  # quiet
    clock.others = 2.0
    clock.advance(1.5)
    assert gov.poll() == 4  # one busy second is not enough
    clock.advance(1.5)
    assert gov.poll() == 2 and torch.get_num_threads() == 2
    clock.others = 3.9
    clock.advance(1.5)
    assert gov.poll() == 2
    clock.advance(1.5)
    assert gov.poll() == 1  # never below one
    clock.others = 0.2  # a shell's burst: no thread taken; more threads at once
    clock.advance(1.5)
    assert gov.poll() == 4 and gov.changes == 3
    clock.others = 2.0
    clock.advance(0.5)
    assert gov.poll() == 4  # within the interval: not measured
    clock.advance(1.0)
    assert gov.poll() == 4
    clock.others = 0.0  # the burst ended: the request to lower is forgotten
    clock.advance(1.5)
    assert gov.poll() == 4
    clock.others = 2.0
    clock.advance(1.5)
    assert gov.poll() == 4
    gov.restore()
    assert torch.get_num_threads() == 4


def test_adaptive_threads_restores_on_exit(monkeypatch, keep_threads) -> None:
    clock = _Clock(monkeypatch)
    torch.set_num_threads(2)
    with AdaptiveThreads() as gov:
        gov.cpus = 2
        clock.others = 1.0
        for _ in range(2):
            clock.advance(2.0)
            gov.poll()
        assert gov.threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_adaptive_threads_without_proc_do_nothing(monkeypatch, keep_threads) -> None:
    monkeypatch.setattr(threads, "_machine_busy_ticks", lambda: None)
    gov = AdaptiveThreads(interval=0.0)
    assert gov.poll() == torch.get_num_threads() and gov.changes == 0


@pytest.mark.skipif(not numba_enabled(), reason="numba not installed")
def test_one_torch_thread_stays_one_after_the_numba_kernels(keep_threads) -> None:
    """numba's parallel loops used to reset the shared OpenMP thread count to all CPUs."""
    torch.set_num_threads(1)
    attn = SBMAttention(32, 2, 8, backend="sparse-numba")
    out, _ = attn(torch.randn(2, 50, 32, requires_grad=True))
    out.sum().backward()
    assert torch.get_num_threads() == 1
    import numba

    assert numba.get_num_threads() == 1


def test_contention_arms_and_report() -> None:
    env, n = arm_settings("package")
    assert n == 0 and "OMP_WAIT_POLICY" not in env
    env, n = arm_settings("passive")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and n >= 1
    env, n = arm_settings("spin=500")
    assert env["GOMP_SPINCOUNT"] == "500"
    with pytest.raises(ValueError, match="unknown arm"):
        arm_settings("turbo")
    with pytest.raises(ValueError, match="whole number"):
        arm_settings("spin=lots")
    r = ArmResult("package", alone=[10.0], busy=[6.0], two=[5.0, 4.0])
    table = markdown([r], "sbmt bench contention", "sbm", 80)
    assert "| package | 10.00 | 6.00 | 0.60x | 4.50 | 0.45x |" in table
