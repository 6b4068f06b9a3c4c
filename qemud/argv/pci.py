"""PCI placement as libvirt 9.0 does it (``qemuDomainAssignPCIAddresses``, ``domain_addr.c``).

Explicit ``<address type='pci'>`` is honoured and checked against the bus it names; every other
PCI device gets the address libvirt would give the same XML, so a hand-written file and its
``virsh dumpxml`` put the guest's devices at the same guest-visible addresses:

* every device and bus says what it plugs into / accepts (libvirt's "connect flags"): on q35
  PCIe devices (virtio without a transitional model, e1000e, xhci, bochs) go behind a
  pcie-root-port each, conventional PCI devices onto a pcie-to-pci-bridge; on i440fx everything
  fills slots 2.. of pci.0, then pci-bridges;
* the two passes of libvirt: a dry run that grows the bus list as devices need it (the
  controllers it adds are then auto-added), and the real assignment over the grown list, in
  libvirt's device order (PCI controllers, filesystems, NICs, sound, other controllers, virtio
  disks, host devices, balloon, RNGs, watchdogs, video, shmem, virtio input, PCI serial, vsock,
  panic);
* the chipset's fixed places: PIIX3 at 00:01.x (IDE .1, first UHCI .2), the primary video card
  at 00:02.0 (pc) / 00:01.0 (q35), ICH9 at 00:1f.x, ICH9 USB2 at 00:1d/00:1a, ICH9 HDA at 00:1b,
  dmi-to-pci-bridge at 00:1e.

Pure: the plan is computed from the domain model alone; :class:`PciPlan` answers the translator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from qemud.domain import Domain
from qemud.domain.devices.address import Address
from qemud.domain.devices.controller import Controller


class F(int):
    """libvirt's VIR_PCI_CONNECT_* flags: what a device plugs into / what a bus accepts.

    Plain ints, not an ``enum.IntFlag``: the planner tests these flags for every slot of every
    bus, and IntFlag's ``&`` and ``|`` (a Python-level call and a new member each) were 40% of the
    translation of a guest with a few hundred devices."""

    PCI_DEVICE = 1 << 0
    PCIE_DEVICE = 1 << 1
    PCIE_ROOT_PORT = 1 << 2
    SWITCH_UP = 1 << 3
    SWITCH_DOWN = 1 << 4
    DMI_TO_PCI = 1 << 5
    PCIE_TO_PCI = 1 << 6
    PXB = 1 << 7
    PXB_PCIE = 1 << 8
    PCI_BRIDGE = 1 << 9
    HOTPLUG = 1 << 16
    AUTO = 1 << 17
    AGGREGATE = 1 << 18
    INTEGRATED = 1 << 19


TYPES = F(0x3FF)
ENDPOINT = F.PCI_DEVICE | F.PCIE_DEVICE
PCI_FLAGS = F.PCI_DEVICE | F.AUTO

#: what each PCI controller model plugs into
CONTROLLER_CONNECT = {
    "pci-bridge": F.PCI_BRIDGE, "pci-expander-bus": F.PXB, "pcie-expander-bus": F.PXB_PCIE,
    "dmi-to-pci-bridge": F.DMI_TO_PCI, "pcie-to-pci-bridge": F.PCIE_TO_PCI,
    "pcie-root-port": F.PCIE_ROOT_PORT | F.AGGREGATE, "pcie-switch-upstream-port": F.SWITCH_UP,
    "pcie-switch-downstream-port": F.SWITCH_DOWN,
}
USB2 = ("ich9-ehci1", "ich9-uhci1", "ich9-uhci2", "ich9-uhci3")
USB2_FUNCTION = {"ich9-ehci1": 7, "ich9-uhci1": 0, "ich9-uhci2": 1, "ich9-uhci3": 2}


class PlanError(Exception):
    """An address cannot be had; ``path`` is the XML element, the message says why."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


@dataclass
class Bus:
    model: str
    flags: F
    min_slot: int
    max_slot: int
    functions: list[int] = field(default_factory=lambda: [0] * 32)
    aggregate: list[bool] = field(default_factory=lambda: [False] * 32)

    @classmethod
    def of(cls, model: str, hotplug: bool = True) -> "Bus":
        """libvirt's virDomainPCIAddressBusSetModel: what can be plugged *into* this bus."""
        hp = F.HOTPLUG if hotplug else F(0)
        if model == "pci-root":
            return cls(model, F.AUTO | F.PCI_DEVICE | F.PCI_BRIDGE | F.PXB | hp, 1, 31)
        if model == "pci-bridge" or model == "pcie-to-pci-bridge":
            return cls(model, F.AUTO | F.PCI_DEVICE | F.PCI_BRIDGE | hp, 1, 31)
        if model == "pci-expander-bus":
            return cls(model, F.AUTO | F.PCI_DEVICE | F.PCI_BRIDGE | hp, 0, 31)
        if model == "pcie-root":
            return cls(model, F.PCIE_DEVICE | F.PCIE_ROOT_PORT | F.DMI_TO_PCI | F.PXB_PCIE, 1, 31)
        if model == "dmi-to-pci-bridge":
            return cls(model, F.PCI_DEVICE | F.PCI_BRIDGE, 0, 31)
        if model in ("pcie-root-port", "pcie-switch-downstream-port"):
            return cls(model, F.AUTO | F.PCIE_DEVICE | F.SWITCH_UP | F.PCIE_TO_PCI | hp, 0, 0)
        if model == "pcie-switch-upstream-port":
            return cls(model, F.SWITCH_DOWN, 0, 31)
        if model == "pcie-expander-bus":
            return cls(model, F.PCIE_ROOT_PORT | F.DMI_TO_PCI, 0, 31)
        raise ValueError(model)

    def empty(self) -> bool:
        return not any(self.functions[self.min_slot:self.max_slot + 1])

    def full(self) -> bool:
        return all(self.functions[self.min_slot:self.max_slot + 1])


def _connect_name(flags: F) -> str:
    for f, name in ((F.PCI_DEVICE, "standard PCI device"), (F.PCIE_DEVICE, "PCI Express device"),
                    (F.PCIE_ROOT_PORT, "pcie-root-port"), (F.SWITCH_UP, "pcie-switch-upstream-port"),
                    (F.SWITCH_DOWN, "pcie-switch-downstream-port"), (F.DMI_TO_PCI, "dmi-to-pci-bridge"),
                    (F.PCIE_TO_PCI, "pcie-to-pci-bridge"), (F.PXB, "pci-expander-bus"),
                    (F.PXB_PCIE, "pcie-expander-bus"), (F.PCI_BRIDGE, "pci-bridge")):
        if flags & f:
            return name
    return "PCI device"


def fmt(bus: int, slot: int, fn: int) -> str:
    return f"{bus:02x}:{slot:02x}.{fn}"


class AddressSet:
    """libvirt's virDomainPCIAddressSet: buses, the functions in use, growth in the dry run."""

    def __init__(self, buses: list[Bus], dry_run: bool, pcie_to_pci: bool) -> None:
        self.buses = buses
        self.dry_run = dry_run
        self.pcie_to_pci = pcie_to_pci

    # -- checks -----------------------------------------------------------------------------
    def compatible(self, bus: int, bus_flags: F, dev: F, from_config: bool) -> str | None:
        if dev & F.INTEGRATED:
            if bus != 0:
                return "needs to be an integrated device (bus 0)"
            bus_flags |= F.PCI_DEVICE | F.AUTO
        if from_config:
            if bus_flags & ENDPOINT:
                bus_flags |= ENDPOINT
            if dev & F.PCI_BRIDGE:
                dev |= F.PCI_DEVICE
        elif dev & F.AUTO and not bus_flags & F.AUTO:
            return f"the PCI controller with index {bus} does not take automatically placed devices"
        if dev & F.HOTPLUG and not bus_flags & F.HOTPLUG:
            return f"the PCI controller with index {bus} does not support hotplug"
        if not dev & bus_flags & TYPES:
            return (f"cannot be plugged into the PCI controller with index {bus} "
                    f"({self.buses[bus].model}); it needs a controller that accepts a {_connect_name(dev)}")
        return None

    def validate(self, b: int, s: int, f: int, flags: F, from_config: bool) -> str | None:
        where = fmt(b, s, f)
        if b >= len(self.buses):
            return (f"PCI address {where} names bus {b}, but there is no PCI controller with index {b} "
                    f"(buses 0-{len(self.buses) - 1} exist)")
        bus = self.buses[b]
        why = self.compatible(b, bus.flags, flags, from_config)
        if why:
            return f"the device at PCI address {where} {why}"
        if s < bus.min_slot or s > bus.max_slot:
            return (f"PCI address {where} is out of range: the {bus.model} at index {b} has slots "
                    f"{bus.min_slot}-{bus.max_slot}")
        if f > 7:
            return f"PCI address {where} is out of range (function 0-7)"
        return None

    # -- growth (dry run) ---------------------------------------------------------------------
    def grow(self, addr: list[int], flags: F) -> None:
        """libvirt's virDomainPCIAddressSetGrow: add buses up to ``addr[0]`` for a device of
        ``flags`` (may bump ``addr[0]`` when a PCIe-only guest first needs conventional PCI)."""
        add = addr[0] - len(self.buses) + 1
        if add <= 0:
            return
        need_dmi = need_pcie_bridge = False
        if flags & F.PCI_DEVICE:
            model = "pci-bridge"
            if not any(bus.flags & F.PCI_BRIDGE for bus in self.buses):
                need_dmi = not self.pcie_to_pci
                need_pcie_bridge = self.pcie_to_pci
            if (need_dmi or need_pcie_bridge) and add == 1:
                add += 1
                addr[0] += 1
        elif flags & (F.PCIE_DEVICE | F.SWITCH_UP):
            model = "pcie-root-port"
        else:
            raise PlanError("", f"a PCI slot is needed for a {_connect_name(flags)}, but none is free, "
                                "and no controller for it can be added automatically; add one")
        new: list[Bus] = []
        if need_dmi:
            new.append(Bus.of("dmi-to-pci-bridge", False))
        if need_pcie_bridge:
            port = Bus.of("pcie-root-port")
            port.flags = F.PCIE_TO_PCI  # only the bridge may take it (libvirt's trick, see there)
            new += [port, Bus.of("pcie-to-pci-bridge")]
        while len(new) < add:
            new.append(Bus.of(model))
        self.buses += new

    # -- reservations -----------------------------------------------------------------------
    def in_use(self, b: int, s: int) -> bool:
        return bool(self.buses[b].functions[s])

    def reserve(self, b: int, s: int, f: int, flags: F, from_config: bool = True) -> None:
        addr = [b]
        if self.dry_run:
            self.grow(addr, flags)
        b = addr[0]
        msg = self.validate(b, s, f, flags, from_config)
        if msg:
            raise PlanError("", msg)
        bus = self.buses[b]
        if bus.functions[s] & (1 << f):
            raise PlanError("", f"PCI address {fmt(b, s, f)} is used twice")
        if not bus.functions[s] and flags & F.AGGREGATE:
            bus.aggregate[s] = True
        bus.functions[s] |= 1 << f

    def next_addr(self, flags: F, function: int = -1) -> tuple[int, int, int]:
        fn0 = 0 if function == -1 else function
        for b, bus in enumerate(self.buses):
            if self.compatible(b, bus.flags, flags, False):
                continue
            for s in range(bus.min_slot, bus.max_slot + 1):
                if not bus.functions[s]:
                    return b, s, fn0
                if flags & F.AGGREGATE and bus.aggregate[s]:
                    if not bus.functions[s] & (1 << fn0):
                        return b, s, fn0
                    if function == -1:
                        for f in range(8):
                            if not bus.functions[s] & (1 << f):
                                return b, s, f
        if self.dry_run:
            addr = [len(self.buses)]
            self.grow(addr, flags)
            return addr[0], self.buses[addr[0]].min_slot, fn0
        raise PlanError("", "no free PCI slot is left for it (add a pci-bridge or pcie-root-port controller)")

    def reserve_next(self, flags: F, function: int = -1) -> tuple[int, int, int]:
        b, s, f = self.next_addr(flags, function)
        self.reserve(b, s, f, flags, from_config=False)
        return b, s, f


# ---- the devices -------------------------------------------------------------------------------

@dataclass
class Item:
    """One PCI device of the domain: where its answer is looked up (``key``: the XML path the
    translator passes), what it plugs into, its explicit address, and (for controllers) which."""

    key: str
    flags: F
    address: Address | None
    ctrl: Controller | None = None
    family: str = ""
    model: str = ""


def explicit(a: Address | None) -> tuple[int, int, int] | None:
    """The address a device asks for, or None where it leaves it to libvirt (absent, slot not
    given, or all zero: libvirt's "empty" address)."""
    if a is None or a.type != "pci":
        return None
    t = (a.bus or 0, a.slot or 0, a.function or 0)
    if t == (0, 0, 0) and not a.domain:
        return None  # libvirt's "empty" address: <address type='pci'/> means "place it for me"
    return t


def _out_of_range(a: Address | None) -> str | None:
    """libvirt's parse-time limits of a PCI address (domain 0, bus <= 0xff, slot <= 0x1f, function <= 7)."""
    if a is None:
        return None
    if a.domain:
        return f"PCI domain {a.domain:#x} does not exist (only domain 0)"
    for name, value, top in (("bus", a.bus, 0xFF), ("slot", a.slot, 0x1F), ("function", a.function, 7)):
        if value is not None and value > top:
            return f"PCI address {name}='{value:#x}' is out of range (at most {top:#x})"
    return None


def default_usb_model(q35: bool) -> str:
    return "qemu-xhci" if q35 else "piix3-uhci"


def _insert(ctrls: list[tuple[str, Controller]], keys: list[tuple[str, int]], new: tuple[str, Controller]) -> None:
    """libvirt's virDomainControllerInsertPreAlloced: controllers of one type stay sorted by index.
    ``keys`` holds each controller's (type, index) beside ``ctrls`` (read as plain tuples: a guest
    with hundreds of controllers inserts each through this scan)."""
    t, index = new[1].type, new[1].index
    at = -1
    for i in range(len(keys) - 1, -1, -1):
        ct, ci = keys[i]
        if ct == t:
            if ci > index:
                at = i
            elif ci < index and at == -1:
                at = i + 1
    if at == -1:
        ctrls.append(new)
        keys.append((t, index))
    else:
        ctrls.insert(at, new)
        keys.insert(at, (t, index))


def controllers(domain: Domain, q35: bool) -> list[tuple[str, Controller]]:
    """The domain's controllers in libvirt's order, with the implicit ones libvirt adds (root
    bus, the PIIX3 IDE / ICH9 SATA, the default USB controller, virtio-serial for virtio
    channels), each with the key the translator uses for it."""
    out: list[tuple[str, Controller]] = []
    keys: list[tuple[str, int]] = []
    for i, c in enumerate(domain.devices.controller):
        _insert(out, keys, (f"/domain/devices/controller[{i + 1}]", c))

    def have(t: str, index: int | None = None) -> bool:
        return any(c.type == t and (index is None or c.index == index) for _, c in out)

    def implicit(key: str, t: str, index: int = 0, model: str | None = None) -> None:
        data: dict[str, str] = {"@type": t, "@index": str(index)}
        if model:
            data["@model"] = model
        # (libvirt's virDomainDefAddController appends what it adds, unlike the parser's sorted insert)
        out.append((key, Controller.model_validate(data)))

    if not have("usb"):
        implicit("implicit:usb", "usb", 0, default_usb_model(q35))
    if not have("pci", 0):
        implicit("implicit:pci-root", "pci", 0, "pcie-root" if q35 else "pci-root")
    if q35 and not have("sata", 0):
        implicit("implicit:sata", "sata", 0)
    if not q35 and not have("ide", 0):
        implicit("implicit:ide", "ide", 0)
    # SCSI controllers for SCSI disks that name none (virDomainDefAddImplicitControllers: before
    # virtio-serial)
    from qemud.argv.disks import implicit_scsi_controllers
    for sc in implicit_scsi_controllers(domain):
        out.append((f"implicit:scsi{sc.index}", sc))
    # the ones the virtio channels and consoles name, and those libvirt adds when all are full
    from qemud.argv.chardev import virtio_serial_plan
    for idx in virtio_serial_plan(domain).implicit:
        if not have("virtio-serial", idx):
            implicit("/domain/devices" if idx == 0 else f"implicit:virtio-serial{idx}", "virtio-serial", idx)
    return out


def _virtio(model: str | None, virtio: F) -> F:
    return PCI_FLAGS if model == "virtio-transitional" else virtio


def controller_flags(c: Controller, q35: bool, pcie: F, virtio: F) -> F:
    if c.type == "pci":
        return CONTROLLER_CONNECT.get(c.model or "", F(0))
    if c.type in ("sata", "ide"):
        return PCI_FLAGS
    if c.type == "usb":
        model = c.model or default_usb_model(q35)
        if model == "none" or model.startswith("qusb"):
            return F(0)
        return pcie if model in ("nec-xhci", "qemu-xhci") else PCI_FLAGS
    if c.type == "scsi":
        model = c.model or "lsilogic"
        if model == "ncr53c90":
            return F(0)
        return virtio if model in ("virtio-scsi", "virtio-non-transitional") else PCI_FLAGS
    if c.type == "virtio-serial":
        return _virtio(c.model, virtio)
    return F(0)


def _nic_flags(iface: Any, pcie: F, virtio: F) -> F:
    if iface.type == "hostdev":
        return F(0)
    model = iface.model.type if iface.model is not None else "rtl8139"
    if model == "usb-net":
        return F(0)
    if model in ("virtio", "virtio-non-transitional"):
        return virtio
    if model in ("e1000e", "igb"):
        return pcie
    return PCI_FLAGS


def _video_model(v: Any) -> str:
    return v.model.type if v.model is not None else "vga"


def _video_flags(v: Any, pcie: F, virtio: F) -> F:
    model = _video_model(v)
    if model == "virtio":
        return virtio
    if model == "bochs":
        return pcie
    if model in ("none", "ramfb", "gop"):
        return F(0)
    return PCI_FLAGS


def _disk_index(dev: str) -> int:
    """libvirt's virDiskNameToIndex: vda -> 0, vdz -> 25, vdaa -> 26."""
    name = dev.rstrip("0123456789")
    for prefix in ("fd", "hd", "vd", "sd", "xvd", "ubd"):
        if name.startswith(prefix):
            letters = name[len(prefix):]
            break
    else:
        return 1 << 30
    n = 0
    for ch in letters:
        if not "a" <= ch <= "z":
            return 1 << 30
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def _iter_family(domain: Domain, fam: str) -> Iterator[tuple[str, Any]]:
    for i, item in enumerate(getattr(domain.devices, fam, ()) or ()):
        yield f"/domain/devices/{fam}[{i + 1}]", item


@dataclass
class Devices:
    """Every PCI device in the order libvirt assigns addresses to them."""

    ctrls: list[tuple[str, Controller]]
    order: list[Item]
    video0: Item | None
    sounds: list[Item]


def collect(domain: Domain, q35: bool, ctrls: list[tuple[str, Controller]]) -> Devices:
    pcie = (F.PCIE_DEVICE if q35 else F.PCI_DEVICE) | F.AUTO
    virtio = pcie  # QEMU >= 4.0 has the non-transitional virtio devices
    dev = domain.devices
    order: list[Item] = []
    for key, c in ctrls:
        if c.type == "pci" and c.index > 0:
            order.append(Item(key, controller_flags(c, q35, pcie, virtio), c.address, c, "controller", c.model or ""))
    for key, fs in _iter_family(domain, "filesystem"):
        drv = getattr(getattr(fs, "driver", None), "type", None)
        if drv in ("loop", "nbd", "ploop"):
            continue
        order.append(Item(key, _virtio(getattr(fs, "model", None), virtio), fs.address, family="filesystem"))
    for key, n in _iter_family(domain, "interface"):
        flags = _nic_flags(n, pcie, virtio)
        if flags:
            order.append(Item(key, flags, n.address, family="interface"))
    sounds: list[Item] = []
    for key, s in _iter_family(domain, "sound"):
        if s.model in ("sb16", "pcspk", "usb"):
            continue
        it = Item(key, PCI_FLAGS, s.address, family="sound", model=s.model)
        sounds.append(it)
        order.append(it)
    for key, c in ctrls:
        if c.type in ("pci", "fdc", "ccid", "isa", "xenbus"):
            continue
        if c.type == "ide" and c.index == 0:
            continue
        flags = controller_flags(c, q35, pcie, virtio)
        if c.type == "usb" and (c.model or default_usb_model(q35)) == "none":
            continue
        if c.type == "scsi" and c.model == "ncr53c90":
            continue
        order.append(Item(key, flags, c.address, c, "controller", c.model or ""))
    # libvirt keeps the disks of one bus sorted by target name (virDomainDiskInsert)
    disks = [(key, d) for key, d in _iter_family(domain, "disk") if d.bus == "virtio"]
    for key, d in sorted(disks, key=lambda kd: _disk_index(kd[1].target.dev)):
        order.append(Item(key, _virtio(d.model, virtio), d.address, family="disk"))
    # libvirt puts an <interface type='hostdev'>'s device in its host device list when it reads
    # the interface, so before every <hostdev>
    for key, n in _iter_family(domain, "interface"):
        if n.type == "hostdev":
            order.append(Item(key, pcie, n.address, family="hostdev"))
    for key, h in _iter_family(domain, "hostdev"):
        if getattr(h, "mode", "subsystem") == "subsystem" and getattr(h, "type", None) in ("pci", "mdev", "scsi_host"):
            order.append(Item(key, pcie, getattr(h, "address", None), family="hostdev"))
    mb = dev.memballoon
    if mb is None or mb.model not in ("none", "xen"):
        order.append(Item("/domain/devices/memballoon", _virtio(mb.model if mb else None, virtio),
                          mb.address if mb else None, family="memballoon"))
    for key, r in _iter_family(domain, "rng"):
        order.append(Item(key, _virtio(r.model, virtio), r.address, family="rng"))
    for key, w in _iter_family(domain, "watchdog"):
        if w.model == "i6300esb":
            order.append(Item(key, PCI_FLAGS, w.address, family="watchdog"))
    videos = list(_iter_family(domain, "video"))
    # libvirt's parser moves the video with primary='yes' to the front; qemud's video code makes
    # the first one in the file the primary (VGA) card, and the placement follows that card
    if not videos and dev.graphics:
        from qemud.domain.devices.misc import Video
        videos = [("/domain/devices/video[1]", Video.model_validate({"model": {"@type": "vga"}}))]
    video0: Item | None = None
    for n, (key, v) in enumerate(videos):
        flags = _video_flags(v, pcie, virtio)
        if not flags:
            continue
        it = Item(key, flags, v.address, family="video", model=_video_model(v))
        if n == 0:
            video0 = it
        order.append(it)
    for key, s in _iter_family(domain, "shmem"):
        order.append(Item(key, PCI_FLAGS, getattr(s, "address", None), family="shmem"))
    for key, inp in _iter_family(domain, "input"):
        if inp.bus == "virtio":
            order.append(Item(key, _virtio(inp.model, virtio), inp.address, family="input"))
    for key, s in _iter_family(domain, "serial"):
        tgt = s.target
        ttype = tgt.type if tgt is not None and tgt.type else "isa-serial"
        model = tgt.model.name if tgt is not None and tgt.model is not None else None
        if ttype == "pci-serial" or model == "pci-serial":
            order.append(Item(key, PCI_FLAGS, s.address, family="serial"))
    vsock = getattr(dev, "vsock", None)
    if vsock is not None:
        order.append(Item("/domain/devices/vsock", _virtio(getattr(vsock, "model", None), virtio),
                          getattr(vsock, "address", None), family="vsock"))
    for key, p in _iter_family(domain, "panic"):
        if p.model == "pvpanic":
            order.append(Item(key, PCI_FLAGS | F.INTEGRATED, p.address, family="panic"))
    return Devices(ctrls, order, video0, sounds)


# ---- the plan ------------------------------------------------------------------------------------

@dataclass
class Placed:
    bus: int
    slot: int
    function: int
    multi: bool | None = None  # explicit multifunction, or None


@dataclass
class PciPlan:
    """The outcome: each device's address by key, the PCI controllers by index (model, key or
    None when auto-added), and problems found."""

    q35: bool
    placed: dict[str, Placed] = field(default_factory=dict)
    ctrls: list[tuple[str, Controller]] = field(default_factory=list)  # libvirt's order, auto-added too
    buses: dict[int, str] = field(default_factory=dict)  # index -> model
    auto_added: list[int] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    used: set[tuple[int, int, int]] = field(default_factory=set)
    multi: set[tuple[int, int]] = field(default_factory=set)

    def root_id(self) -> str:
        return "pcie.0" if self.q35 else "pci.0"

    def bus_id(self, index: int) -> str:
        return self.root_id() if index == 0 else f"pci.{index}"

    def props(self, key: str) -> dict[str, Any] | None:
        p = self.placed.get(key)
        if p is None:
            return None
        out: dict[str, Any] = {"bus": self.bus_id(p.bus)}
        multi = p.multi if p.multi is not None else (p.function == 0 and (p.bus, p.slot) in self.multi)
        if multi:
            out["multifunction"] = True
        out["addr"] = f"0x{p.slot:x}" if p.function == 0 else f"0x{p.slot:x}.0x{p.function:x}"
        return out

    def fallback(self, key: str) -> dict[str, Any] | str:
        """A device the plan does not know: the first wholly free slot, root bus first."""
        for index in sorted(self.buses):
            model = self.buses[index]
            bus = Bus.of(model)
            for slot in range(bus.min_slot, bus.max_slot + 1):
                if all((index, slot, f) not in self.used for f in range(8)):
                    self.used.add((index, slot, 0))
                    self.placed[key] = Placed(index, slot, 0)
                    return self.props(key) or {}
        return "no free PCI slot is left (add a pci-bridge or pcie-root-port controller)"


def _bus_model(c: Controller, q35: bool) -> str:
    return c.model or (("pcie-root" if q35 else "pci-root") if c.index == 0 else "")


class _Run:
    """One pass of libvirt's assignment over a list of controllers."""

    def __init__(self, devs: Devices, q35: bool, nbuses: int, dry_run: bool, pcie_to_pci: bool) -> None:
        self.devs = devs
        self.q35 = q35
        buses: list[Bus | None] = [None] * nbuses
        for _, c in devs.ctrls:
            if c.type == "pci" and c.index < nbuses:
                model = _bus_model(c, q35)
                hotplug = not (c.target is not None and c.target.hotplug is False)
                try:
                    buses[c.index] = Bus.of(model, hotplug)
                except ValueError:
                    buses[c.index] = Bus.of("pcie-root-port" if q35 else "pci-bridge")
        if buses and buses[0] is None:
            buses[0] = Bus.of("pci-root")
        default = "pcie-root-port" if q35 else "pci-bridge"
        self.set = AddressSet([bus or Bus.of(default) for bus in buses], dry_run, pcie_to_pci)
        self.placed: dict[str, Placed] = {}
        self.problems: list[tuple[str, str]] = []

    def _try(self, key: str, fn: Any) -> Any:
        try:
            return fn()
        except PlanError as e:
            self.problems.append((key, e.message))
            return None

    def _take(self, it: Item, function: int = -1) -> None:
        got = self._try(it.key, lambda: self.set.reserve_next(it.flags, function))
        if got is not None and not self.set.dry_run:
            self.placed[it.key] = Placed(*got)

    def collect_explicit(self) -> None:
        keys = {it.key for it in self.devs.order}
        for it in self.devs.order + [i for i in self._chipset_items() if i.key not in keys]:
            a = explicit(it.address)
            if a is None:
                continue
            c = it.ctrl
            if c is not None and a[0] == 0 and a[1] == 1 and not self.q35 and (
                    (c.type == "ide" and c.index == 0 and a[2] == 1)
                    or (c.type == "usb" and c.index == 0 and (c.model or "piix3-uhci") == "piix3-uhci" and a[2] == 2)):
                continue  # the PIIX3's own functions: reserved by the chipset step
            flags = it.flags or F.PCI_DEVICE
            bad = _out_of_range(it.address)
            if bad:
                self.problems.append((it.key + "/address", bad))
                continue
            self._try(it.key + "/address", lambda: self.set.reserve(a[0], a[1], a[2], flags))
            self.placed[it.key] = Placed(*a, multi=it.address.multifunction if it.address else None)

    def _chipset_items(self) -> list[Item]:
        return [Item(k, PCI_FLAGS, c.address, c, "controller", c.model or "")
                for k, c in self.devs.ctrls if c.type in ("ide", "sata") and c.index == 0]

    def _fixed(self, it: Item, where: tuple[int, int, int], flags: F) -> None:
        a = explicit(it.address)
        if a is not None:
            if a != where:
                self.problems.append((it.key + "/address", f"this controller is built into the machine at PCI "
                                      f"address {fmt(*where)}; it cannot be moved to {fmt(*a)}"))
                return
        self.placed[it.key] = Placed(*where)

    def chipset(self) -> None:
        s = self.set
        if not self.q35:
            for key, c in self.devs.ctrls:
                it = Item(key, PCI_FLAGS, c.address, c)
                if c.type == "ide" and c.index == 0:
                    where = (0, 1, 1)
                elif c.type == "usb" and c.index == 0 and (c.model or "piix3-uhci") == "piix3-uhci":
                    where = (0, 1, 2)
                else:
                    continue
                self._fixed(it, where, PCI_FLAGS)
                if explicit(c.address) in (None, where):
                    self._try(key, lambda: s.reserve(*where, PCI_FLAGS))
            self._try("/domain/devices", lambda: s.reserve(0, 1, 0, PCI_FLAGS))
            self._try("/domain/devices", lambda: s.reserve(0, 1, 3, PCI_FLAGS))
            self._primary_video(2, PCI_FLAGS)
            return
        for key, c in self.devs.ctrls:
            if c.type == "sata" and c.index == 0:
                self._fixed(Item(key, PCI_FLAGS, c.address, c), (0, 0x1F, 2), F.PCIE_DEVICE)
            elif c.type == "usb" and c.model == "ich9-uhci1" and c.address is None:
                for slot in (0x1D, 0x1A):
                    if not s.in_use(0, slot):
                        self._try(key, lambda: s.reserve(0, slot, 0, F.PCIE_DEVICE))
                        self.placed[key] = Placed(0, slot, 0, multi=True)
                        break
            elif c.type == "pci" and c.model == "dmi-to-pci-bridge" and c.address is None:
                if not s.in_use(0, 0x1E):
                    self._try(key, lambda: s.reserve(0, 0x1E, 0, F.PCIE_DEVICE))
                    self.placed[key] = Placed(0, 0x1E, 0)
        self._try("/domain/devices", lambda: s.reserve(0, 0x1F, 0, F.PCIE_DEVICE))
        self._try("/domain/devices", lambda: s.reserve(0, 0x1F, 3, F.PCIE_DEVICE))
        self._primary_video(1, F.PCIE_DEVICE)
        if not s.in_use(0, 0x1B):
            for it in self.devs.sounds:
                if it.model == "ich9" and explicit(it.address) is None:
                    self._try(it.key, lambda: s.reserve(0, 0x1B, 0, F.PCIE_DEVICE))
                    self.placed[it.key] = Placed(0, 0x1B, 0)
                    break

    def _primary_video(self, slot: int, flags: F) -> None:
        v = self.devs.video0
        if v is None or explicit(v.address) is not None:
            return
        if self.set.in_use(0, slot):
            self._take(v)
        else:
            self._try(v.key, lambda: self.set.reserve(0, slot, 0, flags))
            self.placed[v.key] = Placed(0, slot, 0)

    def assign(self) -> None:
        usb2: dict[int, tuple[int, int]] = {}
        for it in self.devs.order:
            if it.key in self.placed or explicit(it.address) is not None:
                c = it.ctrl
                if c is not None and c.type == "usb" and c.model in USB2 and it.key in self.placed:
                    p = self.placed[it.key]
                    usb2.setdefault(c.index, (p.bus, p.slot))
        for it in self.devs.order:
            if it.key in self.placed or explicit(it.address) is not None:
                continue
            if it.address is not None and it.address.type not in ("pci",):
                continue  # placed elsewhere (the translator says whether that can be)
            if not it.flags:
                continue
            c = it.ctrl
            if c is not None and c.type == "usb" and c.model in USB2:
                fn = USB2_FUNCTION[c.model or ""]
                multi = True if fn == 0 else None
                if c.index in usb2:
                    b, s = usb2[c.index]
                    self._try(it.key, lambda: self.set.reserve(b, s, fn, it.flags))
                    self.placed[it.key] = Placed(b, s, fn, multi)
                else:
                    got = self._try(it.key, lambda: self.set.reserve_next(it.flags, fn))
                    if got is not None and not self.set.dry_run:
                        # (libvirt's dry run does not record it: companions look for a slot each)
                        usb2[c.index] = (got[0], got[1])
                        self.placed[it.key] = Placed(*got, multi=multi)
                continue
            self._take(it)


def plan(domain: Domain, q35: bool, pcie_to_pci: bool = True) -> PciPlan:
    """libvirt's qemuDomainAssignPCIAddresses for this domain."""
    ctrls = controllers(domain, q35)
    max_idx = max((c.index for _, c in ctrls if c.type == "pci"), default=0)
    out = PciPlan(q35)
    # pass 1: the dry run finds the buses the devices need
    devs = collect(domain, q35, ctrls)
    run = _Run(devs, q35, max_idx + 1, True, pcie_to_pci)
    run.collect_explicit()
    if run.problems:  # a bad explicit address: say that, not what follows from it
        out.problems = _dedupe(run.problems)
        return out
    run.chipset()
    if not q35 and not all(bus.full() for bus in run.set.buses):
        run._try("/domain/devices", lambda: run.set.reserve_next(PCI_FLAGS))  # room for a bridge
    run.assign()
    s = run.set
    if max_idx <= 0 and len(s.buses) > max_idx + 1 and q35:
        run._try("/domain/devices", lambda: s.reserve_next(F.PCIE_DEVICE | F.AUTO))  # a port for hotplug
    have = {c.index for _, c in ctrls if c.type == "pci"}
    i = 1
    while i < len(s.buses):
        if i not in have:
            model = s.buses[i].model
            c = Controller.model_validate({"@type": "pci", "@index": str(i), "@model": model})
            ctrls.append((f"implicit:pci.{i}", c))
            out.auto_added.append(i)
            run._try(f"implicit:pci.{i}", lambda: s.reserve_next(CONTROLLER_CONNECT[model]))
        i += 1
    if len(s.buses) > 256:
        run.problems.append(("/domain/devices", f"placing every PCI device would take {len(s.buses)} PCI buses; "
                             "a guest has at most 256"))
    if run.problems:
        out.problems = _dedupe(run.problems)
        return out
    # pass 2: the real assignment over the grown list
    devs = collect(domain, q35, ctrls)
    run = _Run(devs, q35, len(s.buses), False, pcie_to_pci)
    run.collect_explicit()
    run.chipset()
    run.assign()
    out.problems = _dedupe(run.problems)
    out.placed = run.placed
    out.ctrls = ctrls
    out.buses = {i: bus.model for i, bus in enumerate(run.set.buses)}
    for p in out.placed.values():
        out.used.add((p.bus, p.slot, p.function))
        if p.function:
            out.multi.add((p.bus, p.slot))
    for key, p in out.placed.items():
        if p.function == 0 and p.multi is False and (p.bus, p.slot) in out.multi:
            out.problems.append((key + "/address", f"multifunction='off' at PCI address {fmt(p.bus, p.slot, 0)}, "
                                 "but other functions of that slot are in use; QEMU cannot populate them"))
    for b, bus in enumerate(run.set.buses):
        for slot, fns in enumerate(bus.functions):
            for f in range(8):
                if fns & (1 << f):
                    out.used.add((b, slot, f))
    return out


def _dedupe(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def controller_defaults(pl: PciPlan, ctrls: list[tuple[str, Controller]]) -> dict[int, dict[str, Any]]:
    """libvirt's defaults for each PCI controller: chassisNr, chassis, port, busNr."""
    out: dict[int, dict[str, Any]] = {}
    lowest = 256
    for _, c in ctrls:
        if c.type == "pci" and c.target is not None and c.target.busNr is not None:
            lowest = min(lowest, c.target.busNr)
    for key, c in ctrls:
        if c.type != "pci" or c.index == 0:
            continue
        p = pl.placed.get(key)
        t = c.target
        model = c.model or ""
        d: dict[str, Any] = {}
        if model == "pci-bridge":
            d["chassis_nr"] = t.chassisNr if t is not None and t.chassisNr is not None else c.index
        elif model in ("pcie-root-port", "pcie-switch-downstream-port"):
            if t is not None and t.port is not None:
                d["port"] = t.port
            elif p is not None:
                d["port"] = (p.slot << 3) + p.function if model == "pcie-root-port" else p.slot
            d["chassis"] = t.chassis if t is not None and t.chassis is not None else c.index
        elif model in ("pci-expander-bus", "pcie-expander-bus"):
            if t is not None and t.busNr is not None:
                d["bus_nr"] = t.busNr
            else:
                d["bus_nr"] = lowest - 2 if lowest > 2 else None
                if lowest > 2:
                    lowest -= 2
        out[c.index] = d
    return out
