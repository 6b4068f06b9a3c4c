"""``<disk>``: hard disks, CD-ROMs and floppies."""

import re
from typing import Literal

from pydantic import field_validator

from qemud.domain.base import Element, Many, Opaque, UInt, YesNo, attr, ignored, text
from qemud.domain.units import Unit, unit_bytes
from qemud.domain.seclabel import Seclabel, check_labels
from qemud.domain.devices.address import Address, Alias, Boot
from qemud.domain.devices.virtio import VirtioOptions

DISK_BUSES = ("ide", "sata", "scsi", "virtio", "usb", "fdc")


class MaxSize(Element):
    """A size in bytes unless ``unit`` says otherwise (libvirt's default for max_size)."""

    unit: Unit = attr("bytes")
    value: UInt = text(...)

    @property
    def bytes(self) -> int:
        return self.value * (unit_bytes(self.unit) or 1)


class MetadataCache(Element):
    """``<driver><metadata_cache><max_size unit=..>``: qcow2's metadata cache size."""

    max_size: MaxSize | None = None


class DiskDriver(VirtioOptions):
    name: Literal["qemu"] | None = attr()
    type: Literal["raw", "qcow2", "qed", "vmdk", "vpc", "vdi", "vhdx", "luks", "dmg", "bochs",
                  "cloop", "parallels", "qcow", "cow", "fat", "iso", "dir"] | None = attr()
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
    metadata_cache: MetadataCache | None = None


class Host(Element):
    name: str | None = attr()
    port: UInt | None = attr()
    transport: Literal["tcp", "unix", "rdma"] | None = attr()
    socket: str | None = attr()


class SecretRef(Element):
    """``<secret type='passphrase|iscsi|ceph|...' uuid=... | usage=...>``: a secret named by UUID
    or usage; qemud reads its value from a file of its secrets directory (qemud.secrets)."""

    type: str | None = attr()
    uuid: str | None = attr()
    usage: str | None = attr()


class Encryption(Element):
    format: Literal["default", "qcow", "luks", "luks2", "luks-any"] | None = attr()
    engine: Literal["default", "qemu", "librbd"] | None = attr()
    secret: Many[SecretRef]
    cipher: Opaque | None = None  # storage volumes' (refused on a disk, as by libvirt)
    ivgen: Opaque | None = None


class Auth(Element):
    username: str | None = attr()
    secret: SecretRef


class Slice(Element):
    type: Literal["storage"] = attr(...)
    offset: UInt = attr(...)
    size: UInt = attr(...)


class Slices(Element):
    slice: Many[Slice]


class Seconds(Element):
    seconds: UInt = attr(...)


class SizeAttr(Element):
    size: UInt = attr(...)


class Ssl(Element):
    verify: YesNo = attr(...)


class Cookie(Element):
    name: str = attr(...)
    value: str = text("")


class Cookies(Element):
    cookie: Many[Cookie]


class NamedAttr(Element):
    name: str = attr(...)


class Identity(Element):
    user: str | None = attr()
    group: str | None = attr()


class Reconnect(Element):
    delay: UInt = attr(...)


class Iqn(Element):
    name: str = attr(...)


class Initiator(Element):
    iqn: Iqn | None = None


class ReservationsSource(Element):
    type: Literal["unix"] = attr("unix")
    path: str | None = attr()
    mode: Literal["client", "server"] | None = attr()


class Reservations(Element):
    managed: YesNo | None = attr()
    enabled: YesNo | None = attr()
    source: ReservationsSource | None = None


class DiskSource(Element):
    file: str | None = attr()
    dev: str | None = attr()
    dir: str | None = attr()
    protocol: Literal["nbd", "iscsi", "http", "https", "ftp", "ftps", "tftp", "rbd", "sheepdog",
                      "gluster", "ssh", "vxhs", "nfs"] | None = attr()
    name: str | None = attr()
    query: str | None = attr()
    tls: YesNo | None = attr()
    tlsHostname: str | None = attr()
    pool: str | None = attr()
    volume: str | None = attr()
    mode: str | None = attr()
    fdgroup: str | None = attr()
    type: str | None = attr()  # vhostuser / nvme sources
    managed: YesNo | None = attr()  # nvme
    namespace: UInt | None = attr()  # nvme
    path: str | None = attr()  # vhostuser
    address: Opaque | None = None  # nvme: the host controller's PCI address
    startupPolicy: Literal["mandatory", "requisite", "optional"] | None = attr()
    index: UInt | None = attr()
    host: Many[Host]
    auth: Auth | None = None
    encryption: Encryption | None = None
    slices: Slices | None = None
    timeout: Seconds | None = None
    readahead: SizeAttr | None = None
    ssl: Ssl | None = None
    cookies: Cookies | None = None
    snapshot: NamedAttr | None = None
    config: Opaque | None = None
    identity: Identity | None = None
    reconnect: Reconnect | None = None
    initiator: Initiator | None = None
    reservations: Reservations | None = None
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


class IoTune(Element):
    """``<iotune>``: QEMU's throttling limits for one disk (or its group)."""

    total_bytes_sec: UInt | None = None
    read_bytes_sec: UInt | None = None
    write_bytes_sec: UInt | None = None
    total_iops_sec: UInt | None = None
    read_iops_sec: UInt | None = None
    write_iops_sec: UInt | None = None
    total_bytes_sec_max: UInt | None = None
    read_bytes_sec_max: UInt | None = None
    write_bytes_sec_max: UInt | None = None
    total_iops_sec_max: UInt | None = None
    read_iops_sec_max: UInt | None = None
    write_iops_sec_max: UInt | None = None
    total_bytes_sec_max_length: UInt | None = None
    read_bytes_sec_max_length: UInt | None = None
    write_bytes_sec_max_length: UInt | None = None
    total_iops_sec_max_length: UInt | None = None
    read_iops_sec_max_length: UInt | None = None
    write_iops_sec_max_length: UInt | None = None
    size_iops_sec: UInt | None = None
    group_name: str | None = None


class AcpiIndex(Element):
    index: UInt = attr(...)


class Transient(Element):
    shareBacking: YesNo | None = attr()


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
    iotune: IoTune | None = None
    encryption: Encryption | None = None
    auth: Auth | None = None
    acpi: AcpiIndex | None = None
    transient: Transient | None = None
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
