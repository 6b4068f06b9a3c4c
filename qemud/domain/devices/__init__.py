"""``<devices>``: one module per element family, as in virt-manager's virtinst/devices."""

from __future__ import annotations

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
    lease: Many[Opaque] = ignored("lock manager leases are not used by qemud")

    @model_validator(mode="after")
    def _controller_indexes(self) -> "Devices":
        """Controllers without an index get the next free one of their type (libvirt's rule)."""
        if all(c.index >= 0 for c in self.controller):
            return self
        used: dict[str, set[int]] = {}
        for c in self.controller:
            if c.index >= 0:
                used.setdefault(c.type, set()).add(c.index)
        out = []
        for c in self.controller:
            if c.index < 0:
                taken = used.setdefault(c.type, set())
                n = 0
                while n in taken:
                    n += 1
                taken.add(n)
                c = c.model_copy(update={"index": n})
            out.append(c)
        object.__setattr__(self, "controller", tuple(out))
        return self


__all__ = ["Devices", "Disk", "Controller", "Interface", "Hostdev", "CharDev", "Input", "Graphics", "Video",
           "Sound", "Audio", "Rng", "MemBalloon", "Watchdog", "Panic", "Emulator", "Filesystem", "Tpm"]
