"""The page's search slots (client/admission.py): a few at once, the rest served in arrival order, none forever."""

from __future__ import annotations

import threading
import time

import pytest

from client.admission import Overloaded, Slots

pytestmark = pytest.mark.unit


def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_waiters_get_a_freed_slot_in_arrival_order():
    slots = Slots(2, wait_s=10)
    slots.acquire()
    slots.acquire()  # both slots held
    served: list[int] = []

    def search(i: int) -> None:
        with slots:
            served.append(i)

    threads = []
    for i in range(5):  # each joins the queue only after the previous one did: a known arrival order
        threads.append(threading.Thread(target=search, args=(i,)))
        threads[-1].start()
        until(lambda n=i + 1: slots.waiting == n)
    slots.release()  # one slot: the waiters pass it on one after another, first come first served
    for t in threads:
        t.join(5)
    assert served == [0, 1, 2, 3, 4]
    slots.release()
    with slots, slots:  # both slots are free again
        assert slots.waiting == 0


def test_a_newcomer_never_overtakes_a_waiter():
    slots = Slots(1, wait_s=2)
    slots.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (slots.acquire(), got.set()))
    waiter.start()
    until(lambda: slots.waiting == 1)
    slots.release()  # handed to the waiter, never free in between
    assert got.wait(5)
    slots.wait_s = 0.05
    with pytest.raises(Overloaded):
        slots.acquire()  # the slot is the waiter's (it never gives it back here): a newcomer waits, too long
    waiter.join(5)


def test_a_search_that_waits_too_long_is_refused_and_leaves_the_queue():
    slots = Slots(1, wait_s=0.05)
    slots.acquire()
    with pytest.raises(Overloaded, match="overloaded: no search slot freed within 0.05 s"):
        slots.acquire()
    assert slots.waiting == 0
    slots.release()
    with slots:  # the slot came back, and the refused one took nothing
        pass


def test_a_slot_count_below_one_is_refused():
    with pytest.raises(ValueError):
        Slots(0, wait_s=1)


def test_the_usable_cpus_are_capped_by_a_containers_cpu_limit(tmp_path):
    import os

    from client.admission import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("100000 100000\n")  # cgroup v2: 1 CPU
    assert usable_cpus(v2) == 1
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU still runs one search at a time
    assert usable_cpus(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")  # no limit: the affinity
    assert usable_cpus(v2) == affinity
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(v1) == affinity
    assert usable_cpus(tmp_path / "none") == affinity  # no cgroup files at all
