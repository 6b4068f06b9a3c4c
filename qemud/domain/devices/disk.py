"""``<disk>``: hard disks, CD-ROMs and floppies."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import field_validator

from qemud.domain.base import Element, Many, Opaque, UInt, YesNo, attr, ignored
from qemud.domain.seclabel import Seclabel, check_labels
from qemud.domain.devices.address import Address, Alias, Boot
from qemud.domain.devices.virtio import VirtioOptions

DISK_BUSES = ("ide", "sata", "scsi", "virtio", "usb", "fdc")


class DiskDriver(VirtioOptions):
    name: Literal["qemu"] | None = attr()
    type: Literal["raw", "qcow2", "qed", "vmdk", "vpc", "vdi", "vhdx", "luks", "dmg", "bochs",
                  "cloop", "parallels", "qcow", "cow", "fat", "iso"] | None = attr()
    cache: Literal["default", "none", "writethrough", "writeback", "directsync", "unsafe"] | None = attr()
    discard: Literal["unmap", "ignore"] | None = attr()
    io: Literal["threads", "native", "io_uring"] | None = attr()
    detect_zeroes: Literal["off", "on", "unmap"] | None = attr()
    error_policy: Literal["stop", "report", "ignore", "enospace"] | None = attr()
    rerror_policy: Literal["stop", "report", "ignore"] | None = attr()
    copy_on_read: YesNo | None = attr()
    iothread: UInt | None = attr()
    queues: UInt | None = attr()
    queue_size: UInt | None = attr()
    ioeventfd: YesNo | None = attr()
    event_idx: YesNo | None = attr()


class Host(Element):
    name: str | None = attr()
    port: UInt | None = attr()
    transport: Literal["tcp", "unix", "rdma"] | None = attr()
    socket: str | None = attr()


class DiskSource(Element):
    file: str | None = attr()
    dev: str | None = attr()
    dir: str | None = attr()
    protocol: Literal["nbd", "iscsi", "http", "https", "ftp", "ftps", "tftp", "rbd", "sheepdog",
                      "gluster", "ssh", "vxhs", "nfs"] | None = attr()
    name: str | None = attr()
    startupPolicy: Literal["mandatory", "requisite", "optional"] | None = attr()
    index: UInt | None = attr()
    host: Many[Host]
    seclabel: Many[Seclabel] = ignored("qemud applies no security labels of its own; qemud's own isolation applies (README: security)")

    _seclabels = field_validator("seclabel")(classmethod(lambda cls, v: check_labels(v)))


class DiskTarget(Element):
    dev: str = attr(...)
    bus: Literal[DISK_BUSES] | None = attr()  # type: ignore[valid-type]
    tray: Literal["open", "closed"] | None = attr()
    removable: YesNo | None = attr()
    rotation_rate: UInt | None = attr()

    @field_validator("dev")
    @classmethod
    def _dev(cls, v: str) -> str:
        if not re.fullmatch(r"(hd|sd|vd|fd|xvd|ubd)[a-z]+", v):
            raise ValueError(f"'{v}' is not a disk target name like vda, sdb, hdc or fda")
        return v


class BlockIo(Element):
    logical_block_size: UInt | None = attr()
    physical_block_size: UInt | None = attr()
    discard_granularity: UInt | None = attr()


class Geometry(Element):
    cyls: UInt = attr(...)
    heads: UInt = attr(...)
    secs: UInt = attr(...)
    trans: Literal["none", "lba", "auto"] | None = attr()


class Disk(Element):
    type: Literal["file", "block", "network", "dir", "volume", "nvme", "vhostuser"] = attr("file")
    device: Literal["disk", "cdrom", "floppy", "lun"] = attr("disk")
    snapshot: Literal["no", "internal", "external", "manual"] | None = attr()
    model: Literal["virtio", "virtio-transitional", "virtio-non-transitional"] | None = attr()
    rawio: YesNo | None = attr()
    sgio: Literal["filtered", "unfiltered"] | None = attr()
    driver: DiskDriver | None = None
    source: DiskSource | None = None
    target: DiskTarget
    readonly: Element | None = None
    shareable: Element | None = None
    serial: str | None = None
    wwn: str | None = None
    vendor: str | None = None
    product: str | None = None
    boot: Boot | None = None
    address: Address | None = None
    alias: Alias | None = None
    blockio: BlockIo | None = None
    geometry: Geometry | None = None
    backingStore: Opaque | None = ignored("backing chains are read from the image itself")
    mirror: Opaque | None = ignored("block jobs are not carried across to qemud")

    @property
    def bus(self) -> str:
        """The target bus, with libvirt's default from the target name."""
        if self.target.bus:
            return self.target.bus
        dev = self.target.dev
        if dev.startswith("hd"):
            return "ide"
        if dev.startswith("sd"):
            return "scsi"
        if dev.startswith("vd"):
            return "virtio"
        if dev.startswith("fd"):
            return "fdc"
        return "ide"

    @property
    def path(self) -> str | None:
        """The host file or block device, for local disks."""
        if self.source is None:
            return None
        return self.source.file if self.type == "file" else self.source.dev if self.type == "block" else None

    @property
    def is_readonly(self) -> bool:
        return self.readonly is not None or self.device == "cdrom"


def target_index(dev: str) -> int:
    """``vda`` -> 0, ``sdz`` -> 25, ``sdaa`` -> 26 (libvirt's virDiskNameToIndex)."""
    m = re.fullmatch(r"(?:hd|sd|vd|fd|xvd|ubd)([a-z]+)", dev)
    if not m:
        return 0
    idx = 0
    for ch in m.group(1):
        idx = idx * 26 + (ord(ch) - ord("a") + 1)
    return idx - 1
