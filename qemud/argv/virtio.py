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
