"""``<features>``: hypervisor features (libvirt's "Hypervisor features" section)."""

from __future__ import annotations

from typing import Literal

from qemud.domain.base import Element, YesNo, attr, ignored


class Empty(Element):
    """A feature switched on by its presence: ``<acpi/>``."""


class State(Element):
    state: YesNo = attr(True)


class Apic(Element):
    eoi: YesNo | None = attr()


class Ioapic(Element):
    driver: Literal["qemu", "kvm"] = attr(...)


class Smm(Element):
    state: YesNo = attr(True)


class Features(Element):
    acpi: Empty | None = None
    apic: Apic | None = None
    pae: Empty | None = None
    hap: State | None = ignored("hardware-assisted paging is always used by KVM when present")
    privnet: Empty | None = ignored("a Xen-only setting")
    viridian: Empty | None = ignored("a Xen-only setting")
    vmport: State | None = None
    pmu: State | None = None
    smm: Smm | None = None
    vmcoreinfo: State | None = None
    pvspinlock: State | None = None
    ioapic: Ioapic | None = None
