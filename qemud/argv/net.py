"""``<interface>``: a -netdev backend and a NIC -device."""

from __future__ import annotations

import hashlib
from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.virtio import add_virtio_props, refuse_virtio_options
from qemud.domain.devices.interface import Interface

NIC_MODELS = {
    "virtio": "virtio-net-pci", "virtio-transitional": "virtio-net-pci-transitional",
    "virtio-non-transitional": "virtio-net-pci-non-transitional", "e1000": "e1000",
    "e1000e": "e1000e", "rtl8139": "rtl8139", "ne2k_pci": "ne2k_pci", "pcnet": "pcnet",
    "vmxnet3": "vmxnet3", "igb": "igb", "i82559er": "i82559er", "i82551": "i82551",
    "i82557b": "i82557b", "usb-net": "usb-net",
}
#: libvirt's default NIC model for x86 QEMU guests
DEFAULT_MODEL = "rtl8139"


def stable_mac(uuid: str, index: int) -> str:
    """A MAC in QEMU's 52:54:00 range derived from the domain UUID and the NIC's position, so a
    NIC without <mac> keeps its address across restarts (the file is never rewritten)."""
    h = hashlib.sha256(f"{uuid}/{index}".encode()).digest()
    return "52:54:00:%02x:%02x:%02x" % (h[0], h[1], h[2])


def add_interfaces(b: Builder) -> None:
    for i, iface in enumerate(b.domain.devices.interface):
        _iface(b, iface, i, f"/domain/devices/interface[{i + 1}]")


def _iface(b: Builder, iface: Interface, i: int, path: str) -> None:
    src = iface.source
    netdev: dict[str, Any] = {}
    t = iface.type
    if t == "user":
        netdev = {"type": "user"}
        if not any(x.type == "user" for x in b.domain.devices.interface[:i]):
            from qemud.argv.chardev import guestfwd_rules
            rules = guestfwd_rules(b)  # guestfwd channels forward through the first user netdev
            if rules:
                netdev["guestfwd"] = rules
    elif t in ("bridge", "network"):
        if t == "network":
            net = src.network if src is not None else None
            if not net:
                b.error(f"{path}/source/@network", "required attribute is missing")
                return
            bridge = b.caps.networks.get(net)
            if bridge is None:
                known = ", ".join(sorted(b.caps.networks)) or "none are defined"
                b.error(f"{path}/source/@network", f"no network named '{net}' exists on this host "
                        f"(known: {known}); define it in qemud.conf [networks] or use type='bridge'")
                return
        else:
            bridge = src.bridge if src is not None else None
            if not bridge:
                b.error(f"{path}/source/@bridge", "required attribute is missing")
                return
        netdev = {"type": "bridge", "br": bridge, "helper": b.caps.bridge_helper}
    elif t == "ethernet":
        netdev = {"type": "tap", "script": "no", "downscript": "no"}
        if iface.target is not None:
            netdev["ifname"] = iface.target.dev
        if iface.script is not None:
            b.error(f"{path}/script", "scripts are not run by qemud; create the tap device beforehand")
            return
    elif t in ("server", "client", "mcast", "udp"):
        host = src.address if src is not None else None
        port = src.port if src is not None else None
        if port is None:
            b.error(f"{path}/source/@port", "required attribute is missing")
            return
        key = {"server": "listen", "client": "connect", "mcast": "mcast", "udp": "udp"}[t]
        if t == "udp":
            netdev = {"type": "socket", "udp": f"{host or '127.0.0.1'}:{port}"}
        else:
            netdev = {"type": "socket", key: f"{host or ''}:{port}"}
    elif t == "hostdev":
        return  # a VF given to the guest: assigned with the <hostdev>s (qemud.argv.hostdev)
    elif t == "vdpa":
        from qemud.argv.hostdev import vdpa_netdev
        got = vdpa_netdev(b, iface, path)
        if got is None:
            return
        netdev = got
    elif t == "null":
        b.error(f"{path}/@type", "interface type 'null' is not supported")
        return
    else:
        b.error(f"{path}/@type", f"interface type '{t}' is not supported by qemud yet; use user, bridge, network or ethernet")
        return
    if iface.driver is not None and iface.driver.queues and iface.driver.queues > 1:
        if netdev.get("type") not in ("tap", "bridge", "vhost-vdpa"):
            b.error(f"{path}/driver/@queues", f"multiqueue needs a tap device; interface type '{t}' has one queue")
            return
        netdev["queues"] = iface.driver.queues
    if iface.driver is not None and iface.driver.name == "vhost" and netdev.get("type") == "tap":
        netdev["vhost"] = True
    nid = f"hostnet{i}"
    netdev["id"] = nid
    model = iface.model.type if iface.model is not None else ("virtio" if t == "vdpa" else DEFAULT_MODEL)
    driver = NIC_MODELS.get(model, model)
    if not b.has_device(driver, f"{path}/model/@type", f"NIC model '{model}'"):
        return
    b.add("-netdev", _js(netdev))
    mac = iface.mac.address if iface.mac is not None else stable_mac(b.domain.uuid_value, i)
    dev: dict[str, Any] = {"driver": driver, "netdev": nid,
                           "id": b.alias(iface.alias, f"net{i}", path), "mac": mac}
    if iface.driver is not None:
        q = iface.driver.queues
        if q and q > 1 and driver.startswith("virtio"):
            dev["mq"] = True
            dev["vectors"] = 2 * q + 2
        if iface.driver.rx_queue_size:
            dev["rx_queue_size"] = iface.driver.rx_queue_size
        if iface.driver.tx_queue_size:
            dev["tx_queue_size"] = iface.driver.tx_queue_size
    from qemud.argv.hostdev import nic_teaming
    dev.update(nic_teaming(b, iface, path, driver))
    if iface.mtu is not None and driver.startswith("virtio"):
        dev["host_mtu"] = iface.mtu.size
    if iface.link is not None and iface.link.state == "down":
        b.warn(f"{path}/link", "the link is brought down over QMP after start")
    if driver == "usb-net":
        if b.usb_bus is None:
            b.error(f"{path}/model/@type", "a USB NIC needs a USB controller")
            return
        dev["bus"] = b.usb_bus
    else:
        dev.update(b.pci_props(iface.address, path, "NIC"))
        if iface.acpi is not None:
            dev["acpi-index"] = iface.acpi.index
    if driver.startswith("virtio"):
        dev = add_virtio_props(b, dev, iface.driver, path)
    else:
        refuse_virtio_options(b, iface.driver, path, f"NIC model '{model}'")
    bi = b.bootindex.get(id(iface))
    if bi is not None:
        dev["bootindex"] = bi
    if iface.rom is not None:
        if iface.rom.enabled is False or iface.rom.bar is False:
            dev["romfile"] = ""
        elif iface.rom.file:
            dev["romfile"] = iface.rom.file
    b.device(dev)


def _js(props: dict[str, Any]) -> str:
    from qemud.argv.qemuopts import js
    return js(props)
