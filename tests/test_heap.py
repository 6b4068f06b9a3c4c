"""qemud.heap: the C heap is trimmed once guests settle, once per burst, and never when idle."""

from __future__ import annotations

import asyncio

from qemud.heap import HeapTrim


def test_a_burst_of_changes_trims_once_after_the_last() -> None:
    async def burst() -> tuple[int, int]:
        h = HeapTrim(delay=0.05)
        for _ in range(20):  # state changes 10 ms apart: each pushes the trim back
            h.soon()
            await asyncio.sleep(0.01)
        during = h.trims
        await asyncio.sleep(0.15)
        return during, h.trims

    assert asyncio.run(burst()) == (0, 1)


def test_no_change_no_trim() -> None:
    async def idle() -> int:
        h = HeapTrim(delay=0.01)
        await asyncio.sleep(0.1)
        return h.trims

    assert asyncio.run(idle()) == 0


def test_this_host_has_malloc_trim_and_it_runs() -> None:
    h = HeapTrim()
    assert h._trim is not None, "glibc's malloc_trim not found"
    assert h._trim(0) in (0, 1)


def test_outside_an_event_loop_it_does_nothing() -> None:
    h = HeapTrim()
    h.soon()
    assert h.trims == 0 and h._timer is None
