"""``<cputune>``, ``<blkiotune>`` and ``<memtune>``: what the host gives the guest's QEMU process.

QEMU knows nothing of these; qemud applies them itself once QEMU runs (``qemud.tuning``): vCPU,
emulator and I/O thread affinity and scheduling through the kernel's thread calls, shares, quotas,
I/O weights and memory limits through a cgroup of the guest's own.
"""

from typing import Literal

from pydantic import field_validator, model_validator

from qemud.domain.base import Element, Many, Opaque, UInt, attr, ignored, text
from qemud.domain.cpu import parse_cpuset
from qemud.domain.units import Size

#: cgroup v1 cpu.cfs_period_us / v2 cpu.max limits (microseconds), as libvirt checks them
PERIOD_MIN, PERIOD_MAX = 1000, 1000000
QUOTA_MIN, QUOTA_MAX = 1000, 17592186044415


class CpuSet(Element):
    """An element whose ``cpuset`` attribute names host CPUs."""

    cpuset: str = attr(...)

    @field_validator("cpuset")
    @classmethod
    def _cpuset(cls, v: str) -> str:
        if not parse_cpuset(v):
            raise ValueError(f"'{v}' names no CPU")
        return v

    @property
    def cpus(self) -> frozenset[int]:
        return parse_cpuset(self.cpuset)


class VcpuPin(CpuSet):
    vcpu: UInt = attr(...)


class IothreadPin(CpuSet):
    iothread: UInt = attr(...)


class EmulatorPin(CpuSet):
    pass


class Sched(Element):
    """``<vcpusched>``, ``<iothreadsched>``, ``<emulatorsched>``: the kernel's scheduling policy."""

    scheduler: Literal["batch", "idle", "fifo", "rr", "other"] = attr(...)
    priority: int | None = attr()

    @model_validator(mode="after")
    def _priority(self) -> "Sched":
        if self.scheduler in ("fifo", "rr"):
            if self.priority is None:
                raise ValueError(f"scheduler '{self.scheduler}' needs a priority (1-99)")
            if not 1 <= self.priority <= 99:
                raise ValueError(f"priority {self.priority} is outside 1-99 for scheduler '{self.scheduler}'")
        return self


class VcpuSched(Sched):
    vcpus: str | None = attr()

    @field_validator("vcpus")
    @classmethod
    def _ids(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpuset(v)
        return v


class IothreadSched(Sched):
    iothreads: str | None = attr()

    @field_validator("iothreads")
    @classmethod
    def _ids(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpuset(v)
        return v


class Number(Element):
    value: int = text(...)

    @field_validator("value", mode="before")
    @classmethod
    def _int(cls, v: object) -> object:
        s = str(v).strip()
        if not (s.lstrip("-").isascii() and s.lstrip("-").isdigit()):
            raise ValueError(f"'{v}' is not an integer")
        return int(s)


class CpuTune(Element):
    shares: Number | None = None
    period: Number | None = None
    quota: Number | None = None
    global_period: Number | None = None
    global_quota: Number | None = None
    emulator_period: Number | None = None
    emulator_quota: Number | None = None
    iothread_period: Number | None = None
    iothread_quota: Number | None = None
    vcpupin: Many[VcpuPin]
    emulatorpin: EmulatorPin | None = None
    iothreadpin: Many[IothreadPin]
    vcpusched: Many[VcpuSched]
    iothreadsched: Many[IothreadSched]
    emulatorsched: Sched | None = None
    cachetune: Many[Opaque] = ignored("cache allocation (resctrl) is not applied by qemud")
    memorytune: Many[Opaque] = ignored("memory bandwidth allocation (resctrl) is not applied by qemud")

    @model_validator(mode="after")
    def _check(self) -> "CpuTune":
        if self.shares is not None and not 0 <= self.shares.value <= 262144:
            raise ValueError(f"shares {self.shares.value} is outside 0-262144")
        for name in ("period", "global_period", "emulator_period", "iothread_period"):
            v = getattr(self, name)
            if v is not None and v.value != 0 and not PERIOD_MIN <= v.value <= PERIOD_MAX:
                raise ValueError(f"<{name}> {v.value} is outside {PERIOD_MIN}-{PERIOD_MAX} microseconds")
        for name in ("quota", "global_quota", "emulator_quota", "iothread_quota"):
            v = getattr(self, name)
            if v is not None and v.value not in (0, -1) and not QUOTA_MIN <= v.value <= QUOTA_MAX:
                raise ValueError(f"<{name}> {v.value} is outside {QUOTA_MIN}-{QUOTA_MAX} microseconds (or -1: no limit)")
        seen: set[int] = set()
        for p in self.vcpupin:
            if p.vcpu in seen:
                raise ValueError(f"vCPU {p.vcpu} is pinned twice")
            seen.add(p.vcpu)
        seen = set()
        for p in self.iothreadpin:
            if p.iothread in seen:
                raise ValueError(f"I/O thread {p.iothread} is pinned twice")
            seen.add(p.iothread)
        _no_overlap([(s.vcpus, "vcpus") for s in self.vcpusched], "vcpusched")
        _no_overlap([(s.iothreads, "iothreads") for s in self.iothreadsched], "iothreadsched")
        return self


def _no_overlap(sets: list[tuple[str | None, str]], tag: str) -> None:
    """libvirt's rule: two <vcpusched> (or <iothreadsched>) elements may not name one thread."""
    taken: set[int] = set()
    for spec, attrname in sets:
        ids = parse_cpuset(spec) if spec else frozenset()
        if ids & taken:
            raise ValueError(f"'{tag}' attributes '{attrname}' must not overlap")
        taken |= ids


class BlkioDevice(Element):
    path: str
    weight: Number | None = None
    read_iops_sec: Number | None = None
    write_iops_sec: Number | None = None
    read_bytes_sec: Number | None = None
    write_bytes_sec: Number | None = None


class BlkioTune(Element):
    weight: Number | None = None
    device: Many[BlkioDevice]

    @model_validator(mode="after")
    def _check(self) -> "BlkioTune":
        for w in [self.weight] + [d.weight for d in self.device]:
            if w is not None and not (w.value == 0 or 100 <= w.value <= 1000):
                raise ValueError(f"I/O weight {w.value} is outside 100-1000")
        return self


class MemTune(Element):
    hard_limit: Size | None = None
    soft_limit: Size | None = None
    swap_hard_limit: Size | None = None
    min_guarantee: Size | None = None

    @model_validator(mode="after")
    def _check(self) -> "MemTune":
        if (self.hard_limit is not None and self.swap_hard_limit is not None
                and self.swap_hard_limit.bytes < self.hard_limit.bytes):
            raise ValueError("swap_hard_limit must be at least hard_limit (it counts memory plus swap)")
        return self


__all__ = ["CpuTune", "BlkioTune", "MemTune", "VcpuPin", "IothreadPin", "EmulatorPin", "Sched"]
