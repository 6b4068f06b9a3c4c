"""``<vsock>``: the guest's AF_VSOCK endpoint (vhost-vsock)."""

from typing import Literal

from qemud.domain.base import Element, UInt, YesNo, attr
from qemud.domain.devices.address import Address, Alias
from qemud.domain.devices.virtio import VirtioOptions


class Cid(Element):
    auto: YesNo | None = attr()
    address: UInt | None = attr()


class VsockDriver(VirtioOptions):
    pass


class Vsock(Element):
    model: Literal["virtio", "virtio-transitional", "virtio-non-transitional"] | None = attr()
    cid: Cid | None = None
    driver: VsockDriver | None = None
    address: Address | None = None
    alias: Alias | None = None
