"""How many CPU cores other processes leave free right now, measured without importing torch.

The command line reads this before torch loads, to choose OpenMP's wait policy (libgomp reads
`OMP_WAIT_POLICY` once, when it is loaded) and torch's thread count. An OpenMP parallel region
ends when its slowest thread does: a thread that shares its core with another busy process runs
late in every region, and a thread that spins while it waits burns the time slice the late one
needed. On an idle machine the opposite holds: every thread has its core, and spinning saves the
wake-up at the end of each of a step's hundreds of small regions (bench/threads.py,
docs/experiments/training-speed.md).

The measure is what the CPUs did in the last fraction of a second, not the load average: the
1-minute load average still counts a trustgen command that ended a few seconds ago, so a second
command started after it would have taken a busy machine for an idle one's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.2  # long enough for a few scheduler ticks on every core, short beside any command


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's first line (Linux only)."""
    try:
        fields = [int(x) for x in PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def busy_cores(sample_seconds: float = SAMPLE_SECONDS) -> float:
    """Cores' worth of CPU time other processes used over the next `sample_seconds` (this one
    sleeps meanwhile); where /proc/stat is missing (macOS, Windows), the 1-minute load average,
    and 0 where there is neither."""
    before = _cpu_times()
    if before is None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    time.sleep(sample_seconds)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return 0.0
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


def idle_cores(busy: float | None = None) -> int:
    """The usable cores that other processes leave idle (at least one), given `busy` cores of
    their work (measured now when not given)."""
    cores = usable_cores()
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, int(cores - busy + 0.5)))


__all__ = ["busy_cores", "idle_cores", "usable_cores"]
