"""``<hostdev>`` and ``<interface type='hostdev'>``: host devices given to the guest.

PCI devices and mediated devices go through VFIO (``vfio-pci``), USB devices through
``usb-host``, SCSI LUNs through ``scsi-generic`` on a host_device/iscsi blockdev, vhost-scsi
targets through ``vhost-scsi-pci``.  The translation is complete whatever the host; whether the
host has the device is a separate check against :class:`qemud.host.HostFacts` (``b.caps.host``),
so a host without it gets an error naming the element and the reason, and tests can hand in
facts of a host that has it.

qemud differs from libvirt in one respect: it never rebinds host drivers.  libvirt's
``managed='yes'`` detaches a PCI device from its host driver and binds it to vfio-pci at start;
doing that from a daemon can take the host's own disk or NIC away, so qemud asks the admin to
bind the device beforehand (``driverctl set-override``), which also survives reboots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.disks import network_host
from qemud.argv.qemuopts import js
from qemud.domain.devices.address import Address, Alias
from qemud.domain.devices.hostdev import Hostdev, SourceAddress, Teaming
from qemud.domain.devices.interface import Interface

VHOST_SCSI = {None: "vhost-scsi-pci", "virtio": "vhost-scsi-pci",
              "virtio-transitional": "vhost-scsi-pci-transitional",
              "virtio-non-transitional": "vhost-scsi-pci-non-transitional"}
_WWPN = re.compile(r"naa\.[0-9a-fA-F]{16}\Z")
_ADAPTER = re.compile(r"scsi_host([0-9]+)\Z")
VFIO_HINT = ("enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line) and "
             "load the vfio-pci module")


@dataclass
class _Item:
    """One assigned host device: a <hostdev>, or an <interface type='hostdev'> (a PCI one)."""

    path: str
    hostdev: Hostdev | None = None
    iface: Interface | None = None

    @property
    def kind(self) -> str:
        return "pci" if self.iface is not None else self.hostdev.type  # type: ignore[union-attr]

    @property
    def source_address(self) -> SourceAddress | None:
        if self.iface is not None:
            src = self.iface.source
            return src.pci_address if src is not None else None
        src = self.hostdev.source  # type: ignore[union-attr]
        return src.address if src is not None else None

    @property
    def address(self) -> Address | None:
        return (self.iface or self.hostdev).address  # type: ignore[union-attr]

    @property
    def alias(self) -> Alias | None:
        return (self.iface or self.hostdev).alias  # type: ignore[union-attr]

    @property
    def teaming(self) -> Teaming | None:
        return (self.iface or self.hostdev).teaming  # type: ignore[union-attr]

    @property
    def element(self) -> object:
        return self.iface if self.iface is not None else self.hostdev


def add_hostdevs(b: Builder) -> None:
    """Every assigned host device, in libvirt's order: the hostdev interfaces (libvirt adds them
    to its hostdev list when it reads <interface>), then the <hostdev>s."""
    dev = b.domain.devices
    items = [_Item(f"/domain/devices/interface[{i + 1}]", iface=n)
             for i, n in enumerate(dev.interface) if n.type == "hostdev"]
    items += [_Item(f"/domain/devices/hostdev[{i + 1}]", hostdev=h) for i, h in enumerate(dev.hostdev)]
    dups = _duplicates(b, items)
    auto_scsi = _scsi_addresses(b, items)
    ramfb = [it for it in items if it.hostdev is not None and it.hostdev.ramfb]
    for it in ramfb[1:]:
        b.error(f"{it.path}/@ramfb", "only one vGPU can have ramfb='on' (the guest has one ramfb "
                f"display; {ramfb[0].path} has it)")
    for n, it in enumerate(items):
        default_id = f"hostdev{n}"
        if id(it) in dups:
            continue
        h = it.hostdev
        if h is None:
            _pci(b, it, default_id)
            continue
        if not _allowed(b, h, it.path):
            continue
        if h.type == "pci":
            _pci(b, it, default_id)
        elif h.type == "usb":
            _usb(b, it, default_id)
        elif h.type == "scsi":
            _scsi(b, it, default_id, n, auto_scsi.get(id(h)))
        elif h.type == "scsi_host":
            _vhost_scsi(b, it, default_id)
        elif h.type == "mdev":
            _mdev(b, it, default_id)


def _allowed(b: Builder, h: Hostdev, path: str) -> bool:
    """The checks libvirt makes on a hostdev whatever its host side."""
    if h.mode != "subsystem":
        b.error(f"{path}/@mode", "mode='capabilities' hands host resources to containers; "
                "a QEMU guest takes mode='subsystem' devices")
        return False
    if h.type in ("storage", "misc", "net"):
        b.error(f"{path}/@type", f"type '{h.type}' exists only with mode='capabilities' (containers)")
        return False
    if not _fits_type(b, h, path):
        return False
    if h.boot is not None and h.type not in ("pci", "usb", "scsi"):
        why = ("vhost SCSI devices" if h.type == "scsi_host" else "mediated devices")
        b.error(f"{path}/boot", f"booting from assigned devices is not supported by {why} "
                "(only PCI, USB and SCSI host devices can boot)")
        return False
    if h.rom is not None and h.type != "pci":
        b.error(f"{path}/rom", "ROM tuning is only supported for PCI host devices")
        return False
    if h.teaming is not None and h.type != "pci":
        b.error(f"{path}/teaming", "only a PCI host device can be the transient member of a failover pair")
        return False
    return True


def _fits_type(b: Builder, h: Hostdev, path: str) -> bool:
    """Attributes and children that belong to other hostdev types (libvirt's schema allows them
    only there): refused rather than dropped."""
    owners = {"@model": (h.model, ("mdev", "scsi_host")), "@display": (h.display, ("mdev",)),
              "@ramfb": (h.ramfb, ("mdev",)), "@sgio": (h.sgio, ("scsi",)), "@rawio": (h.rawio, ("scsi",)),
              "readonly": (h.readonly, ("scsi",)), "shareable": (h.shareable, ("scsi",))}
    ok = True
    for name, (value, types) in owners.items():
        if value is not None and h.type not in types:
            b.error(f"{path}/{name}", f"{name.lstrip('@')} belongs to hostdev type {' or '.join(types)}, "
                    f"not '{h.type}'")
            ok = False
    return ok


# ---- PCI --------------------------------------------------------------------------------------

def pci_host_address(a: SourceAddress | None) -> str | None:
    """DDDD:BB:SS.F, or None when the address is incomplete or out of range."""
    if a is None or a.bus is None or a.slot is None or a.function is None:
        return None
    dom = a.domain or 0
    if dom > 0xFFFF or a.bus > 0xFF or a.slot > 0x1F or a.function > 7:
        return None
    return f"{dom:04x}:{a.bus:02x}:{a.slot:02x}.{a.function:x}"


def _pci(b: Builder, it: _Item, default_id: str) -> None:
    el = it.element
    path = it.path
    host = pci_host_address(it.source_address)
    if host is None:
        b.error(f"{path}/source/address", "a host PCI device needs <address domain='0x0000' bus='0x..' "
                "slot='0x..' function='0x.'> (bus 0-255, slot 0-31, function 0-7)")
        return
    driver = getattr(el, "driver", None)
    dname = driver.name if driver is not None else None
    if dname in ("kvm", "xen"):
        b.error(f"{path}/driver/@name", f"'{dname}' device assignment does not exist in QEMU 7.2; "
                "use <driver name='vfio'/> (or leave it out)")
        return
    if it.iface is not None:
        _iface_checks(b, it)
    rom = el.rom  # type: ignore[attr-defined]
    if rom is not None and rom.enabled is False and (rom.bar is not None or rom.file):
        b.error(f"{path}/rom", "ROM tuning (bar, file) is not possible when the ROM is disabled (enabled='no')")
        return
    if not b.has_device("vfio-pci", path, "a host PCI device"):
        return
    _pci_host_check(b, path, host, getattr(el, "managed", None))
    dev_id = b.alias(it.alias, default_id, path)
    if it.address is not None and it.address.type == "unassigned":
        return  # libvirt keeps it away from the host but does not give it to the guest
    props: dict[str, Any] = {"driver": "vfio-pci", "host": host, "id": dev_id}
    bi = b.bootindex.get(id(el))
    if bi is not None:
        props["bootindex"] = bi
    team = it.teaming
    if team is not None:
        if team.type != "transient" or not team.persistent:
            b.error(f"{path}/teaming", "a host device is the transient member of a failover pair: "
                    "<teaming type='transient' persistent='ALIAS-OF-THE-VIRTIO-NIC'/>")
            return
        if not _persistent_nic(b, team.persistent):
            b.error(f"{path}/teaming/@persistent", f"no virtio <interface> with <alias name='{team.persistent}'/> "
                    "and <teaming type='persistent'/> exists to pair this device with")
            return
        props["failover_pair_id"] = team.persistent
    props.update(b.pci_props(it.address, path, "host PCI device"))
    if rom is not None:
        if rom.enabled is False:
            props["romfile"] = ""
        else:
            if rom.bar is not None:
                props["rombar"] = 1 if rom.bar else 0
            if rom.file:
                props["romfile"] = rom.file
    acpi = getattr(el, "acpi", None)
    if acpi is not None:
        props["acpi-index"] = acpi.index
    b.device(props)


def _persistent_nic(b: Builder, alias: str) -> bool:
    for n in b.domain.devices.interface:
        t = getattr(n, "teaming", None)
        if n.alias is not None and n.alias.name == alias and t is not None and t.type == "persistent":
            return True
    return False


def _vlan_tag(b: Builder, it: _Item) -> str | None:
    """The VF's one VLAN tag (<vlan><tag id='42'/></vlan>); an SR-IOV VF cannot trunk."""
    vlan = it.iface.vlan if it.iface is not None else None
    if vlan is None:
        return None
    extra = vlan.model_extra or {}
    tags = extra.get("tag") or []
    tags = tags if isinstance(tags, list) else [tags]
    if len(tags) != 1 or str(extra.get("@trunk", "no")) == "yes" or not isinstance(tags[0], dict) \
            or not (str(tags[0].get("@id", "")).isascii() and str(tags[0].get("@id", "")).isdigit()):
        b.error(f"{it.path}/vlan", "an SR-IOV VF takes exactly one VLAN <tag id='N'/>; VLAN trunking is "
                "not supported by SR-IOV network devices")
        return None
    return str(tags[0]["@id"])


def _iface_checks(b: Builder, it: _Item) -> None:
    """What an <interface type='hostdev'> has beyond a PCI hostdev: it must be an SR-IOV VF, and
    its MAC (and VLAN tag) are set on the VF through its physical function -- by the admin, as
    qemud changes no host network settings."""
    iface = it.iface
    assert iface is not None
    if iface.driver is not None and iface.driver.queues:
        b.warn(f"{it.path}/driver/@queues", "a hostdev NIC's queues are the VF's own; the setting has no effect")
    vlan = _vlan_tag(b, it)
    host = pci_host_address(it.source_address)
    dev = b.caps.host.pci_devices.get(host or "")
    if dev is not None and dev.pf is None:
        b.error(f"{it.path}/source/address", f"host PCI device {host} is not an SR-IOV virtual function; "
                "<interface type='hostdev'> assigns VFs (give a whole NIC with <hostdev type='pci'>)")
        return
    settings = (f" mac {iface.mac.address}" if iface.mac is not None else "") + (f" vlan {vlan}" if vlan else "")
    if not settings:
        return
    what = "MAC address and VLAN" if iface.mac is not None and vlan else "MAC address" if iface.mac else "VLAN"
    where = "/mac" if iface.mac is not None else "/vlan"
    if dev is not None and dev.pf_netdev is not None and dev.vf_index is not None:
        cmd = f"ip link set dev {dev.pf_netdev} vf {dev.vf_index}{settings}"
    else:
        cmd = f"ip link set dev PF vf N{settings}, on the VF's physical function"
    b.warn(f"{it.path}{where}", f"qemud does not program the VF's {what}; set it before start: {cmd}")


def _pci_host_check(b: Builder, path: str, host: str, managed: bool | None) -> None:
    facts = b.caps.host
    if not facts.has("/dev/vfio/vfio"):
        b.error(path, f"host PCI device {host} is assigned through VFIO, and this host has no "
                f"/dev/vfio/vfio ({VFIO_HINT})")
        return
    dev = facts.pci_devices.get(host)
    if dev is None:
        b.error(f"{path}/source/address", f"host PCI device {host} does not exist on this host "
                f"(no /sys/bus/pci/devices/{host}; lspci -D lists the host's devices)")
        return
    if dev.iommu_group is None:
        b.error(f"{path}/source/address", f"host PCI device {host} is in no IOMMU group, so VFIO cannot "
                f"assign it ({VFIO_HINT})")
        return
    if dev.driver != "vfio-pci":
        bound = f"bound to {dev.driver}" if dev.driver else "bound to no driver"
        why = " (managed='yes' is not acted on: qemud never rebinds host drivers)" if managed else ""
        b.error(f"{path}/source/address", f"host PCI device {host} is {bound}, not vfio-pci{why}; bind it "
                f"first: driverctl set-override {host} vfio-pci")


# ---- USB --------------------------------------------------------------------------------------

def _usb_bus(b: Builder, addr: Address | None, path: str) -> str | None:
    """The USB bus a device sits on: <address type='usb' bus='N'> names controller N."""
    if addr is None:
        if b.usb_bus is None:
            b.error(path, "a USB host device needs a USB controller")
        return b.usb_bus
    if addr.type != "usb":
        b.error(f"{path}/address/@type", f"a USB host device sits on USB; address type '{addr.type}' cannot place it")
        return None
    from qemud.argv.controllers import controller_id
    index = addr.bus or 0
    for c in b.domain.devices.controller:
        if c.type == "usb" and c.index == index and c.master is None and c.model != "none":
            return f"{controller_id(c)}.0"
    if index == 0 and b.usb_bus is not None:
        return b.usb_bus  # the USB controller libvirt adds when the file has none
    b.error(f"{path}/address/@bus", f"there is no USB controller with index {index}")
    return None


def _usb(b: Builder, it: _Item, default_id: str) -> None:
    h = it.hostdev
    assert h is not None
    path = it.path
    src = h.source
    a = src.address if src is not None else None
    have_addr = a is not None and a.bus is not None and a.device is not None
    have_ids = src is not None and src.vendor is not None and src.product is not None
    if src is None or not (have_addr or have_ids):
        b.error(f"{path}/source", "a USB host device needs <vendor id=...> and <product id=...>, "
                "or <address bus=... device=...>")
        return
    if src.vendor is not None and src.product is None or src.product is not None and src.vendor is None:
        b.error(f"{path}/source", "<vendor> and <product> go together")
        return
    optional = src.startupPolicy == "optional"
    if src.startupPolicy is not None and not have_ids:
        b.error(f"{path}/source/@startupPolicy", "startupPolicy needs the device named by <vendor> and <product>")
        return
    bus = _usb_bus(b, h.address, path)
    if bus is None or not b.has_device("usb-host", path, "a USB host device"):
        return
    found = _usb_host_check(b, it, have_addr, have_ids, optional)
    if found is None:
        return
    hbus, hdev = found
    props: dict[str, Any] = {"driver": "usb-host", "hostdevice": f"/dev/bus/usb/{hbus:03d}/{hdev:03d}",
                             "id": b.alias(h.alias, default_id, path)}
    reset = src.guestReset
    if reset == "off":
        props["guest-reset"] = False
    elif reset == "uninitialized":
        props.update({"guest-reset": True, "guest-resets-all": False})
    elif reset == "on":
        props.update({"guest-reset": True, "guest-resets-all": True})
    bi = b.bootindex.get(id(h))
    if bi is not None:
        props["bootindex"] = bi
    props["bus"] = bus
    if h.address is not None and h.address.port:
        props["port"] = h.address.port
    b.device(props)


def _usb_host_check(b: Builder, it: _Item, have_addr: bool, have_ids: bool,
                    optional: bool) -> tuple[int, int] | None:
    """(bus, device) of the host USB device, or None after reporting why it cannot be had."""
    h = it.hostdev
    assert h is not None and h.source is not None
    src = h.source
    facts = b.caps.host
    want = []
    if have_ids:
        want.append(f"{src.vendor.value:04x}:{src.product.value:04x}")  # type: ignore[union-attr]
    if have_addr:
        want.append(f"at bus {src.address.bus} device {src.address.device}")  # type: ignore[union-attr]
    what = "USB device " + " ".join(want)
    if not facts.has("/sys/bus/usb/devices"):
        reason = (f"{what} is needed, and this host has no USB bus (no /sys/bus/usb/devices: no USB "
                  "controller, or the usbcore module is not loaded)")
        if optional:
            b.warn(it.path, reason + "; startupPolicy='optional': started without it")
        else:
            b.error(it.path, reason)
        return None
    matches = [d for d in facts.usb_devices
               if (not have_ids or (d.vendor, d.product) == (src.vendor.value, src.product.value))  # type: ignore[union-attr]
               and (not have_addr or (d.bus, d.device) == (src.address.bus, src.address.device))]  # type: ignore[union-attr]
    if not matches:
        if optional:
            b.warn(it.path, f"{what} is not plugged into this host; startupPolicy='optional': started without it")
        else:
            b.error(f"{it.path}/source", f"{what} is not plugged into this host (lsusb lists the host's devices)")
        return None
    if len(matches) > 1:
        b.error(f"{it.path}/source", f"{len(matches)} host USB devices are {what}; add <address bus=... device=...> "
                "to say which")
        return None
    return matches[0].bus, matches[0].device


# ---- SCSI -------------------------------------------------------------------------------------

def _scsi_controller(b: Builder, index: int):  # type: ignore[no-untyped-def]
    for c in b.domain.devices.controller:
        if c.type == "scsi" and c.index == index:
            return c
    return None


def scsi_drive_address(h: Hostdev) -> tuple[int, int, int, int] | None:
    a = h.address
    if a is None or a.type != "drive":
        return None
    return a.controller or 0, a.bus or 0, a.target or 0, a.unit or 0


def _auto_scsi_address(b: Builder, used: set[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """libvirt's virDomainHostdevAssignAddress: the first free unit on bus 0, target 0 of the
    SCSI controllers in index order."""
    from qemud.argv.controllers import scsi_model
    for c in sorted((c for c in b.domain.devices.controller if c.type == "scsi"), key=lambda c: c.index):
        units = 16384 if scsi_model(c).startswith("virtio") else 7
        for unit in range(units):
            if (c.index, 0, 0, unit) not in used:
                used.add((c.index, 0, 0, unit))
                return c.index, 0, 0, unit
    return None


def _scsi(b: Builder, it: _Item, default_id: str, n: int, auto: tuple[int, int, int, int] | None) -> None:
    from qemud.argv.controllers import controller_id, scsi_model
    h = it.hostdev
    assert h is not None
    path = it.path
    src = h.source
    if src is None:
        b.error(f"{path}/source", "a SCSI host device needs a <source>: <adapter name='scsi_hostN'/> with "
                "<address bus target unit/>, or protocol='iscsi'")
        return
    if h.address is not None and h.address.type != "drive":
        b.error(f"{path}/address/@type", f"a SCSI host device sits on a SCSI controller; use <address type='drive'>, "
                f"not '{h.address.type}'")
        return
    addr = scsi_drive_address(h) or auto
    if addr is None:
        b.error(path, "no SCSI controller has a free unit for this device; add <controller type='scsi' model='virtio-scsi'/>")
        return
    ctrl_i, bus_i, target_i, unit_i = addr
    c = _scsi_controller(b, ctrl_i)
    if c is None:
        b.error(f"{path}/address/@controller" if h.address is not None else path,
                f"there is no SCSI controller with index {ctrl_i}; add <controller type='scsi' "
                f"index='{ctrl_i}' model='virtio-scsi'/>")
        return
    virtio = scsi_model(c).startswith("virtio")
    if not virtio:
        if bus_i != 0 or target_i != 0:
            b.error(f"{path}/address", f"a {scsi_model(c)} SCSI controller has one bus and target 0 only")
            return
        if unit_i > 7:
            b.error(f"{path}/address/@unit", f"a {scsi_model(c)} SCSI controller has units 0-7")
            return
    ro = h.readonly is not None
    node = f"hostdev{n}-storage"
    if src.protocol == "iscsi":
        blockdev = _iscsi_blockdev(b, it, node, ro)
        if blockdev is None:
            return
    elif src.protocol is not None:
        b.error(f"{path}/source/@protocol", f"protocol '{src.protocol}' is for type='scsi_host'; a type='scsi' "
                "device is an adapter's LUN or protocol='iscsi'")
        return
    else:
        sg = _scsi_host_check(b, it)
        if sg is None:
            return
        blockdev = {"driver": "host_device", "filename": sg, "node-name": node, "read-only": ro}
    if not b.has_device("scsi-generic", path, "a SCSI host device"):
        return
    if h.sgio is not None or h.rawio:
        b.warn(path, "sgio/rawio are host-side settings of the SCSI device that qemud does not change")
    b.add("-blockdev", js(blockdev))
    props: dict[str, Any] = {"driver": "scsi-generic", "drive": node, "id": b.alias(h.alias, default_id, path),
                             "bus": f"{controller_id(c)}.0"}
    if virtio:
        props.update({"channel": bus_i, "scsi-id": target_i, "lun": unit_i})
    else:
        props["scsi-id"] = unit_i
    bi = b.bootindex.get(id(h))
    if bi is not None:
        props["bootindex"] = bi
    b.device(props)


def _iscsi_blockdev(b: Builder, it: _Item, node: str, ro: bool) -> dict[str, Any] | None:
    src = it.hostdev.source  # type: ignore[union-attr]
    path = it.path
    if src.host is None or not src.name:
        b.error(f"{path}/source", "an iSCSI host device needs name='IQN/LUN' and <host name=... port=...>")
        return None
    target, _, lun = src.name.partition("/")
    if lun and not (lun.isascii() and lun.isdigit()):
        b.error(f"{path}/source/@name", f"'{lun}' is not a LUN number (name='IQN/LUN')")
        return None
    if src.auth is not None:
        b.error(f"{path}/source/auth", "iSCSI CHAP authentication needs a libvirt secret, and qemud does not "
                "manage secrets yet")
        return None
    host = network_host(b, src.host.name, f"{path}/source/host/@name")
    if host is None:
        return None
    props: dict[str, Any] = {"driver": "iscsi", "portal": f"{host}:{src.host.port or 3260}",
                             "target": target, "lun": int(lun or 0), "transport": "tcp"}
    if src.initiator is not None:
        props["initiator-name"] = src.initiator.iqn.name
    props.update({"node-name": node, "read-only": ro})
    return props


def _scsi_host_check(b: Builder, it: _Item) -> str | None:
    """The /dev/sgN of an adapter's LUN, or None after reporting why there is none."""
    src = it.hostdev.source  # type: ignore[union-attr]
    path = it.path
    m = _ADAPTER.match(src.adapter.name or "") if src.adapter is not None else None
    if m is None:
        b.error(f"{path}/source/adapter/@name", "a SCSI host device needs <adapter name='scsi_hostN'/> "
                "(the host's SCSI host N)")
        return None
    a = src.address
    if a is None or a.bus is None or a.target is None or a.unit is None:
        b.error(f"{path}/source/address", "a SCSI host device needs <address bus=... target=... unit=...> on its adapter")
        return None
    key = f"{m.group(1)}:{a.bus}:{a.target}:{a.unit}"
    sg = b.caps.host.scsi_generic.get(key)
    if sg is None:
        b.error(f"{path}/source", f"the host has no SCSI device {key} with a SCSI generic node "
                f"(no /sys/bus/scsi/devices/{key}/scsi_generic; load the sg module, lsscsi -g lists them)")
    return sg


def _vhost_scsi(b: Builder, it: _Item, default_id: str) -> None:
    h = it.hostdev
    assert h is not None
    path = it.path
    src = h.source
    if src is None or src.protocol != "vhost" or not src.wwpn:
        b.error(f"{path}/source", "a scsi_host device needs <source protocol='vhost' wwpn='naa.XXXXXXXXXXXXXXXX'/>")
        return
    if not _WWPN.match(src.wwpn):
        b.error(f"{path}/source/@wwpn", f"'{src.wwpn}' is not a WWPN like naa.5123456789abcde0")
        return
    driver = VHOST_SCSI.get(h.model)
    if driver is None:
        b.error(f"{path}/@model", f"model '{h.model}' is not a vhost-scsi model (virtio, virtio-transitional, "
                "virtio-non-transitional)")
        return
    if not b.has_device(driver, path, "a vhost-scsi device"):
        return
    if not b.caps.host.has("/dev/vhost-scsi"):
        b.error(path, "a vhost-scsi device needs /dev/vhost-scsi, which this host lacks (load the vhost_scsi "
                f"module and create the target {src.wwpn} with targetcli)")
    # without vhostfd QEMU opens /dev/vhost-scsi itself
    props: dict[str, Any] = {"driver": driver, "wwpn": src.wwpn, "id": b.alias(h.alias, default_id, path)}
    props.update(b.pci_props(h.address, path, "vhost-scsi device"))
    b.device(props)


# ---- mediated devices -------------------------------------------------------------------------

def _mdev(b: Builder, it: _Item, default_id: str) -> None:
    h = it.hostdev
    assert h is not None
    path = it.path
    if h.model is None:
        b.error(f"{path}/@model", "a mediated device needs model='vfio-pci'")
        return
    if h.model in ("vfio-ccw", "vfio-ap"):
        b.error(f"{path}/@model", f"model '{h.model}' is an s390 mediated device; an x86 guest has no "
                f"{'channel subsystem' if h.model == 'vfio-ccw' else 'AP bus'} (use model='vfio-pci')")
        return
    if h.model != "vfio-pci":
        b.error(f"{path}/@model", f"'{h.model}' is not a mediated device model (vfio-pci)")
        return
    a = h.source.address if h.source is not None else None
    if a is None or not a.uuid:
        b.error(f"{path}/source/address/@uuid", "a mediated device is named by <address uuid='...'/>; the "
                "uuid is missing")
        return
    if h.address is not None and h.address.type not in ("pci",):
        b.error(f"{path}/address/@type", f"address type '{h.address.type}' cannot place a mediated device of "
                "model 'vfio-pci' (it sits on PCI)")
        return
    if h.display and not b.domain.devices.graphics:
        b.error(f"{path}/@display", "display='on' shows the vGPU's output through a <graphics> device, and the "
                "domain has none")
        return
    if h.ramfb and not h.display:
        b.error(f"{path}/@ramfb", "ramfb='on' needs display='on'")
        return
    driver = "vfio-pci-nohotplug" if h.ramfb else "vfio-pci"
    if not b.has_device(driver, path, "a mediated device"):
        return
    facts = b.caps.host
    if not facts.has("/dev/vfio/vfio"):
        b.error(path, f"mediated device {a.uuid} is assigned through VFIO, and this host has no /dev/vfio/vfio "
                f"({VFIO_HINT})")
    elif a.uuid not in facts.mdev_devices:
        b.error(f"{path}/source/address/@uuid", f"mediated device {a.uuid} does not exist on this host (no "
                f"/sys/bus/mdev/devices/{a.uuid}; create it with mdevctl)")
    props: dict[str, Any] = {"driver": driver, "id": b.alias(h.alias, default_id, path),
                             "sysfsdev": f"/sys/bus/mdev/devices/{a.uuid}"}
    if h.display is not None:
        props["display"] = "on" if h.display else "off"
    if h.ramfb:
        props["ramfb"] = True
    props.update(b.pci_props(h.address, path, "mediated device"))
    b.device(props)


# ---- checks across devices --------------------------------------------------------------------

def _source_key(it: _Item) -> tuple[Any, ...] | None:
    """What names the host device, so two elements naming the same one are found."""
    if it.iface is not None or it.kind == "pci":
        host = pci_host_address(it.source_address)
        return ("pci", host) if host else None
    h = it.hostdev
    assert h is not None
    src = h.source
    if src is None:
        return None
    a = src.address
    if h.type == "usb":
        if a is not None and a.bus is not None and a.device is not None:
            return ("usb", a.bus, a.device)
        if src.vendor is not None and src.product is not None:
            return ("usb-id", src.vendor.value, src.product.value)
    elif h.type == "scsi":
        if src.protocol == "iscsi":
            return ("iscsi", src.name, src.host.name if src.host else None)
        if src.adapter is not None and a is not None:
            return ("scsi", src.adapter.name, a.bus, a.target, a.unit)
    elif h.type == "scsi_host":
        return ("vhost", src.wwpn)
    elif h.type == "mdev" and a is not None and a.uuid:
        return ("mdev", a.uuid)
    return None


def _duplicates(b: Builder, items: list[_Item]) -> set[int]:
    """Report every element naming a host device an earlier one names; their ids(_Item)."""
    out: set[int] = set()
    seen: dict[tuple[Any, ...], str] = {}
    for it in items:
        key = _source_key(it)
        if key is None:
            continue
        if key in seen:
            b.error(f"{it.path}/source", f"this host device is already assigned by {seen[key]}; a host "
                    "device can be given to the guest once")
            out.add(id(it))
        else:
            seen[key] = it.path
    return out


def _scsi_addresses(b: Builder, items: list[_Item]) -> dict[int, tuple[int, int, int, int]]:
    """Two SCSI devices at one drive address: hostdev and hostdev, or disk and hostdev (libvirt
    refuses both); returns the units given to hostdevs without an address, by id(hostdev)."""
    from qemud.argv.disks import drive_address
    used: dict[tuple[int, int, int, int], str] = {}
    for i, d in enumerate(b.domain.devices.disk):
        if d.bus == "scsi":
            used.setdefault(drive_address(d, "scsi"), f"disk target '{d.target.dev}' (/domain/devices/disk[{i + 1}])")
    auto: dict[int, tuple[int, int, int, int]] = {}
    scsi = [it for it in items if it.hostdev is not None and it.hostdev.type == "scsi"
            and it.hostdev.mode == "subsystem"]
    for it in scsi:
        addr = scsi_drive_address(it.hostdev)  # type: ignore[arg-type]
        if addr is None:
            continue
        if addr in used:
            c, bus, t, u = addr
            b.error(f"{it.path}/address", f"SCSI address controller='{c}' bus='{bus}' target='{t}' unit='{u}' "
                    f"is already used by {used[addr]}")
        else:
            used[addr] = it.path
    taken = set(used)
    for it in scsi:
        h = it.hostdev
        assert h is not None
        if h.address is None:
            got = _auto_scsi_address(b, taken)
            if got is not None:
                auto[id(h)] = got
    return auto


# ---- interface helpers (called from qemud.argv.net) ------------------------------------------

def vdpa_netdev(b: Builder, iface: Interface, path: str) -> dict[str, Any] | None:
    """``<interface type='vdpa'>``: a vhost-vdpa netdev on the host's /dev/vhost-vdpa-N.  QEMU
    opens the node itself (libvirt passes it as an fd set instead)."""
    dev = iface.source.dev if iface.source is not None else None
    if not dev:
        b.error(f"{path}/source/@dev", "a vDPA interface needs <source dev='/dev/vhost-vdpa-N'/>")
        return None
    model = iface.model.type if iface.model is not None else "virtio"
    if not model.startswith("virtio"):
        b.error(f"{path}/model/@type", f"a vDPA device is a virtio NIC in the guest; model '{model}' cannot use it")
        return None
    if not b.caps.host.has(dev):
        b.error(f"{path}/source/@dev", f"the vDPA device {dev} does not exist on this host (create it with "
                "'vdpa dev add' and load the vhost_vdpa module)")
    return {"type": "vhost-vdpa", "vhostdev": dev}


def nic_teaming(b: Builder, iface: Interface, path: str, driver: str) -> dict[str, Any]:
    """The NIC's side of a failover pair: the persistent member is a virtio NIC with
    failover=on; a transient member that is not a host device has no QEMU property (libvirt
    accepts and ignores it too)."""
    t = iface.teaming
    if t is None:
        return {}
    if t.type == "persistent":
        if not driver.startswith("virtio-net"):
            b.error(f"{path}/model/@type", "the persistent member of a failover pair must be <model type='virtio'/>")
            return {}
        return {"failover": True}
    b.warn(f"{path}/teaming", "teaming type='transient' acts only on a hostdev interface; this one is an "
           "ordinary NIC")
    return {}
