"""``<sysinfo>``: what the guest's firmware tables say about the machine (SMBIOS), or blobs
handed to it over fw_cfg; and ``<launchSecurity>`` (memory encryption)."""

from typing import Literal

from qemud.domain.base import Element, Many, YesNo, attr, text


class Entry(Element):
    name: str | None = attr()
    file: str | None = attr()
    value: str = text("")


class EntryBlock(Element):
    entry: Many[Entry]


class SysinfoMemory(Element):
    memory_device: Many[EntryBlock]


class Sysinfo(Element):
    type: Literal["smbios", "fwcfg"] = attr(...)
    bios: EntryBlock | None = None
    system: EntryBlock | None = None
    baseBoard: Many[EntryBlock]
    chassis: EntryBlock | None = None
    processor: Many[EntryBlock]
    memory: Many[SysinfoMemory]
    oemStrings: EntryBlock | None = None
    entry: Many[Entry]  # type='fwcfg'


class Text(Element):
    value: str = text("")


class LaunchSecurity(Element):
    type: Literal["sev", "s390-pv", "sev-snp", "tdx"] = attr(...)
    kernelHashes: YesNo | None = attr()
    cbitpos: Text | None = None
    reducedPhysBits: Text | None = None
    policy: Text | None = None
    dhCert: Text | None = None
    session: Text | None = None
