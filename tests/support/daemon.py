"""Run the real qemud daemon in a test: its event log parsed, waited on, and everything cleaned up.

A :class:`Daemon` owns a fresh directory under /tmp (short: unix socket paths must stay under
~100 bytes) holding::

    BASE/domains/   the --domains-dir the daemon watches
    BASE/state/     the --state-dir (SDIR/domains/<name>/{qmp.sock,qemu.pid,qemu.log,record.json})
    BASE/x/         scratch: files written before they are renamed in, consoles, sockets

Its stderr is read by a thread into :attr:`Daemon.lines` (every line, parsed when it is an event
line ``HH:MM:SS [error: |warning: ]MESSAGE  QEMUD_EVENT=... QEMUD_DOMAIN=...``); waiting is a
``threading.Condition`` woken by each new line, with a deadline, never a sleep.

:meth:`Daemon.close` (the fixture's teardown) always SIGKILLs the daemon and every QEMU it
started or adopted (found through SDIR/domains/*/qemu.pid, the records, the pids the log named
and any process whose command line names BASE), then removes BASE.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from qemud.events import parse_line as parse_event_line

import psutil

from tests.support.tinyguest import TinyGuest

QEMUD = Path(sys.executable).with_name("qemud")
#: who the daemon (root) runs QEMU as: its default, the sysusers.d user `make deps` creates
QEMU_USER = pwd.getpwnam("qemud")
QEMUD_NS = "http://qemud.org/xmlns/domain/1.0"



class DaemonError(AssertionError):
    """An expectation about the daemon's log was not met (the message carries the log tail)."""


@dataclass
class Event:
    """One line of the daemon's stderr. ``event`` is None for a line that is not an event line."""

    index: int  # position in Daemon.lines
    run: int  # which start of the daemon (1, 2, ...) wrote it
    received: float  # time.monotonic() when the reader thread got it
    raw: str
    stamp: str | None = None  # HH:MM:SS as logged
    level: str = ""  # "", "error" or "warning"
    message: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # QEMUD_X=... as X (upper case) -> value

    @property
    def event(self) -> str | None:
        return self.fields.get("EVENT")

    @property
    def domain(self) -> str | None:
        return self.fields.get("DOMAIN")

    @property
    def state(self) -> str | None:
        return self.fields.get("STATE")

    @property
    def pid(self) -> int | None:
        p = self.fields.get("PID")
        return int(p) if p is not None else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key.upper().removeprefix("QEMUD_"), default)

    def __getitem__(self, key: str) -> str:
        return self.fields[key.upper().removeprefix("QEMUD_")]

    def __str__(self) -> str:
        return self.raw


def parse_line(raw: str, index: int = 0, run: int = 0, received: float = 0.0) -> Event:
    ev = Event(index=index, run=run, received=received, raw=raw)
    parsed = parse_event_line(raw)
    if parsed is not None:
        ev.stamp, ev.level, ev.message, ev.fields = parsed
    return ev


def _matches(ev: Event, event: str | None, domain: str | None, fields: dict[str, Any],
             pred: Callable[[Event], bool] | None) -> bool:
    if ev.event is None:
        return False
    if event is not None and ev.event != event:
        return False
    if domain is not None and ev.domain != domain:
        return False
    for k, v in fields.items():
        if ev.get(k) != (None if v is None else str(v)):
            return False
    return pred is None or pred(ev)


class Daemon:
    """The real ``qemud --domains-dir D --state-dir S`` as a subprocess, for one test."""

    def __init__(self, extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.extra_env = env or {}
        self.base = Path(tempfile.mkdtemp(prefix="qd", dir="/tmp"))
        self.domains = self.base / "domains"
        self.state = self.base / "state"
        self.scratch = self.base / "x"
        for d in (self.domains, self.state, self.scratch):
            d.mkdir()
        # QEMU runs as the unprivileged qemud user (qemud.runas): it must pass through BASE to
        # its guest's directory under state/, and read the scratch files a test hands a guest
        self.base.chmod(0o711)
        self.scratch.chmod(0o755)
        os.chown(self.scratch, QEMU_USER.pw_uid, QEMU_USER.pw_gid)  # consoles, sockets QEMU makes
        #: root's own scratch (0755): for files that must pass qemud's StrictModes (domain files
        #: reached through symlinks), which a directory QEMU's user owns does not
        self.root_scratch = self.base / "r"
        self.root_scratch.mkdir(mode=0o755)
        self.extra_args = list(extra_args or [])
        self.lines: list[Event] = []
        self.cursor = 0  # where the next wait_for starts looking (see wait_for)
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._eof = True  # the current run's stderr has ended (the daemon exited)
        self._asked_stop = False  # stop() sent SIGTERM to the current run
        self._closed = False

    # ---- the process -----------------------------------------------------------------------
    @property
    def argv(self) -> list[str]:
        return [str(QEMUD), "--domains-dir", str(self.domains), "--state-dir", str(self.state),
                "--log-target", "stderr", *self.extra_args]

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> Event | None:
        """Start the daemon (again, with the same directories). Returns its `ready` event."""
        assert not self.running, "the daemon already runs"
        self._join_reader()
        self._asked_stop = False
        with self._cond:
            self.runs += 1
            run = self.runs
            self._eof = False
            start_at = len(self.lines)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env})
        self._reader = threading.Thread(target=self._read, args=(self.proc, run), daemon=True,
                                        name=f"qemud-stderr-{run}")
        self._reader.start()
        if not wait_ready:
            return None
        return self.wait_for("ready", timeout=timeout, after=start_at)

    restart = start

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self, timeout: float = 10.0) -> None:
        """SIGKILL the daemon (its guests keep running) and reap it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self._reap(timeout)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM: the daemon exits and leaves its guests running. Returns its exit status."""
        assert self.proc is not None
        self._asked_stop = True
        self.proc.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def _reap(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
            raise DaemonError(f"qemud pid {self.proc.pid} did not exit within {timeout:g} s\n{self.tail()}")
        self._join_reader()
        return rc

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(10)
            self._reader = None

    def _read(self, proc: subprocess.Popen[bytes], run: int) -> None:
        assert proc.stderr is not None
        try:
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self._cond:
                    self.lines.append(parse_line(line, len(self.lines), run, time.monotonic()))
                    self._cond.notify_all()
        finally:
            with contextlib.suppress(OSError):
                proc.stderr.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    # ---- the log -----------------------------------------------------------------------------
    def mark(self) -> int:
        """Make the next wait_for look only at lines from now on; returns that position."""
        with self._cond:
            self.cursor = len(self.lines)
            return self.cursor

    def events(self, event: str | None = None, domain: str | None = None, after: int = 0,
               pred: Callable[[Event], bool] | None = None, **fields: Any) -> list[Event]:
        """The event lines so far that match (all of them from ``after`` on)."""
        with self._cond:
            return [e for e in self.lines[after:] if _matches(e, event, domain, fields, pred)]

    def wait_for(self, event: str | None = None, domain: str | None = None, timeout: float = 30.0,
                 after: int | None = None, pred: Callable[[Event], bool] | None = None,
                 **fields: Any) -> Event:
        """The first event line at or after ``after`` (default: the cursor, i.e. just after what
        the previous wait_for returned, or the last mark()) that matches; waits for new lines
        until ``timeout`` seconds have passed. Extra keyword arguments match fields
        (``pid=123``, ``state="running"``). Moves the cursor past the line returned.
        Fails at once when the daemon exits before such a line came."""
        start = self.cursor if after is None else after
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    ev = self.lines[i]
                    i += 1
                    if _matches(ev, event, domain, fields, pred):
                        self.cursor = ev.index + 1
                        return ev
                if self._eof:
                    what = "exited" if self.proc is None or self.proc.poll() is not None else "closed its stderr"
                    why = ""
                    last = next((e for e in reversed(self.lines) if e.event), None)
                    if last is not None and last.event == "daemon-stopping" and not self._asked_stop:
                        why = " after a SIGTERM/SIGINT the test did not send"
                    raise DaemonError(f"qemud {what}{why} (status {self.proc.poll() if self.proc else None}) "
                                      f"before {self._want(event, domain, fields)}\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonError(f"no {self._want(event, domain, fields)} within {timeout:g} s "
                                      f"(looked from line {start})\n{self.tail()}")
                self._cond.wait(left)

    def assert_no(self, event: str | None = None, domain: str | None = None, within: float = 1.0,
                  after: int | None = None, pred: Callable[[Event], bool] | None = None,
                  **fields: Any) -> None:
        """Fail if a matching line is (or arrives within ``within`` seconds) at or after ``after``
        (default: the cursor). Waiting out a quiet period is the point here."""
        start = self.cursor if after is None else after
        deadline = time.monotonic() + within
        with self._cond:
            while True:
                found = [e for e in self.lines[start:] if _matches(e, event, domain, fields, pred)]
                if found:
                    raise DaemonError(f"unexpected {self._want(event, domain, fields)}: {found[0].raw}\n"
                                      f"{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    @staticmethod
    def _want(event: str | None, domain: str | None, fields: dict[str, Any]) -> str:
        parts = [f"event={event}" if event else "any event"]
        if domain:
            parts.append(f"domain={domain}")
        parts += [f"{k}={v}" for k, v in fields.items()]
        return " ".join(parts)

    def tail(self, n: int = 60) -> str:
        with self._cond:
            lines = self.lines[-n:]
        return "--- qemud log (last %d lines) ---\n%s" % (len(lines), "\n".join(f"[{e.run}] {e.raw}" for e in lines))

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(f"[{e.run}] {e.raw}" for e in self.lines)

    # ---- the domains directory -----------------------------------------------------------------
    def path(self, filename: str) -> Path:
        return self.domains / filename

    def drop(self, filename: str, xml: str) -> Path:
        """Write a domain file elsewhere, then rename it into the domains directory (atomic)."""
        tmp = self.scratch / f".{filename}.{uuidlib.uuid4().hex[:8]}"
        tmp.write_text(xml)
        dest = self.domains / filename
        os.rename(tmp, dest)
        return dest

    def remove(self, filename: str) -> None:
        (self.domains / filename).unlink()

    # ---- guests' runtime files -----------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.state / "domains" / name

    def qemu_pid(self, name: str) -> int:
        """The pid in SDIR/domains/NAME/qemu.pid (QEMU's own pid file)."""
        return int((self.run_dir(name) / "qemu.pid").read_text().strip())

    def record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.run_dir(name) / "record.json").read_text())
        except (OSError, ValueError):
            return None

    def qemu_pids(self) -> set[int]:
        """Every QEMU pid this daemon's runs may have left: pid files, records, log lines, and
        processes whose command line names this test's directory."""
        pids: set[int] = set()
        for f in (self.state / "domains").glob("*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(f.read_text().strip()))
        for f in (self.state / "domains").glob("*/record.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                pids.add(int(json.loads(f.read_text())["pid"]))
        for e in self.events():
            if e.event in ("spawned", "adopted") and e.pid:
                pids.add(e.pid)
        base = str(self.base)
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError, IndexError):
                cmd = p.info["cmdline"]
                if cmd and "qemu-system" in cmd[0] and any(base in a for a in cmd):
                    pids.add(p.info["pid"])
        return pids

    def _ours(self, pid: int) -> psutil.Process | None:
        """The process ``pid`` if it is a QEMU of this test (its command line names BASE)."""
        try:
            p = psutil.Process(pid)
            cmd = p.cmdline()
        except (psutil.Error, OSError):
            return None
        if cmd and "qemu-system" in cmd[0] and any(str(self.base) in a for a in cmd):
            return p
        return None

    # ---- teardown ----------------------------------------------------------------------------
    def close(self) -> list[int]:
        """Kill the daemon and every QEMU it left, remove the directories. Returns the QEMU pids
        that were still alive (not zombies) and had to be killed."""
        if self._closed:
            return []
        self._closed = True
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._join_reader()
        killed: list[int] = []
        procs: list[psutil.Process] = []
        for pid in sorted(self.qemu_pids()):
            p = self._ours(pid)
            if p is None:
                continue
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    killed.append(pid)
                p.kill()
                procs.append(p)
        # dead is enough: a zombie re-parented to PID 1 is reaped whenever PID 1 gets to it
        deadline = time.monotonic() + 10
        for p in procs:
            while time.monotonic() < deadline:
                try:
                    if p.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.NoSuchProcess:
                    break
                with contextlib.suppress(psutil.TimeoutExpired):
                    p.wait(0.05)
        shutil.rmtree(self.base, ignore_errors=True)
        return killed

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- processes ------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a process that has not ended (a zombie has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- the guest's console --------------------------------------------------------------------

def wait_file_contains(path: Path, needle: bytes | str, timeout: float = 30.0, start: int = 0,
                       alive: Callable[[], None] | None = None) -> int:
    """Wait until ``path`` holds ``needle`` at or after byte ``start``; returns the offset just
    past it. Polls the file (QEMU writes it; there is nothing to be woken by) with a deadline.
    ``alive`` is called on each round and may raise to give up early."""
    if isinstance(needle, str):
        needle = needle.encode()
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        i = data.find(needle, start)
        if i >= 0:
            return i + len(needle)
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} did not appear in {path} within {timeout:g} s; "
                                 f"its end: {data[-800:]!r}")
        time.sleep(0.05)


class Console:
    """The guest's serial console on a unix socket QEMU listens on (``serial='unix'``)."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"cannot connect to the console {path} within {timeout:g} s") from None
                time.sleep(0.05)
        self.sock = s
        self.data = b""

    def read_until(self, pattern: bytes, timeout: float = 30.0) -> bytes:
        """Read until the regex ``pattern`` matches what came so far; returns it all."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not rx.search(self.data):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen on the console within {timeout:g} s; "
                                     f"got {self.data[-800:]!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(f"console closed before {pattern!r}; got {self.data[-800:]!r}")
            self.data += chunk
        return self.data

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


#: a guest whose kernel does not exist: QEMU exits at once; two failed starts 1 s apart, then
#: `failed` (for tests of what the daemon reports while something else is wrong)
BROKEN = """<domain type='qemu'>
  <name>{name}</name>
  <metadata><qemud:settings xmlns:qemud="http://qemud.org/xmlns/domain/1.0">
    <qemud:restart policy="always" max-retries="2" backoff="1"/></qemud:settings></metadata>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/nonexistent/vmlinuz</kernel></os>
  <devices><memballoon model='none'/></devices>
</domain>"""


# ---- domain XML for the tiny guest ----------------------------------------------------------

def domain_xml(guest: TinyGuest, name: str, *, uuid: str | None = None, memory_mib: int = 256,
               acpi: bool = True, serial: str | None = None, serial_path: Path | str | None = None,
               serial_log: Path | str | None = None, serial_append: bool = True,
               on_poweroff: str | None = None, on_reboot: str | None = None, on_crash: str | None = None,
               autostart: bool | None = None, restart: dict[str, Any] | None = None,
               shutdown_timeout: int | None = None, broken: bool = False, description: str | None = None,
               cmdline: str = "console=ttyS0 quiet panic=-1") -> str:
    """A domain for the tiny test guest (TCG: type='qemu').

    serial: "file" (``serial_path`` is a file QEMU writes the console to; the default when a
    ``serial_path`` is given), "unix" (QEMU listens
    on ``serial_path``; ``serial_log`` additionally logs the console output to a file) or None.
    restart: attributes of <qemud:restart> (policy, max-retries, backoff, max-backoff).
    broken: a disk whose image does not exist, so QEMU exits at once.
    """
    if serial is None and serial_path is not None:
        serial = "file"
    settings = []
    if autostart is not None:
        settings.append(f"<qemud:autostart>{'yes' if autostart else 'no'}</qemud:autostart>")
    if restart:
        attrs = " ".join(f"{k}={quoteattr(str(v))}" for k, v in restart.items())
        settings.append(f"<qemud:restart {attrs}/>")
    if shutdown_timeout is not None:
        settings.append(f"<qemud:shutdown timeout='{shutdown_timeout}'/>")
    metadata = ""
    if settings:
        metadata = (f"  <metadata>\n    <qemud:settings xmlns:qemud='{QEMUD_NS}'>\n      "
                    + "\n      ".join(settings) + "\n    </qemud:settings>\n  </metadata>\n")
    lifecycle = "".join(f"  <{tag}>{v}</{tag}>\n" for tag, v in
                        (("on_poweroff", on_poweroff), ("on_reboot", on_reboot), ("on_crash", on_crash)) if v)
    devices = []
    if serial == "file":
        assert serial_path is not None
        app = " append='on'" if serial_append else ""
        devices.append(f"<serial type='file'><source path={quoteattr(str(serial_path))}{app}/>"
                       f"<target port='0'/></serial>")
    elif serial == "unix":
        assert serial_path is not None
        log = ""
        if serial_log is not None:
            log = f"<log file={quoteattr(str(serial_log))} append='{'on' if serial_append else 'off'}'/>"
        devices.append(f"<serial type='unix'><source mode='bind' path={quoteattr(str(serial_path))}/>"
                       f"<target port='0'/>{log}</serial>")
    elif serial is not None:
        raise ValueError(f"serial kind {serial!r}")
    if broken:
        devices.append("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                       "<source file='/nonexistent/qemud-test/missing.img'/>"
                       "<target dev='vda' bus='virtio'/></disk>")
    devices.append("<memballoon model='none'/>")
    return (
        "<domain type='qemu'>\n"
        f"  <name>{name}</name>\n"
        + (f"  <uuid>{uuid}</uuid>\n" if uuid else "")
        + (f"  <description>{description}</description>\n" if description else "")
        + metadata
        + f"  <memory unit='MiB'>{memory_mib}</memory>\n"
        "  <vcpu>1</vcpu>\n"
        "  <os>\n"
        "    <type arch='x86_64' machine='pc'>hvm</type>\n"
        f"    <kernel>{guest.kernel}</kernel>\n"
        f"    <initrd>{guest.initrd}</initrd>\n"
        f"    <cmdline>{cmdline}</cmdline>\n"
        "  </os>\n"
        + ("  <features><acpi/></features>\n" if acpi else "")
        + lifecycle
        + "  <devices>\n    "
        + "\n    ".join(devices)
        + "\n  </devices>\n</domain>\n"
    )


@contextlib.contextmanager
def running_daemon(**kw: Any) -> Iterator[Daemon]:
    """A started daemon (ready), always cleaned up."""
    d = Daemon(**kw)
    try:
        d.start()
        yield d
    finally:
        d.close()
