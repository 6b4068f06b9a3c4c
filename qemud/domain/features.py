"""``<features>``: hypervisor features (libvirt's "Hypervisor features" section)."""

from typing import Literal

from pydantic import ValidationInfo, field_validator

from qemud.domain.base import Element, Opaque, UInt, YesNo, attr, child, ignored, text
from qemud.domain.units import Unit, unit_bytes


class Empty(Element):
    """A feature switched on by its presence: ``<acpi/>``."""


class State(Element):
    state: YesNo = attr(True)


class Apic(Element):
    eoi: YesNo | None = attr()


class Ioapic(Element):
    driver: Literal["qemu", "kvm"] = attr(...)


class Tseg(Element):
    """``<tseg unit='MiB'>48</tseg>``: the SMRAM size q35's MCH reserves (default unit MiB)."""

    unit: Unit = attr("MiB")
    value: UInt = text(...)

    @property
    def bytes(self) -> int:
        return self.value * (unit_bytes(self.unit) or 1024 * 1024)


class Smm(Element):
    state: YesNo = attr(True)
    tseg: Tseg | None = None


# ---- <hyperv> ---------------------------------------------------------------------------------

class Spinlocks(State):
    retries: UInt | None = attr()


class VendorId(State):
    value: str | None = attr()


class Stimer(State):
    direct: State | None = None


class Tlbflush(State):
    direct: State | None = None
    extended: State | None = None


class Hyperv(Element):
    """Hyper-V enlightenments: each a CPU property ``hv-<name>`` (libvirt's mapping)."""

    mode: Literal["custom", "passthrough"] = attr("custom")
    relaxed: State | None = None
    vapic: State | None = None
    spinlocks: Spinlocks | None = None
    vpindex: State | None = None
    runtime: State | None = None
    synic: State | None = None
    stimer: Stimer | None = None
    reset: State | None = None
    vendor_id: VendorId | None = None
    frequencies: State | None = None
    reenlightenment: State | None = None
    tlbflush: Tlbflush | None = None
    ipi: State | None = None
    evmcs: State | None = None
    avic: State | None = None
    emsr_bitmap: State | None = None
    xmm_input: State | None = None


# ---- <kvm> ------------------------------------------------------------------------------------

class DirtyRing(State):
    size: UInt | None = attr()


class Kvm(Element):
    hidden: State | None = None
    hint_dedicated: State | None = child("hint-dedicated")
    poll_control: State | None = child("poll-control")
    pv_ipi: State | None = child("pv-ipi")
    dirty_ring: DirtyRing | None = child("dirty-ring")


# ---- <tcg> ------------------------------------------------------------------------------------

class TbCache(Element):
    """``<tb-cache unit='MiB'>128</tb-cache>``: TCG's translation cache (default unit KiB)."""

    unit: Unit = attr("KiB")
    value: UInt = text(...)

    @property
    def bytes(self) -> int:
        return self.value * (unit_bytes(self.unit) or 1024 * 1024)


class Tcg(Element):
    tb_cache: TbCache | None = child("tb-cache")


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
    hyperv: Hyperv | None = None
    kvm: Kvm | None = None
    tcg: Tcg | None = None
    ps2: State | None = None
    # features of other architectures or hypervisors: named, with the reason, instead of a
    # bare "not supported"
    hpt: Opaque | None = None
    htm: Opaque | None = None
    nested_hv: Opaque | None = child("nested-hv")
    ccf_assist: Opaque | None = child("ccf-assist")
    cfpc: Opaque | None = None
    sbbc: Opaque | None = None
    ibs: Opaque | None = None
    gic: Opaque | None = None
    ras: Opaque | None = None
    async_teardown: Opaque | None = child("async-teardown")
    xen: Opaque | None = None
    msrs: Opaque | None = None

    @field_validator("hpt", "htm", "nested_hv", "ccf_assist", "cfpc", "sbbc", "ibs", "gic", "ras",
                     "async_teardown", "xen", "msrs")
    @classmethod
    def _foreign(cls, v: Opaque | None, info: ValidationInfo) -> Opaque | None:
        if v is not None:
            raise ValueError(_FOREIGN[info.field_name or ""])
        return v


_PPC = "a POWER (pSeries) feature; qemud runs x86 guests"
_FOREIGN = {
    "hpt": _PPC, "htm": _PPC, "nested_hv": _PPC, "ccf_assist": _PPC, "cfpc": _PPC, "sbbc": _PPC,
    "ibs": _PPC,
    "gic": "the ARM interrupt controller; qemud runs x86 guests",
    "ras": "an ARM feature; qemud runs x86 guests",
    "async_teardown": "an s390 feature; qemud runs x86 guests",
    "xen": "a Xen passthrough setting; qemud runs QEMU guests",
    "msrs": "ignoring unknown MSRs is a KVM module setting (kvm.ignore_msrs) of the host, not "
            "something qemud sets per guest",
}
