"""Helpers for the benchmarks: one qemud daemon of our own, bare QEMU started by hand, the machine.

Everything here starts its own processes and remembers their pids; cleanup kills only those
(and QEMUs whose command line names our own temporary directory), never by a name pattern.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
QEMUD = BIN / "qemud"
QEMUCTL = BIN / "qemuctl"

#: Where the daemon's and qemuctl's bytecode goes. An installed qemud has its .pyc files (pip and
#: dpkg compile at install); a source tree run with PYTHONDONTWRITEBYTECODE set (as in this
#: environment) has none, and every daemon start compiled all of qemud again: about 80 ms of
#: its start, 3 ms of every qemuctl. A cache of their own keeps the source tree clean.
PYCACHE = ROOT / ".cache" / "bench-pyc"


def py_env(**extra: str) -> dict[str, str]:
    """The environment of the daemon and qemuctl: this one, with a bytecode cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(PYCACHE), **extra}


def warm_bytecode() -> None:
    """Compile qemud, and what the daemon and qemuctl import, into PYCACHE before measuring."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "qemud")], env=py_env(),
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-c", "import qemud.daemon, qemud.control, qemud.cli.qemuctl"],
                   env=py_env(), check=True)



# ---- statistics ----------------------------------------------------------------------------------
def stats(xs: list[float]) -> tuple[float, float, float]:
    return (min(xs), statistics.median(xs), max(xs)) if xs else (float("nan"),) * 3


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


# ---- domain files --------------------------------------------------------------------------------
def tiny_xml(name: str, shutdown_timeout: float | None = None) -> str:
    """A 32 MiB guest without disks: SeaBIOS finds nothing to boot and idles."""
    meta = ""
    if shutdown_timeout is not None:
        meta = ("<metadata><qemud:settings xmlns:qemud='http://qemud.org/xmlns/domain/1.0'>"
                f"<qemud:shutdown timeout='{shutdown_timeout:g}'/></qemud:settings></metadata>")
    return f"""<domain type='qemu'>
  <name>{name}</name>{meta}
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><memballoon model='none'/></devices>
</domain>
"""


def linux_xml(name: str, kernel: Path, initrd: Path) -> str:
    """The tiny Linux test guest: it honours the ACPI power button (busybox acpid)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# ---- the daemon ----------------------------------------------------------------------------------
@dataclass
class Ev:
    t: float  # time.monotonic() on arrival in the reader thread
    event: str
    domain: str | None
    fields: dict[str, str] = field(default_factory=dict)


def parse_event(line: str) -> tuple[str, str | None, dict[str, str]] | None:
    from qemud.events import parse_line
    parsed = parse_line(line)
    if parsed is None:
        return None
    fields = parsed[3]
    return fields.get("EVENT", ""), fields.get("DOMAIN"), fields


class Daemon:
    """``qemud --domains-dir B/domains --state-dir B/state --log-target stderr`` of our own."""

    def __init__(self, base: Path, debounce: float | None = None) -> None:
        self.base = base
        self.domains = base / "domains"
        self.state = base / "state"
        self.scratch = base / "x"
        for d in (self.domains, self.state, self.scratch):
            d.mkdir(parents=True, exist_ok=True)
        self.config: Path | None = None
        if debounce is not None:
            self.config = base / "qemud.conf"
            self.config.write_text(f"[daemon]\ndebounce = {debounce}\n")
        self.events: list[Ev] = []
        self.raw: list[str] = []
        self.cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._reader: threading.Thread | None = None
        self.qemu_pids_seen: set[int] = set()

    def start(self, wait_ready: bool = True, timeout: float = 120) -> float:
        """Start the daemon; returns the time (s) from Popen to its `ready` event."""
        argv = [str(QEMUD), "--domains-dir", str(self.domains), "--state-dir", str(self.state),
                "--log-target", "stderr"]
        if self.config:
            argv[1:1] = ["--config", str(self.config)]
        mark = self.mark()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     env=py_env(PYTHONUNBUFFERED="1"))
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        if not wait_ready:
            return 0.0
        ev = self.wait("ready", after=mark, timeout=timeout)
        return ev.t - self.started_at

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            now = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            p = parse_event(line)
            with self.cond:
                self.raw.append(line)
                if p is not None:
                    ev = Ev(now, p[0], p[1], p[2])
                    self.events.append(ev)
                    if ev.event in ("spawned", "adopted") and "PID" in ev.fields:
                        with contextlib.suppress(ValueError):
                            self.qemu_pids_seen.add(int(ev.fields["PID"]))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def mark(self) -> int:
        with self.cond:
            return len(self.events)

    def wait(self, event: str, domain: str | None = None, after: int = 0, timeout: float = 60) -> Ev:
        deadline = time.monotonic() + timeout
        i = after
        with self.cond:
            while True:
                while i < len(self.events):
                    ev = self.events[i]
                    i += 1
                    if ev.event == event and (domain is None or ev.domain == domain):
                        return ev
                if self.proc is not None and self.proc.poll() is not None and self._reader_done():
                    raise RuntimeError(f"qemud exited before {event} {domain}\n" + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no {event} {domain or ''} within {timeout} s\n" + self.tail())
                self.cond.wait(min(left, 0.5))

    def wait_all(self, event: str, names: set[str], after: int, timeout: float = 300) -> float:
        """Wait until every domain in ``names`` logged ``event`` after ``after``; the last one's time."""
        deadline = time.monotonic() + timeout
        left_names = set(names)
        last = 0.0
        i = after
        with self.cond:
            while left_names:
                while i < len(self.events):
                    ev = self.events[i]
                    i += 1
                    if ev.event == event and ev.domain in left_names:
                        left_names.discard(ev.domain)
                        last = ev.t
                left = deadline - time.monotonic()
                if not left_names:
                    break
                if left <= 0:
                    raise RuntimeError(f"{len(left_names)} of {len(names)} without {event} within {timeout} s\n"
                                       + self.tail())
                self.cond.wait(min(left, 0.5))
        return last

    def _reader_done(self) -> bool:
        return self._reader is None or not self._reader.is_alive()

    def tail(self, n: int = 30) -> str:
        with self.cond:
            return "\n".join(self.raw[-n:])

    def drop(self, name: str, xml: str) -> float:
        """Write the file aside, rename it in; returns time.monotonic() just before the rename."""
        tmp = self.scratch / f".{name}.xml"
        tmp.write_text(xml)
        t = time.monotonic()
        os.rename(tmp, self.domains / f"{name}.xml")
        return t

    def qemu_pid(self, name: str) -> int:
        return int((self.state / "domains" / name / "qemu.pid").read_text().strip())

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(QEMUCTL), "--state-dir", str(self.state), *args], capture_output=True,
                              text=True, check=check, timeout=600, env=py_env())

    def list_json(self) -> list[dict]:
        return json.loads(self.ctl("list", "--json").stdout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(10)

    def cpu(self) -> float:
        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system


def our_qemus(base: Path) -> list[psutil.Process]:
    """QEMU processes whose command line names our own temporary directory ``base``."""
    out = []
    b = str(base)
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError, IndexError):
            cmd = p.info["cmdline"]
            if cmd and "qemu-system" in cmd[0] and any(b in a for a in cmd):
                out.append(p)
    return out


def kill_ours(base: Path, extra_pids: set[int] = frozenset()) -> int:
    """SIGKILL our QEMUs (found by our directory in their command line) and wait for them."""
    procs = our_qemus(base)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


# ---- bare QEMU -----------------------------------------------------------------------------------
class RawQMP:
    """The least a client can do: one unix socket, JSON lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def recv_obj(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def cmd(self, name: str) -> dict:
        self.sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            obj = self.recv_obj()
            if "return" in obj or "error" in obj:
                return obj


def bare_argv(name: str, state: Path) -> tuple[list[str], Path, dict[str, str]]:
    """The argv qemud builds for the 32 MiB guest, paused (-S): the project's own code path."""
    from qemud.argv import build_argv
    from qemud.caps import probe
    from qemud.domain import parse_domain
    from qemud.paths import GuestPaths

    d = parse_domain(tiny_xml(name).encode(), f"{name}.xml")
    caps = probe("/usr/bin/qemu-system-x86_64")
    run = state / "domains" / name
    paths = GuestPaths(run, state / "lib" / name)
    cmd = build_argv(d, caps, paths, paused=True)
    run.mkdir(parents=True, exist_ok=True)
    return list(cmd.argv), Path(cmd.qmp), dict(cmd.env)


@dataclass
class BareRun:
    proc: subprocess.Popen[bytes]
    t0: float
    t_qmp: float = 0.0  # greeting received
    t_running: float = 0.0  # cont returned and query-status said running


def bare_spawn(argv: list[str], qmp: Path, env: dict[str, str]) -> tuple[BareRun, socket.socket]:
    """Start bare QEMU like qemud does: the QMP socket bound before QEMU starts, passed as an fd."""
    from qemud.proc import qmp_fd_argv, qmp_listener

    lst = qmp_listener(qmp)
    a = qmp_fd_argv(argv, lst.fileno())
    t0 = time.monotonic()
    p = subprocess.Popen(a, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, **env}, start_new_session=True, pass_fds=(lst.fileno(),))
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect(str(qmp))
    lst.close()
    return BareRun(p, t0), cli


def bare_resume(run: BareRun, cli: socket.socket) -> None:
    q = RawQMP(cli)
    q.recv_obj()  # greeting: QEMU accepted the connection
    run.t_qmp = time.monotonic()
    q.cmd("qmp_capabilities")
    r = q.cmd("cont")
    assert "return" in r, r
    st = q.cmd("query-status")
    assert st["return"]["status"] == "running", st
    run.t_running = time.monotonic()
    cli.close()


def bare_kill_wait(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    for p in procs:
        p.wait(10)


# ---- pidfd ---------------------------------------------------------------------------------------
class ExitWatch:
    """The moment a process ends, seen through a pidfd in a thread of the bench process."""

    def __init__(self, pid: int) -> None:
        self.fd = os.pidfd_open(pid)
        self.t: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        p.poll()
        self.t = time.monotonic()
        os.close(self.fd)

    def join(self, timeout: float) -> float:
        self.thread.join(timeout)
        if self.t is None:
            raise RuntimeError("process did not end")
        return self.t


# ---- the machine ---------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qv = subprocess.run(["/usr/bin/qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    vm = psutil.virtual_memory()
    os_name = ""
    with contextlib.suppress(OSError):
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    return {
        "CPU": cpu,
        "cores": f"{psutil.cpu_count(logical=True)} logical ({psutil.cpu_count(logical=False)} physical)",
        "RAM": f"{vm.total / 2**30:.1f} GiB total, {vm.available / 2**30:.1f} GiB available at start",
        "kernel": platform.release(),
        "OS": os_name,
        "QEMU": qv.splitlines()[0] if qv else "?",
        "Python": platform.python_version(),
        "accelerator": "TCG (KVM cannot run guests here)",
    }


TMPDIR = "/tmp"  # where each measurement makes its directory (bench/run.py --tmpdir)


def tempbase() -> Path:
    p = Path(tempfile.mkdtemp(prefix="qb", dir=TMPDIR))
    p.chmod(0o711)  # qemud (root) runs QEMU as the qemud user, which passes through to its guests
    return p


def rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
