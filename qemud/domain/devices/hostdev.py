"""``<hostdev>``: host devices handed to the guest (PCI and mediated devices through VFIO, USB
devices, SCSI LUNs and vhost-scsi targets), and the parts of them ``<interface type='hostdev'>``
shares.

Only ``mode='subsystem'`` exists for QEMU; ``mode='capabilities'`` is for containers.
"""

import re
from typing import Literal

from pydantic import field_validator, model_validator

from qemud.domain.base import Element, Opaque, UInt, YesNo, attr, ignored
from qemud.domain.devices.address import Address, Alias, Boot

_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z")
_USB_ID = re.compile(r"(0[xX])?[0-9a-fA-F]{1,4}\Z")


class SourceAddress(Element):
    """The host side of a device: a PCI address (domain/bus/slot/function), a USB one
    (bus/device), a SCSI one on an adapter (bus/target/unit) or a mediated device (uuid).
    Numbers are read as libvirt reads them (base 0): bus='222' is 0xde, bus='0x06' is 6."""

    type: Literal["pci", "usb", "scsi", "mdev"] | None = attr()
    domain: UInt | None = attr()
    bus: UInt | None = attr()
    slot: UInt | None = attr()
    function: UInt | None = attr()
    device: UInt | None = attr()
    target: UInt | None = attr()
    unit: UInt | None = attr()
    uuid: str | None = attr()

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        if v is not None and not _UUID.match(v):
            raise ValueError(f"'{v}' is not a UUID")
        return v.lower() if v is not None else v


class UsbId(Element):
    id: str = attr(...)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _USB_ID.match(v):
            raise ValueError(f"'{v}' is not a 16-bit USB id like 0x1234")
        return v

    @property
    def value(self) -> int:
        return int(self.id, 16)


class Adapter(Element):
    name: str | None = attr()
    type: Literal["scsi_host", "fc_host"] | None = attr()


class SourceHost(Element):
    name: str = attr(...)
    port: UInt | None = attr()
    transport: Literal["tcp"] | None = attr()


class Secret(Element):
    type: str | None = attr()
    usage: str | None = attr()
    uuid: str | None = attr()


class Auth(Element):
    username: str = attr(...)
    secret: Secret | None = None


class Iqn(Element):
    name: str = attr(...)


class Initiator(Element):
    iqn: Iqn


class HostdevSource(Element):
    # usb
    startupPolicy: Literal["mandatory", "requisite", "optional"] | None = attr()
    guestReset: Literal["off", "uninitialized", "on"] | None = attr()
    vendor: UsbId | None = None
    product: UsbId | None = None
    # pci, usb, scsi (adapter), mdev
    address: SourceAddress | None = None
    # scsi
    adapter: Adapter | None = None
    protocol: Literal["iscsi", "vhost"] | None = attr()
    name: str | None = attr()
    host: SourceHost | None = None
    auth: Auth | None = None
    initiator: Initiator | None = None
    # scsi_host (vhost)
    wwpn: str | None = attr()
    # pci: libvirt's writeFiltering is Xen only
    writeFiltering: YesNo | None = attr()


class HostdevDriver(Element):
    name: Literal["vfio", "kvm", "xen"] | None = attr()


class Rom(Element):
    bar: YesNo | None = attr()
    file: str | None = attr()
    enabled: YesNo | None = attr()


class Teaming(Element):
    """A failover pair: the persistent virtio NIC, and the transient host device (a VF) that
    names it by alias."""

    type: Literal["persistent", "transient"] = attr(...)
    persistent: str | None = attr()

    @model_validator(mode="after")
    def _pairing(self) -> "Teaming":
        if self.type == "transient" and not self.persistent:
            raise ValueError("teaming type='transient' needs persistent='ALIAS' (the persistent NIC's alias)")
        if self.type == "persistent" and self.persistent:
            raise ValueError("the persistent attribute belongs on the transient member (teaming type='transient')")
        return self


class Acpi(Element):
    index: UInt = attr(...)


class Hostdev(Element):
    mode: Literal["subsystem", "capabilities"] = attr("subsystem")
    type: Literal["pci", "usb", "scsi", "scsi_host", "mdev", "storage", "misc", "net"] = attr(...)
    managed: YesNo | None = attr()
    model: Literal["vfio-pci", "vfio-ccw", "vfio-ap", "virtio", "virtio-transitional",
                   "virtio-non-transitional"] | None = attr()
    display: YesNo | None = attr()
    ramfb: YesNo | None = attr()
    sgio: Literal["filtered", "unfiltered"] | None = attr()
    rawio: YesNo | None = attr()
    source: HostdevSource | None = None
    driver: HostdevDriver | None = None
    boot: Boot | None = None
    rom: Rom | None = None
    address: Address | None = None
    alias: Alias | None = None
    readonly: Opaque | None = None
    shareable: Opaque | None = None
    teaming: Teaming | None = None
    acpi: Acpi | None = None
    origstates: Opaque | None = ignored("libvirt's record of the device's original host state")
