"""``<disk>``: a -blockdev pair (protocol + format node) and a -device on its bus."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.controllers import controller_id, scsi_model
from qemud.domain.devices.controller import Controller
from qemud.domain.devices.disk import Disk, target_index

#: libvirt cache modes -> (cache.direct, cache.no-flush, write-cache on the device)
CACHE = {
    "default": None, "none": (True, False, True), "writethrough": (False, False, False),
    "writeback": (False, False, True), "directsync": (True, False, False), "unsafe": (False, True, True),
}
#: formats QEMU 7.2 has block drivers for
FORMATS = {"raw", "qcow2", "qed", "vmdk", "vpc", "vdi", "vhdx", "luks", "dmg", "bochs", "cloop",
           "parallels", "qcow"}
NETWORK_DRIVERS = {"nbd": "nbd", "iscsi": "iscsi", "http": "http", "https": "https", "ftp": "ftp",
                   "ftps": "ftps", "rbd": "rbd", "gluster": "gluster", "ssh": "ssh", "nfs": "nfs"}


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def network_host(b: Builder, name: str, path: str) -> str | None:
    """A <host name=...> as it goes into a portal ("host:port") or a URL: an IPv6 address in
    brackets, a host name or IPv4 address as it is; anything else is refused (libiscsi reads
    ',' as a portal group tag and the last ':' as the port, a URL reads '/', '@', '?')."""
    try:
        if ipaddress.ip_address(name).version == 6:
            return f"[{name}]"
        return name
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(name):
        b.error(path, f"{name!r} is not a host name or an IP address")
        return None
    return name


def _ctrl(b: Builder, kind: str, index: int) -> Controller | None:
    for c in b.domain.devices.controller:
        if c.type == kind and c.index == index:
            return c
    return None


def drive_address(d: Disk, bus: str) -> tuple[int, int, int, int]:
    """(controller, bus, target, unit): the explicit <address type='drive'>, or libvirt's
    assignment from the target name (virDomainDiskDefAssignAddress)."""
    a = d.address
    if a is not None and a.type == "drive":
        return a.controller or 0, a.bus or 0, a.target or 0, a.unit or 0
    idx = target_index(d.target.dev)
    if bus == "ide":
        return idx // 4, (idx % 4) // 2, 0, idx % 2
    if bus == "sata":
        return idx // 6, 0, 0, idx % 6
    if bus == "scsi":
        return idx // 7, 0, 0, idx % 7
    if bus == "fdc":
        return 0, 0, 0, idx % 2
    return 0, 0, 0, idx


def _storage(b: Builder, d: Disk, path: str, node: str) -> dict[str, Any] | None:
    """The protocol node, or None for an empty drive."""
    src = d.source
    props: dict[str, Any] = {"node-name": node}
    if d.type in ("file", "block"):
        p = d.path
        if not p:
            if d.device in ("cdrom", "floppy"):
                return None
            b.error(f"{path}/source", f"a {d.type} disk needs a <source {'file' if d.type == 'file' else 'dev'}='...'>")
            return {}
        if d.type == "file":
            props.update(driver="file", filename=p)
        else:
            props.update(driver="host_cdrom" if d.device == "cdrom" else "host_device", filename=p)
    elif d.type == "network":
        proto = src.protocol if src is not None else None
        if proto is None:
            b.error(f"{path}/source/@protocol", "a network disk needs a protocol")
            return {}
        drv = NETWORK_DRIVERS.get(proto)
        if drv is None:
            b.error(f"{path}/source/@protocol", f"network protocol '{proto}' is not available in QEMU 7.2")
            return {}
        hosts = src.host if src else ()
        name = src.name or "" if src else ""
        if proto == "nbd":
            h = hosts[0] if hosts else None
            if h is not None and h.transport == "unix":
                if not h.socket:
                    b.error(f"{path}/source/host/@socket", "an NBD disk over a unix socket needs its path")
                    return {}
                server: dict[str, Any] = {"type": "unix", "path": h.socket}
            elif h is not None:
                server = {"type": "inet", "host": h.name or "localhost", "port": str(h.port or 10809)}
            else:
                b.error(f"{path}/source/host", "an NBD disk needs a <host>")
                return {}
            props.update(driver="nbd", server=server)
            if name:
                props["export"] = name
        elif proto in ("http", "https", "ftp", "ftps"):
            h = hosts[0] if hosts else None
            if h is None or not h.name:
                b.error(f"{path}/source/host", f"an {proto} disk needs a <host name=...>")
                return {}
            port = f":{h.port}" if h.port else ""
            from urllib.parse import quote
            host = network_host(b, h.name, f"{path}/source/host/@name")
            if host is None:
                return {}
            props.update(driver=proto, url=f"{proto}://{host}{port}/{quote(name.lstrip('/'), safe='/')}")
        elif proto == "iscsi":
            h = hosts[0] if hosts else None
            if h is None or not h.name:
                b.error(f"{path}/source/host", "an iSCSI disk needs a <host name=...>")
                return {}
            target, _, lun = name.partition("/")
            if lun and not (lun.isascii() and lun.isdigit()):
                b.error(f"{path}/source/@name", f"'{lun}' is not a LUN number (name='IQN/LUN')")
                return {}
            host = network_host(b, h.name, f"{path}/source/host/@name")
            if host is None:
                return {}
            props.update(driver="iscsi", transport="tcp", portal=f"{host}:{h.port or 3260}",
                         target=target, lun=int(lun or 0))
        else:
            b.error(f"{path}/source/@protocol", f"network protocol '{proto}' is not supported by qemud yet")
            return {}
    else:
        b.error(f"{path}/@type", f"disk type '{d.type}' is not supported by qemud; use file, block or network")
        return {}
    drv = d.driver
    if drv is not None:
        if drv.cache and CACHE.get(drv.cache):
            direct, noflush, _ = CACHE[drv.cache]  # type: ignore[misc]
            props["cache"] = {"direct": direct, "no-flush": noflush}
        if drv.io and d.type != "network":
            props["aio"] = drv.io
    props["auto-read-only"] = True
    if d.type != "network":
        props["discard"] = "unmap"
    return props


def add_disks(b: Builder) -> None:
    counts: dict[str, int] = {}
    _floppy_controller(b)
    for i, d in enumerate(b.domain.devices.disk):
        path = f"/domain/devices/disk[{i + 1}]"
        _disk(b, d, i, path, counts)


def _floppy_controller(b: Builder) -> None:
    """Floppies sit on the ISA floppy controller: built into pc, added on q35. Their boot order
    is the controller's (bootindexA/B), the floppy device has none."""
    boot: dict[str, int] = {}
    floppies = [d for d in b.domain.devices.disk if d.device == "floppy"]
    if not floppies:
        return
    for d in floppies:
        bi = b.bootindex.get(id(d))
        if bi is not None:
            boot["bootindexA" if drive_address(d, "fdc")[3] == 0 else "bootindexB"] = bi
    if b.q35:
        b.device({"driver": "isa-fdc", "id": "fdc0", **boot})
    else:
        for k, v in boot.items():
            b.add("-global", f"isa-fdc.{k}={v}")


def _disk(b: Builder, d: Disk, i: int, path: str, counts: dict[str, int]) -> None:
    bus = d.bus
    if d.device == "lun":
        b.error(f"{path}/@device", "SCSI passthrough (device='lun') is not supported by qemud yet")
        return
    if d.device == "floppy" and bus != "fdc":
        b.error(f"{path}/target/@bus", "a floppy sits on the fdc bus")
        return
    if bus == "fdc" and d.device != "floppy":
        b.error(f"{path}/@device", "only a floppy sits on the fdc bus")
        return
    fmt = (d.driver.type if d.driver else None) or "raw"
    if fmt not in FORMATS:
        b.error(f"{path}/driver/@type", f"image format '{fmt}' is not supported by QEMU 7.2")
        return
    if d.driver and d.driver.iothread is not None and bus != "virtio":
        b.error(f"{path}/driver/@iothread", "only virtio disks take an iothread")
    readonly = d.is_readonly
    node = f"drive{i}"
    storage = _storage(b, d, path, f"{node}-file")
    if storage == {}:
        return
    if storage is not None:
        b.add("-blockdev", _js(storage))
        fmt_props: dict[str, Any] = {"node-name": node, "read-only": readonly, "driver": fmt,
                                     "file": f"{node}-file"}
        drv = d.driver
        if drv is not None:
            if drv.discard:
                fmt_props["discard"] = drv.discard
            if drv.detect_zeroes:
                dz = drv.detect_zeroes
                if dz == "unmap" and drv.discard != "unmap":
                    dz = "on"
                fmt_props["detect-zeroes"] = dz
            if drv.cache and CACHE.get(drv.cache):
                direct, noflush, _ = CACHE[drv.cache]  # type: ignore[misc]
                fmt_props["cache"] = {"direct": direct, "no-flush": noflush}
        b.add("-blockdev", _js(fmt_props))
        if d.driver is not None and d.driver.copy_on_read:
            # copy-on-read: a filter node above the format node, which the device then uses
            b.add("-blockdev", _js({"driver": "copy-on-read", "node-name": f"{node}-cor", "file": node}))
    dev: dict[str, Any] = {}
    ctrl_i, bus_i, target_i, unit_i = drive_address(d, bus)
    addr = d.address
    if addr is not None and addr.type == "drive" and bus in ("virtio",):
        b.error(f"{path}/address/@type", "a virtio disk sits on PCI; use <address type='pci'>")
        return
    n = counts.get(bus, 0)
    counts[bus] = n + 1
    if bus == "virtio":
        model = d.model or "virtio"
        driver = {"virtio": "virtio-blk-pci", "virtio-transitional": "virtio-blk-pci-transitional",
                  "virtio-non-transitional": "virtio-blk-pci-non-transitional"}[model]
        if d.device == "cdrom":
            b.error(f"{path}/target/@bus", "a CD-ROM cannot sit on virtio; use sata, scsi or ide")
            return
        dev = {"driver": driver, **b.pci_props(addr, path, "virtio disk")}
        did = b.alias(d.alias, f"virtio-disk{target_index(d.target.dev)}", path)
        if d.driver is not None:
            if d.driver.queues:
                dev["num-queues"] = d.driver.queues
            if d.driver.iothread:
                dev["iothread"] = f"iothread{d.driver.iothread}"
            if d.driver.queue_size:
                dev["queue-size"] = d.driver.queue_size
    elif bus == "ide":
        if b.q35:
            b.error(f"{path}/target/@bus", "a q35 machine has no IDE bus; use bus='sata'")
            return
        if ctrl_i != 0 or bus_i > 1 or unit_i > 1:
            b.error(f"{path}/address" if addr else f"{path}/target/@dev",
                    f"IDE has 2 buses of 2 units on controller 0; {ctrl_i}:{bus_i}:{unit_i} does not exist")
            return
        dev = {"driver": "ide-cd" if d.device == "cdrom" else "ide-hd", "bus": f"ide.{bus_i}", "unit": unit_i}
        did = b.alias(d.alias, f"ide{ctrl_i}-{bus_i}-{unit_i}", path)
    elif bus == "sata":
        if bus_i != 0 or unit_i > 5:
            b.error(f"{path}/address" if addr else f"{path}/target/@dev", "a SATA controller has 6 ports (unit 0-5)")
            return
        if b.q35 and ctrl_i == 0:
            sata_bus = f"ide.{unit_i}"
        else:
            if _ctrl(b, "sata", ctrl_i) is None:
                b.error(path, f"there is no SATA controller with index {ctrl_i}; add <controller type='sata' index='{ctrl_i}'/>")
                return
            sata_bus = f"sata{ctrl_i}.{unit_i}"
        dev = {"driver": "ide-cd" if d.device == "cdrom" else "ide-hd", "bus": sata_bus}
        did = b.alias(d.alias, f"sata{ctrl_i}-0-{unit_i}", path)
    elif bus == "scsi":
        c = _ctrl(b, "scsi", ctrl_i)
        if c is None:
            b.error(path, f"there is no SCSI controller with index {ctrl_i}; add <controller type='scsi' index='{ctrl_i}' model='virtio-scsi'/>")
            return
        virtio = scsi_model(c).startswith("virtio")
        dev = {"driver": "scsi-cd" if d.device == "cdrom" else "scsi-hd", "bus": f"{controller_id(c)}.0"}
        if virtio:
            dev.update({"channel": bus_i, "scsi-id": target_i, "lun": unit_i})
        else:
            if unit_i > 6:
                b.error(f"{path}/address/@unit", "this SCSI controller has units 0-6")
                return
            dev.update({"scsi-id": unit_i, "lun": 0})
        did = b.alias(d.alias, f"scsi{ctrl_i}-{bus_i}-{target_i}-{unit_i}", path)
    elif bus == "usb":
        if b.usb_bus is None:
            b.error(f"{path}/target/@bus", "a USB disk needs a USB controller")
            return
        dev = {"driver": "usb-storage", "bus": b.usb_bus}
        if addr is not None and addr.type == "usb" and addr.port:
            dev["port"] = addr.port
        if d.target.removable is not None:
            dev["removable"] = d.target.removable
        did = b.alias(d.alias, f"usb-disk{target_index(d.target.dev)}", path)
    elif bus == "fdc":
        if unit_i > 1:
            b.error(f"{path}/target/@dev", "the floppy controller has drives A and B (fda, fdb)")
            return
        dev = {"driver": "floppy", "unit": unit_i}
        did = b.alias(d.alias, f"fdc0-0-{unit_i}", path)
    else:
        b.error(f"{path}/target/@bus", f"'{bus}' is not one of ide, sata, scsi, virtio, usb, fdc")
        return
    if storage is not None:
        dev["drive"] = f"{node}-cor" if d.driver is not None and d.driver.copy_on_read else node
    dev["id"] = did
    if d.driver is not None and d.driver.cache and CACHE.get(d.driver.cache) and storage is not None:
        dev["write-cache"] = "on" if CACHE[d.driver.cache][2] else "off"  # type: ignore[index]
    drv = d.driver
    if drv is not None and storage is not None:
        if drv.error_policy:
            dev["werror"] = "enospc" if drv.error_policy == "enospace" else drv.error_policy
            if bus == "usb" or bus == "fdc":
                b.error(f"{path}/driver/@error_policy", f"a {bus} disk has no error policy in QEMU")
                return
        if drv.rerror_policy:
            dev["rerror"] = drv.rerror_policy
        if bus == "virtio":
            if drv.ioeventfd is not None:
                dev["ioeventfd"] = drv.ioeventfd
            if drv.event_idx is not None:
                dev["event_idx"] = drv.event_idx
    bi = b.bootindex.get(id(d))
    if bi is not None and bus != "fdc":
        dev["bootindex"] = bi
    if d.serial:
        dev["serial"] = d.serial
    if d.wwn and bus in ("scsi", "ide", "sata"):
        try:
            dev["wwn"] = int(d.wwn, 16)
        except ValueError:
            b.error(f"{path}/wwn", f"'{d.wwn}' is not a hexadecimal WWN")
    if d.vendor and bus == "scsi":
        dev["vendor"] = d.vendor
    if d.product and bus == "scsi":
        dev["product"] = d.product
    if d.target.rotation_rate is not None and bus in ("scsi", "ide", "sata"):
        dev["rotation_rate"] = d.target.rotation_rate
    if d.blockio is not None:
        if d.blockio.logical_block_size:
            dev["logical_block_size"] = d.blockio.logical_block_size
        if d.blockio.physical_block_size:
            dev["physical_block_size"] = d.blockio.physical_block_size
        if d.blockio.discard_granularity is not None:
            dev["discard_granularity"] = d.blockio.discard_granularity
    if d.geometry is not None and bus in ("ide", "sata", "virtio", "scsi"):
        dev.update({"cyls": d.geometry.cyls, "heads": d.geometry.heads, "secs": d.geometry.secs})
        if d.geometry.trans and bus in ("ide", "sata"):
            dev["bios-chs-trans"] = d.geometry.trans
    if d.shareable is not None and bus == "scsi":
        dev["share-rw"] = True
    elif d.shareable is not None:
        dev["share-rw"] = True
    if d.device == "cdrom" and d.target.tray == "open":
        b.warn(f"{path}/target/@tray", "the tray is closed at start")
    b.device(dev)


def _js(props: dict[str, Any]) -> str:
    from qemud.argv.qemuopts import js
    return js(props)


def add_iothreads(b: Builder) -> None:
    n = b.domain.iothreads or 0
    if n > 1024:
        b.error("/domain/iothreads", "at most 1024 I/O threads")
        return
    for i in range(1, n + 1):
        b.obj({"qom-type": "iothread", "id": f"iothread{i}"})
    for i, d in enumerate(b.domain.devices.disk):
        if d.driver is not None and d.driver.iothread is not None and not 1 <= d.driver.iothread <= n:
            b.error(f"/domain/devices/disk[{i + 1}]/driver/@iothread", f"iothread {d.driver.iothread} does not exist; <iothreads> is {n}")
    for i, c in enumerate(b.domain.devices.controller):
        if c.driver is not None and c.driver.iothread is not None and not 1 <= c.driver.iothread <= n:
            b.error(f"/domain/devices/controller[{i + 1}]/driver/@iothread", f"iothread {c.driver.iothread} does not exist; <iothreads> is {n}")
