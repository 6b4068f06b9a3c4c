"""``<smartcard>``: a CCID card reader's card (emulated from host certificates, or passed through
a character device to a remote client)."""

from typing import Literal

from qemud.domain.base import Element, Many, attr, text
from qemud.domain.devices.address import Address, Alias
from qemud.domain.devices.chardev import CharSource, Protocol


class Certificate(Element):
    value: str = text("")


class Smartcard(Element):
    mode: Literal["host", "host-certificates", "passthrough"] = attr(...)
    type: str | None = attr()  # the character device type of mode='passthrough'
    certificate: Many[Certificate]
    database: Certificate | None = None
    source: Many[CharSource]
    protocol: Protocol | None = None
    address: Address | None = None
    alias: Alias | None = None
