"""Character devices: ``<serial>``, ``<console>``, ``<channel>``, ``<parallel>``."""

from typing import Literal

from pydantic import field_validator

from qemud.domain.base import Element, Many, Opaque, UInt, YesNo, attr, ignored
from qemud.domain.seclabel import Seclabel, check_labels
from qemud.domain.devices.address import Address, Alias

CHAR_TYPES = ("pty", "file", "unix", "tcp", "udp", "null", "vc", "stdio", "pipe", "dev",
              "spicevmc", "spiceport", "qemu-vdagent", "dbus", "nmdm")


class Reconnect(Element):
    enabled: YesNo = attr(...)
    timeout: UInt | None = attr()


class Clipboard(Element):
    copypaste: YesNo = attr(...)


class VdagentMouse(Element):
    mode: Literal["client", "server"] = attr(...)


class CharSource(Element):
    path: str | None = attr()
    mode: Literal["bind", "connect"] | None = attr()
    host: str | None = attr()
    service: str | None = attr()
    append: YesNo | None = attr()
    channel: str | None = attr()
    tls: YesNo | None = attr()
    seclabel: Many[Seclabel] = ignored("qemud applies no security labels of its own; qemud's own isolation applies (README: security)")

    _seclabels = field_validator("seclabel")(classmethod(lambda cls, v: check_labels(v)))
    reconnect: Reconnect | None = None
    #: qemu-vdagent channels: what the agent offers the guest
    clipboard: Clipboard | None = None
    mouse: VdagentMouse | None = None


class Protocol(Element):
    type: Literal["raw", "telnet", "telnets", "tls"] = attr(...)


class TargetModel(Element):
    name: str = attr(...)


class CharTarget(Element):
    type: str | None = attr()
    port: UInt | None = attr()
    name: str | None = attr()
    address: str | None = attr()
    state: str | None = attr()
    model: TargetModel | None = None


class Log(Element):
    file: str = attr(...)
    append: YesNo | None = attr()


class CharDev(Element):
    type: Literal[CHAR_TYPES] = attr("pty")  # type: ignore[valid-type]
    tty: str | None = attr()
    source: Many[CharSource]
    protocol: Protocol | None = None
    target: CharTarget | None = None
    log: Log | None = None
    address: Address | None = None
    alias: Alias | None = None

    @property
    def src(self) -> CharSource | None:
        """The source that matters (udp has a connect and a bind source)."""
        if not self.source:
            return None
        for s in self.source:
            if s.mode != "bind" or self.type != "udp":
                return s
        return self.source[0]
