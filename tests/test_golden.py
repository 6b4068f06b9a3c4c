"""Golden tests of the translator: each tests/data/domains/<case>.xml gives exactly the argv in
<case>.argv.json, with the recorded QEMU 7.2 capabilities and fixed guest paths (no QEMU runs).

``pytest --regen-golden`` rewrites the golden files. Because a regenerated file blesses whatever
the translator does, every case is also checked against facts read straight from its XML (name,
UUID, memory, accelerator, QMP socket, devices), so a regression cannot hide in a regen.
"""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import pytest

from qemud.argv import Command, build_argv
from qemud.caps import HostCaps
from qemud.domain import UUID_NAMESPACE, Domain, load_domain, parse_domain
from tests.conftest import (DOMAINS, guest_paths, json_options, option_names, options, opts_dict,
                            parse_qemuopts)

CASES = sorted(p.stem for p in DOMAINS.glob("*.xml"))

#: The domain XML cases the brief asks for; a missing one is a test failure, not a silent skip.
REQUIRED_CASES = {
    "virt-install-q35", "dumpxml-pc", "minimal-pc", "direct-kernel-boot", "uefi-ovmf",
    "sata-cdrom-floppy", "scsi-virtio-scsi", "scsi-lsilogic", "usb-disk", "nic-bridge",
    "nic-network", "nic-ethernet-tap", "nics-no-mac", "serial-types", "memory-bytes", "memory-mb",
    "memory-gib", "vcpu-topology", "cpu-custom-model", "boot-menu-order", "boot-per-device",
    "clock-localtime", "lifecycle-preserve", "lifecycle-restart", "injection-names", "no-uuid",
}

UNIT_BYTES = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
              "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4,
              "tb": 1000**4}


def xml_of(case: str) -> Path:
    return DOMAINS / f"{case}.xml"


def golden_of(case: str) -> Path:
    return DOMAINS / f"{case}.argv.json"


def translate(case: str, caps: HostCaps, **kw: Any) -> tuple[Domain, Command]:
    domain = load_domain(xml_of(case))
    return domain, build_argv(domain, caps, guest_paths(domain.name), **kw)


def dump_golden(argv: list[str]) -> str:
    return json.dumps(argv, indent=1, ensure_ascii=False) + "\n"


def test_all_required_cases_exist() -> None:
    missing = REQUIRED_CASES - set(CASES)
    assert not missing, f"golden cases missing from {DOMAINS}: {sorted(missing)}"


@pytest.mark.parametrize("case", CASES)
def test_golden_argv(case: str, caps: HostCaps, regen_golden: bool) -> None:
    _, cmd = translate(case, caps)
    golden = golden_of(case)
    if regen_golden:
        golden.write_text(dump_golden(cmd.argv), encoding="utf-8")
        return
    assert golden.exists(), f"{golden} is missing; run pytest --regen-golden and review it"
    expected = json.loads(golden.read_text(encoding="utf-8"))
    assert isinstance(expected, list) and all(isinstance(a, str) for a in expected)
    assert cmd.argv == expected


@pytest.mark.parametrize("case", CASES)
def test_translation_is_pure(case: str, caps: HostCaps) -> None:
    """Same input, same output; parse_domain of the text equals load_domain of the file."""
    d1, c1 = translate(case, caps)
    d2 = parse_domain(xml_of(case).read_bytes(), str(xml_of(case)))
    c2 = build_argv(d2, caps, guest_paths(d2.name))
    assert d1 == d2
    assert c1.argv == c2.argv and c1.env == c2.env and c1.qmp == c2.qmp


@pytest.mark.parametrize("case", CASES)
def test_paused_adds_only_dash_S(case: str, caps: HostCaps) -> None:
    _, cmd = translate(case, caps)
    _, paused = translate(case, caps, paused=True)
    assert paused.argv.count("-S") == 1
    rest = list(paused.argv)
    rest.remove("-S")
    assert rest == cmd.argv
    assert "-S" not in cmd.argv


# ---- facts read straight from the XML -------------------------------------------------------

def _root(case: str) -> ET.Element:
    return ET.parse(xml_of(case)).getroot()


def _expected_mib(el: ET.Element) -> int:
    unit = el.get("unit", "KiB").lower()
    nbytes = int(el.text.strip()) * UNIT_BYTES[unit]  # type: ignore[union-attr]
    kib = -(-nbytes // 1024)
    return -(-kib // 1024)


@pytest.mark.parametrize("case", CASES)
def test_common_facts(case: str, caps: HostCaps) -> None:
    root = _root(case)
    domain, cmd = translate(case, caps)
    argv = cmd.argv
    names = option_names(argv)
    paths = guest_paths(domain.name)

    # the emulator
    emulator = root.findtext("devices/emulator") or "/usr/bin/qemu-system-x86_64"
    assert argv[0] == emulator

    # every option is one QEMU 7.2 knows, with its argument where it takes one
    known = {"-name", "-sandbox", "-machine", "-accel", "-cpu", "-m", "-smp", "-uuid", "-no-user-config",
             "-nodefaults", "-chardev", "-mon", "-rtc", "-global", "-boot", "-kernel", "-initrd",
             "-append", "-display", "-vnc", "-spice", "-device", "-blockdev", "-netdev", "-object",
             "-audiodev", "-no-shutdown", "-no-reboot", "-action", "-msg", "-S", "-bios", "-pidfile",
             "-numa"}
    assert set(names) <= known, set(names) - known
    # QEMU's seccomp sandbox, always; spawning only for the bridge helper of a bridged NIC
    (sandbox,) = options(argv, "-sandbox")
    bridged = any(i.type in ("bridge", "network") for i in domain.devices.interface)
    assert sandbox == ("on,obsolete=deny,elevateprivileges=deny,spawn=%s,resourcecontrol=deny"
                       % ("allow" if bridged else "deny"))

    # identity
    name_opts = opts_dict(options(argv, "-name")[0], "guest")
    assert name_opts == {"guest": root.findtext("name"), "debug-threads": "on"}
    want_uuid = root.findtext("uuid")
    want_uuid = str(uuid.UUID(want_uuid)) if want_uuid else str(uuid.uuid5(UUID_NAMESPACE, domain.name))
    assert options(argv, "-uuid") == [want_uuid]

    # no defaults of QEMU's own, no user config
    assert names.count("-nodefaults") == 1 and names.count("-no-user-config") == 1

    # a display only when the XML asks for one
    has_graphics = root.find("devices/graphics") is not None
    assert (("-display", "none") in zip(argv, argv[1:])) == (not has_graphics)
    if not has_graphics:
        assert "-vnc" not in names and "-spice" not in names

    # QMP: a server socket in the guest's runtime directory, and the monitor on it
    qmp = [opts_dict(v, "backend") for v in options(argv, "-chardev")]
    qmp = [c for c in qmp if c.get("id") == "qmp"]
    assert qmp == [{"backend": "socket", "id": "qmp", "path": str(paths.run / "qmp.sock"),
                    "server": "on", "wait": "off"}]
    assert cmd.qmp == paths.run / "qmp.sock"
    assert opts_dict(options(argv, "-mon")[0]) == {"chardev": "qmp", "mode": "control"}
    assert cmd.prepare[0].kind == "rundir" and cmd.prepare[0].dest == paths.run
    assert options(argv, "-pidfile") in ([], [str(paths.run / "qemu.pid")])

    # the accelerator follows the domain type
    assert options(argv, "-accel") == ["kvm" if root.get("type") == "kvm" else "tcg"]

    # the machine type, resolved to a versioned one
    machine = opts_dict(options(argv, "-machine")[0], "type")
    want_machine = (root.find("os/type").get("machine") or "pc")  # type: ignore[union-attr]
    assert machine["type"] == caps.machine(want_machine).name  # type: ignore[union-attr]
    assert machine["type"] in ("pc-i440fx-7.2", "pc-q35-7.2")
    if root.find("features/acpi") is None:
        assert machine.get("acpi") == "off"
    else:
        assert "acpi" not in machine

    # memory, converted independently of qemud's unit code
    mem = opts_dict(options(argv, "-m")[0], "size")
    assert mem["size"] == f"{_expected_mib(root.find('memory'))}M"  # type: ignore[arg-type]

    # vCPUs
    vcpu = root.find("vcpu")
    count = int(vcpu.text) if vcpu is not None else 1  # type: ignore[arg-type]
    current = int(vcpu.get("current", count)) if vcpu is not None else 1
    smp = parse_qemuopts(options(argv, "-smp")[0], "cpus")
    assert smp[0] == ("cpus", str(current))
    smp_d = dict(smp)
    total = int(smp_d["sockets"]) * int(smp_d.get("dies") or 1) * int(smp_d["cores"]) * int(smp_d["threads"])
    assert total == count
    assert smp_d.get("maxcpus") == (str(count) if current != count else None)

    # every JSON option parses; ids and node names are unique
    devices = json_options(argv, "-device")
    assert all("driver" in d for d in devices)
    ids = [d["id"] for d in devices if "id" in d]
    assert len(ids) == len(set(ids)), ids
    nodes = [b["node-name"] for b in json_options(argv, "-blockdev")]
    assert len(nodes) == len(set(nodes)), nodes
    netdevs = json_options(argv, "-netdev")
    objects = json_options(argv, "-object")
    assert len({n["id"] for n in netdevs}) == len(netdevs)
    assert len({o["id"] for o in objects}) == len(objects)
    chardev_ids = [opts_dict(v, "backend")["id"] for v in options(argv, "-chardev")]
    assert len(chardev_ids) == len(set(chardev_ids))
    # what devices point at exists
    for d in devices:
        if "drive" in d:
            assert d["drive"] in nodes
        if "netdev" in d:
            assert d["netdev"] in {n["id"] for n in netdevs}
        if "chardev" in d:
            assert d["chardev"] in chardev_ids
    # PCI: no two devices at the same bus/addr
    placed = [(d["bus"], d["addr"]) for d in devices if "addr" in d]
    assert len(placed) == len(set(placed)), placed
    assert_bus_references(argv, machine["type"])

    # every local disk's file reaches QEMU exactly, once
    files = [b["filename"] for b in json_options(argv, "-blockdev") if "filename" in b
             and not b["node-name"].startswith("pflash")]
    for disk in root.findall("devices/disk"):
        src = disk.find("source")
        path = None if src is None else (src.get("file") or src.get("dev"))
        if path:
            assert files.count(path) == 1, (path, files)
    assert len(files) == len([d for d in root.findall("devices/disk")
                              if d.find("source") is not None])

    # every NIC: one netdev, one device with its MAC (or a stable locally administered one)
    nics = [d for d in devices if "netdev" in d]
    xml_nics = root.findall("devices/interface")
    assert len(nics) == len(xml_nics) == len(netdevs)
    for x, d in zip(xml_nics, nics):
        mac = x.find("mac")
        if mac is not None:
            assert d["mac"] == mac.get("address").lower()  # type: ignore[union-attr]
        else:
            assert d["mac"].startswith("52:54:00:")
    macs = [d["mac"] for d in nics]
    assert len(macs) == len(set(macs))

    # a memory balloon unless the XML says none
    bal = root.find("devices/memballoon")
    has_balloon = bal is None or bal.get("model") != "none"
    assert any(d["driver"].startswith("virtio-balloon") for d in devices) == has_balloon

    # no argument is empty and the argv ends with the message timestamp option
    assert all(a != "" for a in argv)
    assert argv[-2:] == ["-msg", "timestamp=on"]


def assert_bus_references(argv: list[str], machine_type: str) -> None:
    """Every device's bus exists: a machine's own bus, a PCI bridge's bus (named like the
    bridge) or bus N of a device that provides buses (named ID.N)."""
    devices = json_options(argv, "-device")
    if "q35" in machine_type:
        builtin = {"pcie.0"} | {f"ide.{n}" for n in range(6)}
    else:
        builtin = {"pci.0", "ide.0", "ide.1"}
    ids = [d["id"] for d in devices if "id" in d]
    valid = builtin | set(ids) | {f"{i}.{n}" for i in ids for n in range(8)}
    for d in devices:
        if "bus" in d:
            assert d["bus"] in valid, f"{d['driver']} {d.get('id')} is on bus {d['bus']!r}, which nothing provides"
        if "masterbus" in d:
            assert d["masterbus"] in valid, d


# ---- facts of single cases ------------------------------------------------------------------

def _dev(argv: list[str], driver: str) -> list[dict]:
    return [d for d in json_options(argv, "-device") if d["driver"] == driver]


def _chardev(argv: list[str], cid: str) -> dict:
    found = [c for c in (opts_dict(v, "backend") for v in options(argv, "-chardev")) if c["id"] == cid]
    assert len(found) == 1, (cid, options(argv, "-chardev"))
    return found[0]


def _globals(argv: list[str]) -> set[str]:
    return set(options(argv, "-global"))


def check_virt_install_q35(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    machine = opts_dict(options(a, "-machine")[0], "type")
    assert machine["type"] == "pc-q35-7.2" and machine["hpet"] == "off" and machine["vmport"] == "off"
    assert options(a, "-cpu") == ["host"]
    assert {"ICH9-LPC.disable_s3=1", "ICH9-LPC.disable_s4=1", "kvm-pit.lost_tick_policy=delay"} <= _globals(a)
    assert opts_dict(options(a, "-rtc")[0]) == {"base": "utc", "driftfix": "slew"}
    blk = _dev(a, "virtio-blk-pci")
    assert len(blk) == 1 and blk[0]["bootindex"] == 1
    fmt = [b for b in json_options(a, "-blockdev") if b["node-name"] == blk[0]["drive"]][0]
    assert fmt["driver"] == "qcow2" and fmt["read-only"] is False
    assert json_options(a, "-netdev")[0]["type"] == "user"
    assert _dev(a, "virtio-net-pci")[0]["mac"] == "52:54:00:6b:3c:58"
    # the pty serial port, and the console that is the same port (not a second one)
    assert len(_dev(a, "isa-serial")) == 1
    assert _chardev(a, _dev(a, "isa-serial")[0]["chardev"])["backend"] == "pty"
    # the guest agent channel: a server socket in the runtime directory
    port = _dev(a, "virtserialport")
    assert len(port) == 1 and port[0]["name"] == "org.qemu.guest_agent.0"
    ga = _chardev(a, port[0]["chardev"])
    assert ga["backend"] == "socket" and ga["server"] == "on"
    assert Path(ga["path"]).parent == Path("/run/qemud/domains/fedora39")  # type: ignore[arg-type]
    assert len(_dev(a, "virtio-serial-pci")) == 1
    assert len(_dev(a, "usb-tablet")) == 1 and len(_dev(a, "qemu-xhci")) == 1
    assert len(_dev(a, "virtio-vga")) == 1
    rng = _dev(a, "virtio-rng-pci")
    assert len(rng) == 1
    assert [o for o in json_options(a, "-object") if o["id"] == rng[0]["rng"]][0] == {
        "qom-type": "rng-random", "id": rng[0]["rng"], "filename": "/dev/urandom"}
    vnc = opts_dict(options(a, "-vnc")[0], "vnc")
    assert vnc["vnc"].startswith("127.0.0.1:")  # type: ignore[union-attr]
    assert not cmd.warnings


def check_dumpxml_pc(d: Domain, cmd: Command) -> None:
    a = cmd.argv

    def at(driver: str) -> str:
        (dev,) = _dev(a, driver)
        assert dev["bus"] == "pci.0"
        return dev["addr"]

    # libvirt's explicit addresses are kept
    assert at("virtio-blk-pci") == "0x7"
    assert at("virtio-net-pci") == "0x3"
    assert at("qxl-vga") == "0x2"
    assert at("virtio-balloon-pci") == "0x8"
    assert at("virtio-rng-pci") == "0x9"
    assert at("virtio-serial-pci") == "0x6"
    assert at("piix3-usb-uhci") == "0x1.0x2"
    (cd,) = _dev(a, "ide-cd")
    assert (cd["bus"], cd["unit"], cd["id"]) == ("ide.1", 0, "ide0-1-0")
    # aliases become ids
    assert {"virtio-disk0", "net0", "video0", "balloon0", "rng0", "channel0", "input0", "serial0",
            "usb", "virtio-serial0"} <= {x["id"] for x in json_options(a, "-device") if "id" in x}
    ga = _chardev(a, "charchannel0")
    assert ga["path"] == "/var/lib/libvirt/qemu/channel/target/domain-3-debian11/org.qemu.guest_agent.0"
    # <graphics type='vnc' port='5900' autoport='yes'>: libvirt drops the port of a running
    # guest's dump when autoport is on (virDomainGraphicsDefParseXMLVNC, inactive parse), so QEMU
    # must pick a free display rather than insist on 5900
    vnc = opts_dict(options(a, "-vnc")[0], "vnc")
    assert "to" in vnc, f"autoport='yes' must not pin display :0: {options(a, '-vnc')}"
    (port,) = _dev(a, "virtserialport")
    assert port["bus"] == "virtio-serial0.0" and port["nr"] == 1
    assert json_options(a, "-netdev")[0] == {"type": "bridge", "br": "br0",
                                             "helper": "/usr/lib/qemu/qemu-bridge-helper", "id": "hostnet0"}
    assert options(a, "-cpu")[0].split(",")[0] == "qemu64"
    assert "svm=off" in options(a, "-cpu")[0].split(",")
    # cache='none' io='native'
    (f,) = [b for b in json_options(a, "-blockdev") if b.get("filename", "").endswith("debian11.qcow2")]
    assert f["cache"] == {"direct": True, "no-flush": False} and f["aio"] == "native"
    # what qemud does not do is said, not dropped silently
    warned = {w.path for w in cmd.warnings}
    assert {"/domain/seclabel", "/domain/resource", "/domain/devices/disk[1]/backingStore"} <= warned
    assert all(w.severity == "warning" for w in cmd.warnings)
    assert d.id == 3  # the running id is read and has no effect
    assert "3" not in a


def check_minimal_pc(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    assert "-blockdev" not in a and "-netdev" not in a and "-chardev" in a  # QMP only
    assert len(options(a, "-chardev")) == 1
    assert options(a, "-boot") == ["strict=on"]
    assert "-cpu" not in a


def check_direct_kernel_boot(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    assert options(a, "-kernel") == ["/var/lib/qemud/boot/vmlinuz-6.1.0-13-amd64"]
    assert options(a, "-initrd") == ["/var/lib/qemud/boot/initrd.img-6.1.0-13-amd64"]
    assert options(a, "-append") == ["console=ttyS0 root=/dev/vda1 ro quiet panic=-1"]
    assert "-no-reboot" in a
    assert not any("bootindex" in x for x in json_options(a, "-device"))
    # <serial> and <console> of the same port: one serial device
    assert len(_dev(a, "isa-serial")) == 1


def check_uefi_ovmf(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    bd = {b["node-name"]: b for b in json_options(a, "-blockdev")}
    assert bd["pflash0-file"]["filename"] == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert bd["pflash0"]["read-only"] is True
    nvram = Path(bd["pflash1-file"]["filename"])
    assert nvram.parent == Path("/var/lib/qemud/domains/win-uefi")
    assert bd["pflash1"]["read-only"] is False
    machine = opts_dict(options(a, "-machine")[0], "type")
    assert machine["pflash0"] == "pflash0" and machine["pflash1"] == "pflash1" and machine["smm"] == "on"
    copies = [p for p in cmd.prepare if p.kind == "copy"]
    assert len(copies) == 1
    assert copies[0].source == Path("/usr/share/OVMF/OVMF_VARS_4M.fd") and copies[0].dest == nvram
    assert "-bios" not in a
    assert opts_dict(options(a, "-rtc")[0])["base"] == "localtime"
    assert options(a, "-smp") == ["4,sockets=1,cores=2,threads=2"]
    assert json_options(a, "-netdev")[0]["br"] == "virbr0"


def check_sata_cdrom_floppy(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    (hd,) = _dev(a, "ide-hd")
    (cd,) = _dev(a, "ide-cd")
    assert cd["bootindex"] == 1 and hd["bootindex"] == 2
    assert hd["bus"] == "ide.0" and cd["bus"] == "ide.1"  # q35's AHCI ports 0 and 1
    (fd,) = _dev(a, "floppy")
    assert fd["unit"] == 0
    # q35 has no floppy controller of its own: QEMU refuses a floppy without one
    # ("No 'floppy-bus' bus found for device 'floppy'")
    assert len(_dev(a, "isa-fdc")) == 1
    ro = {b["node-name"]: b["read-only"] for b in json_options(a, "-blockdev") if "read-only" in b}
    assert ro[cd["drive"]] is True and ro[hd["drive"]] is False and ro[fd["drive"]] is False


def check_scsi_virtio_scsi(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    (ctrl,) = _dev(a, "virtio-scsi-pci")
    assert ctrl["id"] == "scsi0" and ctrl["num_queues"] == 4 and ctrl["iothread"] == "iothread1"
    assert [o["id"] for o in json_options(a, "-object") if o["qom-type"] == "iothread"] == ["iothread1", "iothread2"]
    hds = _dev(a, "scsi-hd")
    assert [h["bus"] for h in hds] == ["scsi0.0", "scsi0.0"]
    assert [h["lun"] for h in hds] == [0, 1]
    assert hds[0]["bootindex"] == 1 and "bootindex" not in hds[1]
    assert hds[1]["serial"] == "DBDATA01"
    (cd,) = _dev(a, "scsi-cd")
    assert "drive" not in cd  # an empty CD-ROM drive
    (blk,) = [b for b in json_options(a, "-blockdev") if b.get("filename") == "/dev/vg0/db-data"]
    assert blk["driver"] == "host_device"


def check_scsi_lsilogic(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    (ctrl,) = _dev(a, "lsi53c895a")
    hds = _dev(a, "scsi-hd")
    assert {h["bus"] for h in hds} == {f"{ctrl['id']}.0"}
    assert [h["scsi-id"] for h in hds] == [0, 1]
    assert hds[1]["vendor"] == "LEGACY" and hds[1]["product"] == "DATADISK"
    assert [b["driver"] for b in json_options(a, "-blockdev") if b["node-name"] == hds[1]["drive"]] == ["vmdk"]


def check_storage_tuned(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    objs = json_options(a, "-object")
    assert [o["id"] for o in objs if o["qom-type"] == "iothread"] == ["iothread3", "iothread1"]
    (group,) = [o for o in objs if o["qom-type"] == "throttle-group"]
    assert group["limits"] == {"bps-total": 104857600, "iops-total": 2000, "iops-total-max": 4000,
                               "iops-total-max-length": 10}
    nodes = {b["node-name"]: b for b in json_options(a, "-blockdev")}
    vda, vdb = _dev(a, "virtio-blk-pci")
    for dev, thread in ((vda, "iothread3"), (vdb, "iothread1")):
        assert dev["iothread"] == thread
        top = nodes[dev["drive"]]
        assert top["driver"] == "throttle" and top["throttle-group"] == group["id"]
    assert vda["acpi-index"] == 1
    assert nodes[nodes[vda["drive"]]["file"]]["cache-size"] == 1024 * 1024
    (lsi,) = _dev(a, "lsi53c895a")  # added for the SCSI disk, as libvirt does
    (sda,) = _dev(a, "scsi-hd")
    assert sda["bus"] == f"{lsi['id']}.0"
    assert (nodes[sda["drive"]]["offset"], nodes[sda["drive"]]["size"]) == (0, 524288)


def check_usb_disk(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    (xhci,) = _dev(a, "qemu-xhci")
    (stick,) = _dev(a, "usb-storage")
    assert stick["bus"] == f"{xhci['id']}.0" and stick["removable"] is True and stick["bootindex"] == 1


def check_nic_bridge(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    assert json_options(a, "-netdev") == [{"type": "bridge", "br": "br0", "id": "hostnet0",
                                           "helper": "/usr/lib/qemu/qemu-bridge-helper"}]
    (nic,) = _dev(a, "virtio-net-pci")
    assert nic["host_mtu"] == 9000 and nic["mac"] == "52:54:00:12:34:56"


def check_nic_network(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    nds = json_options(a, "-netdev")
    assert [n["br"] for n in nds] == ["virbr0", "virbr0"]
    assert nds[1]["queues"] == 2
    (vn,) = _dev(a, "virtio-net-pci")
    assert vn["mq"] is True


def check_nic_ethernet_tap(d: Domain, cmd: Command) -> None:
    (nd,) = json_options(cmd.argv, "-netdev")
    assert nd == {"type": "tap", "ifname": "tap-vm0", "script": "no", "downscript": "no", "vhost": True,
                  "id": "hostnet0"}


def check_nics_no_mac(d: Domain, cmd: Command, caps: HostCaps) -> None:
    a = cmd.argv
    nics = [x for x in json_options(a, "-device") if "netdev" in x]
    assert [n["driver"] for n in nics] == ["virtio-net-pci", "e1000", "rtl8139"]
    macs = [n["mac"] for n in nics]
    for m in macs:
        first = int(m[:2], 16)
        assert first & 1 == 0 and first & 2 == 2  # unicast, locally administered
    # stable: the same file gives the same MACs; another UUID gives others
    _, again = translate("nics-no-mac", caps)
    assert [n["mac"] for n in json_options(again.argv, "-device") if "netdev" in n] == macs
    other = parse_domain(xml_of("nics-no-mac").read_text().replace(
        "8394a5b6-c7d8-4e9f-b0a1-b2c3d4e5f607", "8394a5b6-c7d8-4e9f-b0a1-b2c3d4e5f608"))
    other_cmd = build_argv(other, caps, guest_paths(other.name))
    other_macs = [n["mac"] for n in json_options(other_cmd.argv, "-device") if "netdev" in n]
    assert not set(other_macs) & set(macs)
    assert nics[0]["bootindex"] == 1  # <boot dev='network'/>: the first NIC


def check_serial_types(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    serials = sorted(_dev(a, "isa-serial"), key=lambda s: s["index"])
    assert [s["index"] for s in serials] == [0, 1, 2, 3]
    ch = [_chardev(a, s["chardev"]) for s in serials]
    assert ch[0] == {"backend": "file", "id": ch[0]["id"], "path": "/var/log/qemud/serials-console.log",
                     "append": "on"}
    assert ch[1] == {"backend": "socket", "id": ch[1]["id"], "path": "/run/qemud/serials-ttyS1.sock",
                     "server": "on", "wait": "off"}
    assert ch[2] == {"backend": "socket", "id": ch[2]["id"], "host": "127.0.0.1", "port": "4555",
                     "telnet": "on", "server": "on", "wait": "off"}
    assert ch[3] == {"backend": "udp", "id": ch[3]["id"], "host": "127.0.0.1", "port": "4557",
                     "localaddr": "127.0.0.1", "localport": "4556"}
    (par,) = _dev(a, "isa-parallel")
    assert _chardev(a, par["chardev"])["backend"] == "null"


def check_memory_bytes(d: Domain, cmd: Command) -> None:
    assert opts_dict(options(cmd.argv, "-m")[0], "size") == {
        "size": "1024M", "slots": "16", "maxmem": f"{16 * 1024 * 1024}k"}


def check_memory_mb(d: Domain, cmd: Command) -> None:
    assert options(cmd.argv, "-m") == ["size=954M"]  # 10^9 bytes, rounded up to whole MiB


def check_memory_gib(d: Domain, cmd: Command) -> None:
    assert options(cmd.argv, "-m") == ["size=2048M"]


def check_vcpu_topology(d: Domain, cmd: Command) -> None:
    assert options(cmd.argv, "-smp") == ["4,sockets=2,cores=2,threads=2,maxcpus=8"]


def check_cpu_custom_model(d: Domain, cmd: Command) -> None:
    (cpu,) = options(cmd.argv, "-cpu")
    parts = cpu.split(",")
    assert parts[0] == "Skylake-Client-IBRS"
    assert {"ssbd=on", "md-clear=on", "hle=off", "rtm=off", "sse4_2=on", "pmu=off"} <= set(parts[1:])
    assert not any(p.startswith("vmx") for p in parts)  # optional: left to the model


def check_boot_menu_order(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    assert opts_dict(options(a, "-boot")[0]) == {"menu": "on", "splash-time": "3000",
                                                 "reboot-timeout": "5000", "strict": "on"}
    boot = {x["driver"]: x.get("bootindex") for x in json_options(a, "-device")}
    assert (boot["e1000"], boot["ide-cd"], boot["ide-hd"]) == (1, 2, 3)


def check_boot_per_device(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    blk = _dev(a, "virtio-blk-pci")
    assert [b.get("bootindex") for b in blk] == [None, 1]
    assert _dev(a, "virtio-net-pci")[0]["bootindex"] == 2


def check_clock_localtime(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    assert opts_dict(options(a, "-rtc")[0]) == {"base": "localtime", "clock": "vm", "driftfix": "slew"}
    assert opts_dict(options(a, "-machine")[0], "type")["hpet"] == "on"
    # kvmclock present='no' is a CPU property: it needs a -cpu even without <cpu> in the XML
    assert any("kvmclock=off" in c.split(",") for c in options(a, "-cpu")), options(a, "-cpu")
    assert not cmd.env


def check_lifecycle_preserve(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    assert "-no-shutdown" in a  # on_poweroff preserve: QEMU outlives the guest's poweroff
    assert "-no-reboot" in a  # on_reboot destroy: a reboot ends the guest
    assert "panic=pause" in options(a, "-action")  # on_crash preserve: the crashed guest is kept
    (pv,) = _dev(a, "pvpanic")
    assert pv["ioport"] == 0x505


def check_lifecycle_restart(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    # on_reboot restart: QEMU stops at the reboot (-no-reboot) and qemud relaunches it
    assert "-no-reboot" in a and "-no-shutdown" in a
    actions = options(a, "-action")
    assert "panic=pause" not in actions  # on_crash restart: not kept paused
    assert "watchdog=reset" in actions
    assert len(_dev(a, "i6300esb")) == 1 and len(_dev(a, "pvpanic-pci")) == 1


def check_injection_names(d: Domain, cmd: Command) -> None:
    a = cmd.argv
    name = """evil,name=x,debug-threads=off "quoted" 'single'"""
    assert d.name == name
    assert opts_dict(options(a, "-name")[0], "guest") == {"guest": name, "debug-threads": "on"}
    assert _chardev(a, "qmp")["path"] == f"/run/qemud/domains/{name}/qmp.sock"
    assert options(a, "-kernel") == ["/boot/vmlinuz,if=none,file=/etc/shadow"]
    assert options(a, "-append") == ["""console=ttyS0 init=/bin/sh -- -S -device "x" 'y',,z"""]
    assert "-S" not in option_names(a)
    files = [b["filename"] for b in json_options(a, "-blockdev") if "filename" in b]
    assert files == ['/srv/vm/a,file=/etc/shadow,format=raw "b" c.img']
    assert _dev(a, "virtio-blk-pci")[0]["serial"] == 'ser,ial=1 "q"'
    serials = sorted(_dev(a, "isa-serial"), key=lambda s: s["index"])
    assert _chardev(a, serials[0]["chardev"]) == {"backend": "file", "id": serials[0]["chardev"],
                                                  "path": '/var/log/con,sole=1,,x "y".log'}
    assert _chardev(a, serials[1]["chardev"]) == {
        "backend": "socket", "id": serials[1]["chardev"], "path": "/tmp/sock,server=off,path=/tmp/x 'q'.sock",
        "server": "on", "wait": "off"}
    assert json_options(a, "-netdev")[0]["br"] == 'br0","id":"pwn'
    assert set(json_options(a, "-netdev")[0]) == {"type", "br", "helper", "id"}
    # nothing but the options a domain like this needs
    assert option_names(a).count("-device") == len(json_options(a, "-device"))


def check_no_uuid(d: Domain, cmd: Command, caps: HostCaps) -> None:
    assert d.uuid is None
    derived = str(uuid.uuid5(UUID_NAMESPACE, "no-uuid"))
    assert options(cmd.argv, "-uuid") == [derived]
    # a stable UUID, hence a stable MAC, on every translation
    _, again = translate("no-uuid", caps)
    assert again.argv == cmd.argv
    # the derived UUID depends on the name
    renamed = parse_domain(xml_of("no-uuid").read_text().replace("<name>no-uuid<", "<name>no-uuid2<"))
    assert renamed.uuid_value != derived


CHECKS: dict[str, Callable[..., None]] = {
    name.removeprefix("check_").replace("_", "-"): fn
    for name, fn in list(globals().items()) if name.startswith("check_")
}


def test_every_case_has_specific_checks() -> None:
    assert set(CHECKS) == set(CASES), set(CASES) ^ set(CHECKS)


@pytest.mark.parametrize("case", CASES)
def test_case_facts(case: str, caps: HostCaps) -> None:
    d, cmd = translate(case, caps)
    fn = CHECKS[case]
    if fn.__code__.co_argcount == 3:
        fn(d, cmd, caps)
    else:
        fn(d, cmd)


# ---- memory units, beyond the golden cases --------------------------------------------------

MINI = """<domain type='qemu'><name>u</name><memory{unit}>{value}</memory>
<os><type>hvm</type></os></domain>"""


@pytest.mark.parametrize(("unit", "value", "mib"), [
    (None, "262144", 256),
    ("KiB", "262144", 256),
    ("k", "262144", 256),
    ("MiB", "256", 256),
    ("M", "256", 256),
    ("GiB", "1", 1024),
    ("G", "2", 2048),
    ("TiB", "1", 1024 * 1024),
    ("bytes", "268435456", 256),
    ("b", "268435457", 257),  # one byte more: rounded up
    ("KB", "268435", 256),  # 268,435,000 bytes = 255.999 MiB -> 256
    ("MB", "256", 245),  # 256,000,000 bytes = 244.14 MiB -> 245
    ("GB", "1", 954),
    ("mib", "64", 64),  # units are case-insensitive, as in libvirt
])
def test_memory_units(unit: str | None, value: str, mib: int, caps: HostCaps) -> None:
    xml = MINI.format(unit=f" unit='{unit}'" if unit else "", value=value)
    d = parse_domain(xml)
    cmd = build_argv(d, caps, guest_paths("u"))
    assert options(cmd.argv, "-m") == [f"size={mib}M"]


# ---- controllers named by the user (<alias name='ua-...'>) ---------------------------------

ALIASED = """<domain type='qemu'>
  <name>aliased</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices>
    {devices}
  </devices>
</domain>
"""


@pytest.mark.parametrize(("machine", "devices"), [
    ("pc", "<controller type='scsi' index='0' model='virtio-scsi'><alias name='ua-myscsi'/></controller>"
           "<disk type='file' device='disk'><source file='/srv/a.img'/><target dev='sda' bus='scsi'/></disk>"),
    ("pc", "<controller type='scsi' index='0' model='lsilogic'><alias name='ua-lsi'/></controller>"
           "<disk type='file' device='cdrom'><target dev='sda' bus='scsi'/></disk>"),
    ("q35", "<controller type='virtio-serial' index='0'><alias name='ua-vserial'/></controller>"
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"),
    ("q35", "<controller type='usb' index='0' model='qemu-xhci'><alias name='ua-xhci'/></controller>"
            "<input type='tablet' bus='usb'/>"),
], ids=["virtio-scsi", "lsilogic", "virtio-serial", "usb"])
def test_devices_find_a_controller_with_a_user_alias(machine: str, devices: str, caps: HostCaps) -> None:
    """libvirt lets users name devices 'ua-*'; devices on such a controller must use its name."""
    d = parse_domain(ALIASED.format(machine=machine, devices=devices))
    cmd = build_argv(d, caps, guest_paths(d.name))
    assert_bus_references(cmd.argv, caps.machine(machine).name)  # type: ignore[union-attr]
