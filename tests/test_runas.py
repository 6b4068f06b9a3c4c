"""Least privilege: the daemon (root) runs QEMU as the unprivileged ``qemud`` user (issue 7).

A real daemon as root, real QEMU, the tiny guest: the QEMU process's credentials are read from
/proc; files a guest uses are checked from the QEMU user's side (it can or cannot do the thing);
a planted record is refused. Nothing here is mocked.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import Daemon, domain_xml, running_daemon, wait_file_contains
from tests.support.tinyguest import TinyGuest

pytestmark = pytest.mark.qemu

QEMU_USER = pwd.getpwnam("qemud")
BOOT = 90.0


def as_qemu_user(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as the qemud user (what a QEMU that a guest took over could do)."""
    return subprocess.run(["/usr/bin/python3", "-c", code], user=QEMU_USER.pw_uid, group=QEMU_USER.pw_gid,
                          extra_groups=os.getgrouplist("qemud", QEMU_USER.pw_gid), capture_output=True,
                          text=True, timeout=30)


LOCKED = "<memoryBacking><locked/></memoryBacking>"


def with_locked(xml: str) -> str:
    return xml.replace("<vcpu>", LOCKED + "\n  <vcpu>")


def start(d: Daemon, guest: TinyGuest, name: str, extra: str = "", locked: bool = False) -> int:
    after = d.mark()
    xml = domain_xml(guest, name, serial_path=d.scratch / f"{name}.console")
    if locked:
        xml = with_locked(xml)
    d.drop(f"{name}.xml", xml.replace("<memballoon model='none'/>", extra + "<memballoon model='none'/>"))
    ev = d.wait_for("running", name, timeout=BOOT, after=after)
    assert ev.pid is not None
    # booted: its acpid answers the power button, so removing the file stops it cleanly
    wait_file_contains(d.scratch / f"{name}.console", guest.marker, timeout=BOOT)
    return ev.pid


def test_qemu_runs_as_the_qemud_user_and_its_directory_is_guarded(guest: TinyGuest) -> None:
    with running_daemon() as d:
        pid = start(d, guest, "ra1")
        p = psutil.Process(pid)
        assert set(p.uids()) == {QEMU_USER.pw_uid}, "real, effective and saved uid: qemud's"
        assert set(p.gids()) == {QEMU_USER.pw_gid}
        groups = set(int(g) for g in next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                                         if ln.startswith("Groups:")).split()[1:])
        assert 0 not in groups and QEMU_USER.pw_gid in groups
        run = d.run_dir("ra1")
        st = run.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, QEMU_USER.pw_gid, 0o1770)
        assert (run / "record.json").stat().st_uid == 0
        # what a QEMU taken over by its guest may not do: replace root's files beside it
        r = as_qemu_user(f"import os; os.rename({str(run / 'record.json')!r}, {str(run / 'x')!r})")
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
        r = as_qemu_user(f"import os; os.unlink({str(run / 'qemu.log')!r})")
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
        # ... but it made its own pid file there
        assert (run / "qemu.pid").stat().st_uid == QEMU_USER.pw_uid


def test_a_file_qemu_cannot_open_is_named_with_what_to_do(guest: TinyGuest, tmp_path: Path) -> None:
    """A disk in a directory only root may enter: refused by the kernel for the QEMU user, and the
    journal says which element, which user, and the command that fixes it. The other guest runs on."""
    secret_dir = tmp_path / "private"
    secret_dir.mkdir(mode=0o700)
    img = secret_dir / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    with running_daemon() as d:
        other = start(d, guest, "ok1")
        after = d.mark()
        xml = domain_xml(guest, "deny1", serial_path=d.scratch / "deny1.console",
                         restart={"policy": "never"})
        d.drop("deny1.xml", xml.replace(
            "<memballoon model='none'/>",
            f"<disk type='file' device='disk'><source file='{img}'/><target dev='vda' bus='virtio'/></disk>"
            "<memballoon model='none'/>"))
        ev = d.wait_for("crashed", "deny1", timeout=BOOT, after=after)
        assert "Permission denied" in ev.message
        assert "/domain/devices/disk[1]" in ev.message
        assert "QEMU runs as user qemud" in ev.message and "setfacl -m u:qemud:rw" in ev.message
        assert psutil.Process(other).is_running()
        assert d.events("crashed", "ok1", after=after) == []


def test_files_qemud_makes_for_the_guest_are_handed_to_its_user(guest: TinyGuest) -> None:
    """A TPM: swtpm_setup and swtpm run as qemud and own the TPM's state; a transient disk's
    overlay belongs to QEMU's user; root's secrets directory stays root's."""
    with running_daemon() as d:
        base = d.scratch / "base.img"
        base.write_bytes(b"\0" * (1 << 20))
        os.chmod(base, 0o644)  # read-only for QEMU: its writes go to the overlay
        start(d, guest, "tpm9", "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"
              f"<disk type='file' device='disk'><source file='{base}'/><target dev='vda' bus='virtio'/>"
              "<transient/></disk>")
        run = d.run_dir("tpm9")
        rec = d.record("tpm9")
        assert rec is not None
        [h] = rec["extra"]["helpers"]
        assert set(psutil.Process(h["pid"]).uids()) == {QEMU_USER.pw_uid}, "swtpm runs as qemud"
        state = run / "tpm" / "tpm2"
        assert state.stat().st_uid == QEMU_USER.pw_uid
        assert all(f.stat().st_uid == QEMU_USER.pw_uid for f in state.iterdir())
        overlay = run / "transient" / "drive0.qcow2"
        assert overlay.stat().st_uid == QEMU_USER.pw_uid
        assert base.stat().st_uid == 0, "the administrator's image keeps its owner"


def test_ethernet_tap_is_opened_by_qemud_for_the_unprivileged_qemu(guest: TinyGuest) -> None:
    """QEMU as qemud cannot open /dev/net/tun; qemud opens the tap and passes it, as libvirt
    does. The tap exists while the guest runs and goes with QEMU."""
    with running_daemon() as d:
        pid = start(d, guest, "tap1", "<interface type='ethernet'><target dev='qdtap7'/>"
                                      "<model type='virtio'/></interface>")
        assert Path("/sys/class/net/qdtap7").exists()
        cmdline = psutil.Process(pid).cmdline()
        netdev = json.loads(cmdline[cmdline.index("-netdev") + 1])
        assert netdev["type"] == "tap" and "fd" in netdev and "ifname" not in netdev
        # QEMU holds the tap (the kernel names it in the descriptor's fdinfo)
        held = [f.read_text() for f in Path(f"/proc/{pid}/fdinfo").iterdir()]
        assert any("iff:\tqdtap7" in info for info in held)
        after = d.mark()
        d.remove("tap1.xml")
        d.wait_for("stopped", "tap1", timeout=60, after=after)
        deadline = time.monotonic() + 10
        while Path("/sys/class/net/qdtap7").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path("/sys/class/net/qdtap7").exists()


def test_a_planted_record_is_not_adopted(guest: TinyGuest) -> None:
    """The QEMU user can create files in guests' directories. A record it writes there, naming a
    root process with that process's real command line and start time, must not make qemud adopt
    (and later kill) that process."""
    victim = subprocess.Popen(["sleep", "300"])
    try:
        with running_daemon() as d:
            start(d, guest, "pl1")
            d.remove("pl1.xml")
            d.wait_for("stopped", "pl1", timeout=60)
            run = d.run_dir("pl1")
            p = psutil.Process(victim.pid)
            fake = {"name": "pl1", "uuid": "", "file": str(d.domains / "pl1.xml"), "definition": "x",
                    "pid": victim.pid, "create_time": p.create_time(), "argv": p.cmdline(),
                    "qmp": str(run / "qmp.sock"), "log": str(run / "qemu.log"), "started_at": time.time()}
            r = as_qemu_user(f"import json; open({str(run / 'record.json')!r}, 'w').write({json.dumps(fake)!r})")
            assert r.returncode == 0, r.stderr
            d.kill9()
            after = d.mark()
            d.start()
            assert d.events("adopted", after=after) == []
            d.assert_no("adopted", within=1.0)
            assert victim.poll() is None, "the root process named by the planted record lives on"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize(("user", "expect"), [("root", "never runs as root"), ("qd-no-such-user", "does not exist")])
def test_qemu_user_that_is_root_or_missing_stops_the_daemon_with_a_clear_error(user: str, expect: str) -> None:
    d = Daemon()
    try:
        conf = d.scratch / "qemud.conf"
        conf.write_text(f"[qemu]\nuser = '{user}'\n")
        d.extra_args += ["--config", str(conf)]
        d.start(wait_ready=False)
        assert d.proc is not None and d.proc.wait(30) == 1
        ev = d.wait_for("config-error", timeout=10)
        assert expect in ev.message and str(conf) in ev.message
    finally:
        d.close()


def test_locked_memory_of_an_unprivileged_qemu(guest: TinyGuest) -> None:
    """<memoryBacking><locked/>: an unprivileged QEMU may lock only up to its RLIMIT_MEMLOCK.
    qemud starts it with a limit that covers the guest (as libvirt does) when it can raise the
    limit (CAP_SYS_RESOURCE, or a high enough hard limit); where it cannot (this container lacks
    CAP_SYS_RESOURCE, hard limit 8 MiB), the element is refused with what to change."""
    from qemud.runas import memlock_ceiling
    ceiling = memlock_ceiling()
    with running_daemon() as d:
        if ceiling is not None and ceiling < 2 << 30:
            after = d.mark()
            xml = domain_xml(guest, "lock1", serial_path=d.scratch / "lock1.console")
            d.drop("lock1.xml", with_locked(xml))
            ev = d.wait_for("invalid-definition", timeout=60, after=after)
            assert "/domain/memoryBacking/locked" in ev.message and "LimitMEMLOCK=infinity" in ev.message
            assert d.events("spawned", "lock1", after=after) == []
            return
        pid = start(d, guest, "lock1", locked=True)
        soft = int(next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                        if ln.startswith("Max locked memory")).split()[3])
        assert soft >= 256 << 20
        locked_kib = int(next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                              if ln.startswith("VmLck:")).split()[1])
        assert locked_kib >= 256 << 10, "the guest's RAM is locked"
