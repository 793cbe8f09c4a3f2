"""Thread counts that follow the CPUs other processes leave free.

torch's and numba's parallel loops run on one OpenMP runtime (libgomp, loaded by torch). After a
parallel region its threads spin-wait (``GOMP_SPINCOUNT``, 300,000 spins by default) before they
sleep. Alone on a machine that makes small models fast; beside other busy processes the spinning
threads take the cores those processes need, and every parallel region waits for a thread that
is not scheduled. Measured on 2 cores (``sbmt bench contention``, docs/benchmarks.md): two demo
trainings at once ran 0.13x the speed of one alone each. ``OMP_WAIT_POLICY=PASSIVE`` cured that
but made the quiet machine 1.9x slower; shorter spins traded one for the other. Using only the
CPUs that are free gets both: :class:`AdaptiveThreads`, which the trainer runs.
"""

from __future__ import annotations

import os
import time


def describe() -> str:
    """One line for reports: the OpenMP wait settings of the environment."""
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    chosen = [f"{k}={os.environ[k]}" for k in names if k in os.environ]
    return ", ".join(chosen) or "OpenMP wait defaults"


def _machine_busy_ticks() -> int | None:
    """Clock ticks all CPUs spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle  # user .. steal; guest time is already in user


def _own_ticks() -> int | None:
    """Clock ticks this process ran (user + system, all threads; ``/proc/self/stat``)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


class AdaptiveThreads:
    """Follow the CPUs other processes leave free with torch's (and so numba's) thread count.

    Call :meth:`poll` often (the trainer calls it after every step); at most every ``interval``
    seconds it measures how many CPUs the rest of the machine kept busy since the last
    measurement (``/proc/stat`` minus this process's own time) and sets ``torch.set_num_threads``
    to the CPUs left, at least 1 and at most ``max_threads``. Two trainings on 2 cores then run
    one thread each instead of fighting over both (measured in ``sbmt bench contention``: a
    parallel region with more threads than free cores waits for a thread that is not
    scheduled). On a quiet machine it keeps ``max_threads``. Must be called from the thread that
    runs the model: OpenMP thread counts are per calling thread. Does nothing off Linux.
    """

    def __init__(self, max_threads: int | None = None, interval: float = 1.0) -> None:
        import torch

        self.max_threads = max_threads or torch.get_num_threads()
        self.interval = interval
        try:
            self.cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = os.cpu_count() or 1
        self.threads = self.initial = torch.get_num_threads()
        self.changes = 0
        self._lower = False  # the last measurement asked for fewer threads
        self._last = self._sample()

    def _sample(self) -> tuple[float, int, int] | None:
        busy, own = _machine_busy_ticks(), _own_ticks()
        return None if busy is None or own is None else (time.monotonic(), busy, own)

    def others(self) -> float | None:
        """CPUs the other processes kept busy since the last measurement; starts a new one.
        None off Linux or before a first measurement."""
        now = self._sample()
        before, self._last = self._last, now
        if before is None or now is None:
            return None
        ticks = (now[0] - before[0]) * os.sysconf("SC_CLK_TCK")
        if ticks <= 0:
            return None
        return max(0.0, ((now[1] - before[1]) - (now[2] - before[2])) / ticks)

    def poll(self) -> int:
        """Re-measure when ``interval`` has passed; returns the thread count in force."""
        if self._last is None or time.monotonic() - self._last[0] < self.interval:
            return self.threads
        others = self.others()
        if others is None:
            return self.threads
        # 0.3 of a CPU of slack: an editor's or a shell's bursts do not take a thread away
        want = max(1, min(self.max_threads, int(self.cpus - others + 0.3)))
        # fewer threads only when two measurements in a row ask for it: one busy second of
        # another process (a compile, a checkpoint) does not halve a lone training
        if want < self.threads and not self._lower:
            self._lower = True
            return self.threads
        self._lower = False
        if want != self.threads:
            import torch

            torch.set_num_threads(want)
            self.threads = want
            self.changes += 1
        return self.threads

    def restore(self) -> None:
        """Set torch's thread count back to what it was at construction."""
        if self.threads != self.initial:
            import torch

            torch.set_num_threads(self.initial)
            self.threads = self.initial

    def __enter__(self) -> AdaptiveThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
