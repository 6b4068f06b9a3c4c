"""Sizes with libvirt's units (``<memory unit='GiB'>4</memory>``)."""

from typing import Annotated

from pydantic import AfterValidator, field_validator

from qemud.domain.base import Element, attr, text

_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def unit_bytes(unit: str) -> int | None:
    """Bytes per ``unit`` as libvirt's virScaleInteger reads it (case-insensitive): ``b`` and
    ``bytes`` are 1, a bare letter or ``<letter>iB`` a power of 1024, ``<letter>B`` of 1000."""
    u = unit.lower()
    if u in ("b", "bytes"):
        return 1
    if not u or u[0] not in _POWERS:
        return None
    rest = u[1:]
    if rest in ("", "ib"):
        return 1024 ** _POWERS[u[0]]
    if rest == "b":
        return 1000 ** _POWERS[u[0]]
    return None


#: Nothing qemud can start has more memory than this (QEMU's own limit is lower on most hosts).
MAX_BYTES = 1 << 52


def _unit(v: str) -> str:
    if unit_bytes(v) is None:
        raise ValueError(f"'{v}' is not a unit libvirt knows (b, KiB, MiB, GiB, TiB, KB, MB, GB, ...)")
    return v


#: A libvirt size unit attribute.
Unit = Annotated[str, AfterValidator(_unit)]


class Size(Element):
    """An amount of memory: ``<memory unit='MiB'>512</memory>``; default unit KiB."""

    unit: Unit = attr("KiB")
    value: int = text(...)

    @field_validator("value", mode="before")
    @classmethod
    def _value(cls, v: object) -> object:
        s = str(v).strip()
        if not (s.isascii() and s.isdigit()):
            raise ValueError(f"'{v}' is not a non-negative integer")
        return int(s)

    @property
    def bytes(self) -> int:
        return self.value * (unit_bytes(self.unit) or 1024)

    @property
    def kib(self) -> int:
        """Rounded up to whole KiB, as libvirt stores it."""
        return -(-self.bytes // 1024)

    @property
    def mib(self) -> int:
        """Rounded up to whole MiB, as libvirt aligns guest memory for QEMU's ``-m``."""
        return -(-self.kib // 1024)


def size_in_range(size: Size | None, what: str) -> str | None:
    """A message when a size is beyond anything QEMU can be given, else None."""
    if size is not None and size.bytes > MAX_BYTES:
        return f"{what} of {size.value} {size.unit} is larger than any host qemud can run"
    return None
