"""Devices with helper processes: <filesystem> (9p, virtiofs + virtiofsd) and <tpm> (swtpm).

Translation checks use the probed QEMU (and HostFacts replaced where a host resource is
simulated); realization starts the helpers with qemud.helpers and QEMU as the daemon does and
asks QMP; the daemon tests run the real qemud with the tiny guest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemud import helpers
from qemud.argv import Command, build_argv
from qemud.caps import HostCaps, probe
from qemud.domain import parse_domain
from qemud.errors import DomainError
from qemud.launch import prepare
from qemud.paths import GuestPaths
from qemud.proc import qmp_fd_argv, qmp_listener, spawn
from qemud.qmp import Qmp
from tests.support.daemon import Daemon, domain_xml, pid_alive, wait_file_contains
from tests.support.tinyguest import TinyGuest

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
RUN_TIMEOUT = 30.0
BOOT_TIMEOUT = 60.0


def xml(devices: str, numa_shared: bool = False, name: str = "h1") -> str:
    cpu = ("<cpu><numa><cell id='0' cpus='0' memory='128' unit='MiB' memAccess='shared'/></numa></cpu>"
           if numa_shared else "")
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type></os>{cpu}"
            f"<devices>{devices}<memballoon model='none'/></devices></domain>")


@pytest.fixture(scope="module")
def caps() -> HostCaps:
    return probe(QEMU)


def translate(text: str, caps: HostCaps, root: Path = Path("/tmp/qh")) -> Command:
    return build_argv(parse_domain(text, "t.xml"), caps, GuestPaths(root / "run", root / "state"), paused=True)


def problems(text: str, caps: HostCaps) -> list[str]:
    with pytest.raises(DomainError) as exc:
        translate(text, caps)
    return [p.format() for p in exc.value.problems]


def opt(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


# ---- translation --------------------------------------------------------------------------

def test_9p_share_options(caps: HostCaps) -> None:
    cmd = translate(xml("<filesystem type='mount' accessmode='squash' multidevs='remap'>"
                        "<driver type='path' wrpolicy='immediate' packed='on'/>"
                        "<source dir='/srv/a,b'/><target dir='tag'/><readonly/></filesystem>"), caps)
    assert opt(cmd.argv, "-fsdev") == ["local,security_model=none,writeout=immediate,multidevs=remap,"
                                       "readonly=on,id=fsdev-fs0,path=/srv/a,,b"]
    dev = [d for d in opt(cmd.argv, "-device") if "virtio-9p-pci" in d][0]
    assert '"mount_tag":"tag"' in dev and '"packed":true' in dev
    assert cmd.helpers == []


def test_9p_handle_driver_and_modes_are_refused_with_reasons(caps: HostCaps) -> None:
    out = problems(xml("<filesystem><driver type='handle'/><source dir='/a'/><target dir='t'/></filesystem>"), caps)
    assert "filesystem[1]/driver/@type" in out[0] and "removed from QEMU" in out[0]
    out = problems(xml("<filesystem accessmode='passthrough' fmode='644'><source dir='/a'/><target dir='t'/>"
                       "</filesystem>"), caps)
    assert "@fmode" in out[0] and "mapped" in out[0]
    out = problems(xml("<filesystem type='ram'><source usage='1024'/><target dir='t'/></filesystem>"), caps)
    assert "@type" in out[0]


def test_virtiofs_runs_virtiofsd_and_needs_shared_memory(caps: HostCaps) -> None:
    fs = ("<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs' queue='512' iommu='on'/>"
          "<binary xattr='on'><cache mode='always'/><sandbox mode='chroot'/><lock posix='off' flock='on'/>"
          "<thread_pool size='4'/></binary><source dir='/srv/share'/><target dir='share'/></filesystem>")
    out = problems(xml(fs), caps)
    assert "filesystem[1]" in out[0] and "memAccess='shared'" in out[0]
    cmd = translate(xml(fs, numa_shared=True), caps)
    [h] = cmd.helpers
    assert h.name == "virtiofsd-fs0" and h.argv[0] == caps.host.helpers["virtiofsd"]
    assert h.argv[1:] == ["--fd={fd}", "-o", "source=/srv/share,xattr,cache=always,sandbox=chroot,no_posix_lock,flock",
                          "--thread-pool-size=4"]
    assert opt(cmd.argv, "-chardev")[-1] == f"socket,id=chr-vu-fs0,path={h.socket}"
    dev = [d for d in opt(cmd.argv, "-device") if "vhost-user-fs-pci" in d][0]
    assert '"queue-size":512' in dev and '"tag":"share"' in dev and '"iommu_platform":true' in dev
    # no virtiofsd on the host: an error naming the element and the reason
    bare = dataclasses.replace(caps, host=dataclasses.replace(caps.host, helpers={}))
    out = problems(xml(fs, numa_shared=True), bare)
    assert "filesystem[1]/driver/@type" in out[0] and "virtiofsd" in out[0] and "lacks" in out[0]
    # read-only and idmap cannot be honoured by this virtiofsd
    out = problems(xml(fs.replace("</filesystem>", "<readonly/></filesystem>"), numa_shared=True), caps)
    assert "readonly" in out[0]
    out = problems(xml(fs.replace("</binary>", "</binary><idmap><uid start='0' target='1000' count='10'/>"
                                  "</idmap>"), numa_shared=True), caps)
    assert "idmap" in out[0] and "Rust" in out[0]


def test_tpm_backends(caps: HostCaps) -> None:
    cmd = translate(xml("<tpm model='tpm-crb'><backend type='emulator' version='2.0'><active_pcr_banks><sha256/>"
                        "<sha384/></active_pcr_banks></backend></tpm>"), caps)
    [h] = cmd.helpers
    assert h.argv[:4] == [caps.host.helpers["swtpm"], "socket", "--ctrl", "type=unixio,fd={fd}"]
    assert "--tpm2" in h.argv and "--terminate" in h.argv
    assert opt(cmd.argv, "-tpmdev") == ["emulator,id=tpm-tpm0,chardev=chrtpm-tpm0"]
    assert any('"driver":"tpm-crb"' in d for d in opt(cmd.argv, "-device"))
    [setup] = [p for p in cmd.prepare if p.kind == "run"]
    assert setup.dest == Path("/tmp/qh/state/tpm/tpm2/tpm2-00.permall")
    assert setup.argv is not None and "--not-overwrite" in setup.argv and "sha256,sha384" in setup.argv
    # passthrough: only where the host has the TPM
    pt = xml("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>")
    out = problems(pt, dataclasses.replace(caps, host=dataclasses.replace(caps.host, present=frozenset())))
    assert "tpm[1]/backend/device/@path" in out[0] and "lacks" in out[0]
    with_tpm = dataclasses.replace(caps, host=dataclasses.replace(caps.host, present=frozenset({"/dev/tpm0"})))
    assert opt(translate(pt, with_tpm).argv, "-tpmdev") == ["passthrough,id=tpm-tpm0,path=/dev/tpm0"]
    ext = translate(xml("<tpm><backend type='external'><source type='unix' mode='connect' path='/run/x.sock'/>"
                        "</backend></tpm>"), caps)
    assert opt(ext.argv, "-chardev")[-1] == "socket,id=chrtpm-tpm0,path=/run/x.sock" and ext.helpers == []
    # refused, each with its reason
    assert "missing TPM device backend" in problems(xml("<tpm model='tpm-tis'/>"), caps)[0]
    assert "pSeries" in problems(xml("<tpm model='tpm-spapr'><backend type='emulator'/></tpm>"), caps)[0]
    assert "is not a secret's UUID" in problems(xml("<tpm><backend type='emulator'><encryption secret='nope'/>"
                                                    "</backend></tpm>"), caps)[0]
    assert "CRB" in problems(xml("<tpm model='tpm-crb'><backend type='emulator' version='1.2'/></tpm>"), caps)[0]
    bare = dataclasses.replace(caps, host=dataclasses.replace(caps.host, helpers={}))
    out = problems(xml("<tpm><backend type='emulator'/></tpm>"), bare)
    assert "swtpm" in out[0] and "lacks" in out[0]


# ---- realized in QEMU, helpers run by qemud.helpers ---------------------------------------

async def _qmp_session(cmd: Command, queries: list[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    """Start QEMU as the daemon does (helpers first, QMP socket handed over), ask, quit."""
    running = helpers.start(cmd.helpers)
    try:
        listener = qmp_listener(cmd.qmp)
        try:
            argv = qmp_fd_argv(cmd.argv, listener.fileno())
            proc = spawn(argv, cmd.env, cmd.qmp.parent / "qemu.log", (listener.fileno(),))
        finally:
            listener.close()
        q = Qmp("test")
        out: dict[str, Any] = {}
        try:
            await q.connect(str(cmd.qmp), timeout=20)
            for name, args in queries:
                out[name if not args else f"{name} {args.get('path', '')}".strip()] = await q.execute(name, args, timeout=10)
            await q.execute("quit", timeout=10)
        finally:
            await q.close()
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
            proc.close()
    finally:
        await helpers.stop(running)
    out["helper_pids"] = [h.proc.pid for h in running]
    return out


def test_9p_and_virtiofs_shares_are_realized(caps: HostCaps) -> None:
    with tempfile.TemporaryDirectory(prefix="qh", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "a").mkdir()
        (root / "b").mkdir()
        text = xml(f"<filesystem accessmode='mapped' fmode='0640'><source dir='{root / 'a'}'/><target dir='nine'/>"
                   f"</filesystem><filesystem><driver type='virtiofs'/><binary><sandbox mode='chroot'/></binary>"
                   f"<source dir='{root / 'b'}'/><target dir='vfs'/></filesystem>", numa_shared=True)
        cmd = translate(text, caps, root)
        prepare(cmd)
        out = asyncio.run(_qmp_session(cmd, [("qom-list", {"path": "/machine/peripheral"})]))
        kinds = {p["name"]: p["type"] for p in out["qom-list /machine/peripheral"]}
        assert kinds["fs0"] == "child<virtio-9p-pci>"
        assert kinds["fs1"] == "child<vhost-user-fs-pci>"
        [pid] = out["helper_pids"]
        assert not pid_alive(pid), "virtiofsd must end with its guest"


def test_tpm_emulator_is_realized(caps: HostCaps) -> None:
    with tempfile.TemporaryDirectory(prefix="qh", dir="/tmp") as tmp:
        root = Path(tmp)
        cmd = translate(xml("<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"), caps, root)
        prepare(cmd)
        assert (root / "state/tpm/tpm2/tpm2-00.permall").exists()  # swtpm_setup made the state
        out = asyncio.run(_qmp_session(cmd, [("query-tpm", None)]))
        [tpm] = out["query-tpm"]
        assert tpm["id"] == "tpm-tpm0" and tpm["model"] == "tpm-tis" and tpm["options"]["type"] == "emulator"
        [pid] = out["helper_pids"]
        assert not pid_alive(pid), "swtpm must end with its guest"


def test_tpm_state_encrypted_with_a_secret_is_realized_and_unreadable_without_it(caps: HostCaps) -> None:
    uuid = "32ee7e76-2178-47a1-ab7b-269e6e348015"
    with tempfile.TemporaryDirectory(prefix="qh", dir="/tmp") as tmp:
        root = Path(tmp)
        secrets = root / "secrets"
        secrets.mkdir(mode=0o700)
        (secrets / uuid).write_text("a passphrase for the TPM state")
        (secrets / uuid).chmod(0o600)
        with_secrets = dataclasses.replace(caps, host=dataclasses.replace(caps.host, secrets_dir=str(secrets)))
        cmd = translate(xml(f"<tpm model='tpm-crb'><backend type='emulator' version='2.0'>"
                            f"<encryption secret='{uuid}'/></backend></tpm>"), with_secrets, root)
        [helper] = cmd.helpers
        # swtpm reads a copy in the guest's runtime directory (the secrets directory is root's)
        copy = root / "run" / f"secret-{uuid}"
        assert f"pwdfile={copy},mode=aes-256-cbc" in helper.argv
        prepare(cmd)
        assert copy.read_text() == "a passphrase for the TPM state" and copy.stat().st_mode & 0o777 == 0o400
        state = root / "state/tpm/tpm2/tpm2-00.permall"
        out = asyncio.run(_qmp_session(cmd, [("query-tpm", None)]))
        assert out["query-tpm"][0]["model"] == "tpm-crb"
        # swtpm without the key cannot read the state it wrote
        r = subprocess.run(["swtpm", "socket", "--tpmstate", f"dir={state.parent}", "--tpm2", "--flags",
                            "not-need-init,startup-clear", "--ctrl", f"type=unixio,path={root}/c.sock",
                            "--server", f"type=unixio,path={root}/s.sock", "--log", "level=1"],
                           capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        assert r.returncode != 0, "the encrypted state must not open without its key"
        assert b"GetDecryptedData" in r.stdout + r.stderr


# ---- through the daemon ---------------------------------------------------------------------

def helper_pids(d: Daemon) -> set[int]:
    """swtpm / virtiofsd processes (not ended) whose command line names this test's directory."""
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if cmd and os.path.basename(cmd[0]) in ("swtpm", "virtiofsd") and any(str(d.base) in a for a in cmd):
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.add(p.info["pid"])
        except psutil.Error:
            continue
    return out


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        d.start(timeout=30)
        yield d
    finally:
        print(d.log_text())
        for pid in helper_pids(d):  # a failed test must not leave its swtpm behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        d.close()


def tpm_guest_xml(guest: TinyGuest, d: Daemon, name: str, **kw: Any) -> str:
    text = domain_xml(guest, name, serial_path=d.scratch / f"{name}.console", **kw)
    return text.replace("<memballoon model='none'/>",
                        "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm><memballoon model='none'/>")


def start_tpm_guest(d: Daemon, guest: TinyGuest, name: str, **kw: Any) -> tuple[int, int]:
    after = d.mark()
    d.drop(f"{name}.xml", tpm_guest_xml(guest, d, name, **kw))
    started = d.wait_for("helper-started", name, timeout=RUN_TIMEOUT, after=after)
    spawned = d.wait_for("spawned", name, timeout=RUN_TIMEOUT, after=after)
    running = d.wait_for("running", name, timeout=RUN_TIMEOUT, after=after)
    assert started.index < spawned.index, "swtpm starts before QEMU"
    assert started.pid is not None and running.pid == spawned.pid
    wait_file_contains(d.scratch / f"{name}.console", guest.marker, timeout=BOOT_TIMEOUT)
    return started.pid, running.pid  # type: ignore[return-value]


def swtpm_of(d: Daemon, name: str) -> int:
    rec = d.record(name)
    assert rec is not None
    [h] = rec["extra"]["helpers"]
    return int(h["pid"])


def test_tpm_guest_lifecycle_through_the_daemon(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    swtpm, qemu = start_tpm_guest(d, guest, "tpm1")
    assert pid_alive(swtpm) and pid_alive(qemu)
    assert psutil.Process(swtpm).create_time() <= psutil.Process(qemu).create_time()
    assert swtpm_of(d, "tpm1") == swtpm
    state = d.state / "domains" / "tpm1" / "tpm" / "tpm2"
    assert (state / "tpm2-00.permall").exists()
    assert any(f"dir={state}" in a for a in psutil.Process(swtpm).cmdline())
    setup_log = d.run_dir("tpm1") / "swtpm-tpm0-setup.log"
    assert setup_log.read_text().count("Starting vTPM manufacturing") == 1

    # QEMU killed: the guest restarts with a new swtpm on the same state, never made anew
    after = d.mark()
    os.kill(qemu, signal.SIGKILL)
    d.wait_for("crashed", "tpm1", timeout=10, after=after)
    started = d.wait_for("helper-started", "tpm1", timeout=RUN_TIMEOUT, after=after)
    running = d.wait_for("running", "tpm1", timeout=RUN_TIMEOUT, after=after)
    assert started.pid != swtpm and not pid_alive(swtpm)
    swtpm, qemu = started.pid, running.pid  # type: ignore[assignment]
    console = d.scratch / "tpm1.console"
    first = wait_file_contains(console, guest.marker, timeout=1)
    wait_file_contains(console, guest.marker, timeout=BOOT_TIMEOUT, start=first)  # booted again
    assert setup_log.read_text().count("Starting vTPM manufacturing") == 1
    assert (state / "tpm2-00.permall").exists()
    assert helper_pids(d) == {swtpm}

    # the daemon killed and restarted: QEMU and its swtpm are adopted, the same processes
    d.kill9()
    assert pid_alive(swtpm) and pid_alive(qemu)
    after = d.mark()
    d.start(timeout=30)
    adopted = d.wait_for("helper-adopted", "tpm1", timeout=RUN_TIMEOUT, after=after)
    assert adopted.pid == swtpm
    assert d.wait_for("adopted", "tpm1", timeout=RUN_TIMEOUT, after=after).pid == qemu
    d.assert_no("spawned", "tpm1", within=1.0, after=after)
    assert helper_pids(d) == {swtpm}

    # the guest stops: no helper remains
    after = d.mark()
    d.remove("tpm1.xml")
    d.wait_for("stopped", "tpm1", timeout=30, after=after)
    d.wait_for("undefined", "tpm1", timeout=10, after=after)
    assert not pid_alive(swtpm) and not pid_alive(qemu)
    assert helper_pids(d) == set()


def test_killed_helper_is_reported_and_the_guest_restarted(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    swtpm, qemu = start_tpm_guest(d, guest, "tpm2")
    after = d.mark()
    os.kill(swtpm, signal.SIGKILL)
    died = d.wait_for("helper-died", "tpm2", timeout=10, after=after)
    assert died.level == "error" and "swtpm-tpm0" in died.message and "SIGKILL" in died.message
    crashed = d.wait_for("crashed", "tpm2", timeout=10, after=after)
    assert "swtpm-tpm0" in crashed.message
    started = d.wait_for("helper-started", "tpm2", timeout=RUN_TIMEOUT, after=after)
    running = d.wait_for("running", "tpm2", timeout=RUN_TIMEOUT, after=after)
    assert running.pid != qemu and not pid_alive(qemu)
    assert started.pid != swtpm and pid_alive(started.pid)  # type: ignore[arg-type]
    assert helper_pids(d) == {started.pid}


def test_helper_that_died_while_the_daemon_was_down_is_handled_at_adoption(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    swtpm, qemu = start_tpm_guest(d, guest, "tpm3")
    d.kill9()
    os.kill(swtpm, signal.SIGKILL)
    after = d.mark()
    d.start(timeout=30)
    died = d.wait_for("helper-died", "tpm3", timeout=RUN_TIMEOUT, after=after)
    assert "swtpm-tpm0" in died.message and "gone when qemud restarted" in died.message
    started = d.wait_for("helper-started", "tpm3", timeout=RUN_TIMEOUT, after=died.index)
    running = d.wait_for("running", "tpm3", timeout=RUN_TIMEOUT, after=started.index)
    assert running.pid != qemu and not pid_alive(qemu)
    assert helper_pids(d) == {started.pid}
