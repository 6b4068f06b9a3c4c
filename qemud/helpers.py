"""A guest's helper processes (swtpm, virtiofsd): started before QEMU, stopped after it.

The translator describes them (:class:`qemud.argv.HelperSpec`); this runs them, for the daemon
and for the conformance tool alike. Each helper gets its socket already bound and listening (an
inherited fd), so QEMU can connect the moment the helper is spawned: no waiting for the helper to
create it. Helpers run in their own session like QEMU, so they outlive a daemon restart and are
adopted with it (same pid, start time and command line, as QEMU is). Their end is seen through a
pidfd, never by waiting for the pid to vanish.
"""

from __future__ import annotations

import asyncio
import os
import select
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from qemud.argv import HelperSpec
from qemud.errors import HostError
from qemud.proc import ExitInfo, QemuProcess, adopt, log_tail, qmp_listener, spawn
from qemud.runas import RunAs, give

#: after SIGTERM, how long a helper has to end before SIGKILL
STOP_GRACE = 3.0


@dataclass
class Helper:
    """One running helper: its name in the guest, its process, its real command line."""

    name: str
    proc: QemuProcess
    argv: list[str]
    log: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.proc.pid, "create_time": self.proc.create_time,
                "argv": self.argv, "log": self.log}

    def describe(self, info: ExitInfo) -> str:
        """How it ended, in words ("swtpm-tpm0 killed by signal 9 (SIGKILL)")."""
        return info.describe().replace("QEMU", self.name, 1)

    def last_words(self) -> str:
        tail = log_tail(Path(self.log), lines=1)
        return tail[-1] if tail else ""


def start(specs: list[HelperSpec], runas: RunAs | None = None) -> list[Helper]:
    """Start every helper (as QEMU's user ``runas``, unless it is a privileged one); on any
    failure stop those already started and raise HostError. Each socket is QEMU's user's, so
    QEMU, running as that user, may connect."""
    started: list[Helper] = []
    try:
        for spec in specs:
            spec.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            listener = qmp_listener(spec.socket)
            try:
                if runas is not None:
                    os.chown(spec.socket, runas.uid, runas.gid, follow_symlinks=False)
                    if not spec.privileged:  # the helper reopens its log by path (swtpm --log)
                        give(spec.log, runas, create=True)
                fd = listener.fileno()
                argv = [a.replace("{fd}", str(fd)) for a in spec.argv]
                proc = spawn(argv, {}, spec.log, (fd,), None if spec.privileged else runas)
            finally:
                listener.close()  # the helper holds it now; QEMU connects to its path
            started.append(Helper(spec.name, proc, argv, str(spec.log)))
    except OSError as exc:
        stop_sync(started)
        raise HostError(f"cannot start helper {spec.name} ({spec.argv[0]}): {exc.strerror or exc}") from exc
    return started


def adopt_all(saved: list[dict[str, Any]]) -> tuple[list[Helper], list[str]]:
    """The helpers a runtime record names that are still those very processes, and the names of
    those that are not (gone, or their pid reused)."""
    found: list[Helper] = []
    lost: list[str] = []
    for h in saved:
        try:
            proc = adopt(int(h["pid"]), float(h["create_time"]), _live_argv(int(h["pid"]), list(h["argv"])))
        except (KeyError, TypeError, ValueError):
            proc = None
        if proc is None:
            lost.append(str(h.get("name", "?")))
        else:
            found.append(Helper(str(h["name"]), proc, list(h["argv"]), str(h.get("log", ""))))
    return found, lost


def _live_argv(pid: int, argv: list[str]) -> list[str]:
    """The command line the helper a record names runs with now: two helpers replace their first
    program with the real one in the same pid, so the pid's command line is no longer the one
    recorded at the start. Without this a daemon restart takes such a helper for gone and ends
    the guest. Anything but the program that replacement leaves keeps the recorded line (and
    adopt() refuses it).

    * passt's shim (``python -I passt_shim.py FD PASST ARGS...``) becomes ``PASST ARGS... --fd N``
      once QEMU connects;
    * a shell script helper (``/bin/bash -c '...; exec PROGRAM ARGS...'``: the D-Bus display's
      dbus-daemon) becomes what its last ``exec`` names."""
    passt = len(argv) >= 5 and argv[2].endswith("passt_shim.py")
    script = len(argv) == 3 and argv[1] == "-c" and " exec " in argv[2]
    if not passt and not script:
        return argv
    try:
        now = psutil.Process(pid).cmdline()
    except psutil.Error:
        return argv
    if passt and len(now) >= 2 and now[:-2] == argv[4:] and now[-2] == "--fd" and now[-1].isdigit():
        return now
    if script:
        try:
            if now == shlex.split(argv[2].rsplit(" exec ", 1)[1]):
                return now
        except ValueError:
            pass
    return argv


async def stop(helpers: list[Helper], grace: float = STOP_GRACE) -> None:
    """End every helper: SIGTERM, then SIGKILL after ``grace``; returns once all have ended."""
    async def one(h: Helper) -> None:
        h.proc.kill(signal.SIGTERM)
        try:
            await asyncio.wait_for(h.proc.wait(), grace)
        except asyncio.TimeoutError:
            h.proc.kill(signal.SIGKILL)
            await h.proc.wait()
    await asyncio.gather(*(one(h) for h in helpers), return_exceptions=True)
    for h in helpers:
        h.proc.close()


def stop_sync(helpers: list[Helper], grace: float = STOP_GRACE) -> None:
    """:func:`stop` for callers without an event loop (the conformance tool, a failed start)."""
    for h in helpers:
        h.proc.kill(signal.SIGTERM)
    for h in helpers:
        if not _ended(h.proc, grace):
            h.proc.kill(signal.SIGKILL)
            _ended(h.proc, 10.0)
        if h.proc.child is not None:
            try:
                h.proc.child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        h.proc.close()


def has_ended(proc: QemuProcess) -> bool:
    """Whether the process has ended already (its pidfd is readable), without waiting."""
    return _ended(proc, 0)


def _ended(proc: QemuProcess, timeout: float) -> bool:
    """Wait on the pidfd (readable once the process has ended, zombie or reaped)."""
    try:
        ready, _, _ = select.select([proc.pidfd], [], [], timeout)
    except (OSError, ValueError):
        return True
    return bool(ready)
