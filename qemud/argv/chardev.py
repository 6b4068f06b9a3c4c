"""Character devices: a -chardev backend and the device the guest sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemud.argv.builder import Builder
from qemud.argv.qemuopts import js, opts
from qemud.domain.devices.chardev import CharDev

if TYPE_CHECKING:
    from qemud.domain import Domain
    from qemud.domain.devices.controller import Controller

GUEST_AGENT = "org.qemu.guest_agent.0"


def chardev(b: Builder, c: CharDev, cid: str, path: str, console: bool = False,
            spicevmc: str = "vdagent") -> bool:
    """
    b.elements[cid] = pathEmit -chardev id=cid for c; False (with an error) when it cannot be realized.

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
        rc = _reconnect(b, c, path, server)
        if rc is False:
            return False
        b.add("-chardev", "socket," + opts(("id", cid), ("path", sock), ("server", server),
                                           ("wait", False) if server else None, rc, *logfile))
    elif t == "tcp":
        if src is None or not src.service:
            b.error(f"{path}/source/@service", "a TCP character device needs a port (service)")
            return False
        server = src.mode == "bind"
        telnet = c.protocol is not None and c.protocol.type in ("telnet", "telnets")
        rc = _reconnect(b, c, path, server)
        if rc is False:
            return False
        creds = _tls_creds(b, c, cid, path, server)
        if creds is False:
            return False
        b.add("-chardev", "socket," + opts(("id", cid), ("host", src.host or "localhost"), ("port", src.service),
                                           ("telnet", True) if telnet else None, ("server", server),
                                           ("wait", False) if server else None, rc,
                                           ("tls-creds", creds) if creds else None, *logfile))
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
        # libvirt: <clipboard copypaste> -> clipboard=, <mouse mode='client'> -> mouse=on
        clip = src.clipboard.copypaste if src is not None and src.clipboard is not None else None
        mouse = src.mouse.mode == "client" if src is not None and src.mouse is not None else None
        b.add("-chardev", "qemu-vdagent," + opts(("id", cid), ("name", "vdagent"),
                                                 ("clipboard", clip) if clip is not None else None,
                                                 ("mouse", mouse) if mouse is not None else None))
    elif t == "dbus":
        if not any(g.type == "dbus" for g in b.domain.devices.graphics):
            b.error(f"{path}/@type", "a dbus character device needs <graphics type='dbus'>")
            return False
        name = src.channel if src is not None and src.channel else None
        if name is None and "/redirdev" in path:
            name = "org.qemu.usbredir"  # libvirt's channel of a D-Bus USB redirection
        if name is None:
            b.error(f"{path}/source/@channel", "a dbus character device needs the D-Bus channel name "
                    "(e.g. org.qemu.console.serial.0)")
            return False
        b.add("-chardev", "dbus," + opts(("id", cid), ("name", name)))
    elif t == "vc":
        # QEMU's vc backend works without a display too (a text console nobody looks at), as
        # libvirt realizes it; with VNC/SPICE it is the display's text console
        b.add("-chardev", "vc," + opts(("id", cid), *logfile))
    elif t == "stdio":
        # qemud starts QEMU with stdin from /dev/null and stdout into the guest's qemu.log
        b.warn(f"{path}/@type", "a stdio character device is QEMU's standard output: under qemud the "
               "guest's output goes to its qemu.log and it reads nothing (use pty or unix to talk to it)")
        b.add("-chardev", "stdio," + opts(("id", cid), *logfile))
    else:
        b.error(f"{path}/@type", f"character device type '{t}' is not supported")
        return False
    return True


def _reconnect(b: Builder, c: CharDev, path: str, server: bool) -> tuple[str, int] | None | bool:
    """QEMU's reconnect= for a <source><reconnect>: the seconds between attempts (0: never),
    False (with an error) where libvirt refuses it."""
    src = c.src
    rc = src.reconnect if src is not None else None
    if rc is None:
        return None
    rpath = f"{path}/source/reconnect"
    if server:
        b.error(rpath, "chardev reconnect is possible only for connect mode (a listening socket has nothing to reconnect to)")
        return False
    if not rc.enabled:
        if rc.timeout is not None:
            b.error(f"{rpath}/@timeout", "a timeout is meaningless with reconnect disabled")
            return False
        return ("reconnect", 0)
    if not rc.timeout:
        b.error(f"{rpath}/@timeout", "reconnect needs a timeout of at least 1 second")
        return False
    return ("reconnect", rc.timeout)


def _tls_creds(b: Builder, c: CharDev, cid: str, path: str, server: bool) -> str | None | bool:
    """The tls-creds-x509 object of a TCP chardev: with <source tls='yes'>, or by default when
    qemud.conf has [chardev] tls = true (libvirt's chardev_tls); tls='no' opts out."""
    src = c.src
    want = src.tls if src is not None else None
    tls_dir = b.caps.tls_dirs.get("chardev")
    if want is False or (want is None and tls_dir is None):
        return None
    if tls_dir is None:
        b.error(f"{path}/source/@tls", "TLS for character devices is disabled in qemud.conf (set [chardev] "
                "tls = true and tls_x509_cert_dir to a directory with ca-cert.pem and the "
                "client-/server-cert.pem and -key.pem)")
        return False
    oid = f"obj{cid}_tls0"
    # a client always verifies the server it connects to; a server asks no client certificate
    b.obj({"qom-type": "tls-creds-x509", "id": oid, "dir": tls_dir,
           "endpoint": "server" if server else "client", "verify-peer": not server})
    return oid


def _serial_ports(b: Builder) -> list[int]:
    """libvirt's serial port numbers: explicit <target port> kept, the others take the lowest free."""
    serials = b.domain.devices.serial
    used = {s.target.port for s in serials if s.target and s.target.port is not None}
    ports = []
    for s in serials:
        if s.target and s.target.port is not None:
            ports.append(s.target.port)
            continue
        n = 0
        while n in used:
            n += 1
        used.add(n)
        ports.append(n)
    return ports


def add_serials(b: Builder) -> None:
    dev = b.domain.devices
    serials = list(dev.serial)
    ports = _serial_ports(b)
    for i, s in enumerate(serials):
        path = f"/domain/devices/serial[{i + 1}]"
        port = ports[i]
        cid = f"charserial{port}"
        ttype = s.target.type if s.target and s.target.type else "isa-serial"
        model = s.target.model.name if s.target and s.target.model else None
        if ttype == "isa-debug" and model not in (None, "isa-debugcon"):
            b.error(f"{path}/target/model/@name", f"an isa-debug serial target is an isa-debugcon, not a {model}")
            continue
        if not chardev(b, s, cid, path, console=b.console_log is None and (port == 0 or i == 0)):
            continue
        sid = b.alias(s.alias, f"serial{port}", path)
        if ttype == "isa-debug":
            # the debug console QEMU offers at an I/O port (OVMF's debug log sits at 0x402)
            props: dict[str, Any] = {"driver": "isa-debugcon", "chardev": cid, "id": sid}
            if s.address is not None and s.address.type == "isa" and s.address.iobase is not None:
                props["iobase"] = s.address.iobase
            elif s.address is not None and s.address.type != "isa":
                b.error(f"{path}/address/@type", "an isa-debugcon sits on ISA; give <address type='isa' iobase=...>")
                continue
            b.device(props)
        elif ttype in ("isa-serial", "serial") and model in (None, "isa-serial"):
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
    plan = virtio_serial_plan(b.domain)
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
            props = {"driver": "virtconsole", "chardev": cid, "id": b.alias(c.alias, f"console{i}", path)}
            where = plan.ports.get(id(c))
            if where is not None:  # libvirt leaves the port of a console to QEMU (0 when free)
                props["bus"] = f"virtio-serial{where[0]}.{where[1]}"
                if _vs_port(c) is not None:
                    props["nr"] = where[2]
            b.device(props)
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


#: libvirt's port count of a virtio-serial controller without ports= (QEMU's max_ports default)
DEFAULT_VIRTIO_SERIAL_PORTS = 31


@dataclass
class VirtioSerialPlan:
    """Where libvirt puts each virtio console and channel, and the controllers it adds for them.

    libvirt (domain_addr.c): at parse, a controller is added for every index a virtio channel or
    console names (0 when it names none); complete addresses (with a port) are reserved; then
    consoles (port 0 allowed) and channels (from port 1) without a port take the next free port
    of their controller, or of the first controller with one free, or of a new controller."""

    #: controller indexes the file does not define, in the order they are added
    implicit: list[int] = field(default_factory=list)
    #: id(chardev model) -> (controller, bus, port)
    ports: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _vs_port(c: CharDev) -> int | None:
    a = c.address
    if a is None or a.type != "virtio-serial" or not a.port:
        return None
    return int(a.port) if a.port.isascii() and a.port.isdigit() else None


def virtio_serial_plan(domain: Domain) -> VirtioSerialPlan:
    """libvirt's virtio-serial controllers and port numbers for ``domain`` (pure)."""
    plan = VirtioSerialPlan()
    dev = domain.devices
    size: dict[int, int] = {c.index: (c.ports if c.ports else DEFAULT_VIRTIO_SERIAL_PORTS)
                            for c in dev.controller if c.type == "virtio-serial"}
    items: list[tuple[CharDev, str, bool]] = []
    for i, c in enumerate(dev.console):
        if c.target is not None and c.target.type == "virtio":
            items.append((c, f"/domain/devices/console[{i + 1}]", True))
    for i, c in enumerate(dev.channel):
        if c.target is not None and c.target.type == "virtio":
            items.append((c, f"/domain/devices/channel[{i + 1}]", False))
    for c, _, _ in items:
        idx = c.address.controller or 0 if c.address is not None and c.address.type == "virtio-serial" else 0
        if idx not in size:
            size[idx] = DEFAULT_VIRTIO_SERIAL_PORTS
            plan.implicit.append(idx)
    used: dict[int, set[int]] = {k: set() for k in size}
    for c, path, _ in items:
        port = _vs_port(c)
        if port is None:
            continue
        assert c.address is not None
        ctrl = c.address.controller or 0
        if port in used[ctrl]:
            plan.problems.append((f"{path}/address/@port", f"virtio-serial port {port} of controller {ctrl} is taken twice"))
        elif port >= size[ctrl]:
            plan.problems.append((f"{path}/address/@port", f"virtio-serial controller {ctrl} has ports 0-{size[ctrl] - 1}"))
        used[ctrl].add(port)
        plan.ports[id(c)] = (ctrl, c.address.bus or 0, port)
    for c, path, console in items:
        if id(c) in plan.ports:
            continue
        first = 0 if console else 1
        if c.address is not None and c.address.type == "virtio-serial":
            ctrl = c.address.controller or 0  # libvirt: port of the named controller, on bus 0
            free = [p for p in range(first, size[ctrl]) if p not in used[ctrl]]
            if not free:
                plan.problems.append((f"{path}/address", f"virtio-serial controller {ctrl} has no free port"))
                continue
            port = free[0]
        else:
            for ctrl in sorted(size):
                free = [p for p in range(first, size[ctrl]) if p not in used[ctrl]]
                if free:
                    port = free[0]
                    break
            else:
                ctrl = next(n for n in range(len(size) + 1) if n not in size)
                size[ctrl], used[ctrl] = DEFAULT_VIRTIO_SERIAL_PORTS, set()
                plan.implicit.append(ctrl)
                port = first
        used[ctrl].add(port)
        plan.ports[id(c)] = (ctrl, 0, port)
    return plan


def implicit_virtio_serial_controllers(domain: Domain) -> list[Controller]:
    """The virtio-serial controllers libvirt adds for the file's virtio consoles and channels."""
    from qemud.domain.devices.controller import Controller
    return [Controller.model_validate({"@type": "virtio-serial", "@index": str(n)})
            for n in virtio_serial_plan(domain).implicit]


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
    plan = virtio_serial_plan(b.domain)
    for where, msg in plan.problems:
        b.error(where, msg)
    for i, c in enumerate(b.domain.devices.channel):
        path = f"/domain/devices/channel[{i + 1}]"
        tgt = c.target
        ttype = tgt.type if tgt and tgt.type else None
        cid = f"charchannel{i}"
        if ttype == "virtio":
            name = tgt.name if tgt else None
            if c.address is not None and c.address.type == "virtio-serial" and c.address.port \
                    and _vs_port(c) is None:
                b.error(f"{path}/address/@port", f"'{c.address.port}' is not a port number")
                continue
            if c.address is not None and c.address.type not in ("virtio-serial",):
                b.error(f"{path}/address/@type", f"a virtio channel sits on a virtio-serial bus, not '{c.address.type}'")
                continue
            if not chardev(b, c, cid, path):
                continue
            where = plan.ports.get(id(c))
            if where is None:
                continue  # its problem is reported above
            props: dict[str, Any] = {"driver": "virtserialport", "bus": f"virtio-serial{where[0]}.{where[1]}",
                                     "chardev": cid, "id": b.alias(c.alias, f"channel{i}", path), "nr": where[2]}
            if name:
                props["name"] = name
            b.device(props)
        elif ttype == "guestfwd":
            problem = guestfwd_problem(c)
            if problem is not None:
                b.error(f"{path}/{problem[0]}", problem[1])
                continue
            if not chardev(b, c, cid, path):
                continue
            assert tgt is not None
            if any(x.type == "user" for x in b.domain.devices.interface):
                continue  # on the first user-mode NIC's netdev, where the guest reaches it (net.py)
            # libvirt gives each guestfwd channel a user-mode netdev of its own; with no NIC on
            # it no guest traffic reaches the forward, but the guest starts as libvirt's does
            b.warn(path, "no user-mode interface: the guest has no NIC that reaches this forward")
            nid = b.alias(c.alias, f"channel{i}", path)
            b.add("-netdev", js({"type": "user",
                                 "guestfwd": [{"str": f"tcp:{tgt.address}:{tgt.port}-chardev:{cid}"}], "id": nid}))
        elif ttype == "xen":
            b.error(f"{path}/target/@type", "Xen channels do not exist in QEMU guests")
        else:
            b.error(f"{path}/target/@type", "required attribute is missing" if ttype is None
                    else f"channel target '{ttype}' is not supported")
