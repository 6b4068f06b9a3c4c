"""``<address>``: where a device sits on its bus, and ``<alias>``."""

from typing import Literal

from qemud.domain.base import Element, UInt, YesNo, attr


class Address(Element):
    type: Literal["pci", "drive", "usb", "virtio-serial", "ccid", "isa", "dimm", "unassigned",
                  "spapr-vio", "ccw", "virtio-mmio"] = attr(...)
    # pci
    domain: UInt | None = attr()
    bus: UInt | None = attr()
    slot: UInt | None = attr()
    function: UInt | None = attr()
    multifunction: YesNo | None = attr()
    # drive
    controller: UInt | None = attr()
    target: UInt | None = attr()
    unit: UInt | None = attr()
    # usb
    port: str | None = attr()
    # virtio-serial uses controller/bus/port
    # isa
    iobase: UInt | None = attr()
    irq: UInt | None = attr()
    # dimm (slot as for pci)
    base: UInt | None = attr()


class Alias(Element):
    name: str = attr(...)


class Boot(Element):
    order: UInt = attr(...)
    loadparm: str | None = attr()
