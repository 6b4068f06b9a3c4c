"""``<vcpu>`` and ``<cpu>``: how many virtual CPUs, and what they look like."""

import re
from typing import Literal

from pydantic import field_validator

from qemud.domain.base import Element, Many, UInt, YesNo, attr, ignored, text
from qemud.domain.units import Unit

#: The most vCPUs QEMU 7.2's x86 machines take (q35 with x2apic: 288; pc: 255).
MAX_VCPUS = 288

_CPUSET = re.compile(r"\^?[0-9]+(-[0-9]+)?(,\^?[0-9]+(-[0-9]+)?)*\Z")


def parse_cpuset(spec: str) -> frozenset[int]:
    """libvirt's cpuset syntax: ``1-4,^3,6``."""
    spec = spec.replace(" ", "")
    if not _CPUSET.match(spec):
        raise ValueError(f"'{spec}' is not a CPU set like 0-3,^2,6")
    include: set[int] = set()
    exclude: set[int] = set()
    for part in spec.split(","):
        target = exclude if part.startswith("^") else include
        part = part.lstrip("^")
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if b < a:
            raise ValueError(f"'{part}' is an empty CPU range")
        if b > 65535:
            raise ValueError(f"CPU {b} is beyond any host")
        target.update(range(a, b + 1))
    return frozenset(include - exclude)


class Vcpu(Element):
    placement: Literal["static", "auto"] | None = attr()
    cpuset: str | None = attr()
    current: UInt | None = attr()
    count: UInt = text(...)

    @field_validator("cpuset")
    @classmethod
    def _cpuset(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpuset(v)
        return v

    @property
    def cpus(self) -> frozenset[int] | None:
        return parse_cpuset(self.cpuset) if self.cpuset else None


class VcpuState(Element):
    """``<vcpus><vcpu id='1' enabled='no' hotpluggable='yes' order='2'/>``: one vCPU's state."""

    id: UInt = attr(...)
    enabled: YesNo = attr(...)
    hotpluggable: YesNo | None = attr()
    order: UInt | None = attr()


class Vcpus(Element):
    vcpu: Many[VcpuState]


class CpuModel(Element):
    fallback: Literal["allow", "forbid"] | None = attr()
    vendor_id: str | None = attr()
    name: str | None = text()


class Topology(Element):
    sockets: UInt = attr(...)
    dies: UInt = attr(1)
    clusters: UInt = attr(1)
    cores: UInt = attr(...)
    threads: UInt = attr(...)


class CpuFeature(Element):
    policy: Literal["force", "require", "optional", "disable", "forbid"] = attr("require")
    name: str = attr(...)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"'{v}' is not a CPU feature name")
        return v


class CpuCache(Element):
    level: UInt | None = attr()
    mode: Literal["emulate", "passthrough", "disable"] = attr(...)


class MaxPhysAddr(Element):
    mode: Literal["passthrough", "emulate"] = attr(...)
    bits: UInt | None = attr()
    limit: UInt | None = attr()


class Sibling(Element):
    id: UInt = attr(...)
    value: UInt = attr(...)


class Distances(Element):
    sibling: Many[Sibling]


class CacheSize(Element):
    value: UInt = attr(...)
    unit: Unit = attr("B")


class CellCache(Element):
    """HMAT memory-side cache of a NUMA node: ``<cache level associativity policy>``."""

    level: UInt = attr(...)
    associativity: Literal["none", "direct", "full"] = attr(...)
    policy: Literal["none", "writeback", "writethrough"] = attr(...)
    size: CacheSize
    line: CacheSize


class Cell(Element):
    """A guest NUMA node: ``<cell id='0' cpus='0-1' memory='512' unit='MiB'/>``."""

    id: UInt | None = attr()
    cpus: str | None = attr()
    memory: UInt = attr(...)
    unit: Unit = attr("KiB")
    memAccess: Literal["shared", "private"] | None = attr()
    discard: YesNo | None = attr()
    distances: Distances | None = None
    cache: Many[CellCache]

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpuset(v)
        return v

    @property
    def mib(self) -> int:
        """Rounded up to whole MiB, as libvirt aligns NUMA cells."""
        from qemud.domain.units import unit_bytes
        b = self.memory * (unit_bytes(self.unit) or 1024)
        return -(-b // (1024 * 1024))


class Interconnect(Element):
    """One HMAT figure: ``<latency initiator target [cache] type value>`` or ``<bandwidth ... unit>``."""

    initiator: UInt = attr(...)
    target: UInt = attr(...)
    cache: UInt | None = attr()
    type: Literal["access", "read", "write"] = attr(...)
    value: UInt = attr(...)
    unit: Unit | None = attr()


class Interconnects(Element):
    latency: Many[Interconnect]
    bandwidth: Many[Interconnect]


class Numa(Element):
    cell: Many[Cell]
    interconnects: Interconnects | None = None


class Cpu(Element):
    mode: Literal["custom", "host-model", "host-passthrough", "maximum"] = attr("custom")
    match: Literal["minimum", "exact", "strict"] | None = attr()
    check: Literal["none", "partial", "full"] | None = attr()
    migratable: YesNo | None = attr()
    model: CpuModel | None = None
    vendor: str | None = ignored("the vendor is that of the CPU model")
    topology: Topology | None = None
    feature: Many[CpuFeature]
    cache: CpuCache | None = None
    maxphysaddr: MaxPhysAddr | None = None
    numa: Numa | None = None
