"""``<controller>``: PCI buses first (other devices plug into them), then the rest."""

from __future__ import annotations

from qemud.argv.builder import Builder
from qemud.domain.devices.controller import CONTROLLER_MODELS, Controller

PCI_DEVICES = {
    "pci-bridge": "pci-bridge", "dmi-to-pci-bridge": "i82801b11-bridge",
    "pcie-root-port": "pcie-root-port", "pcie-switch-upstream-port": "x3130-upstream",
    "pcie-switch-downstream-port": "xio3130-downstream", "pci-expander-bus": "pxb",
    "pcie-expander-bus": "pxb-pcie", "pcie-to-pci-bridge": "pcie-pci-bridge",
}
#: the QEMU devices libvirt's <model name=...> may name for each PCI controller model
PCI_MODEL_NAMES = {
    "pci-bridge": ("pci-bridge",), "dmi-to-pci-bridge": ("i82801b11-bridge",),
    "pcie-root-port": ("pcie-root-port", "ioh3420"), "pcie-switch-upstream-port": ("x3130-upstream",),
    "pcie-switch-downstream-port": ("xio3130-downstream",), "pci-expander-bus": ("pxb",),
    "pcie-expander-bus": ("pxb-pcie",), "pcie-to-pci-bridge": ("pcie-pci-bridge",),
}
USB_DEVICES = {
    "piix3-uhci": "piix3-usb-uhci", "piix4-uhci": "piix4-usb-uhci", "ehci": "usb-ehci",
    "ich9-ehci1": "ich9-usb-ehci1", "ich9-uhci1": "ich9-usb-uhci1", "ich9-uhci2": "ich9-usb-uhci2",
    "ich9-uhci3": "ich9-usb-uhci3", "vt82c686b-uhci": "vt82c686b-usb-uhci", "pci-ohci": "pci-ohci",
    "nec-xhci": "nec-usb-xhci", "qemu-xhci": "qemu-xhci",
}
SCSI_DEVICES = {
    "lsilogic": "lsi53c895a", "lsisas1068": "mptsas1068", "lsisas1078": "megasas-gen2",
    "vmpvscsi": "pvscsi", "virtio-scsi": "virtio-scsi-pci", "virtio-transitional": "virtio-scsi-pci-transitional",
    "virtio-non-transitional": "virtio-scsi-pci-non-transitional", "am53c974": "am53c974",
    "dc390": "dc390", "ncr53c90": "am53c974",
}


def controller_id(c: Controller) -> str:
    """libvirt's ids: pci.N, usb (index 0) / usbN, scsiN, sataN, ideN, virtio-serialN, ccidN."""
    if c.type == "pci":
        return f"pci.{c.index}"
    if c.type == "usb":
        return "usb" if c.index == 0 else f"usb{c.index}"
    return f"{c.type}{c.index}"


def default_usb_model(b: Builder) -> str:
    return "qemu-xhci" if b.q35 else "piix3-uhci"


def scsi_model(c: Controller) -> str:
    return c.model if c.model and c.model != "auto" else "lsilogic"


def add_pci_controllers(b: Builder) -> None:
    ctrls = list(enumerate(b.domain.devices.controller))
    seen: set[int] = set()
    root = "pcie-root" if b.q35 else "pci-root"
    for i, c in ctrls:
        path = f"/domain/devices/controller[{i + 1}]"
        if c.type != "pci":
            continue
        if c.index in seen:
            b.error(f"{path}/@index", f"two PCI controllers have index {c.index}")
            continue
        seen.add(c.index)
        model = c.model or (root if c.index == 0 else None)
        if model is None:
            b.error(f"{path}/@model", "a PCI controller other than index 0 needs a model")
            continue
        if model not in CONTROLLER_MODELS["pci"]:
            b.error(f"{path}/@model", f"'{model}' is not one of {', '.join(CONTROLLER_MODELS['pci'])}")
            continue
        if c.index == 0:
            if model != root:
                b.error(f"{path}/@model", f"machine {b.machine.name} has a {root} at index 0, not a {model}")
            continue
        if model in ("pci-root", "pcie-root"):
            b.error(f"{path}/@model", f"only index 0 can be the {model}")
            continue
        b.pci.add_bus(c.index, model)
    # reserve explicit addresses of controllers before anything is placed automatically
    for i, c in ctrls:
        if c.type == "pci" and c.index == 0:
            continue
        if c.type == "ide" and not b.q35 and c.address is not None and (c.address.slot, c.address.function) == (1, 1):
            continue  # the PIIX3's own IDE function
        if c.type == "sata" and b.q35 and c.index == 0:
            continue  # ICH9's AHCI at 1f.2
        _reserve(b, c.address, f"/domain/devices/controller[{i + 1}]")
    reserve_device_addresses(b)
    for i, c in ctrls:
        if c.type != "pci" or c.index == 0:
            continue
        path = f"/domain/devices/controller[{i + 1}]"
        model = c.model or ""
        driver = PCI_DEVICES.get(model)
        if c.model_element is not None:  # <model name='ioh3420'/>: the QEMU device libvirt chose
            driver = c.model_element.name
            if driver not in PCI_MODEL_NAMES.get(model, ()):
                b.error(f"{path}/model/@name", f"'{driver}' is not a {model} device (one of "
                        f"{', '.join(PCI_MODEL_NAMES.get(model, ())) or 'none'})")
                continue
        if driver is None or not b.has_device(driver, f"{path}/@model", f"a {model} controller"):
            continue
        props: dict = {"driver": driver}
        tgt = c.target
        if model == "pci-bridge" or model == "pcie-to-pci-bridge":
            if model == "pci-bridge":
                props["chassis_nr"] = tgt.chassisNr if tgt and tgt.chassisNr else c.index
        elif model == "pcie-root-port" or model == "pcie-switch-downstream-port":
            # libvirt's numbering without an explicit port: 0x10 for the first root port, and so on
            props["port"] = tgt.port if tgt and tgt.port is not None else c.index + 0x0F
            props["chassis"] = tgt.chassis if tgt and tgt.chassis is not None else c.index
            if tgt and tgt.hotplug is not None:
                props["hotplug"] = tgt.hotplug
        elif model in ("pci-expander-bus", "pcie-expander-bus"):
            props["bus_nr"] = tgt.busNr if tgt and tgt.busNr is not None else 254 - c.index
        props["id"] = f"pci.{c.index}"
        props.update(b.pci_props(c.address, path, f"{model} controller"))
        b.device(props)


def _reserve(b: Builder, address, path: str) -> None:
    if address is not None and address.type == "pci" and address.slot is not None:
        msg = b.pci.reserve(address)
        if msg:
            b.error(f"{path}/address", msg)


def reserve_device_addresses(b: Builder) -> None:
    """Claim every explicit PCI address of non-controller devices before any auto placement."""
    dev = b.domain.devices
    for fam in ("disk", "interface", "video", "sound", "rng", "watchdog", "input", "panic", "shmem", "hostdev"):
        for i, item in enumerate(getattr(dev, fam)):
            _reserve(b, getattr(item, "address", None), f"/domain/devices/{fam}[{i + 1}]")
    for fam in ("serial", "console", "channel", "parallel"):
        for i, item in enumerate(getattr(dev, fam)):
            _reserve(b, item.address, f"/domain/devices/{fam}[{i + 1}]")
    if dev.memballoon is not None:
        _reserve(b, dev.memballoon.address, "/domain/devices/memballoon")
    for fam in ("iommu", "vsock"):
        if getattr(dev, fam) is not None:
            _reserve(b, getattr(dev, fam).address, f"/domain/devices/{fam}")


def add_other_controllers(b: Builder) -> None:
    """USB, SCSI, SATA, virtio-serial, IDE, FDC and CCID controllers."""
    ctrls = b.domain.devices.controller
    have_usb = any(c.type == "usb" for c in ctrls)
    implicit: list[tuple[str, Controller]] = []
    if not have_usb:
        implicit.append(("/domain/devices", Controller.model_validate({"@type": "usb", "@index": "0"})))
    from qemud.argv.disks import implicit_scsi_controllers
    implicit += [("/domain/devices", c) for c in implicit_scsi_controllers(b.domain)]
    seen: set[tuple[str, int]] = set()
    items = [(i, c) for i, c in enumerate(ctrls)] + [(-1, c) for _, c in implicit]
    # USB companions (ICH9 UHCIs sharing an index with an EHCI) come after their master
    # and a CCID reader (a USB device) after the USB controllers, the implicit one included
    items.sort(key=lambda ic: (ic[1].type == "ccid", _is_companion(ic[1], ctrls)))
    for i, c in items:
        path = f"/domain/devices/controller[{i + 1}]" if i >= 0 else "/domain/devices"
        if c.type == "pci":
            continue
        if (c.type, c.index) in seen and c.type != "usb":
            b.error(f"{path}/@index", f"two {c.type} controllers have index {c.index}")
            continue
        seen.add((c.type, c.index))
        cid = controller_id(c)  # an <alias> of a controller only renames QEMU's id: not followed
        b.ids.add(cid)
        if c.type == "usb":
            _usb(b, c, cid, path)
        elif c.type == "scsi":
            model = scsi_model(c)
            driver = SCSI_DEVICES.get(model)
            if driver is None:
                b.error(f"{path}/@model", f"SCSI controller model '{model}' is not supported by QEMU")
                continue
            if not b.has_device(driver, f"{path}/@model", f"a {model} SCSI controller"):
                continue
            props: dict = {"driver": driver, "id": cid}
            if c.driver is not None:
                if c.driver.queues:
                    props["num_queues"] = c.driver.queues
                if c.driver.iothread:
                    props["iothread"] = f"iothread{c.driver.iothread}"
            props.update(b.pci_props(c.address, path, "SCSI controller"))
            b.device(props)
        elif c.type == "sata":
            if b.q35 and c.index == 0:
                continue  # the ICH9 AHCI built into q35 (id "ide")
            if not b.has_device("ich9-ahci", path, "a SATA controller"):
                continue
            b.device({"driver": "ich9-ahci", "id": cid, **b.pci_props(c.address, path, "SATA controller")})
        elif c.type == "virtio-serial":
            props = {"driver": "virtio-serial-pci", "id": cid}
            if c.ports is not None:
                props["max_ports"] = c.ports
            if c.vectors is not None:
                props["vectors"] = c.vectors
            props.update(b.pci_props(c.address, path, "virtio-serial controller"))
            b.device(props)
        elif c.type == "ide":
            if b.q35:
                b.error(f"{path}/@type", "a q35 machine has no IDE controller; use bus='sata'")
            elif c.index != 0:
                b.error(f"{path}/@index", "a pc machine has one IDE controller (index 0)")
        elif c.type == "fdc":
            if c.index != 0:
                b.error(f"{path}/@index", "a machine has one floppy controller (index 0)")
        elif c.type == "ccid":
            if b.usb_bus is None:
                b.error(path, "a CCID controller needs a USB controller")
            elif b.has_device("usb-ccid", path, "a CCID controller"):
                b.device({"driver": "usb-ccid", "id": cid, "bus": b.usb_bus})
        elif c.type == "isa":
            pass
        else:
            b.error(f"{path}/@type", f"controller type '{c.type}' is not supported by QEMU on x86")


COMPANION_PORTS = {"ich9-uhci1": 0, "ich9-uhci2": 2, "ich9-uhci3": 4}
COMPANION_FUNCTION = {"ich9-ehci1": 7, "ich9-uhci1": 0, "ich9-uhci2": 1, "ich9-uhci3": 2}


def _is_companion(c: Controller, ctrls: tuple[Controller, ...]) -> bool:
    return (c.type == "usb" and (c.master is not None or c.model in COMPANION_PORTS)
            and any(o.type == "usb" and o.index == c.index and o.model not in COMPANION_PORTS for o in ctrls))


def _usb(b: Builder, c: Controller, cid: str, path: str) -> None:
    model = c.model or default_usb_model(b)
    if model == "none":
        return
    driver = USB_DEVICES.get(model)
    if driver is None:
        b.error(f"{path}/@model", f"USB controller model '{model}' is not supported by QEMU on x86")
        return
    if not b.has_device(driver, f"{path}/@model", f"a {model} USB controller"):
        return
    props: dict = {"driver": driver}
    companion = _is_companion(c, b.domain.devices.controller)
    if companion:
        master = "usb" if c.index == 0 else f"usb{c.index}"
        props["masterbus"] = f"{master}.0"
        props["firstport"] = c.master.startport if c.master is not None else COMPANION_PORTS.get(model, 0)
    else:
        props["id"] = cid
        if c.ports is not None and model in ("nec-xhci", "qemu-xhci"):
            props["p2"] = props["p3"] = c.ports
    if c.address is None and model == "piix3-uhci" and not b.q35 and c.index == 0:
        # libvirt's place for the first UHCI: the PIIX3's own function 2
        from qemud.domain.devices.address import Address
        addr = Address.model_validate({"@type": "pci", "@bus": "0", "@slot": "1", "@function": "2"})
        if (0, 1, 2) not in b.pci.used:
            b.pci.reserve(addr)
        props.update(b.pci.props(addr))  # type: ignore[arg-type]
    elif c.address is None and model in COMPANION_FUNCTION and any(
            o.type == "usb" and o.index == c.index and o.model in COMPANION_FUNCTION and o is not c
            for o in b.domain.devices.controller):
        # an ICH9 EHCI and its UHCIs share one slot: EHCI at .7, UHCIs at .0-.2 (libvirt's layout)
        slot = b.usb_slots.get(c.index)
        if slot is None:
            got = b.pci.auto("USB controllers")
            if isinstance(got, str):
                b.error(path, got)
                return
            slot = b.usb_slots[c.index] = (got["bus"], got["addr"])
        fn = COMPANION_FUNCTION[model]
        props.update(bus=slot[0], addr=f"{slot[1]}.0x{fn:x}" if fn else slot[1])
        if fn == 0:
            props["multifunction"] = True
    else:
        props.update(b.pci_props(c.address, path, "USB controller"))
    b.device(props)
    if not companion and b.usb_bus is None:
        b.usb_bus = f"{cid}.0"
