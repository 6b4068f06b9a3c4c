"""Character devices: a -chardev backend and the device the guest sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.qemuopts import opts
from qemud.domain.devices.chardev import CharDev

GUEST_AGENT = "org.qemu.guest_agent.0"


def chardev(b: Builder, c: CharDev, cid: str, path: str, console: bool = False,
            spicevmc: str = "vdagent") -> bool:
    """Emit -chardev id=cid for c; False (with an error) when it cannot be realized.

    ``spicevmc`` names the SPICE channel a spicevmc device carries: vdagent for channels,
    usbredir for <redirdev>, smartcard for <smartcard>.

    The guest's console (``console=True``) is also logged by QEMU to a file qemud follows into
    the journal: QEMU never waits for qemud, and nothing is lost while the daemon restarts."""
    src = c.src
    t = c.type
    logfile: list[tuple[str, object]] = []
    if c.log is not None:
        logfile = [("logfile", c.log.file), ("logappend", bool(c.log.append))]
        if console:
            b.console_log = Path(c.log.file)
    elif console and t == "file" and src is not None and src.path:
        b.console_log = Path(src.path)
    elif console:
        b.console_log = b.paths.console_log
        logfile = [("logfile", str(b.paths.console_log)), ("logappend", True)]
    if t == "pty":
        b.add("-chardev", "pty," + opts(("id", cid), *logfile))
    elif t == "null":
        b.add("-chardev", "null," + opts(("id", cid), *logfile))
    elif t == "file":
        if src is None or not src.path:
            b.error(f"{path}/source/@path", "a file character device needs a path")
            return False
        b.add("-chardev", "file," + opts(("id", cid), ("path", src.path),
                                         ("append", src.append if src.append is not None else None), *logfile))
    elif t == "pipe":
        if src is None or not src.path:
            b.error(f"{path}/source/@path", "a pipe needs a path")
            return False
        b.add("-chardev", "pipe," + opts(("id", cid), ("path", src.path), *logfile))
    elif t == "dev":
        if src is None or not src.path:
            b.error(f"{path}/source/@path", "a host device needs a path")
            return False
        b.add("-chardev", ("parallel," if path.split("/")[-1].startswith("parallel") else "serial,")
              + opts(("id", cid), ("path", src.path), *logfile))
    elif t == "unix":
        sock = src.path if src is not None and src.path else None
        # libvirt's default mode is connect; a socket without a path is ours to create (bind)
        server = sock is None or (src is not None and src.mode == "bind")
        if sock is None and src is not None and src.mode == "connect":
            server = False  # libvirt: "Missing source path attribute for char device"
        if sock is None:
            if not server:
                b.error(f"{path}/source/@path", "a unix socket in connect mode needs a path")
                return False
            sock = b.socket_path(b.paths.chardev_socket(cid), path)
        b.add("-chardev", "socket," + opts(("id", cid), ("path", sock), ("server", server),
                                           ("wait", False) if server else None, *logfile))
    elif t == "tcp":
        if src is None or not src.service:
            b.error(f"{path}/source/@service", "a TCP character device needs a port (service)")
            return False
        server = src.mode == "bind"
        telnet = c.protocol is not None and c.protocol.type in ("telnet", "telnets")
        b.add("-chardev", "socket," + opts(("id", cid), ("host", src.host or "localhost"), ("port", src.service),
                                           ("telnet", True) if telnet else None, ("server", server),
                                           ("wait", False) if server else None, *logfile))
    elif t == "udp":
        connect = next((s for s in c.source if s.mode != "bind"), None)
        bind = next((s for s in c.source if s.mode == "bind"), None)
        if connect is None or not connect.service:
            b.error(f"{path}/source", "a UDP character device needs a connect source with a service")
            return False
        b.add("-chardev", "udp," + opts(("id", cid), ("host", connect.host or "localhost"), ("port", connect.service),
                                        ("localaddr", bind.host if bind else None),
                                        ("localport", bind.service if bind else None), *logfile))
    elif t in ("spicevmc", "spiceport"):
        if not any(g.type == "spice" for g in b.domain.devices.graphics):
            b.error(f"{path}/@type", f"a {t} character device needs <graphics type='spice'>")
            return False
        if t == "spicevmc":
            b.add("-chardev", "spicevmc," + opts(("id", cid), ("name", spicevmc)))
        else:
            b.add("-chardev", "spiceport," + opts(("id", cid), ("name", src.channel if src else "org.qemu.console.0")))
    elif t == "qemu-vdagent":
        b.add("-chardev", "qemu-vdagent," + opts(("id", cid), ("name", "com.redhat.spice.0")))
    elif t == "vc":
        if not b.domain.devices.graphics:
            b.error(f"{path}/@type", "a vc character device needs a graphical display; qemud runs headless")
            return False
        b.add("-chardev", "vc," + opts(("id", cid)))
    elif t == "stdio":
        b.error(f"{path}/@type", "qemud runs QEMU without a terminal; use pty, unix or file instead of stdio")
        return False
    else:
        b.error(f"{path}/@type", f"character device type '{t}' is not supported")
        return False
    return True


def add_serials(b: Builder) -> None:
    dev = b.domain.devices
    serials = list(dev.serial)
    for i, s in enumerate(serials):
        path = f"/domain/devices/serial[{i + 1}]"
        port = s.target.port if s.target and s.target.port is not None else i
        cid = f"charserial{port}"
        ttype = s.target.type if s.target and s.target.type else "isa-serial"
        if not chardev(b, s, cid, path, console=b.console_log is None and (port == 0 or i == 0)):
            continue
        sid = b.alias(s.alias, f"serial{port}", path)
        model = s.target.model.name if s.target and s.target.model else None
        if ttype in ("isa-serial", "serial") and model in (None, "isa-serial"):
            if port > 3:
                b.error(f"{path}/target/@port", "an ISA machine has serial ports 0-3")
                continue
            b.device({"driver": "isa-serial", "chardev": cid, "id": sid, "index": port})
        elif ttype == "usb-serial" or model == "usb-serial":
            if b.usb_bus is None:
                b.error(f"{path}/target/@type", "a USB serial port needs a USB controller")
                continue
            b.device({"driver": "usb-serial", "chardev": cid, "id": sid, "bus": b.usb_bus})
        elif ttype == "pci-serial" or model == "pci-serial":
            b.device({"driver": "pci-serial", "chardev": cid, "id": sid, **b.pci_props(s.address, path, "PCI serial port")})
        else:
            b.error(f"{path}/target/@type", f"serial target '{ttype}' is not supported on x86")
    consoles = list(dev.console)
    for i, c in enumerate(consoles):
        path = f"/domain/devices/console[{i + 1}]"
        ttype = c.target.type if c.target and c.target.type else "serial"
        if ttype == "serial":
            if i == 0 and serials:
                continue  # libvirt: the first console is an alias of the first serial port
            if serials:
                b.error(f"{path}/target/@type", "only the first console can be a serial port")
                continue
            cid = "charserial0"
            if chardev(b, c, cid, path, console=b.console_log is None):
                b.device({"driver": "isa-serial", "chardev": cid, "id": b.alias(c.alias, "serial0", path), "index": 0})
                serials.append(c)
        elif ttype == "virtio":
            cid = f"charconsole{i}"
            if not chardev(b, c, cid, path, console=b.console_log is None):
                continue
            bus = _virtio_serial_bus(b)
            b.device({"driver": "virtconsole", "chardev": cid, "id": b.alias(c.alias, f"console{i}", path), "bus": bus})
        else:
            b.error(f"{path}/target/@type", f"console target '{ttype}' is not supported on x86")
    for i, p in enumerate(dev.parallel):
        path = f"/domain/devices/parallel[{i + 1}]"
        port = p.target.port if p.target and p.target.port is not None else i
        cid = f"charparallel{port}"
        if port > 2:
            b.error(f"{path}/target/@port", "an ISA machine has parallel ports 0-2")
            continue
        if chardev(b, p, cid, path):
            b.device({"driver": "isa-parallel", "chardev": cid, "id": b.alias(p.alias, f"parallel{port}", path), "index": port})


def _virtio_serial_bus(b: Builder) -> str:
    """The bus of the first virtio-serial controller, added when the file has none (as libvirt does)."""
    for c in b.domain.devices.controller:
        if c.type == "virtio-serial":
            return f"virtio-serial{c.index}.0"
    if "virtio-serial0" not in b.ids:
        b.ids.add("virtio-serial0")
        b.device({"driver": "virtio-serial-pci", "id": "virtio-serial0", **b.pci_props(None, "/domain/devices", "virtio-serial controller")})
    return "virtio-serial0.0"


def guestfwd_problem(c: CharDev) -> tuple[str, str] | None:
    """What is wrong with a guestfwd channel's target, as (relative path, message), or None."""
    import ipaddress
    tgt = c.target
    if tgt is None or not tgt.address or tgt.port is None:
        return "target", "a guestfwd channel needs address and port"
    try:
        ipaddress.IPv4Address(tgt.address)
    except ValueError:
        return "target/@address", f"'{tgt.address}' is not an IPv4 address"
    if not 0 < tgt.port < 65536:
        return "target/@port", f"{tgt.port} is not a TCP port"
    return None


def guestfwd_rules(b: Builder) -> list[dict[str, str]]:
    """slirp's guestfwd rules for the valid guestfwd channels (charchannelN is the chardev)."""
    rules = []
    for i, c in enumerate(b.domain.devices.channel):
        if c.target is not None and c.target.type == "guestfwd" and guestfwd_problem(c) is None:
            rules.append({"str": f"tcp:{c.target.address}:{c.target.port}-chardev:charchannel{i}"})
    return rules


def add_channels(b: Builder) -> None:
    for i, c in enumerate(b.domain.devices.channel):
        path = f"/domain/devices/channel[{i + 1}]"
        tgt = c.target
        ttype = tgt.type if tgt and tgt.type else None
        cid = f"charchannel{i}"
        if ttype == "virtio":
            name = tgt.name if tgt else None
            if c.type == "unix" and (c.src is None or not c.src.path) and name == GUEST_AGENT:
                pass  # chardev() puts the socket in the runtime directory
            if not chardev(b, c, cid, path):
                continue
            props: dict[str, Any] = {"driver": "virtserialport", "bus": _virtio_serial_bus(b), "chardev": cid,
                                     "id": b.alias(c.alias, f"channel{i}", path)}
            if c.address is not None and c.address.type == "virtio-serial":
                props["bus"] = f"virtio-serial{c.address.controller or 0}.{c.address.bus or 0}"
                if c.address.port:
                    if not c.address.port.isascii() or not c.address.port.isdigit():
                        b.error(f"{path}/address/@port", f"'{c.address.port}' is not a port number")
                        continue
                    props["nr"] = int(c.address.port)
            if name:
                props["name"] = name
            b.device(props)
        elif ttype == "guestfwd":
            if not chardev(b, c, cid, path):
                continue
            b.warn(path, "guestfwd channels work with user networking only")
            problem = guestfwd_problem(c)
            if problem is not None:
                b.error(f"{path}/{problem[0]}", problem[1])
            elif not any(i.type == "user" for i in b.domain.devices.interface):
                b.error(path, "a guestfwd channel needs a user-mode interface")
            # the forward itself is on the first user-mode netdev (net.py)
        elif ttype == "xen":
            b.error(f"{path}/target/@type", "Xen channels do not exist in QEMU guests")
        else:
            b.error(f"{path}/target/@type", "required attribute is missing" if ttype is None
                    else f"channel target '{ttype}' is not supported")
