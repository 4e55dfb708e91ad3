"""How many searches the page runs at once, and in which order the rest wait: arrival order.

With every request thread searching at once, a search's stages queue separately at the GIL, at Triton and
at Milvus, and under load some searches lose at each of them while others win: the tail (p99 / p50) blows
up (bench/results/service.md). A few searches at a time keep the cores busy, and the others are served
first come, first served. A search that cannot start within its wait gets an answer saying so instead of
queueing without end.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from pathlib import Path


def _cpu_quota(cgroup: Path) -> tuple[str, str] | None:
    """(quota, period) of this process's cgroup: v2's cpu.max, else v1's cfs files; None when neither is there."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return quota, period
    except (OSError, ValueError):
        pass
    try:
        return ((cgroup / "cpu" / "cpu.cfs_quota_us").read_text().split()[0],
                (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip())
    except (OSError, IndexError):
        return None


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup's CPU quota (a container's CPU limit,
    which the affinity does not show: a pod limited to 2 CPUs on a 64-core node sees 64)."""
    cpus = len(os.sched_getaffinity(0))
    limit = _cpu_quota(cgroup)
    if limit is None or limit[0] in ("max", "-1"):  # no cgroup files, or no quota
        return cpus
    return max(1, min(cpus, math.ceil(int(limit[0]) / int(limit[1]))))


class Overloaded(RuntimeError):
    """No slot freed within the wait: more searches arrive than the service answers."""


class Slots:
    """At most `size` holders at once; the others wait in arrival order, each at most `wait_s` seconds.

    A freed slot passes straight to the longest waiter (a newcomer never overtakes it). Used as `with slots:`
    from worker threads.
    """

    def __init__(self, size: int, wait_s: float):
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self.size, self.wait_s = size, wait_s
        self._free = size
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(self.wait_s):
            return
        with self._lock:
            if turn.is_set():  # handed a slot as the wait ran out: it is ours
                return
            self._waiters.remove(turn)
            waiting = len(self._waiters)
        raise Overloaded(f"the page is overloaded: no search slot freed within {self.wait_s:g} s "
                         f"({self.size} searches run at once, {waiting} more waiting)")

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the slot changes hands without being free
            else:
                self._free += 1

    def __enter__(self) -> Slots:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
