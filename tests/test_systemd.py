"""qemud under a real systemd, driven as an administrator would.

A throwaway container (tests/support/nspawn.py: this host's Debian on an overlay that forgets
everything, systemd as PID 1) gets ``make install`` from this checkout; then ``systemctl start
qemud``, the tiny test guest's XML copied into /etc/qemud/domains, its events and console read
back with ``journalctl``, ``systemctl reload qemud``, ``systemctl restart qemud`` and a killed
daemon started again by systemd (the same QEMU each time), ``qemud-guests.service`` stopped (the
guest powers off through ACPI) and ``systemctl stop qemud``.

It needs root, systemd-nspawn (``make deps`` installs systemd-container) and overlayfs; without
them it fails, saying what is missing, rather than being skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemud.events import KINDS
from tests.support.daemon import domain_xml
from tests.support.nspawn import Container, missing_prerequisites, mount_point
from tests.support.tinyguest import MARKER, ensure_guest

pytestmark = pytest.mark.qemu

CHECKOUT = Path(__file__).resolve().parents[1]
DOMAIN = "/etc/qemud/domains/tiny.xml"
CONSOLE = "/var/lib/qemud-e2e/tiny-console.log"  # the guest's serial port, a file QEMU writes
#: CONSOLE's directory: the qemud user's, as QEMU runs as that user (/run/qemud is root's)
CONSOLE_DIR = "/var/lib/qemud-e2e"
POWER_DOWN = "reboot: Power down"  # the guest kernel's last words after the ACPI power button
SHARE = "/var/lib/qemud-e2e-share"  # the guest's virtiofs share, made in the container
BRIDGE = "qemud-e2e-br"  # the bridge of the guest's bridged NIC, made in the container
TAP = "qemud-e2e-tap"  # the tap device QEMU makes for the guest's type='ethernet' NIC
#: the exposure ``systemd-analyze security`` gives qemud.service (units/qemud.service's hardening):
#: a change that loosens the unit fails here; one that tightens it lowers this number (as systemd
#: 252, Debian 12's, scores them: another version weighs the settings differently)
MAX_EXPOSURE = {"qemud.service": 5.0, "qemud-guests.service": 1.2}


def _pid(e: dict[str, Any]) -> int:
    return int(e["_PID"])


def _events(c: Container, event: str, *, by: int | None = None, **fields: str) -> list[dict[str, Any]]:
    """qemud's ``event`` entries (from daemon pid ``by``, when given)."""
    matches = [f"QEMUD_EVENT={event}", *(f"QEMUD_{k.upper()}={v}" for k, v in fields.items())]
    return [e for e in c.journal(*matches) if by is None or _pid(e) == by]


def _wait_event(c: Container, event: str, *, by: int | None = None, timeout: float = 30,
                **fields: str) -> dict[str, Any]:
    """The first ``event`` entry (from daemon pid ``by``); an internal error of qemud meanwhile
    fails at once with its message."""
    deadline = time.monotonic() + timeout
    while True:
        found = _events(c, event, by=by, **fields)
        if found:
            return found[0]
        errors = _events(c, "internal-error", by=by)
        if errors:
            raise AssertionError(f"waiting for QEMUD_EVENT={event} {fields}: qemud logged an internal error: "
                                 + " | ".join(e.get("MESSAGE", "") for e in errors))
        if time.monotonic() > deadline:
            raise AssertionError(f"no QEMUD_EVENT={event} {fields} from qemud pid {by} within {timeout} s")
        time.sleep(0.1)


def _wait_status(c: Container, want: str, timeout: float = 20) -> None:
    """StatusText (qemud's notify STATUS=) becomes ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        text = c.show("qemud", "StatusText")["StatusText"]
        if text == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"StatusText of qemud.service is {text!r}, not {want!r}, after {timeout} s")
        time.sleep(0.1)


def _wait_console(c: Container, text: str, timeout: float = 30) -> None:
    """``text`` appears in the serial console file and, as a line, in the journal (QEMUD_SOURCE=console)."""
    deadline = time.monotonic() + timeout
    while text not in c.run(["cat", CONSOLE], check=False).stdout:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not on the guest's console ({CONSOLE}) within {timeout} s:\n"
                                 + c.run(["tail", "-c", "2000", CONSOLE], check=False).stdout)
        time.sleep(0.1)
    c.wait_journal("QEMUD_SOURCE=console", "QEMUD_DOMAIN=tiny", where=lambda e: text in e.get("MESSAGE", ""),
                   timeout=max(5.0, deadline - time.monotonic()), what=f"QEMUD_SOURCE=console with {text!r}")


def _qemu(c: Container, pid: int, guest_uuid: str) -> list[str]:
    """QEMU pid ``pid`` in the container: alive, running our guest, in qemud.service's cgroup."""
    assert c.pid_alive(pid), f"QEMU pid {pid} is not running in the container"
    argv = c.read_file(f"/proc/{pid}/cmdline").split("\0")
    assert "qemu-system" in argv[0] and guest_uuid in argv, f"pid {pid} is not the guest's QEMU: {argv[:6]}"
    cgroup = c.read_file(f"/proc/{pid}/cgroup")
    assert "/system.slice/qemud.service" in cgroup, f"QEMU pid {pid} is not in qemud.service's cgroup: {cgroup}"
    return argv


def _adopted_by_new_daemon(c: Container, old_main: int, qemu_pid: int, guest_uuid: str,
                           timeout: float = 30) -> int:
    """A new qemud replaces ``old_main`` and adopts QEMU ``qemu_pid`` (no second QEMU); its pid."""
    deadline = time.monotonic() + timeout
    while True:
        main = int(c.show("qemud", "MainPID")["MainPID"])
        if main not in (0, old_main):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"no new qemud replaced pid {old_main} within {timeout} s (MainPID {main})")
        time.sleep(0.1)
    adopted = _wait_event(c, "adopted", by=main, domain="tiny", timeout=max(5.0, deadline - time.monotonic()))
    assert int(adopted["QEMUD_PID"]) == qemu_pid, f"adopted {adopted['QEMUD_PID']}, the QEMU was {qemu_pid}"
    _wait_event(c, "ready", by=main, timeout=10)
    c.wait_active("qemud")
    _qemu(c, qemu_pid, guest_uuid)
    _wait_status(c, "1 running")
    assert len(_events(c, "spawned", domain="tiny")) == 1, "a second QEMU was started"
    return main


def _hardened_guest(xml: str) -> str:
    """The tiny guest with what the unit's sandbox could break: every helper qemud starts beside
    QEMU (virtiofsd for a virtiofs share, passt for a user NIC, swtpm for a TPM: they make
    namespaces, drop capabilities, install seccomp filters; dbus-daemon for the D-Bus display's
    private bus), the NICs that need CAP_NET_ADMIN and
    /dev/net/tun (a bridged one through qemu-bridge-helper, a tap QEMU creates) and a pinned vCPU
    with a real-time scheduler (``qemud.tuning`` sets its affinity and SCHED_FIFO). No <shares>: the container's cgroup v2 has no cpu/io/memory controllers
    on a hybrid host (they are bound to v1 there), so no guest cgroup can be made in it; that the
    unit leaves qemud's own cgroup writable is checked directly."""
    extra = ("<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>"
             f"<source dir='{SHARE}'/><target dir='share'/></filesystem>\n    "
             "<interface type='user'><mac address='52:54:00:e2:e0:01'/><backend type='passt'/>"
             "<model type='virtio'/></interface>\n    "
             "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n    "
             f"<interface type='bridge'><source bridge='{BRIDGE}'/><model type='virtio'/></interface>\n    "
             f"<interface type='ethernet'><target dev='{TAP}' managed='no'/><model type='virtio'/></interface>\n    "
             "<graphics type='dbus'/>\n"
             "  </devices>")
    xml = xml.replace("</devices>", extra, 1)
    xml = xml.replace("  <vcpu>1</vcpu>\n", "  <vcpu>1</vcpu>\n  <cputune><vcpupin vcpu='0' cpuset='0'/>"
                      "<vcpusched vcpus='0' scheduler='fifo' priority='1'/></cputune>\n"
                      "  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n", 1)
    return xml


def _helpers_alive(c: Container, by: int) -> dict[str, int]:
    """The guest's helpers (name -> pid) as qemud started them: all four, each still running."""
    started = {e["QEMUD_HELPER"]: int(e["QEMUD_PID"]) for e in _events(c, "helper-started", by=by, domain="tiny")}
    assert sorted(n.split("-")[0] for n in started) == ["dbus", "passt", "swtpm", "virtiofsd"], started
    died = _events(c, "helper-died", domain="tiny") + _events(c, "helper-exited", domain="tiny")
    assert not died, "a helper ended: " + " | ".join(e.get("MESSAGE", "") for e in died)
    for name, pid in started.items():
        assert c.pid_alive(pid), f"helper {name} (pid {pid}) is not running"
    return started


def _exposure(text: str) -> float:
    """The number in systemd-analyze security's last line ("→ Overall exposure level for
    qemud.service: 6.4 MEDIUM")."""
    last = text.strip().splitlines()[-1]
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", last)
    assert m, f"no exposure level in systemd-analyze security's output: {last!r}"
    return float(m.group(1))


@pytest.mark.parametrize("unit", sorted(MAX_EXPOSURE))
def test_unit_exposure(unit: str) -> None:
    """units/UNIT as systemd scores it, offline: at most its MAX_EXPOSURE."""
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(CHECKOUT / "units" / unit)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    level = _exposure(r.stdout)
    assert level <= MAX_EXPOSURE[unit], f"{unit}'s exposure rose to {level} (at most {MAX_EXPOSURE[unit]}):\n{r.stdout}"


def _qemus(c: Container) -> list[str]:
    return c.run(["pgrep", "-a", "qemu-system"], check=False).stdout.splitlines()


@contextlib.contextmanager
def _step(c: Container, name: str, timings: dict[str, float]) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"step {name!r}: {exc}\n\n---- the container ----\n{c.diagnostics()}") from exc
    timings[name] = time.monotonic() - t0


def test_qemud_under_systemd() -> None:
    missing = missing_prerequisites()
    assert not missing, "the systemd end-to-end test cannot run here; missing: " + "; ".join(missing)
    guest = ensure_guest()
    guest_uuid = str(uuid.uuid4())  # names this run's QEMU on the host too
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    binds = {guest.kernel.resolve().parent, guest.initrd.resolve().parent}
    # make install's python3 (the one on PATH) makes the venv: visible inside when on another mount
    python3 = shutil.which("python3", path=Container.environment()["PATH"])
    assert python3, "no python3 on PATH for make install"
    prefix = Path(os.path.realpath(python3)).parent.parent
    if mount_point(prefix) != Path("/"):
        binds.add(prefix)
    src, copied = _visible_checkout()
    try:
        _run_in_container(src, binds, guest, guest_uuid, timings, t_all)
    finally:
        if copied:
            shutil.rmtree(src, ignore_errors=True)


def _visible_checkout() -> tuple[Path, bool]:
    """The checkout as the container can see it: where nspawn mounts its own file systems
    (/tmp, /run: a CI clone may sit in /tmp) a copy of the working tree elsewhere is used."""
    if not any(p == CHECKOUT or p in CHECKOUT.parents for p in (Path("/tmp"), Path("/run"), Path("/dev"))):
        return CHECKOUT, False
    dest = Path(tempfile.mkdtemp(prefix="qemud-e2e-src-", dir="/var/tmp"))
    shutil.copytree(CHECKOUT, dest, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".state", ".cache",
                                                  "*.egg-info", "build", ".pytest_cache", ".hypothesis"))
    return dest, True


def _run_in_container(src: Path, binds: set[Path], guest: Any, guest_uuid: str, timings: dict[str, float],
                      t_all: float) -> None:
    with Container(overlay_dirs=[src], ro_binds=sorted(binds)) as c:
        # 1. only ever boot on the overlay, in its own mount namespace
        proof = c.prove_isolation()
        assert c.isolated, proof
        with _step(c, "boot", timings):
            state = c.boot()
            assert state in ("running", "degraded"), state
            failed = c.systemctl("--failed", "--no-legend").stdout.strip()
            print(f"\nisolation: {proof}\nbooted to {state!r} in {c.boot_seconds:.1f} s"
                  + (f"; failed units:\n{failed}" if failed else ""))
            for p in (guest.kernel, guest.initrd, src / "Makefile"):
                c.run(["test", "-r", str(p)])  # what the container needs is visible in it

        with _step(c, "make install", timings):
            # pip needs the package index: the host's network namespace, everything else the container's
            c.run(["make", "-C", str(src), "install"], host_network=True, timeout=900)
            unit = c.show("qemud", "LoadState", "FragmentPath", "Type", "NotifyAccess", "KillMode")
            assert unit == {"LoadState": "loaded", "FragmentPath": "/lib/systemd/system/qemud.service",
                            "Type": "notify", "NotifyAccess": "main", "KillMode": "process"}, unit
            assert c.show("qemud-guests", "LoadState")["LoadState"] == "loaded"
            assert c.run(["getent", "passwd", "qemud"], check=False).returncode == 0, \
                "make install did not create the qemud user (systemd-sysusers)"
            assert c.run(["readlink", "-f", "/usr/bin/qemud"]).stdout.strip() == "/usr/lib/qemud/venv/bin/qemud"
            # the unit systemd loaded is as confined as the file says
            for name, most in MAX_EXPOSURE.items():
                level = _exposure(c.run(["systemd-analyze", "security", "--no-pager", name]).stdout)
                assert level <= most, f"{name}'s exposure is {level} as loaded (at most {most})"

        # 2. the daemon, started by systemd, says it is ready and how many guests it has
        with _step(c, "start qemud", timings):
            c.systemctl("start", "qemud")
            assert c.is_active("qemud") == "active"
            main = int(c.show("qemud", "MainPID")["MainPID"])
            assert main > 0
            _wait_event(c, "ready", by=main, timeout=10)
            _wait_status(c, "no guests")
            dog = c.show("qemud", "WatchdogUSec", "WatchdogTimestampMonotonic")
            assert dog["WatchdogUSec"] == "30s", dog
            assert int(dog["WatchdogTimestampMonotonic"]) > 0, f"qemud sent no WATCHDOG=1: {dog}"

        # 3. an administrator drops the guest's file in; the guest runs, the journal tells it
        with _step(c, "guest runs", timings):
            c.run(["mkdir", "-p", SHARE])
            c.run(["install", "-d", "-o", "qemud", "-g", "qemud", CONSOLE_DIR])
            # passt needs a host interface with a default route: the container's network is private
            # (lo only), so a veth pair stands in for the uplink
            for cmd in ("link add qemud-e2e0 type veth peer name qemud-e2e1", "addr add 192.0.2.2/24 dev qemud-e2e0",
                        "link set qemud-e2e1 up", "link set qemud-e2e0 up", "route add default via 192.0.2.1"):
                c.run(["ip", *cmd.split()])
            # the bridged NIC: a bridge, and qemu-bridge-helper's permission to use it
            c.run(["ip", "link", "add", BRIDGE, "type", "bridge"])
            c.run(["ip", "link", "set", BRIDGE, "up"])
            c.run(["mkdir", "-p", "/etc/qemu"])
            c.write_file("/etc/qemu/bridge.conf", f"allow {BRIDGE}\n")
            c.write_file(DOMAIN, _hardened_guest(domain_xml(guest, "tiny", uuid=guest_uuid, serial_path=CONSOLE,
                                                            shutdown_timeout=30)))
            running = _wait_event(c, "running", by=main, domain="tiny", timeout=60)
            qemu_pid = int(running["QEMUD_PID"])
            assert running["SYSLOG_IDENTIFIER"] == "qemud" and running["_SYSTEMD_UNIT"] == "qemud.service"
            assert running["MESSAGE_ID"] == KINDS["running"].message_id
            assert running["QEMUD_UUID"] == guest_uuid
            _qemu(c, qemu_pid, guest_uuid)
            _wait_status(c, "1 running")
            _wait_console(c, MARKER)
            helpers = _helpers_alive(c, main)
            # qemuctl status: QEMU's disk I/O (/proc/PID/io) and its taps' counters (/proc/PID/fdinfo)
            # are readable by the daemon under the unit: QEMU runs as the qemud user, so that takes
            # CAP_SYS_PTRACE
            status = json.loads(c.run(["qemuctl", "status", "tiny", "--json"]).stdout)
            assert status["io"] is not None and status["net"] is not None, \
                f"qemuctl status has no I/O or tap counters: io={status['io']} net={status['net']}"
            assert c.run(["ip", "link", "show", TAP], check=False).returncode == 0, f"QEMU made no tap {TAP}"
            ports = c.run(["ip", "-o", "link", "show", "master", BRIDGE]).stdout
            assert ports.strip(), f"qemu-bridge-helper put no tap on {BRIDGE}"
            # qemud.tuning makes guest cgroups below the daemon's own (Delegate=yes): writable
            # from the service's mount namespace, where the rest of /sys/fs/cgroup is read-only
            own = "/sys/fs/cgroup/system.slice/qemud.service"
            in_service = ["nsenter", "-t", str(main), "-m", "test", "-w"]
            assert c.run([*in_service, f"{own}/cgroup.subtree_control"], check=False).returncode == 0, \
                f"qemud cannot write its delegated cgroup {own}"
            assert c.run([*in_service, "/sys/fs/cgroup/system.slice/cgroup.procs"], check=False).returncode != 0, \
                "qemud may write cgroups other than its own (ProtectControlGroups=)"
            assert c.show("qemud", "Delegate")["Delegate"] == "yes"
            pinned = [t for t in c.run(["ls", f"/proc/{qemu_pid}/task"]).stdout.split()
                      if "Cpus_allowed_list:\t0\n" in c.read_file(f"/proc/{qemu_pid}/task/{t}/status")]
            assert pinned, "no thread of QEMU is pinned to CPU 0 (<vcpupin vcpu='0' cpuset='0'/>)"
            policies = [c.run(["chrt", "-p", t]).stdout for t in pinned]
            assert any("SCHED_FIFO" in p for p in policies), \
                f"the vCPU thread did not get <vcpusched scheduler='fifo'> (RestrictRealtime=?): {policies}"

        # 4. journalctl -x explains the events through the installed catalog
        with _step(c, "catalog", timings):
            text = c.run(["journalctl", "--no-pager", "-b", "-x", "-u", "qemud"]).stdout
            assert "reception only permitted for main PID" not in text, \
                "a child of qemud (QEMU or a helper) sent systemd notify messages as if it were the service"
            explained = KINDS["running"].explanation.replace("@QEMUD_DOMAIN@", "tiny").replace(
                "@QEMUD_PID@", str(qemu_pid))  # the catalog's fields filled in from the entry
            for needle in (f"Subject: {KINDS['running'].subject}", explained, f"Subject: {KINDS['ready'].subject}"):
                assert needle in text, f"{needle!r} not in journalctl -x -u qemud:\n{text[-3000:]}"

        # 5. reload: the directory is reread, nothing restarts
        with _step(c, "reload", timings):
            c.systemctl("reload", "qemud")
            _wait_event(c, "reloading", by=main, timeout=10)
            c.wait_active("qemud")
            _wait_status(c, "1 running")
            assert int(c.show("qemud", "MainPID")["MainPID"]) == main, "reload replaced the daemon"
            _qemu(c, qemu_pid, guest_uuid)
            assert len(_events(c, "spawned", domain="tiny")) == 1, "a reload started a second QEMU"

        # 6. restart: a new daemon adopts the same QEMU (KillMode=process)
        with _step(c, "restart", timings):
            c.systemctl("restart", "qemud")
            assert c.is_active("qemud") == "active"
            main = _adopted_by_new_daemon(c, main, qemu_pid, guest_uuid)
            for name, pid in helpers.items():
                assert c.pid_alive(pid), f"helper {name} (pid {pid}) did not survive the daemon's restart"

        # 6b. the daemon dies (SIGKILL): systemd starts it again (Restart=on-failure), it adopts the QEMU
        with _step(c, "killed", timings):
            c.systemctl("kill", "--signal=SIGKILL", "--kill-who=main", "qemud")
            main = _adopted_by_new_daemon(c, main, qemu_pid, guest_uuid, timeout=15)
            assert c.show("qemud", "NRestarts")["NRestarts"] == "1"
            for name, pid in helpers.items():
                assert c.pid_alive(pid), f"helper {name} (pid {pid}) did not survive the daemon's restart"

        # 7. qemud-guests.service: its stop (host shutdown) powers the guest off through ACPI
        with _step(c, "qemud-guests", timings):
            c.systemctl("start", "qemud-guests")
            assert c.is_active("qemud-guests") == "active"
            c.systemctl("stop", "qemud-guests", timeout=120)
            assert c.is_active("qemud-guests") == "inactive"
            _wait_event(c, "shutdown-requested", by=main, domain="tiny", timeout=10)
            stopped = _wait_event(c, "stopped", by=main, domain="tiny", timeout=40)
            assert not _events(c, "shutdown-timeout", domain="tiny"), "the guest ignored the ACPI power button"
            _wait_console(c, POWER_DOWN, timeout=10)  # the guest's own poweroff, not a kill
            deadline = time.monotonic() + 10
            while c.pid_alive(qemu_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not c.pid_alive(qemu_pid), f"QEMU pid {qemu_pid} still runs after {stopped.get('MESSAGE')!r}"
            assert not _qemus(c), f"QEMU still runs: {_qemus(c)}"
            assert c.is_active("qemud") == "active", "stopping the guests stopped the daemon"
            _wait_status(c, "1 stopped")

        # 8. the daemon stops
        with _step(c, "stop qemud", timings):
            c.systemctl("stop", "qemud")
            assert c.is_active("qemud") == "inactive"
            _wait_event(c, "daemon-stopping", by=main, timeout=10)
            assert c.show("qemud", "Result")["Result"] == "success"
            assert not _qemus(c)
            left = c.run(["pgrep", "-af", "bin/qemud"], check=False).stdout
            assert not left.strip(), f"qemud outlived systemctl stop qemud: {left}"

    # teardown (Container.close) checked the namespace, mounts and cgroup; and on the host:
    mine = [p.pid for p in psutil.process_iter(["cmdline"]) if guest_uuid in (p.info["cmdline"] or [])]
    assert not mine, f"QEMU of this test still runs on the host: {mine}"
    assert not c.leftovers(), f"left behind by the container: {c.leftovers()}"
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
          + f"; total {time.monotonic() - t_all:.1f} s")
