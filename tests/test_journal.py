"""The journal tells the story: qemud's events and QEMU's stderr read back from a real
systemd-journald (in a private mount namespace), with their fields; `journalctl -x` explains
them through the installed catalog."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemud.events import KINDS, catalog
from tests.support.daemon import BROKEN
from tests.support.journald import Namespace, repo

pytestmark = pytest.mark.qemu

QEMUD = Path(sys.executable).parent / "qemud"

@pytest.fixture
def ns() -> Iterator[Namespace]:
    n = Namespace()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def dirs() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qj", dir="/tmp"))
    d.chmod(0o711)  # QEMU runs as the qemud user: it passes through to its guests
    (d / "domains").mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _start(ns: Namespace, d: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(ns.cmd([str(QEMUD), "--domains-dir", str(d / "domains"), "--state-dir", str(d / "s")]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(p: subprocess.Popen[bytes]) -> bytes:
    p.terminate()
    try:
        _, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return err


def test_events_and_qemu_stderr_reach_the_journal_with_their_fields(ns: Namespace, dirs: Path) -> None:
    p = _start(ns, dirs)
    try:
        ns.wait_for(20, "SYSLOG_IDENTIFIER=qemud", "QEMUD_EVENT=ready")
        (dirs / "domains" / "j1.xml").write_text(BROKEN.format(name="j1"))
        failed = ns.wait_for(30, "QEMUD_DOMAIN=j1", "QEMUD_EVENT=failed")[-1]
        assert failed["PRIORITY"] == "3" and failed["QEMUD_STATE"] == "failed"
        assert failed["MESSAGE_ID"] == KINDS["failed"].message_id
        assert failed["MESSAGE"].startswith("j1: failed (")
        crashed = ns.journal("QEMUD_DOMAIN=j1", "QEMUD_EVENT=crashed")
        assert len(crashed) == 2  # max-retries 2: the second failed start is the last
        assert all(c["MESSAGE_ID"] == KINDS["crashed"].message_id and c["QEMUD_PID"].isdigit() for c in crashed)
        assert "QEMU exited with status 1" in crashed[0]["QEMUD_EXIT"]
        uuid = crashed[0]["QEMUD_UUID"]
        # QEMU's own complaint, as a line of its stderr, before the crash that quotes it
        qemu = ns.journal("QEMUD_DOMAIN=j1", "QEMUD_SOURCE=qemu")
        assert qemu and "could not open kernel file '/nonexistent/vmlinuz'" in qemu[0]["MESSAGE"]
        assert qemu[0]["QEMUD_UUID"] == uuid and "QEMUD_EVENT" not in qemu[0]
        assert int(qemu[0]["__MONOTONIC_TIMESTAMP"]) < int(crashed[0]["__MONOTONIC_TIMESTAMP"])
        # the guest's whole life, in order, by its name
        events = [e["QEMUD_EVENT"] for e in ns.journal("QEMUD_DOMAIN=j1") if "QEMUD_EVENT" in e]
        assert events[:4] == ["defined", "starting", "spawned", "crashed"] and events[-1] == "failed"
    finally:
        err = _stop(p)
    assert b"Traceback" not in err


def test_events_go_to_stderr_when_journald_goes_away(ns: Namespace, dirs: Path) -> None:
    p = _start(ns, dirs)
    try:
        ns.wait_for(20, "QEMUD_EVENT=ready")
        ns.kill_journald()
        time.sleep(0.2)
        (dirs / "domains" / "j2.xml").write_text(BROKEN.format(name="j2"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (dirs / "s" / "domains" / "j2" / "qemu.log").exists():
            time.sleep(0.05)
        time.sleep(3)
    finally:
        err = _stop(p).decode()
    assert "j2: defined by" in err and "QEMUD_EVENT=crashed" in err
    assert "Traceback" not in err


def test_catalog_is_current_and_explains_events_in_journalctl_x(ns: Namespace, dirs: Path) -> None:
    committed = (repo() / "units" / "qemud.catalog").read_text()
    assert committed == catalog(), "units/qemud.catalog is stale: python -m qemud.events > units/qemud.catalog"
    # install it the way `make install` does, inside the namespace only (tmpfs over the catalog dirs)
    r = ns.run(["sh", "-c", f"cp {repo() / 'units' / 'qemud.catalog'} /usr/lib/systemd/catalog/ && "
                "journalctl --update-catalog"])
    assert r.returncode == 0, r.stderr
    p = _start(ns, dirs)
    try:
        ns.wait_for(20, "QEMUD_EVENT=ready")
        (dirs / "domains" / "j3.xml").write_text(BROKEN.format(name="j3"))
        ns.wait_for(30, "QEMUD_DOMAIN=j3", "QEMUD_EVENT=failed")
    finally:
        _stop(p)
    out = ns.run(["journalctl", "--no-pager", "-x", "--directory", "/run/log/journal", "QEMUD_DOMAIN=j3",
                  "QEMUD_EVENT=failed"]).stdout
    assert "Subject: A guest failed" in out
    assert "Guest j3 failed to start too many times in a row" in out


def test_guest_console_reaches_the_journal_line_by_line(ns: Namespace, dirs: Path) -> None:
    from tests.support.tinyguest import ensure_guest
    g = ensure_guest()
    (dirs / "domains" / "c1.xml").write_text(f"""<domain type='qemu'>
  <name>c1</name>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{g.kernel}</kernel><initrd>{g.initrd}</initrd>
    <cmdline>console=ttyS0</cmdline></os>
  <features><acpi/></features>
  <devices><serial type='pty'/><memballoon model='none'/></devices>
</domain>""")
    p = _start(ns, dirs)
    try:
        marker = ns.wait_for(30, "QEMUD_DOMAIN=c1", "QEMUD_SOURCE=console",
                             where=lambda e: e["MESSAGE"] == g.marker)[0]
        assert marker["SYSLOG_IDENTIFIER"] == "qemud" and marker["QEMUD_PID"].isdigit()
        # the kernel's boot messages (no 'quiet'): many lines, each its own entry, in order
        lines = [e["MESSAGE"] for e in ns.journal("QEMUD_DOMAIN=c1", "QEMUD_SOURCE=console")]
        assert any(m.startswith("Linux version") or "Linux version" in m for m in lines)
        assert lines.index(g.marker) > 10
    finally:
        _stop(p)
        for pid_file in (dirs / "s" / "domains").glob("*/qemu.pid"):
            try:
                os.kill(int(pid_file.read_text().split()[0]), 9)
            except (OSError, ValueError):
                pass


def test_readme_lists_every_event_kind() -> None:
    """QEMUD_EVENT values are a documented interface: the README's table names each one."""
    import re

    from qemud.events import KINDS
    text = (repo() / "README.md").read_text()
    m = re.search(r"\| `QEMUD_EVENT` \| ([^|]*) \|", text)
    assert m is not None
    listed = {x.strip() for x in m.group(1).split(",")}
    assert listed == set(KINDS)
