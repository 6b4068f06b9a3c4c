"""PCI and USB placement as libvirt does it, checked in real QEMU 7.2.

The guest-visible topology is read back from the running QEMU over QMP: for every device with an
id, the bus QEMU plugged it into (``parent_bus``: the root bus or the bus of a root port / bridge
with its own id) and its slot.function (``addr``). ``query-pci`` cannot show what sits behind a
bridge before the firmware numbered the buses (the guest is started paused), the QOM tree can.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from qemud.argv import build_argv
from qemud.caps import probe
from qemud.domain import parse_domain
from qemud.errors import DomainError
from qemud.launch import prepare
from qemud.paths import GuestPaths
from tests.support.realize import _connect, _kill
from tests.support.tinyguest import ensure_guest
from tools.conformance import (Guest, Rewriter, _device_props, libvirt_args_file, parse_args_file,
                               pci_devices)

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
#: libvirt's inputs and expected command lines, copied into the repository (tests/data/libvirt)
CORPUS = Path(__file__).resolve().parent / "data" / "libvirt"

#: (parent bus id or "root", slot, function) of a device
Place = tuple[str, int, int]


def _bus_owner(bus: str) -> str:
    return "root" if bus in ("pci.0", "pcie.0") else bus


async def _topology(argv: list[str], qmp: Path) -> dict[str, Place]:
    """Start ``argv`` (paused) and read every peripheral's parent bus and devfn from QOM."""
    import subprocess
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        q, why = await _connect(proc, qmp, time.monotonic() + 30)
        assert q is not None, f"QEMU did not start: {why} {proc.stdout.read().decode() if proc.stdout else ''}"
        out: dict[str, Place] = {}
        try:
            for entry in await q.execute("qom-list", {"path": "/machine/peripheral"}):
                if not entry["type"].startswith("child<"):
                    continue
                path = f"/machine/peripheral/{entry['name']}"
                props = {p["name"] for p in await q.execute("qom-list", {"path": path})}
                if "addr" not in props or "parent_bus" not in props:
                    continue  # not a PCI device
                devfn = await q.execute("qom-get", {"path": path, "property": "addr"})
                bus = await q.execute("qom-get", {"path": path, "property": "parent_bus"})
                out[entry["name"]] = (_bus_owner(str(bus).rstrip("/").rsplit("/", 1)[-1]), devfn >> 3, devfn & 7)
            await q.execute("quit")
        finally:
            await q.close()
        return out
    finally:
        _kill(proc)


def realize_topology(xml: str, name: str) -> tuple[list[str], dict[str, Place]]:
    """Translate ``xml`` (rewritten for this host as the conformance run does) and start it."""
    tiny = ensure_guest()
    with tempfile.TemporaryDirectory(prefix="qp", dir="/tmp") as tmp:
        scratch = Path(tmp)
        text = Rewriter(scratch, Guest(str(tiny.kernel), str(tiny.initrd))).run(xml)
        domain = parse_domain(text, name)
        cmd = build_argv(domain, probe(QEMU), GuestPaths(scratch / "run", scratch / "state"), paused=True)
        prepare(cmd)
        return cmd.argv, asyncio.run(_topology(cmd.argv, cmd.qmp))


def libvirt_places(args: list[str]) -> dict[str, Place]:
    """The same (parent bus, slot, function) for every PCI device in libvirt's command line."""
    out: dict[str, Place] = {}
    for i, a in enumerate(args[:-1]):
        if a != "-device":
            continue
        p = _device_props(args[i + 1])
        if "id" not in p or "bus" not in p or "addr" not in p:
            continue
        slot, _, fn = str(p["addr"]).partition(".")
        out[str(p["id"])] = (_bus_owner(str(p["bus"])), int(slot, 0), int(fn, 0) if fn else 0)
    return out


# ---- q35: hand-written XML, libvirt's addresses --------------------------------------------------

@pytest.mark.parametrize("case", ["x86_64-q35-headless", "q35-default-devices-only"])
def test_q35_handwritten_xml_gets_libvirts_guest_addresses(case: str) -> None:
    xml = (CORPUS / f"{case}.xml").read_text()
    args = libvirt_args_file(CORPUS, f"{case}.xml")
    assert args is not None and "latest" in args.name
    expected = libvirt_places(parse_args_file(args))
    assert any(k.startswith("pci.") for k in expected), "the case should need auto-added root ports"
    _, got = realize_topology(xml, case)
    assert {k: got.get(k) for k in expected} == expected


Q35_MIXED = """<domain type='qemu'>
  <name>pci-q35-mixed</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/a.img'/><target dev='vda' bus='virtio'/></disk>
    <interface type='user'><mac address='52:54:00:00:00:01'/><model type='e1000'/></interface>
    <interface type='user'><mac address='52:54:00:00:00:02'/><model type='e1000e'/></interface>
    <controller type='scsi' model='lsilogic'/>
    <video><model type='qxl'/></video>
    <memballoon model='virtio'/>
  </devices>
</domain>"""


def test_q35_conventional_pci_devices_go_behind_an_auto_added_pcie_to_pci_bridge() -> None:
    argv, got = realize_topology(Q35_MIXED, "pci-q35-mixed")
    bridges = [p for p in (_device_props(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "-device")
               if p["driver"] == "pcie-pci-bridge"]
    assert len(bridges) == 1
    bridge = str(bridges[0]["id"])
    # the bridge sits in a root port on pcie.0; e1000 and the LSI HBA are behind the bridge
    port = got[bridge][0]
    assert port.startswith("pci.") and got[port][0] == "root"
    assert got["net0"][0] == bridge and got["scsi0"][0] == bridge
    # PCIe devices each get a root port of their own, in slot 0
    for dev in ("net1", "virtio-disk0", "balloon0"):
        owner, slot, fn = got[dev]
        assert owner.startswith("pci.") and owner != bridge and (slot, fn) == (0, 0)
        assert got[owner][0] == "root"
    assert len({got[d][0] for d in ("net1", "virtio-disk0", "balloon0")}) == 3
    # the primary video card at 00:01.0, as on real q35
    assert got["video0"] == ("root", 1, 0)


# ---- i440fx: slots run out, libvirt adds a pci-bridge -----------------------------------------------

def test_i440fx_guest_overflowing_pci0_gets_a_pci_bridge() -> None:
    nics = "".join(f"<interface type='user'><mac address='52:54:00:00:01:{n:02x}'/><model type='rtl8139'/>"
                   "</interface>" for n in range(32))
    xml = (f"<domain type='qemu'><name>pci-many</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
           f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{nics}"
           "<memballoon model='none'/></devices></domain>")
    argv, got = realize_topology(xml, "pci-many")
    assert got["pci.1"][0] == "root"
    on_root = [n for n in range(32) if got[f"net{n}"][0] == "root"]
    behind = [n for n in range(32) if got[f"net{n}"][0] == "pci.1"]
    assert on_root == list(range(29))  # pci.0 slots 2..30 (00:01 is the PIIX3, one slot for the bridge)
    assert behind == [29, 30, 31]
    assert [got[f"net{n}"][1] for n in behind] == [1, 2, 3]  # a pci-bridge's slot 0 is not used
    assert '"chassis_nr":1' in " ".join(argv)


# ---- translation checks ----------------------------------------------------------------------------

def _translate(devices: str, machine: str = "pc", cpu: str = "") -> list[str]:
    xml = (f"<domain type='qemu'><name>t</name><memory unit='MiB'>128</memory><vcpu>2</vcpu>"
           f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>{cpu}<devices>{devices}</devices></domain>")
    return build_argv(parse_domain(xml), probe(QEMU), GuestPaths(Path("/tmp/t/run"), Path("/tmp/t/state"))).argv


def _problems(devices: str, machine: str = "pc") -> list[str]:
    with pytest.raises(DomainError) as exc:
        _translate(devices, machine)
    return [f"{p.path}: {p.message}" for p in exc.value.problems]


def _device(argv: list[str], did: str) -> dict[str, Any]:
    return next(p for p in (_device_props(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "-device")
                if p.get("id") == did)


def test_explicit_root_port_address_gives_libvirts_port_number() -> None:
    argv = _translate("<controller type='pci' index='0' model='pcie-root'/>"
                      "<controller type='pci' index='1' model='pcie-root-port'>"
                      "<address type='pci' bus='0' slot='5' function='2'/></controller>", "q35")
    rp = _device(argv, "pci.1")
    assert (rp["port"], rp["chassis"], rp["addr"]) == (5 * 8 + 2, 1, "0x5.0x2")


def test_controllers_up_to_a_referenced_index_are_auto_added() -> None:
    argv = _translate("<controller type='pci' index='3' model='pci-bridge'/>"
                      "<interface type='user'><model type='rtl8139'/>"
                      "<address type='pci' bus='2' slot='4'/></interface>")
    ids = [d[0] for d in pci_devices(argv)]
    assert {"pci.1", "pci.2", "pci.3"} <= set(ids)
    assert _device(argv, "net0")["bus"] == "pci.2"
    assert _device(argv, "pci.2")["driver"] == "pci-bridge"


def test_expander_buses_get_numa_node_and_libvirts_bus_numbers() -> None:
    cpu = ("<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/>"
           "<cell id='1' cpus='1' memory='64' unit='MiB'/></numa></cpu>")
    argv = _translate("<controller type='pci' index='1' model='pci-expander-bus'><target><node>1</node></target>"
                      "</controller><controller type='pci' index='2' model='pci-expander-bus'/>", cpu=cpu)
    assert (_device(argv, "pci.1")["bus_nr"], _device(argv, "pci.1")["numa_node"]) == (254, 1)
    assert _device(argv, "pci.2")["bus_nr"] == 252
    with pytest.raises(DomainError, match="NUMA node 1"):
        _translate("<controller type='pci' index='1' model='pci-expander-bus'><target><node>1</node>"
                   "</target></controller>")


def test_bad_explicit_addresses_are_refused_naming_the_element() -> None:
    assert _problems("<controller type='pci' index='0' model='pci-root'>"
                     "<address type='pci' bus='0' slot='3'/></controller>") == [
        "/domain/devices/controller[1]/address: the pci-root is the machine's host bridge; it has no PCI address"]
    probs = _problems("<controller type='pci' index='0' model='pcie-root'/>"
                      "<controller type='pci' index='1' model='pcie-root-port'/>"
                      "<controller type='pci' index='2' model='dmi-to-pci-bridge'><address type='pci' bus='1'/>"
                      "</controller>", "q35")
    assert len(probs) == 1 and probs[0].startswith("/domain/devices/controller[3]/address:")
    assert "accepts a dmi-to-pci-bridge" in probs[0]
    assert "out of range" in _problems("<interface type='user'><address type='pci' bus='0x100' slot='5'/>"
                                       "</interface>")[0]


# ---- USB refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("devices,where,what", [
    ("<controller type='usb' index='0'/><hub type='usb'><address type='usb' bus='1'/></hub>",
     "/domain/devices/hub[1]/address/@bus", "no USB controller has index 1"),
    ("<controller type='usb' index='0' model='qemu-xhci' ports='16'/>",
     "/domain/devices/controller[1]/@ports", "at most 15 ports"),
    ("<controller type='usb' index='0' model='nec-xhci' ports='16'/>",
     "/domain/devices/controller[1]/@ports", "at most 15 ports"),
    ("<controller type='usb' index='0' model='ich9-uhci2'><master startport='2'/></controller>",
     "/domain/devices/controller[1]", "no master controller"),
    ("<controller type='usb' index='0' model='none'/><controller type='usb' index='0'/>",
     "/domain/devices/controller[2]", "USB is disabled"),
    ("<controller type='usb' index='0'/><hub type='usb'><address type='usb' bus='0' port='1.1.1.1.1'/></hub>",
     "/domain/devices/hub[1]/address/@port", "not a USB port path"),
    ("<controller type='usb' index='0'/><input type='mouse' bus='usb'><address type='usb' bus='0' port='1'/></input>"
     "<hub type='usb'><address type='usb' bus='0' port='1'/></hub>",
     "/domain/devices/hub[1]/address/@port", "port 1 is already taken by /domain/devices/input[1]"),
    ("<controller type='usb' index='0'/><input type='mouse' bus='usb'><address type='usb' bus='0' port='1.2'/></input>",
     "/domain/devices/input[1]/address/@port", "there is no USB hub at port 1"),
    ("<controller type='usb' index='0'/><hub type='usb'><address type='usb' bus='0' port='1'/></hub>"
     "<input type='mouse' bus='usb'><address type='usb' bus='0' port='1.9'/></input>",
     "/domain/devices/input[1]/address/@port", "a USB hub has 8 ports"),
])
def test_usb_configurations_libvirt_refuses_are_refused(devices: str, where: str, what: str) -> None:
    probs = _problems(devices)
    assert any(p.startswith(where + ":") and what in p for p in probs), probs


def test_ich9_usb2_group_shares_one_slot_at_1d() -> None:
    argv = _translate("<controller type='usb' model='ich9-ehci1'/><controller type='usb' model='ich9-uhci1'/>"
                      "<controller type='usb' model='ich9-uhci2'/><controller type='usb' model='ich9-uhci3'/>",
                      "q35")
    places = {d[1]: d[2] for d in pci_devices(argv)}
    assert places["ich9-usb-ehci1"] == (0, 0x1D, 7)
    assert places["ich9-usb-uhci1"] == (0, 0x1D, 0)
    assert places["ich9-usb-uhci3"] == (0, 0x1D, 2)
