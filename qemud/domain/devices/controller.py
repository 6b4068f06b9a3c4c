"""``<controller>``: buses that other devices plug into."""

from typing import Literal

from qemud.domain.base import Element, UInt, YesNo, attr, child, text
from qemud.domain.devices.address import Address, Alias
from qemud.domain.devices.virtio import VirtioOptions
from qemud.domain.units import Size

CONTROLLER_MODELS: dict[str, tuple[str, ...]] = {
    "pci": ("pci-root", "pcie-root", "pci-bridge", "dmi-to-pci-bridge", "pcie-root-port",
            "pcie-switch-upstream-port", "pcie-switch-downstream-port", "pci-expander-bus",
            "pcie-expander-bus", "pcie-to-pci-bridge"),
    "usb": ("piix3-uhci", "piix4-uhci", "ehci", "ich9-ehci1", "ich9-uhci1", "ich9-uhci2",
            "ich9-uhci3", "vt82c686b-uhci", "pci-ohci", "nec-xhci", "qusb1", "qusb2", "qemu-xhci",
            "none"),
    "scsi": ("auto", "buslogic", "lsilogic", "lsisas1068", "vmpvscsi", "ibmvscsi", "virtio-scsi",
             "lsisas1078", "virtio-transitional", "virtio-non-transitional", "ncr53c90", "am53c974",
             "dc390"),
    "virtio-serial": ("virtio", "virtio-transitional", "virtio-non-transitional"),
    "ide": ("piix3", "piix4", "ich6"),
    "sata": (),
    "fdc": (),
    "ccid": (),
    "isa": (),
}


class ControllerModel(Element):
    name: str = attr(...)


class TargetNode(Element):
    """``<target><node>N</node>``: the NUMA node a pci-expander-bus / pcie-expander-bus is on."""

    value: UInt = text(...)


class ControllerTarget(Element):
    chassisNr: UInt | None = attr()
    chassis: UInt | None = attr()
    port: UInt | None = attr()
    busNr: UInt | None = attr()
    index: UInt | None = attr()
    hotplug: YesNo | None = attr()
    memReserve: UInt | None = attr()
    node: TargetNode | None = None


class ControllerDriver(VirtioOptions):
    queues: UInt | None = attr()
    cmd_per_lun: UInt | None = attr()
    max_sectors: UInt | None = attr()
    iothread: UInt | None = attr()
    ioeventfd: YesNo | None = attr()


class Master(Element):
    startport: UInt = attr(...)


class Controller(Element):
    type: Literal["ide", "fdc", "scsi", "sata", "usb", "pci", "virtio-serial", "ccid", "xenbus",
                  "isa"] = attr(...)
    index: UInt = attr(-1)  # -1: not given; Devices assigns the next free one, as libvirt does
    model: str | None = attr()
    ports: UInt | None = attr()
    vectors: UInt | None = attr()
    maxGrantFrames: UInt | None = attr()
    model_element: ControllerModel | None = child("model")
    target: ControllerTarget | None = None
    driver: ControllerDriver | None = None
    master: Master | None = None
    pcihole64: Size | None = None  # the PCI root's 64-bit MMIO window (default unit KiB)
    address: Address | None = None
    alias: Alias | None = None


USB2_MODELS = ("ich9-ehci1", "ich9-uhci1", "ich9-uhci2", "ich9-uhci3")


def assign_indexes(ctrls: tuple[Controller, ...]) -> tuple[Controller, ...]:
    """Controllers without an index get one as libvirt's parser gives it: the lowest free index
    of their type, except that an ICH9 USB2 controller (EHCI1 or a UHCI companion) joins the
    group of the USB controller just before it when that is ICH9 USB2 too and has no controller
    of this model yet (so EHCI1 + UHCI1-3 written in a row share one index)."""
    if all(c.index >= 0 for c in ctrls):
        return ctrls
    used: dict[str, set[int]] = {}
    for c in ctrls:
        if c.index >= 0:
            used.setdefault(c.type, set()).add(c.index)
    out: list[Controller] = []
    for c in ctrls:
        if c.index < 0:
            taken = used.setdefault(c.type, set())
            n = -1
            prev = next((o for o in reversed(out) if o.type == "usb"), None) if c.type == "usb" else None
            if (c.model in USB2_MODELS and prev is not None and prev.model in USB2_MODELS
                    and not any(o.type == "usb" and o.index == prev.index and o.model == c.model for o in out)):
                n = prev.index
            if n < 0:
                n = 0
                while n in taken:
                    n += 1
            taken.add(n)
            c = c.model_copy(update={"index": n})
        out.append(c)
    return tuple(out)
