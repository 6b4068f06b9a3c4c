"""``<controller>``: PCI buses first (other devices plug into them), then the rest."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.virtio import add_virtio_props, refuse_virtio_options
from qemud.argv.pci import controller_defaults, plan
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


def _pcihole64(b: Builder, size, path: str) -> None:  # type: ignore[no-untyped-def]
    """<pcihole64>: the host bridge's 64-bit MMIO window size, in KiB as libvirt writes it."""
    bridge = "q35-pcihost" if b.q35 else "i440FX-pcihost"
    if size.bytes % 1024:
        b.error(f"{path}/pcihole64", "must be a whole number of KiB")
        return
    if size.value:  # 0: QEMU's default size
        b.add("-global", f"{bridge}.pci-hole64-size={size.kib}K")


def add_pci_controllers(b: Builder) -> None:
    """Check the PCI controllers, place every PCI device as libvirt would (``qemud.argv.pci``),
    then emit the PCI controllers, the ones libvirt would auto-add included, parents first."""
    ctrls = list(enumerate(b.domain.devices.controller))
    seen: set[int] = set()
    root = "pcie-root" if b.q35 else "pci-root"
    ok = True
    for i, c in ctrls:
        path = f"/domain/devices/controller[{i + 1}]"
        if c.type != "pci":
            continue
        if c.index in seen:
            b.error(f"{path}/@index", f"two PCI controllers have index {c.index}")
            ok = False
            continue
        seen.add(c.index)
        if c.index > 255:
            b.error(f"{path}/@index", f"a PCI controller index is a bus number, at most 255, not {c.index}")
            ok = False
            continue
        model = c.model or (root if c.index == 0 else None)
        if model is None:
            b.error(f"{path}/@model", "a PCI controller other than index 0 needs a model")
            ok = False
            continue
        if model not in CONTROLLER_MODELS["pci"]:
            b.error(f"{path}/@model", f"'{model}' is not one of {', '.join(CONTROLLER_MODELS['pci'])}")
            ok = False
            continue
        if c.index == 0:
            if model != root:
                b.error(f"{path}/@model", f"machine {b.machine.name} has a {root} at index 0, not a {model}")
                ok = False
            elif c.address is not None and c.address.type == "pci" and c.address.slot is not None:
                b.error(f"{path}/address", f"the {root} is the machine's host bridge; it has no PCI address")
                ok = False
            elif c.pcihole64 is not None:
                _pcihole64(b, c.pcihole64, path)
            continue
        if c.pcihole64 is not None:
            b.error(f"{path}/pcihole64", f"only the {root} (index 0) has a 64-bit PCI hole")
        if model in ("pci-root", "pcie-root"):
            b.error(f"{path}/@model", f"only index 0 can be the {model}")
            ok = False
    if not ok:
        b.pci_plan.problems = [("/domain/devices", "the PCI controllers are wrong")]
        return
    pl = plan(b.domain, b.q35, "pcie-pci-bridge" in b.caps.devices)
    b.pci_plan = pl
    for key, msg in pl.problems:
        b.error(key if key.startswith("/") else "/domain/devices", msg)
    if pl.problems:
        return
    order = pl.ctrls
    defaults = controller_defaults(pl, order)
    for key, c in sorted(((k, c) for k, c in order if c.type == "pci" and c.index > 0), key=lambda kc: kc[1].index):
        _pci_controller(b, key, c, defaults.get(c.index, {}))


def _pci_controller(b: Builder, key: str, c: Controller, defaults: dict) -> None:
    path = key if key.startswith("/") else "/domain/devices"
    model = c.model or ""
    driver = PCI_DEVICES.get(model)
    if c.model_element is not None:  # <model name='ioh3420'/>: the QEMU device libvirt chose
        driver = c.model_element.name
        if driver not in PCI_MODEL_NAMES.get(model, ()):
            b.error(f"{path}/model/@name", f"'{driver}' is not a {model} device (one of "
                    f"{', '.join(PCI_MODEL_NAMES.get(model, ())) or 'none'})")
            return
    if driver is None or not b.has_device(driver, f"{path}/@model", f"a {model} controller"):
        return
    props: dict = {"driver": driver}
    tgt = c.target
    if model in ("pci-expander-bus", "pcie-expander-bus"):
        if defaults.get("bus_nr") is None:
            b.error(f"{path}/target/@busNr", "no bus number below the lowest one in use is free for this "
                    "expander bus; set <target busNr=...> by hand")
            return
        props["bus_nr"] = defaults["bus_nr"]
        if tgt is not None and tgt.node is not None:
            cells = b.domain.cpu.numa.cell if b.domain.cpu is not None and b.domain.cpu.numa is not None else ()
            if not any((cell.id if cell.id is not None else n) == tgt.node.value for n, cell in enumerate(cells)):
                b.error(f"{path}/target/node", f"NUMA node {tgt.node.value} is not a guest NUMA node "
                        "(<cpu><numa><cell id=...>)")
                return
            props["numa_node"] = tgt.node.value
    elif model == "pci-bridge":
        props["chassis_nr"] = defaults.get("chassis_nr", c.index)
    elif model in ("pcie-root-port", "pcie-switch-downstream-port"):
        if "port" in defaults:
            props["port"] = defaults["port"]
        props["chassis"] = defaults.get("chassis", c.index)
        if tgt is not None and tgt.hotplug is not None:
            props["hotplug"] = tgt.hotplug
    props["id"] = f"pci.{c.index}"
    b.ids.add(props["id"])
    props.update(b.pci_props(c.address, path, f"{model} controller", key=key))
    b.device(props)


def add_other_controllers(b: Builder) -> None:
    """USB, SCSI, SATA, virtio-serial, IDE, FDC and CCID controllers."""
    ctrls = b.domain.devices.controller
    check_usb(b)
    have_usb = any(c.type == "usb" for c in ctrls)
    implicit: list[tuple[str, Controller]] = []
    if not have_usb:
        implicit.append(("/domain/devices", Controller.model_validate({"@type": "usb", "@index": "0"})))
    from qemud.argv.disks import implicit_scsi_controllers
    implicit += [("/domain/devices", c) for c in implicit_scsi_controllers(b.domain)]
    from qemud.argv.chardev import implicit_virtio_serial_controllers  # libvirt's, for virtio channels
    implicit += [("/domain/devices", c) for c in implicit_virtio_serial_controllers(b.domain)]
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
            _usb(b, c, cid, path, "implicit:usb" if i < 0 else path)
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
            props.update(b.pci_props(c.address, path, "SCSI controller",
                                     key=f"implicit:scsi{c.index}" if i < 0 else None))
            if driver.startswith("virtio"):
                props = add_virtio_props(b, props, c.driver, path)
            else:
                refuse_virtio_options(b, c.driver, path, f"a {model} SCSI controller")
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
            # an implicit one is placed under its key in the PCI plan (qemud.argv.pci.controllers)
            key = None if i >= 0 else ("/domain/devices" if c.index == 0 else f"implicit:virtio-serial{c.index}")
            props.update(b.pci_props(c.address, path, "virtio-serial controller", key=key))
            b.device(add_virtio_props(b, props, c.driver, path))
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


#: xHCI controllers have at most 15 ports (QEMU's limit, as libvirt checks it)
XHCI_MAX_PORTS = 15
#: libvirt's VIR_DOMAIN_DEVICE_USB_MAX_PORT_DEPTH: a root port and three levels of hubs
USB_MAX_PORT_DEPTH = 4


def check_usb(b: Builder) -> None:
    """libvirt's USB rules: model 'none' stands alone, companions need their master, xHCI port
    counts, and every USB address names an existing bus and a port path QEMU can follow."""
    ctrls = b.domain.devices.controller
    usb = [(i, c) for i, c in enumerate(ctrls) if c.type == "usb"]
    if any(c.model == "none" for _, c in usb) and len(usb) > 1:
        # the first other one (two model='none' controllers: the second)
        i = next((i for i, c in usb if c.model != "none"), usb[1][0])
        b.error(f"/domain/devices/controller[{i + 1}]", "USB is disabled for this domain (a USB controller of "
                "model 'none'), so no other USB controller can be added")
    for i, c in usb:
        path = f"/domain/devices/controller[{i + 1}]"
        model = c.model or default_usb_model(b)
        if model in ("nec-xhci", "qemu-xhci") and c.ports is not None and c.ports > XHCI_MAX_PORTS:
            b.error(f"{path}/@ports", f"a '{model}' controller has at most {XHCI_MAX_PORTS} ports, not {c.ports}")
        if c.master is not None and not _is_companion(c, ctrls):
            b.error(path, f"the {model} USB controller is a companion, but no master controller (ich9-ehci1) "
                    f"has index {c.index}")
    buses = {c.index for _, c in usb if c.model != "none"}
    if not usb:
        buses = {0}
    taken: dict[tuple[int, str], str] = {}  # (bus, port path) -> the device there
    hubs: set[tuple[int, str]] = set()  # where a hub sits: ports below it exist
    wanted: list[tuple[str, int, str]] = []
    for fam, items in _usb_addressed(b):
        for n, item in items:
            a = item.address
            path = f"/domain/devices/{fam}[{n + 1}]/address" if n >= 0 else f"/domain/devices/{fam}/address"
            if a.bus is not None and a.bus not in buses:
                b.error(f"{path}/@bus", f"USB bus {a.bus} is asked for, but no USB controller has index {a.bus}")
            if a.port:
                parts = a.port.split(".")
                if len(parts) > USB_MAX_PORT_DEPTH or not all(p.isascii() and p.isdigit() and 0 < int(p) for p in parts):
                    b.error(f"{path}/@port", f"'{a.port}' is not a USB port path (up to {USB_MAX_PORT_DEPTH} "
                            "port numbers from 1, joined by '.')")
                    continue
                key = (a.bus or 0, ".".join(str(int(p)) for p in parts))
                if key in taken:
                    b.error(f"{path}/@port", f"USB bus {key[0]} port {key[1]} is already taken by {taken[key]}")
                    continue
                taken[key] = path.rsplit("/address", 1)[0]
                if fam == "hub":
                    hubs.add(key)
                wanted.append((path, key[0], key[1]))
    # libvirt's rule: a port path below the root names a hub at each step
    for path, bus, port in wanted:
        parts = port.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            if (bus, parent) not in hubs:
                b.error(f"{path}/@port", f"there is no USB hub at port {parent} of bus {bus} for port {port}")
                break
            if int(parts[depth]) > USB_HUB_PORTS:
                b.error(f"{path}/@port", f"port {port}: a USB hub has {USB_HUB_PORTS} ports")
                break


#: QEMU's usb-hub has 8 ports
USB_HUB_PORTS = 8


def _usb_addressed(b: Builder) -> list[tuple[str, list[tuple[int, Any]]]]:
    """Every device of the domain with an ``<address type='usb'>``, by family."""
    out = []
    dev = b.domain.devices
    for fam in type(dev).model_fields:
        value = getattr(dev, fam, None)
        items = list(enumerate(value)) if isinstance(value, tuple) else ([(-1, value)] if value is not None else [])
        found = [(n, it) for n, it in items if getattr(getattr(it, "address", None), "type", None) == "usb"]
        if found:
            out.append((fam, found))
    return out


def _is_companion(c: Controller, ctrls: tuple[Controller, ...]) -> bool:
    return (c.type == "usb" and (c.master is not None or c.model in COMPANION_PORTS)
            and any(o.type == "usb" and o.index == c.index and o.model not in COMPANION_PORTS for o in ctrls))


def _usb(b: Builder, c: Controller, cid: str, path: str, key: str) -> None:
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
    props.update(b.pci_props(c.address, path, "USB controller", key=key))
    b.device(props)
    if not companion and b.usb_bus is None:
        b.usb_bus = f"{cid}.0"
