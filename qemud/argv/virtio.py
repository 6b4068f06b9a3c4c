"""QEMU properties for libvirt's virtio driver options (see qemud.domain.devices.virtio)."""

from __future__ import annotations

from typing import Any

from qemud.domain.devices.virtio import VirtioOptions

#: libvirt attribute -> QEMU virtio device property
_PROPS = {"iommu": "iommu_platform", "ats": "ats", "packed": "packed", "page_per_vq": "page-per-vq"}


def virtio_props(driver: VirtioOptions | None) -> dict[str, Any]:
    """The properties a virtio device gets from its ``<driver>``: only those the file sets."""
    if driver is None:
        return {}
    return {qemu: getattr(driver, name) for name, qemu in _PROPS.items() if getattr(driver, name) is not None}


#: virtio devices that are modern-only (virtio 1.0, no legacy interface) whatever their bus
_MODERN_ONLY = ("virtio-mouse-pci", "virtio-keyboard-pci", "virtio-tablet-pci", "virtio-input-host-pci",
                "virtio-gpu-pci", "virtio-vga", "virtio-gpu-gl-pci", "virtio-vga-gl", "vhost-user-gpu-pci",
                "vhost-user-vga", "vhost-vsock-pci", "vhost-user-vsock-pci")


#: buses whose one slot is a PCIe port: a virtio device there is modern-only (disable-legacy=auto)
_PCIE_PORTS = ("pcie-root-port", "pcie-switch-downstream-port")


def _legacy_capable(b: Any, props: dict[str, Any]) -> bool:
    """Whether QEMU gives this virtio PCI device a legacy (virtio 0.9) interface too: its
    transitional models always, its plain ``-pci`` models unless they sit behind a PCIe port
    (QEMU's disable-legacy=auto)."""
    drv = str(props.get("driver", ""))
    if drv.endswith("-non-transitional") or drv in _MODERN_ONLY or props.get("disable-legacy") in (True, "on"):
        return False
    if drv.endswith("-transitional"):
        return True
    bus = str(props.get("bus", ""))
    model = b.pci_plan.buses.get(int(bus[4:])) if bus.startswith("pci.") and bus[4:].isdigit() else None
    return model not in _PCIE_PORTS


def add_virtio_props(b: Any, props: dict[str, Any], driver: VirtioOptions | None, path: str) -> dict[str, Any]:
    """``props`` of a virtio PCI device (with its bus already placed) plus its ``<driver>``'s
    virtio options, right after the driver name as libvirt writes them.  iommu='on' is refused
    where QEMU would refuse it: VIRTIO_F_IOMMU_PLATFORM exists for modern-only devices, and a
    device that keeps a legacy interface cannot have it ("supported by neither legacy nor
    transitional device")."""
    extra = virtio_props(driver)
    if extra.get("iommu_platform") and _legacy_capable(b, props):
        b.error(f"{path}/driver/@iommu", f"QEMU refuses iommu='on' for {props.get('driver')} here: it "
                "is a transitional virtio device (with a legacy interface), which cannot have "
                "VIRTIO_F_IOMMU_PLATFORM; use the virtio-non-transitional model, or put the device "
                "behind a pcie-root-port (q35)")
        extra.pop("iommu_platform")
    if not extra:
        return props
    out = {"driver": props["driver"], **extra}
    out.update({k: v for k, v in props.items() if k != "driver"})
    return out


def refuse_virtio_options(b: Any, driver: VirtioOptions | None, path: str, what: str) -> None:
    """libvirt's rule: the virtio options exist on virtio devices only."""
    for name, value in virtio_props(driver).items():
        attr = next(k for k, v in _PROPS.items() if v == name)
        b.error(f"{path}/driver/@{attr}", f"is a virtio option; {what} is not a virtio device")
