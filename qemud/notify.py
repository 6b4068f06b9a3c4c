"""systemd's notify protocol (Type=notify): READY, STATUS, RELOADING, STOPPING, WATCHDOG.

Without $NOTIFY_SOCKET (not started by systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterable


def _send(state: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon
    try:
        daemon.notify(state)
    except OSError:
        pass


def ready(status: str) -> None:
    _send(f"READY=1\nSTATUS={status}")


def reloading() -> None:
    # systemd 253+ wants MONOTONIC_USEC with RELOADING; older ones ignore it
    _send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> None:
    _send("STOPPING=1")


def status(text: str) -> None:
    _send(f"STATUS={text}")


def summary(states: Iterable[str]) -> str:
    """"3 running, 1 failed" (every state that has guests, in a fixed order)."""
    order = ["running", "paused", "starting", "stopping", "backoff", "crashed", "failed", "stopped"]
    c = Counter(states)
    parts = [f"{c[s]} {s}" for s in order if c[s]]
    return ", ".join(parts) if parts else "no guests"


async def watchdog() -> None:
    """Ping systemd's watchdog at half its interval, only when WatchdogSec= asks for it (the one
    periodic wake-up qemud has, and only then)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return
    interval = int(usec) / 2e6
    while True:
        _send("WATCHDOG=1")
        await asyncio.sleep(interval)
