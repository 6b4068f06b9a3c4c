"""``<iommu>``: intel-iommu, amd-iommu (q35's system IOMMUs) or virtio-iommu-pci.

libvirt's rules (qemu_validate.c, domain_validate.c): the x86 IOMMUs exist on q35 only; interrupt
remapping needs the split irqchip (``<ioapic driver='qemu'/>``, which add_machine turns into
kernel_irqchip=split); extended interrupt mode (eim) needs interrupt remapping; virtio-iommu needs
ACPI (its topology is described by the VIOT table) and sits on the root bus."""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder

PATH = "/domain/devices/iommu"
#: address widths intel-iommu in QEMU 7.2 implements
INTEL_AW_BITS = (39, 48)


def add_iommu(b: Builder) -> None:
    io = b.domain.devices.iommu
    if io is None:
        return
    if io.model == "smmuv3":
        b.error(f"{PATH}/@model", "IOMMU device: 'smmuv3' exists on ARM virt machines only, not on x86")
        return
    if io.model == "virtio":
        _virtio(b)
        return
    if not b.q35:
        b.error(f"{PATH}/@model", f"IOMMU device: '{io.model}' is only supported with Q35 machines")
        return
    if io.address is not None:
        b.error(f"{PATH}/address", f"IOMMU device: '{io.model}' is part of the machine and takes no address")
        return
    dr = io.driver
    f = b.domain.features
    split = f is not None and f.ioapic is not None and f.ioapic.driver == "qemu"
    props: dict[str, Any] = {"driver": "intel-iommu" if io.model == "intel" else "amd-iommu",
                             "id": b.alias(io.alias, "iommu0", PATH)}
    if dr is not None and dr.intremap is not None:
        if dr.intremap and not split:
            b.error(f"{PATH}/driver/@intremap", "IOMMU interrupt remapping requires split I/O APIC "
                    "(<features><ioapic driver='qemu'/></features>)")
        props["intremap"] = "on" if dr.intremap else "off"
    if io.model == "intel":
        if dr is not None and dr.caching_mode is not None:
            props["caching-mode"] = dr.caching_mode
        if dr is not None and dr.eim is not None:
            if dr.eim and not dr.intremap:
                b.error(f"{PATH}/driver/@eim", "iommu eim requires interrupt remapping to be enabled (intremap='on')")
            elif dr.eim and not b.domain.kvm:
                b.error(f"{PATH}/driver/@eim", "extended interrupt mode (eim='on') needs KVM's split irqchip; "
                        "QEMU refuses it under emulation (type='qemu'): drop eim or use type='kvm'")
            props["eim"] = "on" if dr.eim else "off"
        if dr is not None and dr.aw_bits is not None:
            if dr.aw_bits not in INTEL_AW_BITS:
                b.error(f"{PATH}/driver/@aw_bits", f"intel-iommu supports address widths {INTEL_AW_BITS[0]} "
                        f"and {INTEL_AW_BITS[1]}, not {dr.aw_bits}")
            props["aw-bits"] = dr.aw_bits
    else:
        for name in ("caching_mode", "eim", "aw_bits"):
            if dr is not None and getattr(dr, name) is not None:
                b.error(f"{PATH}/driver/@{name}", f"the AMD IOMMU has no '{name}' setting (an intel one)")
    if dr is not None and dr.iotlb is not None:
        props["device-iotlb"] = dr.iotlb
    b.device(props)


def _virtio(b: Builder) -> None:
    io = b.domain.devices.iommu
    assert io is not None
    if not b.q35:
        b.error(f"{PATH}/@model", "IOMMU device: 'virtio' is only supported with Q35 and ARM Virt machines")
        return
    f = b.domain.features
    if f is None or f.acpi is None:
        b.error(f"{PATH}/@model", "IOMMU device: 'virtio' requires ACPI (<features><acpi/></features>): "
                "the guest finds it through the VIOT table")
        return
    if io.driver is not None and any(v is not None for v in io.driver.model_dump().values()):
        b.error(f"{PATH}/driver", "IOMMU device: 'virtio' has no driver settings")
        return
    addr = io.address
    if addr is not None and addr.type != "pci":
        b.error(f"{PATH}/address/@type", "IOMMU device: 'virtio' needs a PCI address")
        return
    if addr is not None and addr.slot is not None and (addr.bus or 0) != 0:
        b.error(f"{PATH}/address/@bus", "IOMMU device: 'virtio' needs a PCI address on the root bus "
                f"(bus 0): it must be an integrated device, not on bus {addr.bus}")
        return
    props: dict[str, Any] = {"driver": "virtio-iommu-pci", "id": b.alias(io.alias, "iommu0", PATH)}
    props.update(b.pci_props(addr, PATH, "virtio IOMMU"))
    b.device(props)
