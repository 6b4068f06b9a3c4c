"""``<devices>``: one module per element family, as in virt-manager's virtinst/devices."""

from pydantic import model_validator

from qemud.domain.base import Element, Many, Opaque, ignored, text
from qemud.domain.devices.chardev import CharDev
from qemud.domain.devices.controller import Controller
from qemud.domain.devices.disk import Disk
from qemud.domain.devices.hostdev import Hostdev
from qemud.domain.devices.filesystem import Filesystem
from qemud.domain.devices.interface import Interface
from qemud.domain.devices.iommu import Iommu
from qemud.domain.devices.redirdev import RedirDev, RedirFilter
from qemud.domain.devices.shmem import Shmem
from qemud.domain.devices.smartcard import Smartcard
from qemud.domain.devices.vsock import Vsock
from qemud.domain.memory import MemoryDevice
from qemud.domain.devices.misc import (Audio, Graphics, Hub, Input, MemBalloon, Panic, Rng, Sound,
                                       Video, Watchdog)
from qemud.domain.devices.tpm import Tpm


class Emulator(Element):
    path: str = text(...)


class Devices(Element):
    emulator: Emulator | None = None
    disk: Many[Disk]
    filesystem: Many[Filesystem]
    controller: Many[Controller]
    interface: Many[Interface]
    serial: Many[CharDev]
    parallel: Many[CharDev]
    console: Many[CharDev]
    channel: Many[CharDev]
    input: Many[Input]
    graphics: Many[Graphics]
    video: Many[Video]
    sound: Many[Sound]
    audio: Many[Audio]
    rng: Many[Rng]
    memballoon: MemBalloon | None = None
    watchdog: Many[Watchdog]
    panic: Many[Panic]
    hub: Many[Hub]
    iommu: Iommu | None = None
    redirdev: Many[RedirDev]
    redirfilter: RedirFilter | None = None
    smartcard: Many[Smartcard]
    shmem: Many[Shmem]
    vsock: Vsock | None = None
    hostdev: Many[Hostdev]
    tpm: Many[Tpm]
    memory: Many[MemoryDevice]
    lease: Many[Opaque] = ignored("lock manager leases are not used by qemud")

    @model_validator(mode="after")
    def _controller_indexes(self) -> "Devices":
        """Controllers without an index get the one libvirt's parser gives them."""
        from qemud.domain.devices.controller import assign_indexes
        out = assign_indexes(self.controller)
        if out is not self.controller:
            object.__setattr__(self, "controller", out)
        return self


__all__ = ["Devices", "Disk", "Controller", "Interface", "Hostdev", "CharDev", "Input", "Graphics", "Video",
           "Sound", "Audio", "Rng", "MemBalloon", "Watchdog", "Panic", "Emulator", "Filesystem", "Tpm"]
