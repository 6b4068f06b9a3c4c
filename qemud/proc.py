"""The thin seam between the supervisor and the OS: QEMU processes.

A QEMU qemud started is its child; one it adopted after a restart is not. Either way its end is
seen through a pidfd (readable once the process has exited, zombie or reaped), never by waiting
for the PID to vanish: this machine's PID 1 reaps others' children only every second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import resource
import signal
import socket
import subprocess
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from qemud.errors import HostError
from qemud.runas import RunAs, open_regular


@dataclass(frozen=True)
class ExitInfo:
    exitcode: int | None = None  # exit status, when it ended by exiting
    signal: int | None = None  # the signal that killed it
    known: bool = True  # False for an adopted process: its status went to someone else

    def describe(self) -> str:
        if not self.known:
            return "QEMU ended (status unknown: it was adopted, not qemud's child)"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"QEMU killed by signal {self.signal} ({name})"
        return f"QEMU exited with status {self.exitcode}"

    @property
    def clean(self) -> bool:
        return self.known and self.signal is None and self.exitcode == 0


class QemuProcess:
    """A running QEMU: its pid, its start time (identity), and a way to await its end."""

    def __init__(self, pid: int, create_time: float, child: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.create_time = create_time
        self.child = child
        self.pidfd = os.pidfd_open(pid)
        self._exit: ExitInfo | None = None
        self._waiter: asyncio.Future[ExitInfo] | None = None

    @property
    def adopted(self) -> bool:
        return self.child is None

    async def wait(self) -> ExitInfo:
        """Until the process has ended; its exit status when it is our child. Any number of
        tasks may wait at once (one watches a helper while another stops it): they share one
        wait, as the event loop has one reader per fd."""
        if self._exit is not None:
            return self._exit
        if self._waiter is None:
            self._waiter = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._waiter)

    async def _wait(self) -> ExitInfo:
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        loop.add_reader(self.pidfd, lambda: ended.done() or ended.set_result(None))
        try:
            await ended
        finally:
            loop.remove_reader(self.pidfd)
        self._exit = self._collect()
        return self._exit

    def _collect(self) -> ExitInfo:
        if self.child is not None:
            rc = self.child.wait()
            return ExitInfo(signal=-rc) if rc < 0 else ExitInfo(exitcode=rc)
        return ExitInfo(known=False)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process through its pidfd (never a recycled PID)."""
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()  # its reader goes before the fd does
        try:
            os.close(self.pidfd)
        except OSError:
            pass


#: systemd's messages to the daemon itself: a child that finds them talks to systemd as if it were
#: the service (the D-Bus display's dbus-daemon sends READY=1, which systemd refuses and logs)
_DAEMON_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def spawn(argv: list[str], env: dict[str, str], log_path: Path, pass_fds: tuple[int, ...] = (),
          runas: RunAs | None = None, memlock: int = 0) -> QemuProcess:
    """Start QEMU in its own session (so the daemon's signals and death do not reach it), with
    stdout/stderr appended to its log file (a pipe would break when the daemon restarts), as the
    unprivileged ``runas`` user when given (its groups: ``kvm``). The log file is root's, opened
    without following a symlink a QEMU may have planted in its directory."""
    if runas is not None:
        argv = [*runas.argv_prefix(), *argv]
    fd = open_regular(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with open(fd, "ab", buffering=0) as log, _memlock_limit(memlock if runas is not None else 0):
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env={**{k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY_ENV}, **env},
                                 start_new_session=True, close_fds=True,
                                 pass_fds=pass_fds)
    try:
        ctime = psutil.Process(child.pid).create_time()
    except psutil.Error:
        ctime = 0.0
    return QemuProcess(child.pid, ctime, child)


@contextlib.contextmanager
def _memlock_limit(need: int) -> Iterator[None]:
    """RLIMIT_MEMLOCK of at least ``need`` bytes for a child forked meanwhile (it inherits the
    limit): an unprivileged QEMU with <locked/> may lock its memory, as libvirt sets it. Root
    (qemud) may raise the limit; its own is put back after the fork."""
    if need <= 0:
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if old[0] == resource.RLIM_INFINITY or old[0] >= need:
        yield
        return
    hard = old[1] if old[1] == resource.RLIM_INFINITY or old[1] >= need else need
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (need, hard))
    except (ValueError, OSError) as exc:  # the translator checks this; a host changed since
        raise HostError(f"cannot let QEMU lock {need >> 20} MiB (<memoryBacking><locked/>): {exc}") from exc
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, old)


def adopt(pid: int, create_time: float, argv: list[str]) -> QemuProcess | None:
    """The QEMU a record names, if that very process still runs: same pid, same start time,
    same command line. Anything else (gone, a zombie, a recycled pid) is None."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - create_time) > 0.01:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        if p.cmdline() != argv:
            return None
        proc = QemuProcess(pid, create_time, None)
    except (psutil.Error, OSError):
        return None
    return proc


def log_tail(path: Path, lines: int = 10, max_bytes: int = 16384) -> list[str]:
    """The last lines of QEMU's log (its stderr)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    tail = deque((ln.decode(errors="replace").rstrip() for ln in data.splitlines()), maxlen=lines)
    return [ln for ln in tail if ln]


def qmp_listener(path: Path) -> socket.socket:
    """The QMP socket, bound and listening before QEMU starts, handed to QEMU as an fd: qemud can
    connect at once (the connection waits in the backlog until QEMU accepts), no retry loop."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        s.listen(4)
    except OSError:
        s.close()
        raise
    return s


def qmp_fd_argv(argv: list[str], fd: int) -> list[str]:
    """argv with the QMP chardev's path replaced by an inherited listening fd."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "-chardev" and out[i + 1].startswith("socket,id=qmp,"):
            out[i + 1] = f"socket,id=qmp,fd={fd},server=on,wait=off"
            return out
    raise ValueError("no QMP chardev in the command line")


def pidfile_holder(path: Path) -> int | None:
    """The pid of a QEMU that holds this guest's pid file lock (a live QEMU for the guest), or
    None. QEMU locks its -pidfile for its whole life."""
    try:
        # QEMU's user may write in the guest's directory: never follow a link, never block on a FIFO
        fd = open_regular(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            return int(os.pread(fd, 32, 0).split()[0])
        except (ValueError, IndexError, OSError):
            return -1
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
