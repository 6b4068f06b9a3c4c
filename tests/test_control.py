"""``qemuctl`` against the running daemon: the control socket end to end.

The real qemud (tests.support.daemon.Daemon), real QEMU (TCG) running the tiny guest, and
``qemuctl`` run as a separate process the way an administrator runs it: its exit status (0
success, 1 failure, 2 usage error), its output, and never a traceback.

Every guest here has ``<serial type='pty'/>`` as its console (what ``qemuctl console`` attaches
to); QEMU also logs that console to RUNTIME/domains/NAME/console.log, which is what the tests
wait on (boot marker, ``reboot: Power down``) and what the daemon follows into its log
(QEMUD_SOURCE=console lines).

The permission tests create system users and a group (unique names, removed at teardown) and
run qemuctl as them with setpriv(1).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.daemon import Daemon, domain_xml, pid_alive, wait_file_contains
from tests.support.tinyguest import PROMPT, TinyGuest

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("qemuctl")
QEMUCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "qemud.cli.qemuctl"]

RUN_TIMEOUT = 30.0
BOOT_TIMEOUT = 60.0
POWER_DOWN = b"reboot: Power down"
TABLE_HEADER = ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CPU%", "MEMORY"]
#: what `list --json` promises for every guest (see the --json help text)
LIST_KEYS = {"name", "uuid", "state", "pid", "restarts", "file"}
UUID_RX = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# ---- fixtures ---------------------------------------------------------------------------------

def wait_socket(d: Daemon, timeout: float = 10.0) -> None:
    """Wait until the control socket accepts connections. qemud logs `ready` (and tells systemd
    READY=1) a moment *before* it creates its socket (see
    test_control_socket_accepts_connections_once_ready); the other tests are not about that."""
    path = str(d.state / "qemud.sock")
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"no control socket at {path} within {timeout:g} s\n{d.tail()}") from None
        time.sleep(0.02)


def start_daemon(d: Daemon) -> None:
    d.start(timeout=30)
    wait_socket(d)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        start_daemon(d)
        yield d
    finally:
        print(d.log_text())  # shown by pytest when the test failed
        d.close()


# ---- helpers ----------------------------------------------------------------------------------

def pty_xml(guest: TinyGuest, name: str, **kw: Any) -> str:
    """The tiny guest with ``<serial type='pty'/>`` as its first serial port (its console)."""
    xml = domain_xml(guest, name, **kw)
    anchor = "<devices>\n    "
    assert xml.count(anchor) == 1 and "<serial" not in xml
    return xml.replace(anchor, anchor + "<serial type='pty'><target port='0'/></serial>\n    ")


def console_log(d: Daemon, name: str) -> Path:
    return d.run_dir(name) / "console.log"


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    both = r.stdout + r.stderr
    assert "Traceback" not in both, both
    assert "internal error" not in both, both


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def ctl(d: Daemon | Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``qemuctl --state-dir SDIR ARGS...`` as root; never a traceback."""
    state = d.state if isinstance(d, Daemon) else d
    r = subprocess.run([*QEMUCTL, "--state-dir", str(state), *args], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, env=_env())
    no_traceback(r)
    return r


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"qemuctl {r.args[3:]} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def listing(d: Daemon) -> dict[str, dict[str, Any]]:
    guests = json.loads(ok(ctl(d, "list", "--json")).stdout)
    assert isinstance(guests, list)
    return {g["name"]: g for g in guests}


def status(d: Daemon, name: str) -> dict[str, Any]:
    g = json.loads(ok(ctl(d, "status", name, "--json")).stdout)
    assert isinstance(g, dict)
    return g


def wait_state(d: Daemon, name: str, state: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask `status --json` until the guest is in ``state``; the last answer is returned either way."""
    deadline = time.monotonic() + timeout
    while True:
        g = status(d, name)
        if g["state"] == state or time.monotonic() > deadline:
            return g
        time.sleep(0.1)


def said(r: subprocess.CompletedProcess[str], name: str) -> str:
    """The state a guest command printed for ``name`` (``NAME: STATE (CAUSE)``)."""
    m = re.search(rf"(?m)^{re.escape(name)}: (\w+)", r.stdout + r.stderr)
    assert m is not None, f"no '{name}: STATE' line in {r.stdout!r} / {r.stderr!r}"
    return m.group(1)


def start_guests(d: Daemon, guest: TinyGuest, *names: str, booted: bool = True, **kw: Any) -> dict[str, int]:
    """Drop NAME.xml for each name (pty console), wait until each runs and, by default, has booted
    (its marker, or the shell prompt for a guest without ACPI, in its console log)."""
    after = d.mark()
    for name in names:
        d.drop(f"{name}.xml", pty_xml(guest, name, **kw))
    pids = {}
    for name in names:
        running = d.wait_for("running", name, timeout=RUN_TIMEOUT, after=after)
        assert running.pid is not None
        pids[name] = running.pid
    if booted:
        want = guest.marker if kw.get("acpi", True) else PROMPT
        for name, pid in pids.items():
            wait_file_contains(console_log(d, name), want, timeout=BOOT_TIMEOUT, alive=lambda p=pid: _alive(p))
    return pids


def _alive(pid: int) -> None:
    assert pid_alive(pid), f"QEMU pid {pid} ended while the guest booted"


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"QEMU pid {pid} still runs {timeout:g} s later"
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


_SOURCE_LINE = re.compile(r"^\d\d:\d\d:\d\d (?:error: |warning: )?(?P<message>.*?)  (?P<fields>QEMUD_SOURCE=.*)$")


def console_lines(d: Daemon, name: str, after: int = 0) -> list[str]:
    """The messages of the daemon's QEMUD_SOURCE=console lines for ``name``. They are not event
    lines (no QEMUD_EVENT), so tests.support.daemon does not parse them: done here."""
    out = []
    for e in d.lines[after:]:
        m = _SOURCE_LINE.match(e.raw)
        if m is None:
            continue
        try:
            fields = dict(tok.partition("=")[::2] for tok in shlex.split(m.group("fields")))
        except ValueError:
            continue
        if fields.get("QEMUD_SOURCE") == "console" and fields.get("QEMUD_DOMAIN") == name:
            out.append(m.group("message"))
    return out


def wait_console_line(d: Daemon, name: str, pattern: str, timeout: float = 10.0, after: int = 0) -> str:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for message in console_lines(d, name, after):
            if rx.search(message):
                return message
        if time.monotonic() > deadline:
            raise AssertionError(f"no QEMUD_SOURCE=console line of {name} matching {pattern!r} within "
                                 f"{timeout:g} s\n{d.tail()}")
        time.sleep(0.05)


class CtlConsole:
    """``qemuctl console NAME`` with stdin and stdout as pipes: what it prints is collected by a
    thread; stdin ends when :meth:`finish` closes it."""

    def __init__(self, d: Daemon, name: str) -> None:
        self.proc = subprocess.Popen([*QEMUCTL, "--state-dir", str(d.state), "console", name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=_env())
        self.data = b""
        self.eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self.eof = True
                    self._cond.notify_all()
                    return
                self.data += chunk
                self._cond.notify_all()

    def read_until(self, pattern: bytes, timeout: float = 30.0, start: int = 0) -> int:
        """Wait until the regex matches what qemuctl printed (from ``start`` on); returns the
        offset just past the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self.data, start)
                if m:
                    return m.end()
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    why = "qemuctl's output ended" if self.eof else f"nothing within {timeout:g} s"
                    raise AssertionError(f"{pattern!r} not printed by qemuctl console ({why}); got "
                                         f"{self.data[-800:]!r}; status {self.proc.poll()}")
                self._cond.wait(left)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self, timeout: float = 10.0) -> tuple[int, str]:
        """Close stdin; qemuctl ends after 0.5 s without output. Returns (status, stderr)."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        rc = self.proc.wait(timeout)
        self._thread.join(5)
        return rc, self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                if f is not None:
                    f.close()


# ---- 1: list -----------------------------------------------------------------------------------

def test_list_shows_every_guest_as_a_table_and_as_json(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pids = start_guests(d, guest, "web1", booted=False)
    d.drop("web2.xml", pty_xml(guest, "web2", autostart=False))
    d.wait_for("defined", "web2", timeout=10)
    d.assert_no("starting", "web2", within=0.5)

    r = ok(ctl(d, "list"))
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].split() == TABLE_HEADER
    # the cells, cut where the header's columns start (they line up under it)
    starts = [lines[0].index(h) for h in TABLE_HEADER]
    rows = {}
    for line in lines[1:]:
        cells = [line[a:b] for a, b in zip(starts, [*starts[1:], None])]
        assert all(c.endswith("  ") for c in cells[:-1]) and not any(c.startswith(" ") for c in cells), line
        rows[cells[0].strip()] = [c.strip() for c in cells]
    assert sorted(rows) == ["web1", "web2"] and len(lines) == 3, r.stdout
    assert rows["web1"][1:3] == ["running", str(pids["web1"])]
    assert rows["web1"][4] == "0"  # restarts
    assert rows["web1"][6].endswith("iB")  # memory
    assert rows["web2"][1:] == ["stopped", "-", "-", "0", "-", "-"]

    r = ok(ctl(d, "list", "--json"))
    guests = json.loads(r.stdout)
    assert [g["name"] for g in guests] == ["web1", "web2"]
    for g in guests:
        assert LIST_KEYS <= set(g), g
        assert UUID_RX.match(g["uuid"]), g
        assert g["restarts"] == 0
    web1, web2 = guests
    assert web1["state"] == "running" and web1["pid"] == pids["web1"]
    assert web1["file"] == str(d.path("web1.xml"))
    assert web1["uuid"] == d.events("defined", "web1")[-1]["uuid"]
    assert web2["state"] == "stopped" and web2["pid"] is None
    assert web2["file"] == str(d.path("web2.xml"))
    assert web1["uuid"] != web2["uuid"]

    # top: the same table, refreshed -n times
    r = ok(ctl(d, "top", "-d", "0.1", "-n", "2"))
    assert r.stdout.count("qemud: 2 guest(s)") == 2, r.stdout
    assert r.stdout.count("NAME  ") == 2 and r.stdout.count("\nweb1 ") == 2, r.stdout


# ---- 2: status ---------------------------------------------------------------------------------

def _status_text(r: subprocess.CompletedProcess[str]) -> tuple[dict[str, str], list[str]]:
    fields: dict[str, str] = {}
    stderr_lines: list[str] = []
    in_stderr = False
    for line in r.stdout.splitlines():
        if line == "QEMU's last stderr lines:":
            in_stderr = True
        elif in_stderr:
            assert line.startswith("  "), line
            stderr_lines.append(line.strip())
        else:
            key, sep, value = line.partition(":")
            assert sep, line
            fields[key] = value.strip()
    return fields, stderr_lines


def test_status_before_and_after_qemu_is_killed(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = start_guests(d, guest, "web1", booted=False)["web1"]

    fields, stderr_lines = _status_text(ok(ctl(d, "status", "web1")))
    assert fields["Name"] == "web1"
    assert UUID_RX.match(fields["UUID"])
    assert fields["State"].startswith("running")
    assert fields["File"] == str(d.path("web1.xml"))
    assert fields["PID"] == str(pid)
    assert fields["Restarts"] == "0"
    assert fields["Restart policy"].startswith("always")
    assert fields["Last exit"] == "-"
    assert fields["Memory (RSS)"] != "-"
    # QEMU's own stderr: it announces the pty of the console
    assert any(line.startswith("char device redirected to /dev/pts/") for line in stderr_lines), stderr_lines

    g = status(d, "web1")
    assert g["name"] == "web1" and g["state"] == "running" and g["pid"] == pid
    assert g["file"] == str(d.path("web1.xml"))
    assert g["restarts"] == 0 and g["last_exit"] is None
    assert g["rss"] > 0
    assert g["restart_policy"]["policy"] == "always"
    assert {"max_retries", "backoff", "max_backoff"} <= set(g["restart_policy"])
    assert any("char device redirected to /dev/pts/" in s for s in g["stderr"]), g["stderr"]
    assert g["console_log"] == str(console_log(d, "web1"))

    d.mark()
    os.kill(pid, signal.SIGKILL)
    crashed = d.wait_for("crashed", "web1", timeout=10)
    assert "SIGKILL" in crashed["exit"]
    running = d.wait_for("running", "web1", timeout=RUN_TIMEOUT)
    new = running.pid
    assert new is not None and new != pid

    g = status(d, "web1")
    assert g["state"] == "running" and g["pid"] == new and g["rss"] > 0
    assert g["restarts"] == 1
    assert g["stderr"] and all(isinstance(s, str) for s in g["stderr"])
    fields, _ = _status_text(ok(ctl(d, "status", "web1")))
    assert fields["PID"] == str(new) and fields["Restarts"] == "1"
    # what ended the previous QEMU stays visible after the restart
    assert g["last_exit"] is not None and "SIGKILL" in g["last_exit"], (
        f"status --json after a kill -9 and the restart: last_exit={g['last_exit']!r} "
        f"(the crashed event said {crashed['exit']!r})")
    assert "SIGKILL" in fields["Last exit"], fields["Last exit"]


# ---- 3: shutdown, kept down across daemon restarts, start ---------------------------------------

def _restart_daemon(d: Daemon, how: str) -> int:
    if how == "kill9":
        d.kill9()
    else:
        assert d.stop() == 0
    after = d.mark()
    start_daemon(d)
    return after


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_shutdown_stays_stopped_across_daemon_restarts_until_started(daemon: Daemon, guest: TinyGuest,
                                                                      how: str) -> None:
    d = daemon
    pid = start_guests(d, guest, "web1")["web1"]
    after = d.mark()
    r = ok(ctl(d, "shutdown", "web1"))
    assert said(r, "web1") == "stopped", r.stdout
    assert r.stderr == ""
    wait_gone(pid)
    d.wait_for("shutdown-requested", "web1", timeout=0, after=after)
    assert not d.events("shutdown-timeout", "web1", after=after)
    # through ACPI: the guest powered itself off
    wait_file_contains(console_log(d, "web1"), POWER_DOWN, timeout=5)
    d.assert_no("starting", "web1", within=1.5, after=after)
    g = listing(d)["web1"]
    assert g["state"] == "stopped" and g["pid"] is None

    # the daemon restarts: the guest stays down, as asked
    after = _restart_daemon(d, how)
    d.wait_for("stays-stopped", "web1", timeout=10, after=after)
    d.assert_no("starting", "web1", within=1.5, after=after)
    g = listing(d)["web1"]
    assert g["state"] == "stopped" and g["pid"] is None

    after = d.mark()
    r = ok(ctl(d, "start", "web1"))
    assert said(r, "web1") == "running", r.stdout
    new = d.wait_for("running", "web1", timeout=0, after=after).pid
    assert new is not None and new != pid and pid_alive(new) and d.qemu_pid("web1") == new
    assert f"pid {new}" in r.stdout
    g = listing(d)["web1"]
    assert g["state"] == "running" and g["pid"] == new

    # started again: a daemon restart now adopts it, and nothing keeps it down any more
    after = _restart_daemon(d, how)
    adopted = d.wait_for("adopted", "web1", timeout=RUN_TIMEOUT, after=after)
    assert adopted.pid == new
    d.wait_for("running", "web1", timeout=RUN_TIMEOUT, after=after)
    d.assert_no("spawned", "web1", within=1.0, after=after)
    assert not d.events("stays-stopped", "web1", after=after)
    g = listing(d)["web1"]
    assert g["state"] == "running" and g["pid"] == new and pid_alive(new)


# ---- 4: shutdown --timeout ---------------------------------------------------------------------

def test_shutdown_timeout_ends_a_guest_without_acpi(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = start_guests(d, guest, "deaf", acpi=False)["deaf"]
    after = d.mark()
    t0 = time.monotonic()
    r = ok(ctl(d, "shutdown", "deaf", "--timeout", "2"))
    took = time.monotonic() - t0
    assert said(r, "deaf") == "stopped", r.stdout
    assert 1.5 <= took <= 8.0, f"shutdown --timeout 2 took {took:.2f} s"
    wait_gone(pid)
    timeout = d.wait_for("shutdown-timeout", "deaf", timeout=0, after=after)
    requested = d.wait_for("shutdown-requested", "deaf", timeout=0, after=after)
    assert 1.5 <= timeout.received - requested.received <= 4.0
    assert POWER_DOWN not in console_log(d, "deaf").read_bytes()
    d.assert_no("starting", "deaf", within=1.0, after=after)
    assert listing(d)["deaf"]["state"] == "stopped"


# ---- 5: destroy, restart, reset, pause, resume, --all -------------------------------------------

def test_pause_and_resume(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = start_guests(d, guest, "web1")["web1"]

    r = ok(ctl(d, "pause", "web1"))
    assert said(r, "web1") == "paused", r.stdout
    assert wait_state(d, "web1", "paused")["state"] == "paused"
    time.sleep(0.2)
    before = cpu_seconds(pid)
    time.sleep(1.0)
    used = cpu_seconds(pid) - before
    assert used < 0.15, f"a paused QEMU used {used:.2f} s of CPU in 1 s"
    assert listing(d)["web1"]["state"] == "paused"

    r = ok(ctl(d, "resume", "web1", "--json"))
    g = json.loads(r.stdout)
    assert g["name"] == "web1" and g["state"] == "running" and g["pid"] == pid
    assert wait_state(d, "web1", "running")["state"] == "running"
    assert pid_alive(pid) and d.qemu_pid("web1") == pid
    d.assert_no("spawned", "web1", within=0)


def test_reset_reboots_the_guest_in_place(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = start_guests(d, guest, "web1")["web1"]
    log = console_log(d, "web1")
    first = wait_file_contains(log, guest.marker, timeout=1)
    after = d.mark()
    r = ok(ctl(d, "reset", "web1"))
    assert said(r, "web1") in ("running", "paused"), r.stdout
    d.wait_for("reset", "web1", timeout=5, after=after)
    # the same QEMU, running, and the guest boots a second time
    assert pid_alive(pid) and d.qemu_pid("web1") == pid
    g = wait_state(d, "web1", "running", timeout=5)
    assert g["state"] == "running", (f"after `qemuctl reset` the guest is {g['state']} ({g['cause']}), "
                                     f"qemuctl printed {r.stdout.strip()!r}")
    wait_file_contains(log, guest.marker, timeout=BOOT_TIMEOUT, start=first, alive=lambda: _alive(pid))
    assert g["pid"] == pid
    assert not d.events("spawned", "web1", after=after)


def test_restart_and_destroy(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = start_guests(d, guest, "web1")["web1"]
    log = console_log(d, "web1")

    after = d.mark()
    r = ok(ctl(d, "restart", "web1"))
    assert said(r, "web1") == "running", r.stdout
    new = d.wait_for("running", "web1", timeout=0, after=after).pid
    assert new is not None and new != pid and pid_alive(new) and d.qemu_pid("web1") == new
    assert not pid_alive(pid)
    assert f"pid {new}" in r.stdout
    # gracefully: ACPI first, and the guest powered itself off
    d.wait_for("shutdown-requested", "web1", timeout=0, after=after)
    assert log.read_bytes().count(POWER_DOWN) == 1
    g = listing(d)["web1"]
    assert g["state"] == "running" and g["pid"] == new
    first = wait_file_contains(log, POWER_DOWN, timeout=1)
    wait_file_contains(log, guest.marker, timeout=BOOT_TIMEOUT, start=first, alive=lambda: _alive(new))

    after = d.mark()
    r = ok(ctl(d, "destroy", "web1", "--json"))
    g = json.loads(r.stdout)
    assert g["name"] == "web1" and g["state"] == "stopped" and g["pid"] is None
    wait_gone(new, timeout=2)
    # pulled the plug: no ACPI request, no poweroff inside the guest, and no restart
    assert not d.events("shutdown-requested", "web1", after=after)
    assert log.read_bytes().count(POWER_DOWN) == 1
    d.assert_no("starting", "web1", within=1.5, after=after)
    assert listing(d)["web1"]["state"] == "stopped"


def test_all_variants_act_on_every_guest(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pids = start_guests(d, guest, "g1", "g2")

    after = d.mark()
    r = ok(ctl(d, "shutdown", "--all"))
    assert {said(r, "g1"), said(r, "g2")} == {"stopped"}, r.stdout
    assert len(r.stdout.splitlines()) == 2
    for name, pid in pids.items():
        wait_gone(pid)
        wait_file_contains(console_log(d, name), POWER_DOWN, timeout=5)
    d.assert_no("starting", within=1.0, after=after)
    assert {g["state"] for g in listing(d).values()} == {"stopped"}

    after = d.mark()
    r = ok(ctl(d, "start", "--all"))
    assert said(r, "g1") == "running" and said(r, "g2") == "running", r.stdout
    now = listing(d)
    for name, pid in pids.items():
        new = d.wait_for("running", name, timeout=0, after=after).pid
        assert new is not None and new != pid and pid_alive(new)
        assert now[name]["state"] == "running" and now[name]["pid"] == new

    # --all with --json: one object per guest
    r = ok(ctl(d, "destroy", "--all", "--json"))
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(o["name"] for o in objs) == ["g1", "g2"]
    assert {o["state"] for o in objs} == {"stopped"}


# ---- 6: console ----------------------------------------------------------------------------------

def test_console_relays_both_ways_while_the_journal_keeps_the_lines(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    # attach as soon as QEMU runs: the guest boots in ~1.6 s, so qemuctl sees the marker
    pid = start_guests(d, guest, "web1", booted=False)["web1"]
    lines_at = len(d.lines)
    con = CtlConsole(d, "web1")
    try:
        at = con.read_until(re.escape(guest.marker.encode()), timeout=BOOT_TIMEOUT)
        at = con.read_until(re.escape(PROMPT.encode()), timeout=30, start=at)
        con.send(b'echo hel""lo\n')
        con.read_until(rb"(?m)^hello\r?$", timeout=20, start=at)
        # meanwhile the daemon still follows the console into its log
        wait_console_line(d, "web1", r"^hello\s*$", timeout=10, after=lines_at)
        wait_console_line(d, "web1", re.escape(guest.marker), timeout=0, after=lines_at)
        rc, err = con.finish()
    finally:
        con.kill()
    assert rc == 0, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert pid_alive(pid) and listing(d)["web1"]["state"] == "running"

    # detached: a second session works the same
    con = CtlConsole(d, "web1")
    try:
        con.send(b'echo wor""ld\n')
        con.read_until(rb"(?m)^world\r?$", timeout=20)
        rc, err = con.finish()
    finally:
        con.kill()
    assert rc == 0, err
    wait_console_line(d, "web1", r"^world\s*$", timeout=10, after=lines_at)
    assert pid_alive(pid) and d.qemu_pid("web1") == pid


def test_control_socket_accepts_connections_once_ready() -> None:
    """`ready` (READY=1 for systemd) means qemud can be used: `systemctl start qemud && qemuctl
    list` must not find "qemud is not running"."""
    d = Daemon()
    try:
        d.start(timeout=30)  # returns as soon as the `ready` line is read
        path = d.state / "qemud.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except OSError as exc:
                raise AssertionError(f"qemud logged `ready` but its control socket {path} does not accept "
                                     f"connections yet: {exc}") from None
    finally:
        d.close()


# ---- 7: errors -------------------------------------------------------------------------------------

GUEST_CMDS = ["start", "shutdown", "destroy", "restart", "reset", "pause", "resume"]


def test_unknown_guest_is_an_error(daemon: Daemon) -> None:
    d = daemon
    for args in (["status", "nosuch"], ["status", "nosuch", "--json"], ["console", "nosuch"],
                 *[[c, "nosuch"] for c in GUEST_CMDS], ["shutdown", "nosuch", "--timeout", "1"]):
        r = ctl(d, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "no guest named 'nosuch'" in r.stderr, (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)
    # an empty daemon lists nothing
    assert json.loads(ok(ctl(d, "list", "--json")).stdout) == []
    assert ok(ctl(d, "list")).stdout.split() == TABLE_HEADER


def test_commands_needing_a_running_qemu_fail_cleanly(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    d.drop("off.xml", pty_xml(guest, "off", autostart=False))
    # a console that is a file, not a pty: nothing to attach to
    d.drop("filecon.xml", domain_xml(guest, "filecon", serial_path=d.scratch / "filecon.console"))
    d.wait_for("defined", "off", timeout=10, after=0)
    d.wait_for("running", "filecon", timeout=RUN_TIMEOUT, after=0)
    for cmd in ("reset", "pause", "resume", "console"):
        r = ctl(d, cmd, "off")
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        assert "off is stopped" in r.stderr and "running QEMU" in r.stderr, (cmd, r.stderr)
    r = ctl(d, "console", "filecon")
    assert r.returncode == 1 and "has no pty console" in r.stderr, r.stderr
    # a stopped guest shut down / destroyed again: still stopped, not an error
    for cmd in ("shutdown", "destroy"):
        r = ok(ctl(d, cmd, "off"))
        assert said(r, "off") == "stopped"
    assert listing(d)["off"]["state"] == "stopped"


def _not_running(state: Path, *args: str) -> None:
    t0 = time.monotonic()
    r = ctl(state, *args, timeout=10)
    took = time.monotonic() - t0
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    assert f"qemud is not running (no socket at {state / 'qemud.sock'})" in r.stderr, (args, r.stderr)
    assert r.stdout == ""
    assert took < 1.0, f"qemuctl {args} took {took:.2f} s to find no daemon"


def test_daemon_not_running_is_reported_quickly() -> None:
    with tempfile.TemporaryDirectory(prefix="qdc") as tmp:
        state = Path(tmp) / "state"
        for args in (["list"], ["list", "--json"], ["status", "web1"], ["start", "web1"], ["shutdown", "--all"],
                     ["console", "web1"], ["top", "-n", "1"]):
            _not_running(state, *args)
        state.mkdir()
        _not_running(state, "list")


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_daemon_gone_is_reported_quickly(daemon: Daemon, how: str) -> None:
    d = daemon
    ok(ctl(d, "list"))
    if how == "kill9":
        d.kill9()  # the socket file stays behind; nobody listens on it
        assert (d.state / "qemud.sock").exists()
    else:
        assert d.stop() == 0
    for args in (["list"], ["status", "web1"], ["destroy", "--all"], ["console", "web1"]):
        _not_running(d.state, *args)


@pytest.mark.parametrize("args", [
    [], ["bogus"], ["list", "--bogus"], ["status"], ["start"], ["start", "web1", "--all"],
    ["shutdown", "web1", "--timeout", "soon"], ["shutdown", "web1", "--timeout"], ["pause", "a", "b"],
    ["console"], ["top", "-n", "many"], ["logs"], ["--state-dir"],
], ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_exit_2(args: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="qdc") as tmp:
        r = ctl(Path(tmp), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "usage:" in r.stderr
    assert r.stdout == ""


def test_socket_and_state_dir_together_is_a_usage_error() -> None:
    r = subprocess.run([*QEMUCTL, "--state-dir", "/tmp", "--socket", "/tmp/x.sock", "list"], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL, env=_env())
    no_traceback(r)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


# ---- 8: permissions ------------------------------------------------------------------------------

def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


class Identities:
    """System users and groups made for one test (unique names), always removed afterwards."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.users: list[str] = []
        self.groups: list[str] = []

    def group(self, suffix: str) -> str:
        name = f"qdt{self.tag}{suffix}"
        self.groups.append(name)
        r = _run("groupadd", "--system", name)
        assert r.returncode == 0, r.stderr
        return name

    def user(self, suffix: str, groups: list[str] | None = None) -> str:
        name = f"qdt{self.tag}{suffix}"
        self.users.append(name)
        argv = ["useradd", "--system", "--no-create-home", "--no-user-group", "--gid", "nogroup",
                "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        r = _run(*argv, name)
        assert r.returncode == 0, r.stderr
        return name

    def cleanup(self) -> list[str]:
        problems = []
        for u in reversed(self.users):
            if _run("getent", "passwd", u).returncode != 0:
                continue
            r = _run("userdel", u)
            if r.returncode != 0:
                r = _run("userdel", "--force", u)
            if _run("getent", "passwd", u).returncode == 0:
                problems.append(f"user {u}: {r.stderr.strip()}")
        for g in reversed(self.groups):
            if _run("getent", "group", g).returncode != 0:
                continue
            r = _run("groupdel", g)
            if _run("getent", "group", g).returncode == 0:
                problems.append(f"group {g}: {r.stderr.strip()}")
        return problems


@pytest.fixture
def identities() -> Iterator[Identities]:
    assert os.geteuid() == 0, "the tests run as root (they create test users)"
    for tool in ("useradd", "userdel", "groupadd", "groupdel", "setpriv"):
        assert shutil.which(tool) is not None, f"{tool} is not installed"
    ids = Identities()
    try:
        yield ids
    finally:
        problems = ids.cleanup()
        assert not problems, problems


def ctl_as(user: str, d: Daemon, *args: str, groups: str = "clear") -> subprocess.CompletedProcess[str]:
    """qemuctl as ``user`` (primary group nogroup). groups: "clear" (no supplementary groups),
    "init" (those /etc/group gives the user) or a group name (that one only, whatever /etc/group
    says). The system python3 runs it from the source tree: the venv's interpreter lives under
    /root, which other users cannot enter; the client side is standard library only."""
    opt = {"clear": ["--clear-groups"], "init": ["--init-groups"]}.get(groups, [f"--groups={groups}"])
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8",
           "HOME": "/nonexistent"}
    r = subprocess.run(["setpriv", f"--reuid={user}", "--regid=nogroup", *opt, python, "-m", "qemud.cli.qemuctl",
                        "--state-dir", str(d.state), *args], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL, env=env, cwd="/")
    no_traceback(r)
    return r


def _refused_by_daemon(user: str, d: Daemon, commands: list[list[str]], pid: int, groups: str = "clear",
                       tries: int = 3) -> None:
    """qemuctl as ``user`` gets past the file mode and the daemon's SO_PEERCRED check refuses each
    command: exit 1, nothing reaches the guest (QEMU ``pid`` keeps running, no event about it),
    and qemuctl says "permission denied" (not the client's EACCES message naming the socket).
    Each is tried a few times: whether qemuctl's request is written before the daemon's refusal
    closes the connection is a race, and qemuctl must say why it failed either way."""
    sock = d.state / "qemud.sock"
    after = d.mark()
    results = [(args, ctl_as(user, d, *args, groups=groups)) for args in commands for _ in range(tries)]
    for args, r in results:
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stdout == "", (args, r.stdout)
    # nothing reached the guest
    d.assert_no(domain="web1", within=1.0, after=after)
    assert pid_alive(pid) and listing(d)["web1"]["state"] == "running"
    silent = [" ".join(args) for args, r in results if "permission denied" not in r.stderr]
    assert not silent, (f"refused by the daemon, qemuctl exited 1 without saying why (empty stderr) in "
                        f"{len(silent)} of {len(results)} runs: {silent}; stderr of the others: "
                        f"{sorted({r.stderr for _, r in results})}")
    for args, r in results:
        assert str(sock) not in r.stderr, ("refused by the daemon, not by the file mode", args, r.stderr)


def _reachable(d: Daemon) -> None:
    """Let others traverse the way to the socket (mkdtemp made the base 0700)."""
    for p in (d.base, d.state):
        os.chmod(p, os.stat(p).st_mode | 0o001)


def test_socket_is_root_only_without_a_control_group(daemon: Daemon, guest: TinyGuest,
                                                     identities: Identities) -> None:
    d = daemon
    pid = start_guests(d, guest, "web1", booted=False)["web1"]
    _reachable(d)
    sock = d.state / "qemud.sock"
    st = os.stat(sock)
    assert oct(st.st_mode & 0o777) == oct(0o600) and st.st_uid == 0
    user = identities.user("u")

    # the file mode stops the connect (EACCES): qemuctl says so
    for args in (["list"], ["destroy", "web1"], ["console", "web1"]):
        r = ctl_as(user, d, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "permission denied" in r.stderr and str(sock) in r.stderr, r.stderr
        assert r.stdout == ""

    # the socket opened to everyone: the daemon's own check (SO_PEERCRED) still refuses
    os.chmod(sock, 0o666)
    _refused_by_daemon(user, d, [["list"], ["destroy", "web1"], ["shutdown", "--all"], ["console", "web1"]], pid)


def test_control_group_members_may_use_the_socket_and_no_one_else(guest: TinyGuest,
                                                                   identities: Identities) -> None:
    group = identities.group("g")
    member = identities.user("in", groups=[group])
    other = identities.user("out")
    d = Daemon()
    try:
        conf = d.scratch / "qemud.conf"
        conf.write_text(f'[control]\ngroup = "{group}"\n')
        d.extra_args = ["--config", str(conf)]
        start_daemon(d)
        pid = start_guests(d, guest, "web1", booted=False)["web1"]
        _reachable(d)
        sock = d.state / "qemud.sock"
        st = os.stat(sock)
        assert oct(st.st_mode & 0o777) == oct(0o660)
        assert st.st_gid == grp.getgrnam(group).gr_gid

        # a member of the group: allowed (file mode and the daemon's check)
        r = ctl_as(member, d, "list", "--json", groups="init")
        assert r.returncode == 0, r.stderr
        guests = json.loads(r.stdout)
        assert [(g["name"], g["state"], g["pid"]) for g in guests] == [("web1", "running", pid)]
        r = ctl_as(member, d, "status", "web1", groups="init")
        assert r.returncode == 0 and "running" in r.stdout, r.stderr

        # not a member: the file mode refuses the connect
        r = ctl_as(other, d, "list")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "permission denied" in r.stderr and str(sock) in r.stderr, r.stderr

        # not a member, but its process holds the group: past the file mode, the daemon refuses
        # (it checks the user, by SO_PEERCRED, against the group's members)
        _refused_by_daemon(other, d, [["list"], ["destroy", "web1"]], pid, groups=group)
    finally:
        print(d.log_text())
        d.close()
