"""``<os>``: how the guest boots (libvirt's "Operating system booting" section)."""

from typing import Literal

from pydantic import field_validator

from qemud.domain.devices.disk import DiskSource
from qemud.domain.base import Element, Many, UInt, YesNo, attr, child, ignored, text


class OsType(Element):
    arch: str | None = attr()
    machine: str | None = attr()
    value: Literal["hvm"] = text(...)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        if v is not None and v not in ("x86_64", "i686"):
            raise ValueError(f"'{v}' is not an architecture qemud runs (x86_64, i686)")
        return v


class Loader(Element):
    readonly: YesNo | None = attr()
    secure: YesNo | None = attr()
    type: Literal["rom", "pflash"] | None = attr()
    format: Literal["raw", "qcow2"] | None = attr()
    stateless: YesNo | None = attr()
    path: str | None = text()


class Nvram(Element):
    """``<nvram>``: the firmware's variable store: a path as text, or (libvirt 8.5+) a
    ``<source>`` of type file, block or network, like a disk's."""

    template: str | None = attr()
    templateFormat: Literal["raw", "qcow2"] | None = attr()
    format: Literal["raw", "qcow2"] | None = attr()
    type: Literal["file", "block", "network"] | None = attr()
    source: DiskSource | None = None
    path: str | None = text()

    @property
    def file(self) -> str | None:
        """The local file (or block device) holding the variables, if any."""
        if self.path:
            return self.path
        if self.source is not None and self.type in (None, "file", "block"):
            return self.source.file or self.source.dev
        return None


class Boot(Element):
    dev: Literal["hd", "cdrom", "fd", "network"] = attr(...)


class BootMenu(Element):
    enable: YesNo = attr(...)
    timeout: UInt | None = attr()


class Bios(Element):
    useserial: YesNo | None = attr()
    rebootTimeout: int | None = attr()


class Smbios(Element):
    mode: Literal["sysinfo", "host", "emulate"] = attr(...)


class Text(Element):
    value: str = text("")


class FirmwareFeature(Element):
    enabled: YesNo = attr(...)
    name: str = attr(...)


class OsFirmware(Element):
    """``<os><firmware><feature enabled='yes' name='enrolled-keys'/></firmware>``: what the
    automatically selected firmware must (not) have."""

    feature: Many[FirmwareFeature]


class AcpiTable(Element):
    type: Literal["slic", "rawset", "msdm"] = attr(...)
    value: str = text("")


class OsAcpi(Element):
    """``<os><acpi><table type='slic'>FILE</table></acpi>``: extra ACPI tables for the guest."""

    table: Many[AcpiTable]


class Os(Element):
    firmware: Literal["bios", "efi"] | None = attr()
    type: OsType
    loader: Loader | None = None
    nvram: Nvram | None = None
    kernel: Text | None = None
    initrd: Text | None = None
    cmdline: Text | None = None
    boot: Many[Boot]
    bootmenu: BootMenu | None = None
    bios: Bios | None = None
    smbios: Smbios | None = None
    acpi: OsAcpi | None = None
    firmware_features: OsFirmware | None = child("firmware")
    init: Text | None = ignored("only for container domains")
