"""Pure-argv device families (iommu, redirdev, smartcard, shmem, sysinfo/fw_cfg/ACPI tables,
pcspk, evdev and passthrough inputs, Hyper-V panic, watchdog dump, vsock, SEV): each realized in
real QEMU 7.2 and checked over QMP where this host can run it, and the host-limit errors (no
/dev/vhost-vsock, no /dev/sev, no evdev node) checked against HostFacts that lack or have them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemud.argv import build_argv
from qemud.caps import HostCaps, probe
from qemud.domain import parse_domain
from qemud.errors import DomainError
from qemud.host import HostFacts
from qemud.launch import prepare
from qemud.paths import GuestPaths
from qemud.qmp import Qmp

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"


def xml(devices: str = "", machine: str = "pc", features: str = "", head: str = "", os_extra: str = "",
        dtype: str = "qemu") -> str:
    return f"""<domain type='{dtype}'><name>fam</name><uuid>{UUID}</uuid><memory unit='MiB'>64</memory>
      {head}<os><type arch='x86_64' machine='{machine}'>hvm</type>{os_extra}</os>
      <features>{features}</features>
      <devices><memballoon model='none'/>{devices}</devices></domain>"""


@pytest.fixture(scope="module")
def caps() -> HostCaps:
    return probe(QEMU)


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qf", dir="/tmp") as d:
        yield Path(d)


def with_host(caps: HostCaps, *present: str, kvm: bool | None = None) -> HostCaps:
    """caps on a host that has the device nodes ``present`` (and KVM, if asked)."""
    c = dataclasses.replace(caps, host=HostFacts(present=frozenset(present)))
    if kvm is not None:
        c = dataclasses.replace(c, kvm=kvm, kvm_reason="")
    return c


def translate(text: str, caps: HostCaps, tmp: Path) -> Any:
    return build_argv(parse_domain(text), caps, GuestPaths(tmp / "run", tmp / "state"), paused=True)


def problems(text: str, caps: HostCaps, tmp: Path) -> list[tuple[str, str]]:
    with pytest.raises(DomainError) as exc:
        translate(text, caps, tmp)
    return [(p.path, p.message) for p in exc.value.problems]


def devices(argv: list[str]) -> list[dict[str, Any]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a in ("-device", "-object")
            and argv[i + 1].startswith("{")]


def by_id(argv: list[str], ident: str) -> dict[str, Any]:
    [d] = [d for d in devices(argv) if d.get("id") == ident]
    return d


async def _session(argv: list[str], qmp: Path, calls: list[tuple[str, dict[str, Any] | None]]) -> list[Any]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    q = Qmp("test")
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"QEMU exited ({proc.returncode}): {out}")
            if qmp.exists():
                with contextlib.suppress(Exception):
                    await q.connect(str(qmp), timeout=2)
                    break
            assert time.monotonic() < deadline, "QEMU did not open its QMP socket"
            await asyncio.sleep(0.05)
        out = []
        for name, args in calls:
            out.append(await q.hmp(args["command"]) if name == "hmp" else await q.execute(name, args))
        with contextlib.suppress(Exception):
            await q.execute("quit")
        return out
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(q.close(), 2)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def run(cmd: Any, *calls: tuple[str, dict[str, Any] | None]) -> list[Any]:
    """Start the translated guest (paused) in QEMU, answer ``calls`` over QMP, stop it."""
    prepare(cmd)
    return asyncio.run(_session(cmd.argv, cmd.qmp, list(calls)))


def qom_get(path: str, prop: str) -> tuple[str, dict[str, Any]]:
    return ("qom-get", {"path": path, "property": prop})


PERIPHERALS = ("qom-list", {"path": "/machine/peripheral"})


def names(qom_list: list[dict[str, Any]]) -> set[str]:
    return {p["name"] for p in qom_list}


# ---- iommu ---------------------------------------------------------------------------------

def test_intel_iommu_is_realized_with_its_driver_settings(caps: HostCaps, tmp: Path) -> None:
    cmd = translate(xml("<iommu model='intel'><driver intremap='on' caching_mode='on' iotlb='on' aw_bits='48'/></iommu>",
                        machine="q35", features="<acpi/><ioapic driver='qemu'/>"), caps, tmp)
    assert "kernel_irqchip=split" in cmd.argv[cmd.argv.index("-machine") + 1]
    typ, intremap, cm, iotlb, aw = run(cmd, qom_get("/machine/peripheral/iommu0", "type"),
                                       qom_get("/machine/peripheral/iommu0", "intremap"),
                                       qom_get("/machine/peripheral/iommu0", "caching-mode"),
                                       qom_get("/machine/peripheral/iommu0", "device-iotlb"),
                                       qom_get("/machine/peripheral/iommu0", "aw-bits"))
    assert (typ, intremap, cm, iotlb, aw) == ("intel-iommu", "on", True, True, 48)


def test_intel_iommu_refusals_name_the_element(caps: HostCaps, tmp: Path) -> None:
    got = problems(xml("<iommu model='intel'/>"), caps, tmp)
    assert got == [("/domain/devices/iommu/@model", "IOMMU device: 'intel' is only supported with Q35 machines")]
    got = problems(xml("<iommu model='intel'><driver intremap='on'/></iommu>", machine="q35"), caps, tmp)
    assert got[0][0] == "/domain/devices/iommu/driver/@intremap" and "ioapic driver='qemu'" in got[0][1]
    got = problems(xml("<iommu model='intel'><driver aw_bits='52'/></iommu>", machine="q35"), caps, tmp)
    assert got[0][0] == "/domain/devices/iommu/driver/@aw_bits"


def test_virtio_iommu_sits_on_the_root_bus(caps: HostCaps, tmp: Path) -> None:
    cmd = translate(xml("<iommu model='virtio'/>", machine="q35", features="<acpi/>"), caps, tmp)
    [pci] = run(cmd, ("query-pci", None))
    found = [d for d in pci[0]["devices"] if d.get("qdev_id") == "iommu0"]
    assert len(found) == 1 and pci[0]["bus"] == 0
    assert found[0]["id"]["vendor"] == 0x1AF4  # a virtio device


def test_virtio_iommu_refusals_are_libvirts(caps: HostCaps, tmp: Path) -> None:
    assert problems(xml("<iommu model='virtio'/>", machine="q35"), caps, tmp)[0][1] == \
        "IOMMU device: 'virtio' requires ACPI (<features><acpi/></features>): the guest finds it through the VIOT table"
    assert "only supported with Q35" in problems(xml("<iommu model='virtio'/>", features="<acpi/>"), caps, tmp)[0][1]
    got = problems(xml("<iommu model='virtio'><address type='virtio-mmio'/></iommu>", machine="q35",
                       features="<acpi/>"), caps, tmp)
    assert got == [("/domain/devices/iommu/address/@type", "IOMMU device: 'virtio' needs a PCI address")]


# ---- USB redirection, smartcards --------------------------------------------------------------

def test_usb_redirection_with_a_filter_and_boot_order(caps: HostCaps, tmp: Path) -> None:
    sock = tmp / "redir.sock"
    cmd = translate(xml(f"""<controller type='usb' model='qemu-xhci'/>
        <redirdev bus='usb' type='unix'><source mode='bind' path='{sock}'/><boot order='2'/>
          <address type='usb' bus='0' port='3'/></redirdev>
        <redirfilter><usbdev class='0x08' vendor='0x15E1' product='0x2007' version='1.10' allow='yes'/>
          <usbdev allow='no'/></redirfilter>"""), caps, tmp)
    flt, port, chardevs = run(cmd, qom_get("/machine/peripheral/redir0", "filter"),
                              qom_get("/machine/peripheral/redir0", "port"), ("query-chardev", None))
    assert flt == "0x08:0x15E1:0x2007:0x0110:1|-1:-1:-1:-1:0"
    assert port == "3"
    [ch] = [c for c in chardevs if c["label"] == "charredir0"]
    assert str(sock) in ch["filename"]
    assert by_id(cmd.argv, "redir0")["bootindex"] == 2


def test_redirfilter_rejects_a_bad_vendor(caps: HostCaps, tmp: Path) -> None:
    got = problems(xml("""<redirdev bus='usb' type='spicevmc'/><graphics type='spice'/>
        <redirfilter><usbdev vendor='xyz' allow='yes'/></redirfilter>"""), caps, tmp)
    assert got[0][0] == "/domain/devices/redirfilter/usbdev[1]" and "'xyz'" in got[0][1]


def test_smartcard_passthrough_over_a_socket(caps: HostCaps, tmp: Path) -> None:
    sock = tmp / "sc.sock"
    cmd = translate(xml(f"""<smartcard mode='passthrough' type='unix'><source mode='bind' path='{sock}'/>
        </smartcard>"""), caps, tmp)
    periph, typ, chardevs = run(cmd, PERIPHERALS, qom_get("/machine/peripheral/smartcard0", "type"),
                                ("query-chardev", None))
    assert {"ccid0", "smartcard0"} <= names(periph)
    assert typ == "ccid-card-passthru"
    assert any(c["label"] == "charsmartcard0" and str(sock) in c["filename"] for c in chardevs)


def test_smartcard_host_certificates_translation(caps: HostCaps, tmp: Path) -> None:
    # ccid-card-emulated needs an NSS database with those certificates to start: translation only
    argv = translate(xml("""<smartcard mode='host-certificates'><certificate>a</certificate>
        <certificate>b</certificate><certificate>c</certificate><database>/tmp/db</database></smartcard>"""),
                     with_host(caps), tmp).argv
    assert by_id(argv, "smartcard0") == {"driver": "ccid-card-emulated", "backend": "certificates", "cert1": "a",
                                         "cert2": "b", "cert3": "c", "db": "/tmp/db", "id": "smartcard0",
                                         "bus": "ccid0.0"}
    got = problems(xml("<smartcard mode='host-certificates'><certificate>a</certificate></smartcard>"), caps, tmp)
    assert got[0][0] == "/domain/devices/smartcard[1]/certificate"


def test_smartcard_host_mode_needs_the_hosts_nss_database(caps: HostCaps, tmp: Path) -> None:
    got = problems(xml("<smartcard mode='host'/>"), with_host(caps), tmp)
    assert got == [("/domain/devices/smartcard[1]/@mode", "needs the NSS database /etc/pki/nssdb, which this "
                    "host lacks (NSS must see the host's card or certificates there)")]
    argv = translate(xml("<smartcard mode='host'/>"), with_host(caps, "/etc/pki/nssdb"), tmp).argv
    assert by_id(argv, "smartcard0") == {"driver": "ccid-card-emulated", "backend": "nss-emulated",
                                         "id": "smartcard0", "bus": "ccid0.0"}
    assert by_id(argv, "ccid0")["driver"] == "usb-ccid"


# ---- shmem -----------------------------------------------------------------------------------

def test_ivshmem_plain_shares_a_file_in_dev_shm(caps: HostCaps, tmp: Path) -> None:
    name = f"qemud-test-{uuid.uuid4().hex[:8]}"
    cmd = translate(xml(f"<shmem name='{name}' role='master'><model type='ivshmem-plain'/>"
                        "<size unit='M'>2</size></shmem>"), caps, tmp)
    try:
        typ, memdev, size, share, path = run(
            cmd, qom_get("/machine/peripheral/shmem0", "type"), qom_get("/machine/peripheral/shmem0", "memdev"),
            qom_get("/objects/shmmem-shmem0", "size"), qom_get("/objects/shmmem-shmem0", "share"),
            qom_get("/objects/shmmem-shmem0", "mem-path"))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")
    assert (typ, memdev, size, share, path) == ("ivshmem-plain", "/objects/shmmem-shmem0", 2 << 20, True,
                                                f"/dev/shm/{name}")


def test_shmem_refusals(caps: HostCaps, tmp: Path) -> None:
    assert "removed from QEMU" in problems(xml("<shmem name='s'><model type='ivshmem'/></shmem>"), caps, tmp)[0][1]
    assert problems(xml("<shmem name='s'><size unit='K'>12345</size></shmem>"), caps, tmp)[0][1] == \
        "shmem size must be a power of two"
    assert problems(xml("<shmem name='s'><msi/></shmem>"), caps, tmp)[0][1] == \
        "msi option is only supported with a server"
    argv = translate(xml("<shmem name='d'><model type='ivshmem-doorbell'/><server path='/tmp/d.sock'/>"
                         "<msi vectors='16'/></shmem>"), caps, tmp).argv
    assert by_id(argv, "shmem0")["vectors"] == 16 and by_id(argv, "shmem0")["chardev"] == "charshmem0"
    assert "socket,id=charshmem0,path=/tmp/d.sock" in argv


# ---- sysinfo, fw_cfg, ACPI tables ------------------------------------------------------------

SYSINFO = f"""<sysinfo type='smbios'>
    <bios><entry name='vendor'>LENOVO</entry><entry name='date'>01/02/2023</entry></bios>
    <system><entry name='manufacturer'>Fedora</entry><entry name='uuid'>{UUID}</entry></system>
    <baseBoard><entry name='serial'>CZC1065993</entry></baseBoard>
    <chassis><entry name='asset'>40000101</entry></chassis>
    <oemStrings><entry>This is, more tricky</entry></oemStrings></sysinfo>
  <sysinfo type='fwcfg'><entry name='opt/com.example/name'>example value</entry></sysinfo>"""


def test_smbios_and_fw_cfg_are_given_to_qemu(caps: HostCaps, tmp: Path) -> None:
    cmd = translate(xml(head=SYSINFO, os_extra="<smbios mode='sysinfo'/>"), caps, tmp)
    smbios = [cmd.argv[i + 1] for i, a in enumerate(cmd.argv) if a == "-smbios"]
    assert smbios == ["type=0,vendor=LENOVO,date=01/02/2023", f"type=1,manufacturer=Fedora,uuid={UUID}",
                      "type=2,serial=CZC1065993", "type=3,asset=40000101", "type=11,value=This is,, more tricky"]
    assert cmd.argv[cmd.argv.index("-fw_cfg") + 1] == "name=opt/com.example/name,string=example value"
    [got] = run(cmd, ("query-uuid", None))  # QEMU accepted every table
    assert got["UUID"] == UUID


def test_sysinfo_refusals_are_libvirts(caps: HostCaps, tmp: Path) -> None:
    bad_date = "<sysinfo type='smbios'><bios><entry name='date'>999/999/123</entry></bios></sysinfo>"
    got = problems(xml(head=bad_date, os_extra="<smbios mode='sysinfo'/>"), caps, tmp)
    assert got[0][0] == "/domain/sysinfo/bios/entry[1]" and "Invalid BIOS 'date' format" in got[0][1]
    other = "<sysinfo type='smbios'><system><entry name='uuid'>a94b4335-6a14-8bc4-d6da-f7ea590b6816</entry></system></sysinfo>"
    got = problems(xml(head=other, os_extra="<smbios mode='sysinfo'/>"), caps, tmp)
    assert "UUID mismatch between <uuid> and <sysinfo>" in got[0][1]
    assert problems(xml(os_extra="<smbios mode='host'/>"), caps, tmp)[0][0] == "/domain/os/smbios/@mode"


def test_slic_acpi_table(caps: HostCaps, tmp: Path) -> None:
    table = tmp / "slic.dat"
    table.write_bytes(b"\0" * 64)
    cmd = translate(xml(features="<acpi/>", os_extra=f"<acpi><table type='slic'>{table}</table></acpi>"), caps, tmp)
    assert cmd.argv[cmd.argv.index("-acpitable") + 1] == f"sig=SLIC,file={table}"
    [status] = run(cmd, ("query-status", None))  # QEMU built its ACPI tables with it
    assert status["status"] == "prelaunch"


# ---- sound, panic, watchdog -------------------------------------------------------------------

def test_pc_speaker_gets_the_audio_backend(caps: HostCaps, tmp: Path) -> None:
    cmd = translate(xml("<sound model='pcspk'/><audio id='1' type='none'/>"), caps, tmp)
    [audiodev] = run(cmd, qom_get("/machine", "pcspk-audiodev"))
    assert audiodev == "audio1"


def test_hyperv_panic_is_the_vcpus_crash_msrs(caps: HostCaps, tmp: Path) -> None:
    cmd = translate(xml("<panic model='hyperv'/><panic model='isa'><address type='isa' iobase='0x505'/></panic>"),
                    caps, tmp)
    [cpus] = run(cmd, ("query-cpus-fast", None))
    [crash, anon] = run(cmd, qom_get(cpus[0]["qom-path"], "hv-crash"),
                        ("qom-list", {"path": "/machine/peripheral-anon"}))
    assert crash is True
    assert any(p["type"] == "child<pvpanic>" for p in anon)


def test_watchdog_dump_pauses_the_guest_and_says_so(caps: HostCaps, tmp: Path) -> None:
    cmd = translate(xml("<watchdog model='i6300esb' action='dump'/>"), caps, tmp)
    assert cmd.argv[cmd.argv.index("-action") + 1] == "watchdog=pause"
    assert any(w.path == "/domain/devices/watchdog[1]/@action" and "no core dump" in w.message for w in cmd.warnings)
    [periph] = run(cmd, PERIPHERALS)
    assert "watchdog0" in names(periph)


# ---- host-limited families: vsock, SEV, evdev --------------------------------------------------

VSOCK = "<vsock model='virtio'><cid auto='no' address='42'/></vsock>"


def test_vsock_without_vhost_vsock_is_a_host_error(caps: HostCaps, tmp: Path) -> None:
    got = problems(xml(VSOCK), with_host(caps), tmp)
    assert got == [("/domain/devices/vsock", "needs /dev/vhost-vsock, which this host lacks "
                    "(load the vhost_vsock kernel module)")]


def test_vsock_translation_where_the_host_has_it(caps: HostCaps, tmp: Path) -> None:
    argv = translate(xml(VSOCK), with_host(caps, "/dev/vhost-vsock"), tmp).argv
    d = by_id(argv, "vsock0")
    assert d["driver"] == "vhost-vsock-pci" and d["guest-cid"] == 42 and "vhostfd" not in d
    auto = by_id(translate(xml("<vsock><cid auto='yes'/></vsock>"), with_host(caps, "/dev/vhost-vsock"), tmp).argv,
                 "vsock0")
    again = by_id(translate(xml("<vsock><cid auto='yes'/></vsock>"), with_host(caps, "/dev/vhost-vsock"), tmp).argv,
                  "vsock0")
    assert auto["guest-cid"] == again["guest-cid"] >= 3
    got = problems(xml("<vsock model='virtio-transitional'/>"), with_host(caps, "/dev/vhost-vsock"), tmp)
    assert got[0][0] == "/domain/devices/vsock/@model" and "vhost-vsock-pci-transitional" in got[0][1]


SEV = """<launchSecurity type='sev' kernelHashes='yes'><cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits>
  <policy>0x0003</policy><dhCert>AQAA</dhCert><session>IHAV</session></launchSecurity>"""


def test_sev_without_dev_sev_is_a_host_error(caps: HostCaps, tmp: Path) -> None:
    got = problems(xml(head=SEV, dtype="kvm"), with_host(caps, kvm=True), tmp)
    assert got == [("/domain/launchSecurity", "needs /dev/sev, which this host lacks (an AMD EPYC host with SEV "
                    "enabled in its firmware and kvm_amd loaded with sev=1)")]


def test_sev_translation_where_the_host_has_it(caps: HostCaps, tmp: Path) -> None:
    cmd = translate(xml(head=SEV, dtype="kvm"), with_host(caps, "/dev/sev", kvm=True), tmp)
    obj = by_id(cmd.argv, "lsec0")
    assert obj == {"qom-type": "sev-guest", "id": "lsec0", "cbitpos": 47, "reduced-phys-bits": 1, "policy": 3,
                   "dh-cert-file": str(tmp / "run" / "dh_cert.base64"),
                   "session-file": str(tmp / "run" / "session.base64"), "kernel-hashes": True}
    assert "confidential-guest-support=lsec0" in cmd.argv
    prepare(cmd)
    assert (tmp / "run" / "dh_cert.base64").read_text() == "AQAA"
    assert (tmp / "run" / "dh_cert.base64").stat().st_mode & 0o777 == 0o600


def test_evdev_inputs_need_the_hosts_event_device(caps: HostCaps, tmp: Path) -> None:
    ev = "<input type='evdev'><source dev='/dev/input/event7' grab='all' grabToggle='alt-alt' repeat='on'/></input>"
    got = problems(xml(ev), with_host(caps), tmp)
    assert got == [("/domain/devices/input[1]/source/@dev", "needs /dev/input/event7, which this host lacks "
                    "(no such input event device)")]
    argv = translate(xml(ev), with_host(caps, "/dev/input/event7"), tmp).argv
    assert by_id(argv, "input0") == {"qom-type": "input-linux", "id": "input0", "evdev": "/dev/input/event7",
                                     "grab_all": True, "grab-toggle": "alt-alt", "repeat": True}
    pt = "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event7'/></input>"
    assert problems(xml(pt), with_host(caps), tmp)[0][0] == "/domain/devices/input[1]/source/@evdev"
    d = by_id(translate(xml(pt), with_host(caps, "/dev/input/event7"), tmp).argv, "input0")
    assert d["driver"] == "virtio-input-host-pci" and d["evdev"] == "/dev/input/event7"


def test_transitional_keyboard_is_refused_like_libvirt(caps: HostCaps, tmp: Path) -> None:
    got = problems(xml("<input type='keyboard' bus='virtio' model='virtio-non-transitional'/>"), caps, tmp)
    assert got == [("/domain/devices/input[1]/@model",
                    "virtio (non-)transitional models are not supported for input type=keyboard")]


def test_unix_chardev_in_connect_mode_needs_a_path(caps: HostCaps, tmp: Path) -> None:
    rng = """<rng model='virtio'><backend model='egd' type='unix'>
        <source mode='connect' host='1.2.3.4' service='1234'/></backend></rng>"""
    got = problems(xml(rng), caps, tmp)
    assert got[0][0] == "/domain/devices/rng[1]/backend/source/@path"


def test_sysinfo_without_smbios_mode_is_checked_but_not_given(caps: HostCaps, tmp: Path) -> None:
    cmd = translate(xml(head=SYSINFO), caps, tmp)
    assert "-smbios" not in cmd.argv and "-fw_cfg" in cmd.argv
    assert any(w.path == "/domain/sysinfo[1]" and "mode='sysinfo'" in w.message for w in cmd.warnings)
    bad_date = "<sysinfo type='smbios'><bios><entry name='date'>13/01/2023</entry></bios></sysinfo>"
    assert problems(xml(head=bad_date), caps, tmp)[0][0] == "/domain/sysinfo/bios/entry[1]"


def test_dbus_redirdev_needs_the_dbus_display(caps: HostCaps, tmp: Path) -> None:
    got = problems(xml("<redirdev bus='usb' type='dbus'/>"), caps, tmp)
    assert got == [("/domain/devices/redirdev[1]/@type", "a dbus redirdev needs <graphics type='dbus'>")]
