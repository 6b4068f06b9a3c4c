"""Guest memory: ``<memory dumpCore>``, ``<memoryBacking>``, ``<numatune>`` and the memory devices
(``<devices><memory model=...>``)."""

import re
from typing import Literal

from pydantic import field_validator

from qemud.domain.base import Element, Many, UInt, YesNo, attr
from qemud.domain.devices.address import Address, Alias
from qemud.domain.units import Size, Unit, unit_bytes

_NODESET = re.compile(r"\^?[0-9]+(-[0-9]+)?(,\^?[0-9]+(-[0-9]+)?)*\Z")


def parse_nodeset(spec: str) -> frozenset[int]:
    """libvirt's node set syntax (that of cpusets): ``0-3,^2``.  Raises ValueError."""
    from qemud.domain.cpu import parse_cpuset
    s = spec.replace(" ", "")
    if not _NODESET.match(s):
        raise ValueError(f"'{spec}' is not a node set like 0-3,^2")
    nodes = parse_cpuset(s)
    if not nodes:
        raise ValueError(f"'{spec}' names no node at all")
    return nodes


def _nodeset(v: str | None) -> str | None:
    if v is not None:
        parse_nodeset(v)
    return v


class Flag(Element):
    """An element whose presence is its meaning (``<locked/>``)."""


class DomainMemory(Size):
    """``<memory unit='KiB' dumpCore='on'>``."""

    dumpCore: YesNo | None = attr()


class Page(Element):
    size: UInt = attr(...)
    unit: Unit = attr("KiB")
    nodeset: str | None = attr()

    @field_validator("nodeset")
    @classmethod
    def _nodes(cls, v: str | None) -> str | None:
        return _nodeset(v)

    @property
    def kib(self) -> int:
        return -(-self.size * (unit_bytes(self.unit) or 1024) // 1024)


class Hugepages(Element):
    page: Many[Page]


class BackingSource(Element):
    type: Literal["file", "anonymous", "memfd"] = attr(...)


class BackingAccess(Element):
    mode: Literal["shared", "private"] = attr(...)


class BackingAllocation(Element):
    mode: Literal["immediate", "ondemand"] | None = attr()
    threads: UInt | None = attr()


class MemoryBacking(Element):
    hugepages: Hugepages | None = None
    nosharepages: Flag | None = None
    locked: Flag | None = None
    source: BackingSource | None = None
    access: BackingAccess | None = None
    allocation: BackingAllocation | None = None
    discard: Flag | None = None


NumaMode = Literal["strict", "preferred", "interleave", "restrictive"]


class NumaTuneMemory(Element):
    mode: NumaMode = attr("strict")
    nodeset: str | None = attr()
    placement: Literal["static", "auto"] | None = attr()

    @field_validator("nodeset")
    @classmethod
    def _nodes(cls, v: str | None) -> str | None:
        return _nodeset(v)


class MemNode(Element):
    cellid: UInt = attr(...)
    mode: NumaMode = attr("strict")
    nodeset: str = attr(...)

    @field_validator("nodeset")
    @classmethod
    def _nodes(cls, v: str | None) -> str | None:
        return _nodeset(v)


class NumaTune(Element):
    # libvirt reads the first <memory>; its own tests repeat it
    memory: Many[NumaTuneMemory]
    memnode: Many[MemNode]


# ---- memory devices ------------------------------------------------------------------------

class MemSource(Element):
    pagesize: Size | None = None
    nodemask: str | None = None
    path: str | None = None
    alignsize: Size | None = None
    pmem: Flag | None = None

    @field_validator("nodemask")
    @classmethod
    def _nodes(cls, v: str | None) -> str | None:
        return _nodeset(v)


class Label(Element):
    size: Size


class MemTargetAddress(Element):
    """virtio-mem's ``<target><address base='0x...'/>``."""

    base: UInt = attr(...)


class MemTarget(Element):
    size: Size
    node: UInt | None = None
    label: Label | None = None
    readonly: Flag | None = None
    block: Size | None = None
    requested: Size | None = None
    current: Size | None = None  # output only (virsh dumpxml of a running guest)
    address: MemTargetAddress | None = None


class MemoryDevice(Element):
    model: Literal["dimm", "nvdimm", "virtio-mem", "virtio-pmem", "sgx-epc"] = attr(...)
    access: Literal["shared", "private"] | None = attr()
    discard: YesNo | None = attr()
    uuid: str | None = None  # ppc64 nvdimm only; refused by the translator
    source: MemSource | None = None
    target: MemTarget
    alias: Alias | None = None
    address: Address | None = None
