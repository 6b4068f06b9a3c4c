"""``<iommu>``: the guest's DMA remapping unit (intel-iommu, virtio-iommu, ...)."""

from typing import Literal

from qemud.domain.base import Element, UInt, YesNo, attr
from qemud.domain.devices.address import Address, Alias


class IommuDriver(Element):
    intremap: YesNo | None = attr()
    caching_mode: YesNo | None = attr()
    eim: YesNo | None = attr()
    iotlb: YesNo | None = attr()
    aw_bits: UInt | None = attr()


class Iommu(Element):
    model: Literal["intel", "smmuv3", "virtio", "amd"] = attr(...)
    driver: IommuDriver | None = None
    address: Address | None = None
    alias: Alias | None = None
