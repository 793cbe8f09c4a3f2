"""Peak memory of a piece of work, on a CPU (resident set) or a GPU (allocator)."""

from __future__ import annotations

import torch


class PeakMemory:
    """Measure the peak memory from now on.

    On a GPU: the allocator's peak minus what was allocated at the start. On a CPU: the growth of
    the process's peak resident set (Linux ``VmHWM``, reset at the start through
    ``/proc/self/clear_refs``) over its size at the start. Where ``/proc`` is missing, the
    process-wide ``ru_maxrss`` is used, which cannot be reset.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return
        self.start = status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
        except OSError:
            pass

    def peak(self) -> int:
        """Bytes: peak since the start, minus the start."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.start)
        hwm = status_kib("VmHWM") * 1024
        if hwm == 0:
            import resource

            hwm = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return max(hwm - self.start, 0)


def status_kib(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
