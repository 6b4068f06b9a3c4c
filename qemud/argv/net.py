"""``<interface>``: a -netdev backend and a NIC -device."""

from __future__ import annotations

import hashlib
from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.qemuopts import opts
from qemud.argv.virtio import add_virtio_props, refuse_virtio_options
from qemud.domain.devices.interface import Interface, PortForward

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
    if t == "user" and iface.backend is not None and iface.backend.type == "passt":
        netdev = _passt(b, iface, i, path)
        if not netdev:
            return
    elif t == "user":
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
    elif t == "vhostuser":
        got = _vhostuser(b, iface, i, path)
        if got is None:
            return
        netdev = got
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
    model = iface.model.type if iface.model is not None else ("virtio" if t == "vdpa" else DEFAULT_MODEL)
    virtio = NIC_MODELS.get(model, model).startswith("virtio")
    if not _extras_ok(b, iface, path, virtio):
        return
    if iface.driver is not None and iface.driver.queues and iface.driver.queues > 1:
        if not virtio:
            # libvirt ignores queues of a NIC model that has one queue (tap-vhost-incorrect)
            b.warn(f"{path}/driver/@queues", f"NIC model '{model}' has one queue; queues is ignored")
        elif netdev.get("type") not in ("tap", "bridge", "vhost-user", "vhost-vdpa"):
            b.error(f"{path}/driver/@queues", f"multiqueue is not supported for network interfaces of type "
                    f"'{t}' (it needs a tap device: use bridge, network or ethernet)")
            return
        else:
            netdev["queues"] = iface.driver.queues
    if iface.driver is not None and iface.driver.name == "vhost" and netdev.get("type") == "tap":
        netdev["vhost"] = True
    nid = f"hostnet{i}"
    netdev["id"] = nid
    driver = NIC_MODELS.get(model, model)
    if not b.has_device(driver, f"{path}/model/@type", f"NIC model '{model}'"):
        return
    b.add("-netdev", _js(netdev))
    mac = iface.mac.address if iface.mac is not None else stable_mac(b.domain.uuid_value, i)
    dev: dict[str, Any] = {"driver": driver, "netdev": nid,
                           "id": b.alias(iface.alias, f"net{i}", path), "mac": mac}
    if iface.driver is not None:
        if iface.driver.rss is not None:
            dev["rss"] = iface.driver.rss
        if iface.driver.rss_hash_report is not None:
            dev["hash"] = iface.driver.rss_hash_report
        q = iface.driver.queues
        if q and q > 1 and driver.startswith("virtio"):
            dev["mq"] = True
            dev["vectors"] = 2 * q + 2
        for name in ("rx_queue_size", "tx_queue_size"):
            size = getattr(iface.driver, name)
            if not size:
                continue
            # QEMU's virtio-net takes a power of two, 256 to 1024 (libvirt checks the first)
            if size & (size - 1) or not 256 <= size <= 1024:
                b.error(f"{path}/driver/@{name}", f"{size} is not a power of two from 256 to 1024")
                continue
            dev[name] = size
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


def passt_port_spec(pf: PortForward) -> str:
    """passt's -t/-u SPEC of one <portForward>: [ADDRESS[%DEV]/]RANGE,... where a range is
    START[-END][:TO[-TOEND]] or ~START[-END] for an exclusion (libvirt's qemuPasstAddNetProps)."""
    parts = []
    for r in pf.range:
        one = f"{r.start}-{r.end}" if r.end is not None else str(r.start)
        if r.exclude:
            one = "~" + one
        elif r.to is not None:
            one += f":{r.to}" + (f"-{r.to + r.end - r.start}" if r.end is not None else "")
        parts.append(one)
    prefix = ""
    if pf.address or pf.dev:
        prefix = (pf.address or "") + (f"%{pf.dev}" if pf.dev else "") + "/"
    return prefix + ",".join(parts)


def passt_command(passt: str, iface: Interface, mac: str) -> list[str]:
    """The passt process that backs a user-mode NIC with <backend type='passt'>, with libvirt's
    options (qemuPasstStart); it serves QEMU's one connection (--fd, added by qemud.passt_shim)
    in the foreground and exits when QEMU goes."""
    argv = [passt, "--one-off", "--foreground", "--mac-addr", mac]
    if iface.mtu is not None:
        argv += ["--mtu", str(iface.mtu.size)]
    if iface.source is not None and iface.source.dev:
        argv += ["--interface", iface.source.dev]
    for ip in iface.ip:
        extra = ip.model_extra or {}
        if extra.get("@address"):
            argv += ["--address", str(extra["@address"])]
            if extra.get("@prefix"):
                argv += ["--netmask", str(extra["@prefix"])]
    if iface.backend is not None and iface.backend.logFile:
        argv += ["--log-file", iface.backend.logFile]
    for pf in iface.portForward:
        argv += ["--tcp-ports" if pf.proto == "tcp" else "--udp-ports", passt_port_spec(pf)]
    return argv


def _passt(b: Builder, iface: Interface, i: int, path: str) -> dict[str, Any] | None:
    """A user-mode NIC backed by passt: a supervised helper on a socket in the guest's runtime
    directory, which QEMU connects to (-netdev stream)."""
    import sys
    from pathlib import Path

    from qemud import passt_shim  # run as a file (stdlib only): no import path needed in the helper
    from qemud.argv.builder import HelperSpec
    sock = b.socket_path(b.paths.run / f"passt-net{i}.sock", path)
    for n, pf in enumerate(iface.portForward):
        if not pf.range:
            b.error(f"{path}/portForward[{n + 1}]", "a port forward needs at least one <range>")
            return None
    passt = b.caps.host.helpers.get("passt")
    if passt is None:
        b.error(f"{path}/backend/@type", "the passt backend needs the passt program, which this host lacks "
                "(install the passt package)")
        return None
    mac = iface.mac.address if iface.mac is not None else stable_mac(b.domain.uuid_value, i)
    # qemud listens on the socket and hands it over; the shim accepts QEMU and becomes passt
    # privileged: started as root, passt drops to nobody itself (and the shim is qemud's code)
    b.helpers.append(HelperSpec(name=f"passt-net{i}", socket=Path(sock), log=b.paths.run / f"passt-net{i}.log",
                                privileged=True, argv=[sys.executable, "-I", passt_shim.__file__, "{fd}",
                                      *passt_command(passt, iface, mac)]))
    return {"type": "stream", "addr": {"type": "unix", "path": sock}, "server": False}


def _vhostuser(b: Builder, iface: Interface, i: int, path: str) -> dict[str, Any] | None:
    """A vhost-user backend (a switch such as OVS-DPDK) on a unix socket: its -chardev, and the
    netdev (None with an error when it cannot be built). QEMU waits at start for the backend."""
    src = iface.source
    if src is None or not src.path:
        b.error(f"{path}/source/@path", "a vhost-user interface needs the backend's socket path")
        return None
    if src.type not in (None, "unix"):
        b.error(f"{path}/source/@type", "a vhost-user backend is reached over a unix socket (type='unix')")
        return None
    if src.mode not in ("server", "client"):
        b.error(f"{path}/source/@mode", "required: 'server' (QEMU listens) or 'client' (QEMU connects)")
        return None
    model = iface.model.type if iface.model is not None else None
    if model is None or not model.startswith("virtio"):
        b.error(f"{path}/model/@type", "a vhost-user interface must be a virtio NIC")
        return None
    if iface.backend is not None and (iface.backend.tap or iface.backend.vhost):
        b.error(f"{path}/backend", "custom tap device path is not supported for network interfaces of type vhostuser")
        return None
    server = src.mode == "server"
    rc = src.reconnect
    parts: list[tuple[str, object] | None] = [("id", f"charnet{i}"), ("path", src.path)]
    if server:
        parts.append(("server", True))  # QEMU waits for the backend to connect before it starts
        if rc is not None:
            b.error(f"{path}/source/reconnect", "reconnect is possible only in client mode")
            return None
    elif rc is not None:
        if rc.enabled and not rc.timeout:
            b.error(f"{path}/source/reconnect/@timeout", "reconnect needs a timeout of at least 1 second")
            return None
        parts.append(("reconnect", rc.timeout if rc.enabled else 0))
    cells = b.domain.cpu.numa.cell if b.domain.cpu is not None and b.domain.cpu.numa is not None else ()
    if not any(c.memAccess == "shared" for c in cells):
        b.warn(path, "vhost-user without shared guest memory (a NUMA cell with memAccess='shared'): "
               "the backend cannot reach the guest's buffers and the interface may not work")
    b.add("-chardev", "socket," + opts(*parts))
    netdev: dict[str, Any] = {"type": "vhost-user", "chardev": f"charnet{i}"}
    return netdev


def _extras_ok(b: Builder, iface: Interface, path: str, virtio: bool) -> bool:
    """The NIC settings beyond model and backend: virtio-only ones checked, host-side ones
    (applied by libvirt to the tap or by the network, not by QEMU) accepted with a warning."""
    ok = True
    d = iface.driver
    if d is not None and not virtio:
        for name, value in (("rss", d.rss), ("rss_hash_report", d.rss_hash_report)):
            if value is not None:
                b.error(f"{path}/driver/@{name}", f"{name} is a virtio-net setting; this NIC is not virtio")
                ok = False
    tap = iface.type in ("ethernet", "bridge", "network")
    for what, el in (("coalesce", iface.coalesce), ("port", iface.port)):
        if el is not None:
            where = "on its tap device" if tap else f"to a type '{iface.type}' interface"
            b.warn(f"{path}/{what}", f"<{what}> is a host-side setting of the network (libvirt applies it "
                   f"{where}); qemud does not apply it")
    bk = iface.backend
    if iface.ip and not (bk is not None and bk.type == "passt"):
        b.warn(f"{path}/ip", "guest-side addresses only apply to containers and the passt backend")
    if bk is not None and bk.type == "passt":
        pass  # _passt()
    elif iface.portForward:
        b.error(f"{path}/portForward", "port forwarding needs the passt backend (<backend type='passt'>)")
        ok = False
    elif bk is not None and (bk.tap or bk.vhost):
        b.warn(f"{path}/backend", "qemud opens the tap and vhost devices itself; <backend> paths are not used")
    return ok


def _js(props: dict[str, Any]) -> str:
    from qemud.argv.qemuopts import js
    return js(props)
