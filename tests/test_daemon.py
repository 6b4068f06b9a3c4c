"""The daemon end to end: the real qemud, real QEMU (TCG) and the tiny Linux guest.

Every wait has a deadline: on the daemon's log (tests.support.daemon.Daemon.wait_for wakes on
each new line), on the guest's console file, or as an explicit quiet period when the point is
that nothing happens.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import Console, Daemon, domain_xml, pid_alive, wait_file_contains
from tests.support.tinyguest import PROMPT, TinyGuest

pytestmark = pytest.mark.qemu

#: QEMU start to `running` (QMP up, `cont` done); the guest boots ~1.6 s more to the marker
RUN_TIMEOUT = 30.0
BOOT_TIMEOUT = 60.0
#: a guest with ACPI powers off within milliseconds of the button; QEMU then quits
STOP_TIMEOUT = 30.0
POWER_DOWN = b"reboot: Power down"


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        d.start(timeout=30)
        yield d
    finally:
        # shown by pytest when the test failed
        print(d.log_text())
        d.close()


def console_path(d: Daemon, name: str) -> Path:
    return d.scratch / f"{name}.console"


def start_guest(d: Daemon, guest: TinyGuest, name: str, filename: str | None = None,
                wait_marker: bool = True, **kw: object) -> int:
    """Drop NAME.xml (a file console in the scratch dir unless told otherwise), wait until it
    runs and (by default) until the guest has booted to its marker. Returns QEMU's pid."""
    kw.setdefault("serial_path", console_path(d, name))
    after = d.mark()
    d.drop(filename or f"{name}.xml", domain_xml(guest, name, **kw))  # type: ignore[arg-type]
    spawned = d.wait_for("spawned", name, timeout=RUN_TIMEOUT, after=after)
    running = d.wait_for("running", name, timeout=RUN_TIMEOUT, after=after)
    assert running.pid == spawned.pid
    assert d.qemu_pid(name) == running.pid
    if wait_marker and kw.get("serial") != "unix":
        # without ACPI the guest has no power button: /init reports that instead of the marker,
        # then starts its shell
        booted = guest.marker if kw.get("acpi", True) else PROMPT
        wait_file_contains(Path(str(kw["serial_path"])), booted, timeout=BOOT_TIMEOUT,
                           alive=lambda: _still_running(running.pid))
    return running.pid  # type: ignore[return-value]


def _still_running(pid: int | None) -> None:
    assert pid is not None and pid_alive(pid), f"QEMU pid {pid} ended while the guest booted"


def cmdline(pid: int) -> list[str]:
    return psutil.Process(pid).cmdline()


# ---- 1 -----------------------------------------------------------------------------------------

def test_dropped_file_starts_the_guest_and_it_boots(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    console = console_path(d, "web1")
    xml = domain_xml(guest, "web1", serial_path=console)
    written = d.scratch / "web1.xml"  # written elsewhere, then renamed in: the file is never half there
    written.write_text(xml)
    after = d.mark()
    os.rename(written, d.path("web1.xml"))

    defined = d.wait_for("defined", "web1", timeout=RUN_TIMEOUT)
    assert defined["file"] == str(d.path("web1.xml"))
    d.wait_for("starting", "web1", timeout=RUN_TIMEOUT)
    spawned = d.wait_for("spawned", "web1", timeout=RUN_TIMEOUT)
    running = d.wait_for("running", "web1", timeout=RUN_TIMEOUT)
    assert running.state == "running" and running.pid == spawned.pid
    assert d.qemu_pid("web1") == running.pid
    assert "qemu-system" in cmdline(running.pid)[0]

    wait_file_contains(console, guest.marker, timeout=BOOT_TIMEOUT, alive=lambda: _still_running(running.pid))
    assert pid_alive(running.pid)
    assert not d.events("invalid-definition", after=after)
    assert len(d.events("spawned", "web1", after=after)) == 1


# ---- 2 -----------------------------------------------------------------------------------------

def test_killed_qemu_is_restarted_within_a_second(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    old = start_guest(d, guest, "web1")
    after = d.mark()
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)

    crashed = d.wait_for("crashed", "web1", timeout=10)
    assert crashed.state == "crashed"
    spawned = d.wait_for("spawned", "web1", timeout=10)
    running = d.wait_for("running", "web1", timeout=10)
    elapsed = running.received - killed_at
    new = running.pid
    assert new is not None and new != old and spawned.pid == new
    assert elapsed < 1.0, f"running again {elapsed:.3f} s after the kill"
    assert d.qemu_pid("web1") == new
    assert pid_alive(new)
    assert [e.event for e in d.events(domain="web1", after=after)
            if e.event in ("crashed", "backoff", "starting", "running", "failed")] == ["crashed", "starting", "running"]
    # the new QEMU boots the guest again (the console file is appended to)
    console = console_path(d, "web1")
    first = wait_file_contains(console, guest.marker, timeout=1)
    wait_file_contains(console, guest.marker, timeout=BOOT_TIMEOUT, start=first, alive=lambda: _still_running(new))


# ---- 3 -----------------------------------------------------------------------------------------

def test_qemu_dying_at_once_backs_off_then_fails_and_leaves_others_alone(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    good = start_guest(d, guest, "good")
    good_running = d.events("running", "good")[-1]
    after = d.mark()
    d.drop("bad.xml", domain_xml(guest, "bad", broken=True, restart={"max-retries": 3, "backoff": 1}))

    backoff = d.wait_for("backoff", "bad", timeout=RUN_TIMEOUT)
    assert backoff["next_delay"] == "1.0"
    failed = d.wait_for("failed", "bad", timeout=RUN_TIMEOUT)
    assert failed.level == "error"
    crashed = " ".join(e.message for e in d.events("crashed", "bad", after=after))
    assert "missing.img" in crashed
    # QEMU's error names its -blockdev option; qemud names the element and the file behind it
    assert f"(from /domain/devices/disk[1] in {d.path('bad.xml')})" in crashed
    # 3 starts in a row, each one ended at once: then no more
    assert len(d.events("spawned", "bad", after=after)) == 3
    assert len(d.events("crashed", "bad", after=after)) == 3
    d.assert_no("starting", "bad", within=2.5, after=failed.index + 1)

    # the other guest: untouched throughout
    assert d.events(domain="good", after=good_running.index + 1) == []
    assert pid_alive(good) and d.qemu_pid("good") == good
    assert "qemu-system" in cmdline(good)[0]


# ---- 4 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_daemon_killed_and_restarted_adopts_the_running_guest(daemon: Daemon, guest: TinyGuest, how: str) -> None:
    d = daemon
    pid = start_guest(d, guest, "web1")
    if how == "kill9":
        d.kill9()
    else:
        assert d.stop() == 0
        d.wait_for("daemon-stopping", timeout=0)
    assert pid_alive(pid), "QEMU must outlive its daemon"

    after = d.mark()
    d.start(timeout=30)
    adopted = d.wait_for("adopted", "web1", timeout=RUN_TIMEOUT, after=after)
    assert adopted.pid == pid and adopted.run == 2
    running = d.wait_for("running", "web1", timeout=RUN_TIMEOUT, after=after)
    assert running.state == "running" and running.pid == pid
    d.assert_no("spawned", "web1", within=2.0, after=after)
    d.assert_no("starting", "web1", within=0, after=after)
    assert pid_alive(pid) and d.qemu_pid("web1") == pid


# ---- 5 -----------------------------------------------------------------------------------------

def test_removed_file_shuts_the_guest_down_by_acpi(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = start_guest(d, guest, "web1")
    after = d.mark()
    d.remove("web1.xml")

    stopping = d.wait_for("stopping", "web1", timeout=10)
    requested = d.wait_for("shutdown-requested", "web1", timeout=10)
    assert requested.pid == pid
    stopped = d.wait_for("stopped", "web1", timeout=STOP_TIMEOUT)
    undefined = d.wait_for("undefined", "web1", timeout=10)
    assert stopping.index < requested.index < stopped.index < undefined.index
    assert not d.events("shutdown-timeout", "web1", after=after)
    assert not d.events("crashed", "web1", after=after)
    # the guest powered itself down (acpid -> poweroff -f), QEMU did not just get killed
    wait_file_contains(console_path(d, "web1"), POWER_DOWN, timeout=5)
    assert not pid_alive(pid), f"QEMU pid {pid} still runs after `stopped`"
    assert not (d.run_dir("web1") / "record.json").exists()


# ---- 6 -----------------------------------------------------------------------------------------

def test_invalid_edit_is_reported_and_the_guest_keeps_running(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = start_guest(d, guest, "web1")
    running = d.events("running", "web1")[-1]
    path = d.path("web1.xml")
    d.mark()
    with open(path, "w") as fh:  # an edit in place that breaks the file
        fh.write("<domain type='qemu'>\n  <name>web1</name>\n  <memory unit='MiB'>256\n")

    invalid = d.wait_for("invalid-definition", timeout=10)
    assert invalid["file"] == str(path)
    assert str(path) in invalid.message
    assert invalid.level == "error"
    d.assert_no(domain="web1", within=2.0, after=running.index + 1)
    assert pid_alive(pid) and d.qemu_pid("web1") == pid


# ---- 7 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", ["swapfile-rename", "truncate-two-chunks"])
def test_editor_save_restarts_the_guest_once(daemon: Daemon, guest: TinyGuest, save: str) -> None:
    d = daemon
    console = console_path(d, "web1")
    old = start_guest(d, guest, "web1", memory_mib=256)
    assert "size=256M" in cmdline(old)
    new_xml = domain_xml(guest, "web1", serial_path=console, memory_mib=192)
    path = d.path("web1.xml")
    after = d.mark()
    if save == "swapfile-rename":
        swp = d.path(".web1.xml.swp")
        swp.write_text(new_xml)
        os.rename(swp, path)
    else:
        half = len(new_xml) // 2
        with open(path, "w") as fh:  # truncate, first chunk: not valid XML on its own
            fh.write(new_xml[:half])
        time.sleep(0.05)  # the gap between an editor's writes, well within the 0.2 s debounce
        with open(path, "a") as fh:
            fh.write(new_xml[half:])

    redefined = d.wait_for("redefined", "web1", timeout=10)
    assert redefined["file"] == str(path)
    d.wait_for("stopping", "web1", timeout=10)
    d.wait_for("stopped", "web1", timeout=STOP_TIMEOUT)
    spawned = d.wait_for("spawned", "web1", timeout=RUN_TIMEOUT)
    running = d.wait_for("running", "web1", timeout=RUN_TIMEOUT)
    new = running.pid
    assert new is not None and new != old and spawned.pid == new
    assert "size=192M" in cmdline(new)
    # a quiet while later: still exactly one of each
    d.assert_no("invalid-definition", within=2.0, after=after)
    assert len(d.events("redefined", "web1", after=after)) == 1
    assert len(d.events("spawned", "web1", after=after)) == 1
    assert len(d.events("stopping", "web1", after=after)) == 1
    assert pid_alive(new) and d.qemu_pid("web1") == new
    assert not pid_alive(old)


# ---- 8 -----------------------------------------------------------------------------------------

def test_guest_ignoring_acpi_is_ended_after_the_shutdown_timeout(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = start_guest(d, guest, "deaf", acpi=False, shutdown_timeout=2)
    after = d.mark()
    d.remove("deaf.xml")

    stopping = d.wait_for("stopping", "deaf", timeout=10)
    d.wait_for("shutdown-requested", "deaf", timeout=10)
    timeout = d.wait_for("shutdown-timeout", "deaf", timeout=15)
    waited = timeout.received - stopping.received
    assert 1.5 <= waited <= 4.0, f"shutdown-timeout {waited:.2f} s after stopping; the domain says 2 s"
    assert timeout.level == "warning"
    stopped = d.wait_for("stopped", "deaf", timeout=15)
    d.wait_for("undefined", "deaf", timeout=10)
    assert stopped.received - timeout.received < 5.0  # QMP quit, not the SIGTERM/SIGKILL steps
    assert not pid_alive(pid)
    assert POWER_DOWN not in console_path(d, "deaf").read_bytes()
    assert not d.events("crashed", "deaf", after=after)


# ---- 9 -----------------------------------------------------------------------------------------

def _poweroff_from_inside(d: Daemon, guest: TinyGuest, name: str, on_poweroff: str) -> int:
    sock = d.scratch / f"{name}.sock"
    log = console_path(d, name)
    pid = start_guest(d, guest, name, serial="unix", serial_path=sock, serial_log=log, on_poweroff=on_poweroff)
    wait_file_contains(log, guest.marker, timeout=BOOT_TIMEOUT, alive=lambda: _still_running(pid))
    wait_file_contains(log, PROMPT, timeout=BOOT_TIMEOUT, alive=lambda: _still_running(pid))
    con = Console(sock)
    try:
        d.mark()
        con.send("poweroff -f\n")
        shutdown = d.wait_for("guest-shutdown", name, timeout=20)
        assert shutdown.pid == pid
        assert on_poweroff in shutdown.message
    finally:
        con.close()
    return pid


def test_guest_poweroff_with_on_poweroff_destroy_stays_stopped(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    pid = _poweroff_from_inside(d, guest, "web1", "destroy")
    d.wait_for("stopping", "web1", timeout=10)
    stopped = d.wait_for("stopped", "web1", timeout=STOP_TIMEOUT)
    assert POWER_DOWN in console_path(d, "web1").read_bytes()
    d.assert_no("starting", "web1", within=3.0, after=stopped.index + 1)
    d.assert_no("spawned", "web1", within=0, after=stopped.index + 1)
    assert not pid_alive(pid)


def test_guest_poweroff_with_on_poweroff_restart_starts_again(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    old = _poweroff_from_inside(d, guest, "web1", "restart")
    d.wait_for("stopping", "web1", timeout=10)
    d.wait_for("stopped", "web1", timeout=STOP_TIMEOUT)
    d.wait_for("starting", "web1", timeout=10)
    spawned = d.wait_for("spawned", "web1", timeout=RUN_TIMEOUT)
    running = d.wait_for("running", "web1", timeout=RUN_TIMEOUT)
    new = running.pid
    assert new is not None and new != old and spawned.pid == new
    assert pid_alive(new) and d.qemu_pid("web1") == new
    assert not pid_alive(old)


# ---- 10 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("then", ["nothing", "touch-first-file"])
def test_second_file_with_the_same_name_is_refused(daemon: Daemon, guest: TinyGuest, then: str) -> None:
    """The file that defined the guest first keeps it. `touch-first-file`: the first file's
    mtime is bumped afterwards (touch, a backup restore, a save without changes): its content is
    the same, so nothing may happen to the guest, and the second file stays refused."""
    d = daemon
    pid = start_guest(d, guest, "web1", filename="a.xml", uuid="6d6f1c02-8a4b-4f3e-9d55-0123456789ab")
    running = d.events("running", "web1")[-1]
    d.mark()
    other_console = d.scratch / "other.console"
    d.drop("b.xml", domain_xml(guest, "web1", serial_path=other_console,
                               uuid="6d6f1c02-8a4b-4f3e-9d55-ba9876543210", memory_mib=192))

    dup = d.wait_for("duplicate-definition", timeout=10)
    assert dup["file"] == str(d.path("b.xml"))
    assert str(d.path("a.xml")) in dup.message and "web1" in dup.message
    if then == "touch-first-file":
        os.utime(d.path("a.xml"))
    # nothing happens to the guest (not a redefinition from b.xml, not a restart)
    d.assert_no(domain="web1", within=2.0, after=running.index + 1)
    # and a.xml is not the one refused now
    d.assert_no("duplicate-definition", within=0, pred=lambda e: e["file"] == str(d.path("a.xml")))
    assert pid_alive(pid) and d.qemu_pid("web1") == pid
    assert "size=256M" in cmdline(pid)
    assert not other_console.exists()


# ---- guest reboot --------------------------------------------------------------------------

@pytest.mark.parametrize("on_reboot", ["restart", "destroy"])
def test_guest_reboot_follows_on_reboot(daemon: Daemon, guest: TinyGuest, on_reboot: str) -> None:
    """A reboot inside the guest: on_reboot='restart' relaunches QEMU (faster than a reset in
    place under TCG), on_reboot='destroy' leaves the guest stopped."""
    d = daemon
    name = "web1"
    sock = d.scratch / f"{name}.sock"
    log = console_path(d, name)
    pid = start_guest(d, guest, name, serial="unix", serial_path=sock, serial_log=log, on_reboot=on_reboot)
    wait_file_contains(log, guest.marker, timeout=BOOT_TIMEOUT, alive=lambda: _still_running(pid))
    wait_file_contains(log, PROMPT, timeout=BOOT_TIMEOUT, alive=lambda: _still_running(pid))
    con = Console(sock)
    try:
        d.mark()
        con.send("reboot -f\n")
        shutdown = d.wait_for("guest-shutdown", name, timeout=20)
        assert shutdown.pid == pid and f"on_reboot={on_reboot}" in shutdown.message
    finally:
        con.close()
    d.wait_for("stopped", name, timeout=STOP_TIMEOUT)
    if on_reboot == "restart":
        running = d.wait_for("running", name, timeout=RUN_TIMEOUT)
        assert running.pid is not None and running.pid != pid and pid_alive(running.pid)
    else:
        d.assert_no("starting", name, within=3)
        assert not pid_alive(pid)


def test_guest_reboot_while_no_daemon_runs_resets_in_place(daemon: Daemon, guest: TinyGuest) -> None:
    """A guest that reboots while qemud is stopped (a restart, an upgrade) must not stay down:
    with nobody to relaunch QEMU it resets in place, and the next qemud adopts it running; from
    then on a reboot relaunches QEMU again."""
    d = daemon
    name = "rb1"
    sock = d.scratch / f"{name}.sock"
    log = console_path(d, name)
    pid = start_guest(d, guest, name, serial="unix", serial_path=sock, serial_log=log)
    wait_file_contains(log, PROMPT, timeout=BOOT_TIMEOUT, alive=lambda: _still_running(pid))
    assert d.stop() == 0
    booted = log.read_bytes().count(guest.marker.encode())
    con = Console(sock)
    try:
        con.send("reboot -f\n")
        deadline = time.monotonic() + BOOT_TIMEOUT
        while log.read_bytes().count(guest.marker.encode()) <= booted:  # it boots again, same QEMU
            assert time.monotonic() < deadline, "the guest did not come back after its reboot"
            assert pid_alive(pid), "QEMU stopped at the guest's reboot with no qemud to restart it"
            time.sleep(0.1)
        wait_file_contains(log, PROMPT, timeout=BOOT_TIMEOUT, start=log.read_bytes().rfind(guest.marker.encode()))
        after = d.mark()
        d.start()
        adopted = d.wait_for("adopted", name, timeout=RUN_TIMEOUT, after=after)
        assert adopted.pid == pid and "(running)" in adopted.message
        d.assert_no("stopped", name, within=2)
        again = d.mark()
        con.send("reboot -f\n")  # watched again: qemud relaunches QEMU, as on_reboot says
        assert "rebooted" in d.wait_for("guest-shutdown", name, timeout=20, after=again).message
        running = d.wait_for("running", name, timeout=RUN_TIMEOUT, after=again)
        assert running.pid is not None and running.pid != pid
    finally:
        con.close()


def test_idle_daemon_does_no_periodic_work(daemon: Daemon, guest: TinyGuest) -> None:
    """With a guest running and nothing happening, the daemon is never woken: no polling timer,
    no periodic task (inotify, pidfds and QMP sockets wake it when something happens)."""
    d = daemon
    start_guest(d, guest, "web1")
    assert d.proc is not None
    status = Path(f"/proc/{d.proc.pid}/status")

    def switches() -> int:
        text = status.read_text()
        return sum(int(line.split()[1]) for line in text.splitlines()
                   if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    time.sleep(1.0)  # let the start settle
    before = switches()
    time.sleep(3.0)
    assert switches() - before == 0


# ---- host shutdown -------------------------------------------------------------------------

@pytest.mark.parametrize("with_daemon", [True, False])
def test_stop_guests_shuts_every_guest_down_in_parallel(daemon: Daemon, guest: TinyGuest, with_daemon: bool) -> None:
    """qemud --stop-guests (the host-shutdown unit's ExecStop): every guest powers off through
    ACPI, and a running daemon keeps them down instead of restarting them."""
    d = daemon
    pids = [start_guest(d, guest, name) for name in ("g1", "g2")]
    for name in ("g1", "g2"):
        wait_file_contains(console_path(d, name), guest.marker, timeout=BOOT_TIMEOUT)
    if not with_daemon:
        d.kill9()
    mark = d.mark()
    t0 = time.monotonic()
    r = subprocess.run([str(d.argv[0]), "--state-dir", str(d.state), "--log-target", "stderr",
                        "--stop-guests", "--timeout", "30"], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "2 guest(s) shut down, 0 ended after the timeout" in r.stderr
    assert took < 20  # in parallel, each within milliseconds of its poweroff
    for pid in pids:
        assert not pid_alive(pid)
    for name in ("g1", "g2"):
        assert "reboot: Power down" in console_path(d, name).read_text(errors="replace")
    if with_daemon:
        for name in ("g1", "g2"):
            d.wait_for("stopped", name, timeout=10, after=mark)
        d.assert_no("starting", "g1", within=2)


def test_first_start_with_an_empty_capability_cache(guest: TinyGuest) -> None:
    """A fresh install or a QEMU upgrade: the daemon probes QEMU (off its event loop) and the
    guest starts."""
    cache = Path(tempfile.mkdtemp(prefix="qc", dir="/tmp"))
    d = Daemon(env={"QEMUD_CACHE_DIR": str(cache)})
    try:
        d.start(timeout=30)
        start_guest(d, guest, "fresh")
        assert list((cache / "caps").glob("*.json")), "the probe result is cached"
    finally:
        print(d.log_text())
        d.close()
        shutil.rmtree(cache, ignore_errors=True)


def test_files_and_directories_others_may_write_are_refused(daemon: Daemon, guest: TinyGuest) -> None:
    """Whoever can write a domain file can make root start QEMU with any file: like sshd's
    StrictModes, such a file (or directory) is refused, and a running guest is left alone."""
    d = daemon
    pid = start_guest(d, guest, "web1")
    d.mark()
    bad = d.domains / "evil.xml"
    bad.write_text(domain_xml(guest, "evil"))
    os.chmod(bad, 0o666)
    os.rename(bad, d.domains / "evil2.xml")  # a rename is what the daemon reacts to
    refused = d.wait_for("invalid-definition", timeout=10)
    assert "evil2.xml" in refused.message and "writable by others" in refused.message
    d.assert_no("defined", "evil", within=1)
    # the directory itself becomes writable by others: nothing in it is read any more, and the
    # running guest keeps running
    os.chmod(d.domains, 0o777)
    (d.domains / "web1.xml").unlink()
    err = d.wait_for("directory-error", timeout=10)
    assert "writable by others" in err.message
    d.assert_no("stopping", "web1", within=1)
    assert pid_alive(pid)
    os.chmod(d.domains, 0o755)


def test_file_removed_and_put_back_while_the_guest_stops(daemon: Daemon, guest: TinyGuest) -> None:
    """`rm web1.xml; cp backup web1.xml` while the guest is still shutting down: the guest is
    wanted again and runs afterwards (the file is the truth)."""
    d = daemon
    start_guest(d, guest, "web1", acpi=False, shutdown_timeout=2)
    text = (d.domains / "web1.xml").read_text()
    mark = d.mark()
    d.remove("web1.xml")
    d.wait_for("stopping", "web1", timeout=10, after=mark)
    d.drop("web1.xml", text)
    d.wait_for("stopped", "web1", timeout=20, after=mark)
    running = d.wait_for("running", "web1", timeout=20, after=mark)
    assert running.pid is not None and pid_alive(running.pid)


def test_symlink_loop_in_the_directory_is_reported_not_fatal(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    os.symlink("loop.xml", d.domains / "loop.xml")
    d.drop("web1.xml", domain_xml(guest, "web1", serial_path=console_path(d, "web1")))
    err = d.wait_for("invalid-definition", timeout=10)
    assert "loop.xml" in err.message and "Too many levels of symbolic links" in err.message
    d.wait_for("running", "web1", timeout=20)
