"""Host device assignment: <hostdev> (pci, usb, scsi, scsi_host, mdev), <interface type='hostdev'>
and <interface type='vdpa'>.

This host has no VFIO, no USB bus and no SCSI devices, so the translation is checked with host
facts built by hand for a host that has the device (golden-style: the exact -device QEMU gets),
and the refusals both with such facts (each host-side reason on its own) and with this host's real
facts.  Real QEMU then proves the argv shape: given our argv, QEMU gets past every property and
fails only where it opens the host device itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qemud.argv import build_argv
from qemud.caps import HostCaps, probe
from qemud.domain import parse_domain
from qemud.errors import DomainError, Problem
from qemud.host import HostFacts, PciHostDevice, UsbHostDevice, _pci_devices, _scsi_generic, _usb_devices, read_host
from qemud.paths import GuestPaths

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
PATHS = GuestPaths(Path("/run/qemud/domains/g"), Path("/var/lib/qemud/domains/g"))
MDEV = "53764d0e-85a0-42b4-af5c-2046b460b1dc"

#: a host that has every device the tests name
HAS_ALL = HostFacts(
    present=frozenset({"/dev/vfio/vfio", "/sys/bus/usb/devices", "/dev/vhost-scsi", "/dev/vhost-vdpa-0"}),
    pci_devices={
        "0000:06:12.5": PciHostDevice(driver="vfio-pci", iommu_group=12),
        "0000:06:12.6": PciHostDevice(driver="vfio-pci", iommu_group=13),
        "0000:03:07.1": PciHostDevice(driver="vfio-pci", iommu_group=14, pf="0000:03:00.0",
                                      pf_netdev="enp3s0f0", vf_index=1),
        "0021:de:1f.1": PciHostDevice(driver="vfio-pci", iommu_group=15),
    },
    usb_devices=(UsbHostDevice(bus=14, device=6, vendor=0x046D, product=0xC52B),
                 UsbHostDevice(bus=14, device=7, vendor=0x0781, product=0x5567),
                 UsbHostDevice(bus=15, device=2, vendor=0x0781, product=0x5567)),
    mdev_devices=frozenset({MDEV}),
    scsi_generic={"0:0:0:0": "/dev/sg0", "0:0:0:1": "/dev/sg1"},
)


def xml(devices: str, machine: str = "pc", os_extra: str = "") -> str:
    return f"""<domain type='qemu'><name>g</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64' machine='{machine}'>hvm</type>{os_extra}</os>
      <devices>{devices}</devices></domain>"""


@pytest.fixture(scope="module")
def caps() -> HostCaps:
    return probe(QEMU)


@pytest.fixture(scope="module")
def has_all(caps: HostCaps) -> HostCaps:
    return dataclasses.replace(caps, host=HAS_ALL)


def devices(argv: list[str], *drivers: str) -> list[dict[str, Any]]:
    """The JSON -device values whose driver is one of ``drivers``."""
    out = []
    for i, a in enumerate(argv[:-1]):
        if a == "-device" and argv[i + 1].startswith("{"):
            d = json.loads(argv[i + 1])
            if d["driver"] in drivers:
                out.append(d)
    return out


def option_values(argv: list[str], option: str) -> list[dict[str, Any]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == option and argv[i + 1].startswith("{")]


def refuse(text: str, caps: HostCaps) -> list[Problem]:
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(text), caps, PATHS)
    return exc.value.problems


PCI = """<hostdev mode='subsystem' type='pci' managed='yes'><driver name='vfio'/>
  <source><address domain='0x0000' bus='0x06' slot='0x12' function='0x5'/></source>{extra}</hostdev>"""


# ---- translation, on a host that has the device --------------------------------------------

def test_pci_hostdev_is_vfio_pci_with_host_address_rom_boot_and_guest_address(has_all: HostCaps) -> None:
    text = xml(PCI.format(extra="<boot order='1'/><rom bar='on' file='/srv/rom.bin'/>"
                          "<address type='pci' domain='0' bus='0' slot='7' function='0' multifunction='on'/>")
               + """<hostdev mode='subsystem' type='pci'><source>
                      <address domain='0x0000' bus='0x06' slot='0x12' function='0x6'/></source>
                      <rom bar='off'/><alias name='ua-gpu'/><acpi index='3'/></hostdev>""")
    argv = build_argv(parse_domain(text), has_all, PATHS).argv
    assert devices(argv, "vfio-pci") == [
        {"driver": "vfio-pci", "host": "0000:06:12.5", "id": "hostdev0", "bootindex": 1, "bus": "pci.0",
         "addr": "0x7", "multifunction": True, "rombar": 1, "romfile": "/srv/rom.bin"},
        {"driver": "vfio-pci", "host": "0000:06:12.6", "id": "ua-gpu", "bus": "pci.0", "addr": "0x2",
         "rombar": 0, "acpi-index": 3},
    ]


def test_pci_source_numbers_are_read_like_libvirt_decimal_or_hex(has_all: HostCaps) -> None:
    # hostdev-vfio-multidomain: bus='222' slot='31' is 0xde:0x1f
    text = xml("""<hostdev mode='subsystem' type='pci' managed='yes'><source>
                  <address domain='0x0021' bus='222' slot='31' function='1'/></source></hostdev>""")
    [dev] = devices(build_argv(parse_domain(text), has_all, PATHS).argv, "vfio-pci")
    assert dev["host"] == "0021:de:1f.1"


def test_rom_disabled_gives_an_empty_romfile(has_all: HostCaps) -> None:
    [dev] = devices(build_argv(parse_domain(xml(PCI.format(extra="<rom enabled='no'/>"))), has_all, PATHS).argv,
                    "vfio-pci")
    assert dev["romfile"] == ""


def test_unassigned_pci_hostdev_keeps_its_id_and_is_not_given_to_the_guest(has_all: HostCaps) -> None:
    text = xml(PCI.format(extra="<address type='unassigned'/>") + PCI.replace("0x5", "0x6").format(extra=""))
    [dev] = devices(build_argv(parse_domain(text), has_all, PATHS).argv, "vfio-pci")
    assert (dev["host"], dev["id"]) == ("0000:06:12.6", "hostdev1")


def test_hostdev_interface_is_a_vf_with_boot_order_and_mac_instructions(has_all: HostCaps) -> None:
    text = xml("""<interface type='hostdev' managed='yes'><mac address='00:11:22:33:44:55'/>
                  <source><address type='pci' domain='0x0000' bus='0x03' slot='0x07' function='0x1'/></source>
                  <boot order='1'/></interface>""")
    cmd = build_argv(parse_domain(text), has_all, PATHS)
    assert devices(cmd.argv, "vfio-pci") == [
        {"driver": "vfio-pci", "host": "0000:03:07.1", "id": "hostdev0", "bootindex": 1, "bus": "pci.0", "addr": "0x2"}]
    assert not any(a.startswith("{") and '"netdev"' in a for a in cmd.argv)
    [warn] = [w for w in cmd.warnings if w.path == "/domain/devices/interface[1]/mac"]
    assert "ip link set dev enp3s0f0 vf 1 mac 00:11:22:33:44:55" in warn.message


def test_hostdev_interface_vlan_goes_into_the_vf_settings_and_cannot_trunk(has_all: HostCaps) -> None:
    vf = """<interface type='hostdev'><mac address='00:11:22:33:44:55'/>
            <source><address type='pci' domain='0x0000' bus='0x03' slot='0x07' function='0x1'/></source>{}</interface>"""
    cmd = build_argv(parse_domain(xml(vf.format("<vlan><tag id='42'/></vlan>"))), has_all, PATHS)
    assert any("ip link set dev enp3s0f0 vf 1 mac 00:11:22:33:44:55 vlan 42" in w.message for w in cmd.warnings)
    [p] = refuse(xml(vf.format("<vlan trunk='yes'><tag id='42'/><tag id='47'/></vlan>")), has_all)
    assert p.path == "/domain/devices/interface[1]/vlan" and "trunking" in p.message


def test_hostdev_interface_must_be_a_virtual_function(caps: HostCaps) -> None:
    host = facts(pci_devices={"0000:03:07.1": PciHostDevice(driver="vfio-pci", iommu_group=4)})
    [p] = refuse(xml("""<interface type='hostdev'><source>
                        <address type='pci' domain='0x0000' bus='0x03' slot='0x07' function='0x1'/></source></interface>"""),
                 dataclasses.replace(caps, host=host))
    assert p.path == "/domain/devices/interface[1]/source/address" and "not an SR-IOV virtual function" in p.message


def test_failover_pair_virtio_nic_and_hostdev(has_all: HostCaps) -> None:
    text = xml("""<interface type='user'><mac address='00:11:22:33:44:55'/><model type='virtio'/>
                    <teaming type='persistent'/><alias name='ua-backup0'/></interface>
                  <interface type='hostdev' managed='yes'><mac address='00:11:22:33:44:55'/>
                    <source><address type='pci' domain='0x0000' bus='0x03' slot='0x07' function='0x1'/></source>
                    <teaming type='transient' persistent='ua-backup0'/></interface>""")
    argv = build_argv(parse_domain(text), has_all, PATHS).argv
    [nic] = devices(argv, "virtio-net-pci")
    assert nic["failover"] is True and nic["id"] == "ua-backup0"
    [vf] = devices(argv, "vfio-pci")
    assert vf["failover_pair_id"] == "ua-backup0"


def test_usb_hostdev_by_address_on_a_chosen_controller_port(has_all: HostCaps) -> None:
    text = xml("""<controller type='usb' index='0' model='piix3-uhci'/>
                  <controller type='usb' index='1' model='qemu-xhci'/>
                  <hostdev mode='subsystem' type='usb'><source guestReset='uninitialized'>
                    <address bus='14' device='6'/></source><boot order='2'/>
                    <address type='usb' bus='1' port='3'/></hostdev>""")
    assert devices(build_argv(parse_domain(text), has_all, PATHS).argv, "usb-host") == [
        {"driver": "usb-host", "hostdevice": "/dev/bus/usb/014/006", "id": "hostdev0", "guest-reset": True,
         "guest-resets-all": False, "bootindex": 2, "bus": "usb1.0", "port": "3"}]


def test_usb_hostdev_by_vendor_and_product_is_found_on_the_host(has_all: HostCaps) -> None:
    text = xml("""<hostdev mode='subsystem' type='usb'><source>
                  <vendor id='0x046d'/><product id='0xc52b'/></source></hostdev>""")
    [dev] = devices(build_argv(parse_domain(text), has_all, PATHS).argv, "usb-host")
    assert dev["hostdevice"] == "/dev/bus/usb/014/006" and dev["bus"] == "usb.0"


def test_usb_vendor_product_matching_two_devices_needs_an_address(has_all: HostCaps) -> None:
    text = xml("""<hostdev mode='subsystem' type='usb'><source>
                  <vendor id='0x0781'/><product id='0x5567'/></source></hostdev>""")
    [p] = refuse(text, has_all)
    assert p.path == "/domain/devices/hostdev[1]/source" and "2 host USB devices" in p.message
    text = text.replace("</source>", "<address bus='15' device='2'/></source>")
    [dev] = devices(build_argv(parse_domain(text), has_all, PATHS).argv, "usb-host")
    assert dev["hostdevice"] == "/dev/bus/usb/015/002"


def test_optional_usb_device_that_is_absent_is_left_out_with_a_warning(has_all: HostCaps) -> None:
    text = xml("""<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'>
                  <vendor id='0x1234'/><product id='0x5678'/></source></hostdev>""")
    cmd = build_argv(parse_domain(text), has_all, PATHS)
    assert devices(cmd.argv, "usb-host") == []
    assert any(w.path == "/domain/devices/hostdev[1]" and "optional" in w.message for w in cmd.warnings)


def test_scsi_hostdev_on_virtio_scsi_and_lsi(has_all: HostCaps) -> None:
    text = xml("""<controller type='scsi' index='0' model='virtio-scsi'/><controller type='scsi' index='1'/>
        <hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/>
          <address bus='0' target='0' unit='0'/></source><address type='drive' controller='0' bus='0' target='4' unit='8'/></hostdev>
        <hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/>
          <address bus='0' target='0' unit='1'/></source><readonly/><boot order='1'/>
          <address type='drive' controller='1' bus='0' target='0' unit='7'/></hostdev>
        <hostdev mode='subsystem' type='scsi'><source protocol='iscsi' name='iqn.1992-01.com.example:storage/2'>
          <host name='example.org' port='3260'/><initiator><iqn name='iqn.2020-07.com.example:test'/></initiator>
          </source></hostdev>""")
    argv = build_argv(parse_domain(text), has_all, PATHS).argv
    assert [b for b in option_values(argv, "-blockdev") if b["node-name"].startswith("hostdev")] == [
        {"driver": "host_device", "filename": "/dev/sg0", "node-name": "hostdev0-storage", "read-only": False},
        {"driver": "host_device", "filename": "/dev/sg1", "node-name": "hostdev1-storage", "read-only": True},
        {"driver": "iscsi", "portal": "example.org:3260", "target": "iqn.1992-01.com.example:storage", "lun": 2,
         "transport": "tcp", "initiator-name": "iqn.2020-07.com.example:test", "node-name": "hostdev2-storage",
         "read-only": False},
    ]
    assert devices(argv, "scsi-generic") == [
        {"driver": "scsi-generic", "drive": "hostdev0-storage", "id": "hostdev0", "bus": "scsi0.0",
         "channel": 0, "scsi-id": 4, "lun": 8},
        {"driver": "scsi-generic", "drive": "hostdev1-storage", "id": "hostdev1", "bus": "scsi1.0",
         "scsi-id": 7, "bootindex": 1},
        # no <address>: libvirt's first free unit on controller 0, bus 0, target 0
        {"driver": "scsi-generic", "drive": "hostdev2-storage", "id": "hostdev2", "bus": "scsi0.0",
         "channel": 0, "scsi-id": 0, "lun": 0},
    ]


def test_vhost_scsi_and_its_transitional_models(has_all: HostCaps) -> None:
    text = xml("""<hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' wwpn='naa.5123456789abcde0'/></hostdev>
                  <hostdev mode='subsystem' type='scsi_host' model='virtio-transitional'>
                    <source protocol='vhost' wwpn='naa.5123456789abcde1'/>
                    <address type='pci' domain='0' bus='0' slot='9' function='0'/></hostdev>""")
    argv = build_argv(parse_domain(text), has_all, PATHS).argv
    assert devices(argv, "vhost-scsi-pci", "vhost-scsi-pci-transitional") == [
        {"driver": "vhost-scsi-pci", "wwpn": "naa.5123456789abcde0", "id": "hostdev0", "bus": "pci.0", "addr": "0x2"},
        {"driver": "vhost-scsi-pci-transitional", "wwpn": "naa.5123456789abcde1", "id": "hostdev1",
         "bus": "pci.0", "addr": "0x9"},
    ]


def test_mdev_with_display_and_ramfb(has_all: HostCaps) -> None:
    text = xml(f"""<graphics type='vnc'/>
        <hostdev mode='subsystem' type='mdev' model='vfio-pci' display='on' ramfb='on'>
          <source><address uuid='{MDEV}'/></source></hostdev>""")
    [dev] = devices(build_argv(parse_domain(text), has_all, PATHS).argv, "vfio-pci-nohotplug")
    assert dev == {"driver": "vfio-pci-nohotplug", "id": "hostdev0", "sysfsdev": f"/sys/bus/mdev/devices/{MDEV}",
                   "display": "on", "ramfb": True, "bus": "pci.0", "addr": dev["addr"]}


def test_vdpa_interface_is_a_vhost_vdpa_netdev_on_virtio(has_all: HostCaps) -> None:
    text = xml("""<interface type='vdpa'><mac address='52:54:00:95:db:c0'/>
                  <source dev='/dev/vhost-vdpa-0'/><driver queues='2'/></interface>""")
    argv = build_argv(parse_domain(text), has_all, PATHS).argv
    assert option_values(argv, "-netdev") == [
        {"type": "vhost-vdpa", "vhostdev": "/dev/vhost-vdpa-0", "queues": 2, "id": "hostnet0"}]
    [nic] = devices(argv, "virtio-net-pci")
    assert nic["mq"] is True and nic["mac"] == "52:54:00:95:db:c0"


# ---- host limits: each reason on its own, and this host's own facts -------------------------

def facts(**changes: Any) -> HostFacts:
    return dataclasses.replace(HAS_ALL, **changes)


@pytest.mark.parametrize("host, path, words", [
    (facts(present=HAS_ALL.present - {"/dev/vfio/vfio"}), "/domain/devices/hostdev[1]", ["/dev/vfio/vfio", "vfio-pci module"]),
    (facts(pci_devices={}), "/domain/devices/hostdev[1]/source/address", ["0000:06:12.5 does not exist"]),
    (facts(pci_devices={"0000:06:12.5": PciHostDevice(driver="vfio-pci")}), "/domain/devices/hostdev[1]/source/address",
     ["no IOMMU group"]),
    (facts(pci_devices={"0000:06:12.5": PciHostDevice(driver="e1000e", iommu_group=3)}),
     "/domain/devices/hostdev[1]/source/address",
     ["bound to e1000e", "managed='yes' is not acted on", "driverctl set-override 0000:06:12.5 vfio-pci"]),
])
def test_pci_host_reasons(caps: HostCaps, host: HostFacts, path: str, words: list[str]) -> None:
    [p] = refuse(xml(PCI.format(extra="")), dataclasses.replace(caps, host=host))
    assert p.path == path
    for w in words:
        assert w in p.message


def test_this_host_refuses_every_kind_naming_element_and_reason(caps: HostCaps) -> None:
    """This machine has no VFIO, no USB bus, no SCSI devices, no vhost-scsi, no vDPA."""
    host = read_host()
    assert caps.host == host or caps.host.present == host.present
    for lacking in ("/dev/vfio/vfio", "/sys/bus/usb/devices", "/dev/vhost-scsi", "/dev/vhost-vdpa-0"):
        assert not host.has(lacking), f"this test describes a host without {lacking}"
    text = xml(PCI.format(extra="")
               + "<hostdev mode='subsystem' type='usb'><source><address bus='14' device='6'/></source></hostdev>"
               + "<controller type='scsi' model='virtio-scsi'/><hostdev mode='subsystem' type='scsi'><source>"
                 "<adapter name='scsi_host0'/><address bus='0' target='0' unit='0'/></source></hostdev>"
               + "<hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' wwpn='naa.5123456789abcde0'/></hostdev>"
               + f"<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{MDEV}'/></source></hostdev>"
               + "<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface>")
    got = {(p.path, w) for p in refuse(text, caps)
           for w in ("/dev/vfio/vfio", "/sys/bus/usb/devices", "/sys/bus/scsi/devices", "/dev/vhost-scsi",
                     "/dev/vhost-vdpa-0") if w in p.message}
    assert got == {
        ("/domain/devices/hostdev[1]", "/dev/vfio/vfio"),
        ("/domain/devices/hostdev[2]", "/sys/bus/usb/devices"),
        ("/domain/devices/hostdev[3]/source", "/sys/bus/scsi/devices"),
        ("/domain/devices/hostdev[4]", "/dev/vhost-scsi"),
        ("/domain/devices/hostdev[5]", "/dev/vfio/vfio"),
        ("/domain/devices/interface[1]/source/@dev", "/dev/vhost-vdpa-0"),
    }


def test_mdev_that_does_not_exist(caps: HostCaps) -> None:
    text = xml(f"<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{MDEV}'/></source></hostdev>")
    [p] = refuse(text, dataclasses.replace(caps, host=facts(mdev_devices=frozenset())))
    assert p.path == "/domain/devices/hostdev[1]/source/address/@uuid" and "mdevctl" in p.message


# ---- libvirt's refusals (the corpus .err cases) ----------------------------------------------

@pytest.mark.parametrize("devs, path, words", [
    (PCI.format(extra="") * 2, "/domain/devices/hostdev[2]/source", ["already assigned by /domain/devices/hostdev[1]"]),
    ("<hostdev mode='subsystem' type='usb'><source><address bus='14' device='6'/></source></hostdev>" * 2,
     "/domain/devices/hostdev[2]/source", ["already assigned"]),
    (f"<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{MDEV}'/></source></hostdev>" * 2,
     "/domain/devices/hostdev[2]/source", ["already assigned"]),
    ("<controller type='scsi' model='virtio-scsi'/>" + "<hostdev mode='subsystem' type='scsi'><source>"
     "<adapter name='scsi_host0'/><address bus='0' target='0' unit='0'/></source></hostdev>" * 2,
     "/domain/devices/hostdev[2]/source", ["already assigned"]),
    ("<controller type='scsi' model='virtio-scsi'/>"
     "<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/><address bus='0' target='0' unit='0'/>"
     "</source><address type='drive' controller='0' bus='0' target='0' unit='0'/></hostdev>"
     "<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/><address bus='0' target='0' unit='1'/>"
     "</source><address type='drive' controller='0' bus='0' target='0' unit='0'/></hostdev>",
     "/domain/devices/hostdev[2]/address", ["controller='0' bus='0' target='0' unit='0'", "/domain/devices/hostdev[1]"]),
    ("<controller type='scsi' model='virtio-scsi'/><disk type='file'><source file='/tmp/x.img'/><target dev='sda' bus='scsi'/></disk>"
     "<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/><address bus='0' target='0' unit='1'/>"
     "</source><address type='drive' controller='0' bus='0' target='0' unit='0'/></hostdev>",
     "/domain/devices/hostdev[1]/address", ["disk target 'sda'"]),
    (f"<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{MDEV}'/></source>"
     "<address type='drive' controller='0' bus='0' target='0' unit='1'/></hostdev>",
     "/domain/devices/hostdev[1]/address/@type", ["'drive'", "vfio-pci"]),
    ("<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
     "<address domain='0x0000' bus='0x06' slot='0x12' function='0x5'/></source></hostdev>",
     "/domain/devices/hostdev[1]/source/address/@uuid", ["uuid is missing"]),
    (f"<hostdev mode='subsystem' type='mdev' model='vfio-pci' display='on'><source><address uuid='{MDEV}'/></source></hostdev>",
     "/domain/devices/hostdev[1]/@display", ["<graphics>"]),
    (f"<graphics type='vnc'/><hostdev mode='subsystem' type='mdev' model='vfio-pci' display='on' ramfb='on'><source>"
     f"<address uuid='{MDEV}'/></source></hostdev><hostdev mode='subsystem' type='mdev' model='vfio-pci' display='on' "
     "ramfb='on'><source><address uuid='53764d0e-85a0-42b4-af5c-2046b460b1dd'/></source></hostdev>",
     "/domain/devices/hostdev[2]/@ramfb", ["only one vGPU"]),
    (f"<hostdev mode='subsystem' type='mdev' model='vfio-ccw'><source><address uuid='{MDEV}'/></source></hostdev>",
     "/domain/devices/hostdev[1]/@model", ["s390"]),
    ("<hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' wwpn='naa.5123456789abcde0'/>"
     "<boot order='1'/></hostdev>", "/domain/devices/hostdev[1]/boot", ["not supported by vhost SCSI devices"]),
    ("<hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' wwpn='5123456789abcde0'/></hostdev>",
     "/domain/devices/hostdev[1]/source/@wwpn", ["naa."]),
    ("<hostdev mode='subsystem' type='usb'><source><address bus='14' device='6'/></source><rom bar='off'/></hostdev>",
     "/domain/devices/hostdev[1]/rom", ["only supported for PCI"]),
    (PCI.format(extra="<rom enabled='no' bar='on'/>"), "/domain/devices/hostdev[1]/rom", ["disabled"]),
    (PCI.replace("vfio", "kvm").format(extra=""), "/domain/devices/hostdev[1]/driver/@name", ["vfio"]),
    (PCI.format(extra="<teaming type='transient' persistent='ua-nope'/>"), "/domain/devices/hostdev[1]/teaming/@persistent",
     ["ua-nope"]),
    ("<interface type='user'><model type='e1000'/><teaming type='persistent'/><alias name='ua-b'/></interface>",
     "/domain/devices/interface[1]/model/@type", ["virtio"]),
    (PCI.replace("type='pci'", "type='pci' display='on'").format(extra=""), "/domain/devices/hostdev[1]/@display",
     ["mdev"]),
    ("<hostdev mode='subsystem' type='usb'><source><address bus='14' device='6'/></source><readonly/></hostdev>",
     "/domain/devices/hostdev[1]/readonly", ["scsi"]),
    ("<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/><model type='e1000'/></interface>",
     "/domain/devices/interface[1]/model/@type", ["virtio"]),
])
def test_libvirt_refusals_name_the_element(has_all: HostCaps, devs: str, path: str, words: list[str]) -> None:
    problems = refuse(xml(devs), has_all)
    assert path in [p.path for p in problems], problems
    [p] = [p for p in problems if p.path == path]
    for w in words:
        assert w in p.message


def test_teaming_pairing_is_checked_when_the_file_is_read() -> None:
    with pytest.raises(DomainError) as exc:
        parse_domain(xml("<interface type='user'><teaming type='transient'/></interface>"))
    assert exc.value.problems[0].path == "/domain/devices/interface[1]/teaming"


def test_zpci_is_refused_on_x86() -> None:
    with pytest.raises(DomainError) as exc:
        parse_domain(xml(PCI.format(extra="<address type='pci' domain='0' bus='0' slot='8' function='0'>"
                                          "<zpci uid='0x0019' fid='0x0000001f'/></address>")))
    assert exc.value.problems[0].path == "/domain/devices/hostdev[1]/address/zpci"


# ---- the host readers, on a sysfs tree made for the test -------------------------------------

def test_readers_find_driver_iommu_group_and_sriov_parent(tmp_path: Path) -> None:
    pci = tmp_path / "pci"
    for name in ("0000:03:00.0", "0000:03:07.1"):
        (pci / name).mkdir(parents=True)
    (tmp_path / "drivers" / "vfio-pci").mkdir(parents=True)
    (tmp_path / "groups" / "14").mkdir(parents=True)
    os.symlink(tmp_path / "drivers" / "vfio-pci", pci / "0000:03:07.1" / "driver")
    os.symlink(tmp_path / "groups" / "14", pci / "0000:03:07.1" / "iommu_group")
    os.symlink(pci / "0000:03:00.0", pci / "0000:03:07.1" / "physfn")
    os.symlink(pci / "0000:03:07.1", pci / "0000:03:00.0" / "virtfn1")
    (pci / "0000:03:00.0" / "net" / "enp3s0f0").mkdir(parents=True)
    got = _pci_devices(str(pci))
    assert got["0000:03:07.1"] == PciHostDevice(driver="vfio-pci", iommu_group=14, pf="0000:03:00.0",
                                                 pf_netdev="enp3s0f0", vf_index=1)
    assert got["0000:03:00.0"] == PciHostDevice()

    usb = tmp_path / "usb"
    for name, vals in (("14-1", ("14", "6", "046d", "c52b")), ("14-1:1.0", None)):
        (usb / name).mkdir(parents=True)
        for f, v in zip(("busnum", "devnum", "idVendor", "idProduct"), vals or ()):
            (usb / name / f).write_text(v + "\n")
    assert _usb_devices(str(usb)) == (UsbHostDevice(14, 6, 0x046D, 0xC52B),)

    scsi = tmp_path / "scsi"
    (scsi / "2:0:0:1" / "scsi_generic" / "sg3").mkdir(parents=True)
    (scsi / "host2").mkdir()
    assert _scsi_generic(str(scsi)) == {"2:0:0:1": "/dev/sg3"}
    assert HostFacts.from_json(json.loads(json.dumps(HAS_ALL.to_json()))) == HAS_ALL


# ---- real QEMU: the argv shape it accepts ----------------------------------------------------

def _qemu_help(driver: str) -> set[str]:
    out = subprocess.run([QEMU, "-device", f"{driver},help"], capture_output=True, text=True, timeout=30).stdout
    return {line.split("=", 1)[0].strip() for line in out.splitlines()[1:] if "=" in line}


GENERIC = {"driver", "id", "bus"}  # qdev properties every device has, not listed by ,help

FULL = xml(f"""<graphics type='vnc'/><controller type='usb' index='0' model='piix3-uhci'/>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    {PCI.format(extra="<boot order='1'/><rom bar='on' file='/srv/rom.bin'/><acpi index='3'/>")}
    <hostdev mode='subsystem' type='usb'><source guestReset='on'><address bus='14' device='6'/></source>
      <boot order='2'/><address type='usb' bus='0' port='1'/></hostdev>
    <hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/><address bus='0' target='0' unit='0'/>
      </source><boot order='3'/><address type='drive' controller='0' bus='0' target='4' unit='8'/></hostdev>
    <hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' wwpn='naa.5123456789abcde0'/></hostdev>
    <hostdev mode='subsystem' type='mdev' model='vfio-pci' display='on' ramfb='on'>
      <source><address uuid='{MDEV}'/></source></hostdev>""")


def test_every_property_emitted_is_one_qemu_lists(has_all: HostCaps) -> None:
    argv = build_argv(parse_domain(FULL), has_all, PATHS).argv
    emitted = devices(argv, "vfio-pci", "vfio-pci-nohotplug", "usb-host", "scsi-generic", "vhost-scsi-pci")
    assert {d["driver"] for d in emitted} == {"vfio-pci", "vfio-pci-nohotplug", "usb-host", "scsi-generic",
                                              "vhost-scsi-pci"}
    for d in emitted:
        assert set(d) - GENERIC <= _qemu_help(d["driver"]), d


def _qemu_fails_at(argv: list[str]) -> str:
    """QEMU's first error for ``argv`` (it must fail: these devices are not on this host)."""
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0, "QEMU started a guest whose host devices do not exist here"
    return run.stderr.strip().splitlines()[0]


@pytest.mark.parametrize("devs, failure", [
    (PCI.format(extra="<boot order='1'/><rom bar='on' file='/srv/rom.bin'/><acpi index='3'/>"),
     "vfio /sys/bus/pci/devices/0000:06:12.5: no such host device"),
    ("<hostdev mode='subsystem' type='usb'><source guestReset='on'><address bus='14' device='6'/></source>"
     "<boot order='2'/><address type='usb' bus='0' port='1'/></hostdev>", "failed to open /dev/bus/usb/014/006"),
    ("<controller type='scsi' model='virtio-scsi'/><hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/>"
     "<address bus='0' target='0' unit='0'/></source><boot order='3'/>"
     "<address type='drive' controller='0' bus='0' target='4' unit='8'/></hostdev>", "cannot get SG_IO version number"),
    (f"<graphics type='vnc'/><hostdev mode='subsystem' type='mdev' model='vfio-pci' display='on' ramfb='on'>"
     f"<source><address uuid='{MDEV}'/></source></hostdev>", f"vfio /sys/bus/mdev/devices/{MDEV}: no such host device"),
    ("<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/><driver queues='2'/></interface>",
     "Could not open '/dev/vhost-vdpa-0'"),
])
def test_qemu_takes_the_argv_and_fails_only_at_the_missing_host_device(caps: HostCaps, devs: str, failure: str,
                                                                       tmp_path: Path) -> None:
    # a host that has the device, except that the SCSI generic node is /dev/null: QEMU opens it
    # and then finds it is no SCSI device, past every property of scsi-generic
    host = facts(scsi_generic={"0:0:0:0": "/dev/null"})
    paths = GuestPaths(tmp_path / "run", tmp_path / "state")
    (tmp_path / "run").mkdir()
    argv = build_argv(parse_domain(xml(devs)), dataclasses.replace(caps, host=host), paths, paused=True).argv
    line = _qemu_fails_at(argv)
    assert failure in line, line
    assert "not found" not in line and "Invalid parameter" not in line


def test_vhost_scsi_argv_is_taken_by_qemu_up_to_opening_dev_vhost_scsi(caps: HostCaps, tmp_path: Path) -> None:
    devs = "<hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' wwpn='naa.5123456789abcde0'/></hostdev>"
    paths = GuestPaths(tmp_path / "run", tmp_path / "state")
    (tmp_path / "run").mkdir()
    argv = build_argv(parse_domain(xml(devs)), dataclasses.replace(caps, host=HAS_ALL), paths, paused=True).argv
    line = _qemu_fails_at(argv)
    assert "vhost-scsi: open vhost char device failed" in line, line
