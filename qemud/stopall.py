"""Host shutdown: every guest shut down gracefully, in parallel, within a timeout.

With a daemon running, it is asked (SIGUSR1) and keeps the guests down (it would otherwise
restart them by their policies); without one, this process presses every guest's power button
over QMP itself. Either way it waits on each QEMU's pidfd and, at the timeout, ends the QEMUs
that are left (QMP quit, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from pathlib import Path

from qemud import records
from qemud.events import ERR, INFO, NOTICE, WARNING, EventLog
from qemud.proc import adopt
from qemud.qmp import Qmp, QmpError


def daemon_pid(runtime: Path) -> int | None:
    """The running daemon's pid, from its locked pid file."""
    try:
        fd = os.open(runtime / "qemud.pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # nobody holds it: no daemon
        except OSError:
            pass
        data = os.read(fd, 32).split()
        return int(data[0]) if data else None
    finally:
        os.close(fd)


async def _qmp(path: str, command: str) -> None:
    q = Qmp("stop-guests")
    try:
        await q.connect(path, timeout=5)
        await q.execute(command, timeout=5)
    except QmpError:
        pass
    finally:
        await q.close()


async def _power_off(path: str) -> None:
    """Without a daemon: press the power button, and once the guest is down quit QEMU (it runs
    with -no-shutdown and would stay)."""
    q = Qmp("stop-guests")
    try:
        await q.connect(path, timeout=5)
        await q.execute("system_powerdown", timeout=5)
        async for ev in q.events():
            if ev.get("event") == "SHUTDOWN":
                await q.execute("quit", timeout=5)
                return
    except QmpError:
        pass
    finally:
        await q.close()


async def stop_guests(runtime: Path, timeout: float, log: EventLog) -> int:
    guests = []
    for _, rec in records.load_all(runtime / "domains"):
        if rec is None:
            continue
        proc = adopt(rec.pid, rec.create_time, rec.argv)
        if proc is not None:
            guests.append((rec, proc))
    pid = daemon_pid(runtime)
    log.emit("stopping-all", f"shutting down {len(guests)} guest(s)"
             + (f" through qemud pid {pid}" if pid else " (no qemud runs)"), NOTICE)
    if pid:
        os.kill(pid, signal.SIGUSR1)
    helpers = [] if pid else [asyncio.ensure_future(_power_off(rec.qmp)) for rec, _ in guests]
    waits = {asyncio.ensure_future(proc.wait()): (rec, proc) for rec, proc in guests}
    done, pending = await asyncio.wait(waits, timeout=timeout) if waits else (set(), set())
    for t in pending:
        rec, proc = waits[t]
        log.emit("shutdown-timeout", f"{rec.name}: not down after {timeout:g} s, ending QEMU", WARNING,
                 domain=rec.name, pid=rec.pid)
        await _qmp(rec.qmp, "quit")
    if pending:
        done2, still = await asyncio.wait(pending, timeout=5)
        for t in still:
            waits[t][1].kill(signal.SIGKILL)
            t.cancel()
    for h in helpers:
        h.cancel()
    for rec, proc in guests:
        proc.close()
    log.emit("stopped-all", f"{len(done)} guest(s) shut down, {len(pending)} ended after the timeout",
             INFO if not pending else ERR)
    return 0
