"""Tap devices opened by qemud (root) and handed to an unprivileged QEMU, as libvirt does.

QEMU running as its own user may not open ``/dev/net/tun`` nor attach a tap it does not own
(that takes CAP_NET_ADMIN). So for ``<interface type='ethernet'>`` qemud opens the tap itself
(creating it when it does not exist: it then lives as long as QEMU holds it, as libvirt's
``vnetN`` do) and QEMU gets the open file descriptors (``fd=``, ``fds=`` for multiqueue); for
``type='bridge'``/``'network'`` it makes a new tap and adds it to the bridge, the work
qemu-bridge-helper does for a root QEMU. The
translator stays pure: it writes ``ifname=``; the launcher swaps it for descriptors
(:func:`pass_taps`), as it does for the QMP socket.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct

from qemud.errors import HostError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


def open_tap(ifname: str, queues: int = 1) -> tuple[str, list[int]]:
    """Open (create if missing) the tap ``ifname`` ("" lets the kernel name it), one descriptor
    per queue; the name it got and the descriptors."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    name = ifname
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            res = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            name = res[:IFNAMSIZ].rstrip(b"\0").decode()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise HostError(f"cannot open the tap device {ifname or '(new)'}: {exc.strerror or exc}") from exc
    return name, fds


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFINDEX = 0x8933
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1


def _ifreq(name: str, value: int, fmt: str) -> bytes:
    return struct.pack(f"16s{fmt}", name.encode(), value).ljust(40, b"\0")


def attach_to_bridge(tap: str, bridge: str) -> None:
    """Make ``tap`` a port of ``bridge`` and bring it up: what qemu-bridge-helper does for a root
    QEMU, and what an unprivileged QEMU can no longer have done (Debian's helper is not setuid,
    and QEMU's -sandbox sets no_new_privs before running it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            index = struct.unpack_from("16si", fcntl.ioctl(s, SIOCGIFINDEX, _ifreq(tap, 0, "i")))[1]
            fcntl.ioctl(s, SIOCBRADDIF, _ifreq(bridge, index, "i"))
        except OSError as exc:
            raise HostError(f"cannot add the tap device {tap} to the bridge {bridge}: {exc.strerror or exc}") from exc
        try:
            flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(tap, 0, "H")))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(tap, flags | IFF_UP, "H"))
        except OSError as exc:
            raise HostError(f"cannot bring the tap device {tap} up: {exc.strerror or exc}") from exc


def pass_taps(argv: list[str]) -> tuple[list[str], list[int]]:
    """``argv`` with each tap netdev's ``ifname`` replaced by descriptors qemud opened, and those
    descriptors (to pass to QEMU, then close). Raises HostError naming the tap that failed."""
    out = list(argv)
    fds: list[int] = []
    try:
        for i, a in enumerate(out[:-1]):
            if a != "-netdev" or not out[i + 1].startswith("{"):
                continue
            nd = json.loads(out[i + 1])
            bridge = None
            if nd.get("type") == "bridge":  # a new tap, on the bridge, as qemu-bridge-helper makes it
                bridge = str(nd.pop("br", ""))
                nd.pop("helper", None)
                nd["type"] = "tap"
            elif nd.get("type") != "tap" or "fd" in nd or "fds" in nd:
                continue
            queues = int(nd.pop("queues", 1) or 1)
            name, got = open_tap(str(nd.pop("ifname", "")), queues)
            fds += got
            if bridge is not None:
                attach_to_bridge(name, bridge)
            for k in ("script", "downscript"):
                nd.pop(k, None)
            if queues > 1:
                nd["fds"] = ":".join(map(str, got))
            else:
                nd["fd"] = str(got[0])
            out[i + 1] = json.dumps(nd, separators=(",", ":"))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return out, fds


__all__ = ["attach_to_bridge", "open_tap", "pass_taps"]
