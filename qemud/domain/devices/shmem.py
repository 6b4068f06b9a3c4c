"""``<shmem>``: inter-VM shared memory (ivshmem)."""

from typing import Literal

from qemud.domain.base import Element, UInt, YesNo, attr
from qemud.domain.devices.address import Address, Alias
from qemud.domain.units import Size


class ShmemModel(Element):
    type: Literal["ivshmem", "ivshmem-plain", "ivshmem-doorbell"] = attr(...)


class ShmemServer(Element):
    path: str | None = attr()


class ShmemMsi(Element):
    enabled: YesNo | None = attr()
    vectors: UInt | None = attr()
    ioeventfd: YesNo | None = attr()


class ShmemSize(Size):
    """libvirt reads a bare shmem size in bytes (memory elements default to KiB)."""

    unit: str = attr("B")


class Shmem(Element):
    name: str = attr(...)
    role: Literal["master", "peer"] | None = attr()
    model: ShmemModel | None = None
    size: ShmemSize | None = None
    server: ShmemServer | None = None
    msi: ShmemMsi | None = None
    address: Address | None = None
    alias: Alias | None = None
