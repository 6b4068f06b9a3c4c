"""Faults, each through the real daemon and real QEMU (TCG, the tiny guest): the runtime
directory full or read-only, the QEMU binary missing or replaced, a QEMU that never answers QMP
or exits while negotiating it, the QMP socket deleted, the daemon SIGKILLed during a start, a
stop and a restart, the journal gone. Each ends with the same checks: no guest lost, never two
QEMUs for one guest, no QEMU left behind, and every state reported truthfully.

A QEMU's end is read as the kernel tells it (zombie or gone), never by waiting for its pid to
vanish: this machine's PID 1 reaps others' children only every second or two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import BROKEN, Daemon, DaemonError, domain_xml, pid_alive
from tests.support.tinyguest import TinyGuest

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
QEMUCTL = Path(sys.executable).with_name("qemuctl")
RUN_TIMEOUT = 60.0  # the machine is shared: starts are slow, never hung
#: qemud's QMP connect timeout (qemud.guest.QMP_CONNECT_TIMEOUT) plus slack for a loaded host
QMP_TIMEOUT = 30.0 + 30.0


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        print(d.log_text())
        d.close()


# ---- helpers ---------------------------------------------------------------------------------

def qemus(d: Daemon) -> dict[str, list[int]]:
    """Live QEMUs per guest name, from /proc (the -pidfile under this daemon's directory); a
    zombie has ended."""
    out: dict[str, list[int]] = {}
    prefix = str(d.state / "domains") + "/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] in (b"Z", b"X"):
            continue
        args = [a.decode(errors="replace") for a in argv]
        for i, a in enumerate(args[:-1]):
            if a == "-pidfile" and args[i + 1].startswith(prefix):
                out.setdefault(args[i + 1][len(prefix):].split("/")[0], []).append(int(entry))
    return out


def wait_ended(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still runs after {timeout:g} s"
        time.sleep(0.05)


def with_emulator(xml: str, emulator: Path | str) -> str:
    return xml.replace("<devices>\n", f"<devices>\n    <emulator>{emulator}</emulator>\n", 1)


def start(d: Daemon, guest: TinyGuest, name: str, **kw: object) -> int:
    """Drop NAME.xml and wait until it runs; returns QEMU's pid (checked: the only one)."""
    after = d.mark()
    emulator = kw.pop("emulator", None)
    xml = domain_xml(guest, name, memory_mib=96, **kw)  # type: ignore[arg-type]
    d.drop(f"{name}.xml", with_emulator(xml, emulator) if emulator else xml)
    running = d.wait_for("running", name, timeout=RUN_TIMEOUT, after=after)
    assert running.pid is not None
    assert qemus(d).get(name) == [running.pid]
    return running.pid


def qemuctl(d: Daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(QEMUCTL), "--state-dir", str(d.state), *args], capture_output=True, text=True,
                          timeout=timeout)


def status(d: Daemon, name: str) -> dict[str, object]:
    import json
    r = qemuctl(d, "status", name, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up: a file grown until ENOSPC."""
    f = directory / "filler"
    with open(f, "wb") as fh:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                fh.write(chunk)
                fh.flush()
    # the last partial pages too
    with contextlib.suppress(OSError), open(f, "ab", buffering=0) as fh:
        while True:
            fh.write(b"\0")
    return f


# ---- the runtime directory ----------------------------------------------------------------------

def test_runtime_dir_full(daemon: Daemon, guest: TinyGuest) -> None:
    """A full runtime directory: a running guest keeps running and can be stopped; a guest
    cannot start (no record could be written, so no unadoptable QEMU may run): that is
    reported, retried by its policy up to failed, and it runs once there is room again."""
    d = daemon
    with tmpfs(d.state, "2m"):
        d.start()
        keep = start(d, guest, "keep", shutdown_timeout=5)
        filler = fill(d.state)
        mark = d.mark()
        d.drop("victim.xml", domain_xml(guest, "victim", memory_mib=96, restart={"max-retries": 3, "backoff": 1}))
        failed = d.wait_for("failed", "victim", timeout=RUN_TIMEOUT, after=mark)
        failures = [e for e in d.events(domain="victim", after=mark) if e.event in ("crashed", "record-error")]
        assert any("No space left on device" in e.message for e in failures), [e.raw for e in failures]
        assert [e.event for e in d.events(domain="victim", after=mark) if e.event in ("crashed", "backoff")] == \
            ["crashed", "crashed", "backoff", "crashed"]
        for e in d.events("spawned", "victim", after=mark):
            wait_ended(e.pid)  # type: ignore[arg-type]
        assert "victim" not in qemus(d), "a QEMU without a record must not be left running"
        assert d.events("running", "victim", after=mark) == []
        assert status(d, "victim")["state"] == "failed"
        # the other guest: untouched, and it can still be stopped while the directory is full
        assert qemus(d).get("keep") == [keep]
        mark = d.mark()
        assert qemuctl(d, "destroy", "keep").returncode == 0
        d.wait_for("stopped", "keep", timeout=RUN_TIMEOUT, after=mark)
        wait_ended(keep)
        # room again: it starts, with one QEMU, and it is adoptable (its record was written)
        filler.unlink()
        mark = d.mark()
        assert qemuctl(d, "start", "victim").returncode == 0
        running = d.wait_for("running", "victim", timeout=RUN_TIMEOUT, after=mark)
        assert qemus(d) == {"victim": [running.pid]}
        d.kill9()
        mark = d.mark()
        d.start(timeout=RUN_TIMEOUT)
        adopted = d.wait_for("adopted", "victim", timeout=RUN_TIMEOUT, after=mark)
        assert adopted.pid == running.pid and adopted.level == ""
        d.close()


def test_runtime_dir_read_only(daemon: Daemon, guest: TinyGuest) -> None:
    """A read-only runtime directory: qemud started on it says why it cannot run (no lock, no
    records: it could neither keep a second daemon out nor adopt), in words, no traceback; once
    writable, the guests run as the files say.

    (The kernel refuses to remount a file system read-only while a file on it is open for
    writing, and QEMU's log and the daemon's lock always are: with guests or a daemon running
    the directory cannot become read-only short of a forced error remount.)"""
    d = daemon
    with tmpfs(d.state, "16m"):
        d.drop("g.xml", domain_xml(guest, "g", memory_mib=96))
        subprocess.run(["mount", "-o", "remount,ro", str(d.state)], check=True)
        mark = d.mark()
        d.start(wait_ready=False)
        assert d.proc is not None
        assert d.proc.wait(30) == 1
        err = d.wait_for("host-error", timeout=10, after=mark)
        assert "Read-only file system" in err.message and str(d.state) in err.message
        assert err.level == "error"
        assert "Traceback" not in d.log_text()
        assert qemus(d) == {}
        subprocess.run(["mount", "-o", "remount,rw", str(d.state)], check=True)
        mark = d.mark()
        d.start(timeout=RUN_TIMEOUT)
        running = d.wait_for("running", "g", timeout=RUN_TIMEOUT, after=mark)
        assert qemus(d) == {"g": [running.pid]}
        d.close()


# ---- the QEMU binary ------------------------------------------------------------------------------

@pytest.fixture
def bindir() -> Iterator[Path]:
    p = Path(tempfile.mkdtemp(prefix="qb", dir="/tmp"))
    p.chmod(0o711)  # QEMU runs as the qemud user: it passes through to its guests
    try:
        yield p
    finally:
        shutil.rmtree(p, ignore_errors=True)


def install_qemu(path: Path) -> None:
    """QEMU at ``path``: a symlink (a copy would look for its firmware and modules relative to
    itself; through a symlink QEMU runs as the real binary, and the path is what qemud knows)."""
    os.symlink(QEMU, path)


def test_qemu_binary_missing(daemon: Daemon, guest: TinyGuest, bindir: Path) -> None:
    """<emulator> deleted under a running guest: the guest runs on, a daemon restart adopts it
    (the same process, its binary gone), a crash cannot restart it: reported, then failed;
    the binary back, `qemuctl start` runs it."""
    d = daemon
    d.start()
    emu = bindir / "qemu-system-x86_64"
    install_qemu(emu)
    pid = start(d, guest, "g", emulator=emu, restart={"max-retries": 2, "backoff": 1})
    emu.unlink()
    d.kill9()
    mark = d.mark()
    d.start(timeout=RUN_TIMEOUT)
    assert d.wait_for("adopted", "g", timeout=RUN_TIMEOUT, after=mark).pid == pid
    assert qemus(d) == {"g": [pid]}
    mark = d.mark()
    os.kill(pid, signal.SIGKILL)
    failed = d.wait_for("failed", "g", timeout=RUN_TIMEOUT, after=mark)
    assert str(emu) in failed.message and "does not exist" in failed.message, failed.raw
    assert d.events("spawned", "g", after=mark) == []
    assert qemus(d) == {}
    install_qemu(emu)
    mark = d.mark()
    r = qemuctl(d, "start", "g")
    assert r.returncode == 0, r.stderr
    running = d.wait_for("running", "g", timeout=RUN_TIMEOUT, after=mark)
    assert qemus(d) == {"g": [running.pid]}


def test_qemu_binary_replaced(daemon: Daemon, guest: TinyGuest, bindir: Path) -> None:
    """<emulator> replaced by something else under a running guest: adoption still finds the
    very process it recorded (pid, start time, command line), and a restart uses what is at
    the path now, probed again: here not a QEMU, so reported and failed, never a stale start."""
    d = daemon
    d.start()
    emu = bindir / "qemu-system-x86_64"
    install_qemu(emu)
    pid = start(d, guest, "g", emulator=emu, restart={"max-retries": 2, "backoff": 1})
    fake = bindir / "fake"
    fake.write_text("#!/bin/sh\necho 'this is not QEMU' >&2\nexit 7\n")
    fake.chmod(0o755)
    os.replace(fake, emu)
    d.kill9()
    mark = d.mark()
    d.start(timeout=RUN_TIMEOUT)
    adopted = d.wait_for("adopted", "g", timeout=RUN_TIMEOUT, after=mark)
    assert adopted.pid == pid and d.events("spawned", "g", after=mark) == []
    assert qemus(d) == {"g": [pid]}
    mark = d.mark()
    os.kill(pid, signal.SIGKILL)
    failed = d.wait_for("failed", "g", timeout=RUN_TIMEOUT, after=mark)
    assert "probing" in failed.message and "this is not QEMU" in failed.message, failed.raw
    assert d.events("spawned", "g", after=mark) == []
    # replaced by a QEMU again while the daemon runs (it had probed the fake): probed anew, runs
    tmp = bindir / "new"
    install_qemu(tmp)
    os.replace(tmp, emu)
    mark = d.mark()
    assert qemuctl(d, "start", "g").returncode == 0
    running = d.wait_for("running", "g", timeout=RUN_TIMEOUT, after=mark)
    assert qemus(d) == {"g": [running.pid]}


# ---- QMP ---------------------------------------------------------------------------------------------

def _wrapper(bindir: Path, body: str) -> Path:
    """An <emulator> that is the real QEMU when probed (no -pidfile) and ``body`` when it runs a guest."""
    w = bindir / "qemu-wrapper"
    w.write_text(body.replace("@QEMU@", QEMU))
    w.chmod(0o755)
    return w


def test_qemu_that_never_answers_qmp(daemon: Daemon, guest: TinyGuest, bindir: Path) -> None:
    """QEMU that stops itself before it greets on QMP: the start times out, QEMU is killed
    (never left behind, stopped or not), the policy retries once at once, then fails."""
    d = daemon
    d.start()
    w = _wrapper(bindir, '#!/bin/sh\ncase " $* " in *" -pidfile "*) kill -STOP $$ ;; esac\nexec @QEMU@ "$@"\n')
    mark = d.mark()
    d.drop("mute.xml", with_emulator(domain_xml(guest, "mute", memory_mib=96,
                                                restart={"max-retries": 2, "backoff": 1}), w))
    first = d.wait_for("spawned", "mute", timeout=RUN_TIMEOUT, after=mark)
    crashed = d.wait_for("crashed", "mute", timeout=QMP_TIMEOUT, after=mark)
    assert "QMP did not come up" in crashed.message and crashed.pid == first.pid, crashed.raw
    wait_ended(first.pid)  # type: ignore[arg-type]
    second = d.wait_for("spawned", "mute", timeout=RUN_TIMEOUT, after=crashed.index)
    assert second.pid != first.pid
    failed = d.wait_for("failed", "mute", timeout=QMP_TIMEOUT, after=second.index)
    assert failed.level == "error"
    wait_ended(second.pid)  # type: ignore[arg-type]
    assert qemus(d) == {} and d.events("running", "mute", after=mark) == []
    d.assert_no("spawned", "mute", within=2, after=failed.index)
    assert status(d, "mute")["state"] == "failed"


FAKE_QMP = r'''#!/usr/bin/python3
import os, socket, sys
args = sys.argv[1:]
if "-pidfile" not in args:
    os.execv("@QEMU@", ["@QEMU@"] + args)
spec = next(a for a in args if a.startswith("socket,id=qmp,fd="))
listener = socket.socket(fileno=int(spec.split("fd=")[1].split(",")[0]))
conn, _ = listener.accept()
conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
             b'"capabilities": []}}\r\n')
conn.recv(4096)  # qmp_capabilities: never answered
sys.stderr.write("fake QEMU: exiting in the middle of QMP negotiation\n")
sys.stderr.flush()
os._exit(3)  # at once: the connection closes as the process ends (no interpreter teardown first)
'''


def test_qemu_exiting_during_qmp_negotiation(daemon: Daemon, guest: TinyGuest, bindir: Path) -> None:
    d = daemon
    d.start()
    w = _wrapper(bindir, FAKE_QMP)
    mark = d.mark()
    d.drop("quitter.xml", with_emulator(domain_xml(guest, "quitter", memory_mib=96,
                                                   restart={"max-retries": 3, "backoff": 1}), w))
    failed = d.wait_for("failed", "quitter", timeout=RUN_TIMEOUT * 2, after=mark)
    spawned = d.events("spawned", "quitter", after=mark)
    crashed = d.events("crashed", "quitter", after=mark)
    assert len(spawned) == 3 and len(crashed) == 3
    assert [e.event for e in d.events(domain="quitter", after=mark)
            if e.event in ("crashed", "backoff", "failed")] == ["crashed", "crashed", "backoff", "crashed", "failed"]
    for c in crashed:
        assert "exited with status 3" in c.message and "in the middle of QMP negotiation" in c.message, c.raw
    for s in spawned:
        wait_ended(s.pid)  # type: ignore[arg-type]
    assert d.events("running", "quitter", after=mark) == []
    assert status(d, "quitter")["state"] == "failed"
    d.assert_no("spawned", "quitter", within=2, after=failed.index)


def test_qmp_socket_deleted_under_a_running_guest(daemon: Daemon, guest: TinyGuest) -> None:
    """The daemon keeps its QMP connection: the guest stays supervised and a stop is an ACPI
    shutdown as usual. A restarted daemon cannot reach such a QEMU: it takes it over (no second
    QEMU), reports it, ends it and starts the guest afresh, fully supervised again."""
    d = daemon
    d.start()
    old = start(d, guest, "g", serial_path=d.scratch / "g.console")
    (d.run_dir("g") / "qmp.sock").unlink()
    st = status(d, "g")
    assert st["state"] == "running" and st["pid"] == old
    d.kill9()
    mark = d.mark()
    d.start(timeout=RUN_TIMEOUT)
    adopted = d.wait_for("adopted", "g", timeout=RUN_TIMEOUT, after=mark)
    assert adopted.pid == old and adopted.level == "warning" and "QMP is unreachable" in adopted.message
    stopped = d.wait_for("stopped", "g", timeout=RUN_TIMEOUT, after=mark)
    assert stopped.pid == old
    running = d.wait_for("running", "g", timeout=RUN_TIMEOUT, after=stopped.index)
    new = running.pid
    assert new is not None and new != old
    wait_ended(old)
    assert qemus(d) == {"g": [new]}
    assert (d.run_dir("g") / "qmp.sock").exists()
    # the new QEMU's socket deleted too: the live connection still powers it down
    from tests.support.daemon import wait_file_contains
    wait_file_contains(d.scratch / "g.console", guest.marker, timeout=120)
    (d.run_dir("g") / "qmp.sock").unlink()
    mark = d.mark()
    d.remove("g.xml")
    d.wait_for("shutdown-requested", "g", timeout=20, after=mark)
    d.wait_for("stopped", "g", timeout=RUN_TIMEOUT, after=mark)
    assert d.events("shutdown-timeout", "g", after=mark) == []
    wait_ended(new)
    assert qemus(d) == {}


# ---- the daemon killed in the middle of things ------------------------------------------------------

@pytest.mark.parametrize("record", ["kept", "lost"])
def test_daemon_killed_during_a_start(daemon: Daemon, guest: TinyGuest, record: str) -> None:
    """SIGKILL between spawning QEMU and its QMP setup (QEMU is held stopped until the daemon is
    dead, so the window is certain). The restarted daemon finds a QEMU that never ran the guest
    (-S, no `cont`): it ends it and starts again: one QEMU, running, not left paused.
    `lost`: killed before the record was written (the record removed to get there): the QEMU is
    found by the pid file it locks and taken over the same way, never a second one beside it."""
    d = daemon
    d.start()
    mark = d.mark()
    d.drop("g.xml", domain_xml(guest, "g", memory_mib=96))
    pidfile = d.run_dir("g") / "qemu.pid"
    deadline = time.monotonic() + RUN_TIMEOUT
    pid = None
    while pid is None:
        assert time.monotonic() < deadline, "QEMU did not write its pid file"
        with contextlib.suppress(OSError, ValueError, IndexError):  # created, not written yet
            pid = int(pidfile.read_text().split()[0])
        time.sleep(0.001)
    os.kill(pid, signal.SIGSTOP)  # QEMU writes its pid file before it can greet on QMP
    try:
        assert d.wait_for("spawned", "g", timeout=RUN_TIMEOUT, after=mark).pid == pid
        assert d.events("running", "g", after=mark) == []
        d.kill9()
    finally:
        os.kill(pid, signal.SIGCONT)
    if record == "lost":
        (d.run_dir("g") / "record.json").unlink()
    mark = d.mark()
    d.start(timeout=RUN_TIMEOUT)
    if record == "lost":
        assert d.wait_for("orphan", "g", timeout=RUN_TIMEOUT, after=mark).pid == pid
    adopted = d.wait_for("adopted", "g", timeout=RUN_TIMEOUT, after=mark)
    assert adopted.pid == pid and "prelaunch" in adopted.message
    running = d.wait_for("running", "g", timeout=RUN_TIMEOUT, after=mark)
    assert running.pid != pid
    wait_ended(pid)
    assert qemus(d) == {"g": [running.pid]}
    assert status(d, "g")["state"] == "running"


def test_running_guest_whose_record_was_lost_is_taken_over(daemon: Daemon, guest: TinyGuest) -> None:
    """A running QEMU without its record (removed while the daemon was down): found by the pid
    file it locks, taken over as it is, running; no second QEMU, no refusal."""
    d = daemon
    d.start()
    pid = start(d, guest, "g")
    d.kill9()
    (d.run_dir("g") / "record.json").unlink()
    mark = d.mark()
    d.start(timeout=RUN_TIMEOUT)
    assert d.wait_for("orphan", "g", timeout=RUN_TIMEOUT, after=mark).pid == pid
    assert d.wait_for("adopted", "g", timeout=RUN_TIMEOUT, after=mark).pid == pid
    assert d.wait_for("running", "g", timeout=RUN_TIMEOUT, after=mark).pid == pid
    d.assert_no("spawned", "g", within=2, after=mark)
    assert qemus(d) == {"g": [pid]} and d.record("g") is not None
    # and it is supervised: a crash is restarted
    mark = d.mark()
    os.kill(pid, signal.SIGKILL)
    running = d.wait_for("running", "g", timeout=RUN_TIMEOUT, after=mark)
    assert qemus(d) == {"g": [running.pid]} and running.pid != pid


def _restarted_once_after_adoption(d: Daemon, pid: int) -> None:
    """Start the daemon again: it adopts QEMU ``pid`` of guest g, ends it and starts g again
    exactly once (a restart under way is finished, not lost, not repeated)."""
    mark = d.mark()
    d.start(timeout=RUN_TIMEOUT)
    assert d.wait_for("adopted", "g", timeout=RUN_TIMEOUT, after=mark).pid == pid
    stopped = d.wait_for("stopped", "g", timeout=RUN_TIMEOUT, after=mark)
    running = d.wait_for("running", "g", timeout=RUN_TIMEOUT, after=stopped.index)
    assert running.pid != pid
    wait_ended(pid)
    assert qemus(d) == {"g": [running.pid]}
    d.assert_no("stopping", "g", within=2, after=running.index)


def _held_in_stop(d: Daemon, guest: TinyGuest, name: str, how: list[str]) -> tuple[int, subprocess.Popen[str]]:
    """A guest without ACPI (it ignores the power button) being stopped: the stop is under way
    for its timeout, when the daemon is SIGKILLed."""
    pid = start(d, guest, name, acpi=False, shutdown_timeout=4)
    mark = d.mark()
    client = subprocess.Popen([str(QEMUCTL), "--state-dir", str(d.state), *how, name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    d.wait_for("shutdown-requested", name, timeout=20, after=mark)
    d.kill9()
    client.communicate(timeout=20)
    assert pid_alive(pid)
    return pid, client


def test_daemon_killed_during_a_stop(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    d.start()
    pid, _ = _held_in_stop(d, guest, "g", ["shutdown"])
    mark = d.mark()
    d.start(timeout=RUN_TIMEOUT)
    assert d.wait_for("adopted", "g", timeout=RUN_TIMEOUT, after=mark).pid == pid
    d.wait_for("stopping", "g", timeout=20, after=mark)
    d.wait_for("shutdown-timeout", "g", timeout=30, after=mark)
    stopped = d.wait_for("stopped", "g", timeout=RUN_TIMEOUT, after=mark)
    wait_ended(pid)
    assert qemus(d) == {}
    d.assert_no("spawned", "g", within=3, after=mark)
    assert stopped.run == 2 and status(d, "g")["state"] == "stopped"


def test_daemon_killed_during_a_restart(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    d.start()
    pid, _ = _held_in_stop(d, guest, "g", ["restart"])
    mark = d.mark()
    _restarted_once_after_adoption(d, pid)
    assert len(d.events("spawned", "g", after=mark)) == 1


# ---- the journal --------------------------------------------------------------------------------------

def test_journal_gone_and_back() -> None:
    """journald killed and its socket deleted while the daemon runs: events go to stderr, none
    lost, nothing crashes; a journald started again gets the events from then on."""
    from tests.support.journald import JOURNALD, Namespace
    ns = Namespace()
    base = Path(tempfile.mkdtemp(prefix="qj", dir="/tmp"))
    base.chmod(0o711)  # QEMU runs as the qemud user: it passes through to its guests
    (base / "domains").mkdir()
    p = subprocess.Popen(ns.cmd([str(QEMUCTL.with_name("qemud")), "--domains-dir", str(base / "domains"),
                                 "--state-dir", str(base / "s")]),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journald2: subprocess.Popen[bytes] | None = None
    err = ""
    try:
        ns.wait_for(30, "SYSLOG_IDENTIFIER=qemud", "QEMUD_EVENT=ready")
        ns.kill_journald()
        assert ns.run(["rm", "-f", "/run/systemd/journal/socket"]).returncode == 0
        (base / "domains" / "j1.xml").write_text(BROKEN.format(name="j1"))
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (base / "s" / "domains" / "j1" / "qemu.log").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(4)  # j1 fails (2 starts, 1 s apart) while there is no journal
        assert p.poll() is None, "qemud died without its journal"
        journald2 = subprocess.Popen(ns.cmd([JOURNALD]), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while ns.run(["test", "-S", "/run/systemd/journal/socket"]).returncode != 0:
            assert time.monotonic() < deadline, "journald did not come back"
            time.sleep(0.1)
        (base / "domains" / "j2.xml").write_text(BROKEN.format(name="j2"))
        failed = ns.wait_for(RUN_TIMEOUT, "QEMUD_DOMAIN=j2", "QEMUD_EVENT=failed")
        assert failed and failed[-1]["PRIORITY"] == "3"
        assert ns.journal("QEMUD_DOMAIN=j1", "QEMUD_EVENT=failed") == []  # told on stderr instead
    finally:
        p.terminate()
        try:
            err = p.communicate(timeout=30)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            p.kill()
            err = p.communicate()[1].decode(errors="replace")
        if journald2 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(journald2.pid, signal.SIGKILL)
            journald2.wait()
        ns.close()
        shutil.rmtree(base, ignore_errors=True)
    print(err)
    assert "Traceback" not in err
    # every event of j1 is on stderr, in order, and none of j2's (they went to the journal)
    j1 = [ln.split("QEMUD_EVENT=")[1].split()[0] for ln in err.splitlines() if "QEMUD_DOMAIN=j1" in ln
          and "QEMUD_EVENT=" in ln]
    assert j1[:4] == ["defined", "starting", "spawned", "crashed"] and j1[-1] == "failed", j1
    assert not any("QEMUD_DOMAIN=j2" in ln and "QEMUD_EVENT=" in ln for ln in err.splitlines())


def test_journal_not_reading_never_stalls_the_daemon() -> None:
    """journald alive but not reading (stopped: hung, or busy): its queue full, a blocking
    sender would hang the daemon and with it every guest's supervision. Events go to stderr,
    the daemon keeps supervising and answering; once journald reads again, events go to it."""
    from tests.support.journald import Namespace
    ns = Namespace()
    base = Path(tempfile.mkdtemp(prefix="qj", dir="/tmp"))
    base.chmod(0o711)  # QEMU runs as the qemud user: it passes through to its guests
    (base / "domains").mkdir()
    p = subprocess.Popen(ns.cmd([str(QEMUCTL.with_name("qemud")), "--domains-dir", str(base / "domains"),
                                 "--state-dir", str(base / "s")]),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = ""
    stopped = False
    try:
        ns.wait_for(30, "SYSLOG_IDENTIFIER=qemud", "QEMUD_EVENT=ready")
        os.kill(ns.journald_pid, signal.SIGSTOP)
        stopped = True
        # fill journald's queue, as a burst of messages from anything on the host would
        import socket as socketlib
        flood = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM | socketlib.SOCK_NONBLOCK)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 100000:
                flood.sendto(b"MESSAGE=flood\nSYSLOG_IDENTIFIER=flood\n",
                             f"/proc/{ns.pid}/root/run/systemd/journal/socket")
                sent += 1
        flood.close()
        assert sent < 100000, "journald's queue never filled"
        (base / "domains" / "j1.xml").write_text(BROKEN.format(name="j1"))
        t0 = time.monotonic()
        # the daemon supervises (j1 is tried twice and fails) and answers, journald still stopped
        while True:
            r = subprocess.run([str(QEMUCTL), "--state-dir", str(base / "s"), "list", "--json"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            if '"failed"' in r.stdout:
                break
            assert time.monotonic() - t0 < RUN_TIMEOUT, r.stdout
            time.sleep(0.2)
        os.kill(ns.journald_pid, signal.SIGCONT)
        stopped = False
        (base / "domains" / "j2.xml").write_text(BROKEN.format(name="j2"))
        ns.wait_for(RUN_TIMEOUT, "QEMUD_DOMAIN=j2", "QEMUD_EVENT=failed")
    finally:
        if stopped:
            os.kill(ns.journald_pid, signal.SIGCONT)
        p.terminate()
        try:
            err = p.communicate(timeout=30)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            p.kill()
            err = p.communicate()[1].decode(errors="replace")
        ns.close()
        shutil.rmtree(base, ignore_errors=True)
    print(err)
    assert "Traceback" not in err
    j1 = [ln.split("QEMUD_EVENT=")[1].split()[0] for ln in err.splitlines() if "QEMUD_DOMAIN=j1" in ln
          and "QEMUD_EVENT=" in ln]
    assert "failed" in j1, j1


def test_daemon_killed_while_a_removed_file_stops_its_guest_and_the_file_comes_back(
        daemon: Daemon, guest: TinyGuest) -> None:
    """Found by the chaos run: the file removed (its guest shutting down), the daemon SIGKILLed,
    the file put back before the daemon restarts. The file is the truth: the guest runs, with
    one QEMU, not 'stopped as asked' by a removal that no longer holds."""
    d = daemon
    d.start()
    pid = start(d, guest, "g", acpi=False, shutdown_timeout=4)
    text = d.path("g.xml").read_text()
    mark = d.mark()
    d.remove("g.xml")
    d.wait_for("shutdown-requested", "g", timeout=20, after=mark)
    d.kill9()
    d.drop("g.xml", text)
    _restarted_once_after_adoption(d, pid)
    assert status(d, "g")["state"] == "running"


def test_stderr_that_takes_nothing_never_stalls_the_daemon() -> None:
    """Under systemd the stderr fallback is itself a stream to journald: a hung journald fills it.
    Here stderr is a pipe already full that nobody reads: the daemon must still start, supervise
    (j1 fails its starts) and answer; the lines wait or are dropped and counted, never waited for."""
    import fcntl
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 512)
    os.set_blocking(w, True)
    base = Path(tempfile.mkdtemp(prefix="qe", dir="/tmp"))
    base.chmod(0o711)
    (base / "domains").mkdir()
    p = subprocess.Popen([str(QEMUCTL.with_name("qemud")), "--domains-dir", str(base / "domains"),
                          "--state-dir", str(base / "s"), "--log-target", "stderr"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w)
    os.close(w)
    try:
        (base / "domains" / "j1.xml").write_text(BROKEN.format(name="j1"))
        t0 = time.monotonic()
        while True:
            q = subprocess.run([str(QEMUCTL), "--state-dir", str(base / "s"), "list", "--json"],
                               capture_output=True, text=True, timeout=30)
            if q.returncode == 0 and '"failed"' in q.stdout:
                break
            assert p.poll() is None, "qemud died with a full stderr"
            assert time.monotonic() - t0 < RUN_TIMEOUT, (q.stdout, q.stderr)
            time.sleep(0.2)
        # once stderr is read again the daemon's lines arrive, with the count of those dropped
        p.terminate()
        out = b""
        while chunk := os.read(r, 65536):
            out += chunk
        assert p.wait(30) == 0
        text = out.decode(errors="replace")
        assert "QEMUD_EVENT=daemon-stopping" in text
        assert "QEMUD_EVENT=ready" in text or "log line(s) dropped" in text
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(r)
        subprocess.run([str(QEMUCTL.with_name("qemud")), "--state-dir", str(base / "s"), "--stop-guests",
                        "--timeout", "5"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
