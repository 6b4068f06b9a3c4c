"""``<redirdev>`` (a USB device of the client's, forwarded over a channel) and ``<redirfilter>``."""

from typing import Literal

from qemud.domain.base import Element, Many, YesNo, attr
from qemud.domain.devices.address import Address, Alias, Boot
from qemud.domain.devices.chardev import CHAR_TYPES, CharSource, Protocol


class RedirDev(Element):
    bus: Literal["usb"] = attr(...)
    type: Literal[CHAR_TYPES] = attr(...)  # type: ignore[valid-type]
    source: Many[CharSource]
    protocol: Protocol | None = None
    boot: Boot | None = None
    address: Address | None = None
    alias: Alias | None = None


class UsbDev(Element):
    # libvirt writes -1 for "any"; kept as text, checked and formatted by the translator
    class_: str | None = attr(name="class")
    vendor: str | None = attr()
    product: str | None = attr()
    version: str | None = attr()
    allow: YesNo = attr(...)


class RedirFilter(Element):
    usbdev: Many[UsbDev]
