"""``<redirdev bus='usb'>``: usb-redir devices fed by a character device (SPICE's usbredir
channel, or a TCP/unix socket to a usbredir server), and the ``<redirfilter>`` they all share."""

from __future__ import annotations

import re
from typing import Any

from qemud.argv.builder import Builder
from qemud.argv.chardev import chardev
from qemud.argv.qemuopts import opts
from qemud.domain.devices.chardev import CharDev
from qemud.domain.devices.redirdev import UsbDev

_HEX = re.compile(r"0[xX][0-9a-fA-F]+\Z")


def _field(v: str | None, width: int, limit: int, what: str) -> str:
    """One filter field as libvirt writes it: -1 for any, else 0x-hex of fixed width."""
    if v is None or v.strip() == "-1":
        return "-1"
    s = v.strip()
    if not _HEX.match(s) or int(s, 16) > limit:
        raise ValueError(f"'{v}' is not a USB {what} (-1 or hexadecimal 0x0..0x{limit:X})")
    return f"0x{int(s, 16):0{width}X}"


def _version(v: str | None) -> str:
    """libvirt reads "major.minor" as BCD: "1.10" -> 0x0110, "9.4" -> 0x0940."""
    if v is None or v.strip() == "-1":
        return "-1"
    m = re.fullmatch(r"([0-9a-fA-F]{1,2})\.([0-9a-fA-F]{1,2})", v.strip())
    if m is None:
        raise ValueError(f"'{v}' is not a USB device version (major.minor, or -1)")
    return f"0x{int(m.group(1), 16):02X}{int(m.group(2).ljust(2, '0'), 16):02X}"


def filter_rule(u: UsbDev) -> str:
    return ":".join([_field(u.class_, 2, 0xFF, "class"), _field(u.vendor, 4, 0xFFFF, "vendor id"),
                     _field(u.product, 4, 0xFFFF, "product id"), _version(u.version),
                     "1" if u.allow else "0"])


def redir_filter(b: Builder) -> str | None:
    """usb-redir's filter property (rules joined by '|'), None without <redirfilter>."""
    rf = b.domain.devices.redirfilter
    if rf is None or not rf.usbdev:
        return None
    rules = []
    for i, u in enumerate(rf.usbdev):
        try:
            rules.append(filter_rule(u))
        except ValueError as exc:
            b.error(f"/domain/devices/redirfilter/usbdev[{i + 1}]", str(exc))
    return "|".join(rules)


def add_redirdevs(b: Builder) -> None:
    dev = b.domain.devices
    if dev.redirfilter is not None and not dev.redirdev:
        b.warn("/domain/devices/redirfilter", "a USB redirection filter without <redirdev> does nothing")
    flt = redir_filter(b) if dev.redirdev else None
    for i, r in enumerate(dev.redirdev):
        path = f"/domain/devices/redirdev[{i + 1}]"
        if b.usb_bus is None:
            b.error(f"{path}/@bus", "USB redirection needs a USB controller")
            continue
        if not b.has_device("usb-redir", path, "USB redirection"):
            continue
        cid = f"charredir{i}"
        if r.type == "dbus":  # the D-Bus display's usbredir channel
            if not any(g.type == "dbus" for g in dev.graphics):
                b.error(f"{path}/@type", "a dbus redirdev needs <graphics type='dbus'>")
                continue
            b.add("-chardev", "dbus," + opts(("id", cid), ("name", "org.qemu.usbredir")))
        elif not _chardev(b, r, cid, path):
            continue
        props: dict[str, Any] = {"driver": "usb-redir", "chardev": cid, "id": b.alias(r.alias, f"redir{i}", path)}
        if flt:
            props["filter"] = flt
        if r.boot is not None:
            props["bootindex"] = r.boot.order
        props.update(usb_port(b, r.address, path))
        b.device(props)


def _chardev(b: Builder, r: Any, cid: str, path: str) -> bool:
    """The redirdev's character device, built by the shared chardev code (usbredir channel)."""
    cd = CharDev.model_validate({"@type": r.type,
                                 "source": [s.model_dump(by_alias=True, exclude_none=True) for s in r.source],
                                 **({"protocol": r.protocol.model_dump(by_alias=True)} if r.protocol else {})})
    return chardev(b, cd, cid, path, spicevmc="usbredir")


def usb_port(b: Builder, address: Any, path: str) -> dict[str, Any]:
    """bus/port of a USB device: its <address type='usb' port=...>, or QEMU's next free port."""
    props: dict[str, Any] = {"bus": b.usb_bus}
    if address is not None:
        if address.type != "usb":
            b.error(f"{path}/address/@type", f"a USB device needs a USB address, not '{address.type}'")
        elif address.port:
            props["port"] = address.port
    return props
