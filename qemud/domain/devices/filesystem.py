"""``<filesystem>``: a host directory shared with the guest, over virtio-9p (QEMU serves it) or
virtiofs (a virtiofsd helper process serves it, QEMU only forwards the vhost-user queues)."""

from typing import Literal

from qemud.domain.base import Element, Many, Opaque, UInt, YesNo, attr, ignored
from qemud.domain.devices.address import Address, Alias, Boot
from qemud.domain.devices.virtio import VirtioOptions


class FsDriver(VirtioOptions):
    """``<driver type= wrpolicy= queue= .../>``: the backend, and the virtio transport options."""

    type: Literal["path", "handle", "loop", "nbd", "ploop", "virtiofs", "default"] | None = attr()
    format: str | None = attr()
    wrpolicy: Literal["immediate", "default"] | None = attr()
    queue: UInt | None = attr()


class FsCache(Element):
    mode: Literal["none", "always", "auto", "default"] = attr(...)


class FsSandbox(Element):
    mode: Literal["namespace", "chroot", "default"] = attr(...)


class FsLock(Element):
    posix: YesNo | None = attr()
    flock: YesNo | None = attr()


class FsThreadPool(Element):
    size: UInt = attr(...)


class FsBinary(Element):
    """``<binary>``: how qemud runs virtiofsd for this share."""

    path: str | None = attr()
    xattr: YesNo | None = attr()
    cache: FsCache | None = None
    sandbox: FsSandbox | None = None
    lock: FsLock | None = None
    thread_pool: FsThreadPool | None = None


class FsSource(Element):
    dir: str | None = attr()
    file: str | None = attr()
    socket: str | None = attr()
    name: str | None = attr()
    pool: str | None = attr()
    volume: str | None = attr()
    usage: UInt | None = attr()
    units: str | None = attr()


class FsTarget(Element):
    dir: str = attr(...)


class IdMapEntry(Element):
    start: UInt = attr(...)
    target: UInt = attr(...)
    count: UInt = attr(...)


class IdMap(Element):
    uid: Many[IdMapEntry]
    gid: Many[IdMapEntry]


class Filesystem(Element):
    type: Literal["mount", "block", "file", "template", "ram", "bind", "volume"] = attr("mount")
    accessmode: Literal["passthrough", "mapped", "squash", "default"] | None = attr()
    model: Literal["virtio", "virtio-transitional", "virtio-non-transitional", "default"] | None = attr()
    multidevs: Literal["default", "remap", "forbid", "warn"] | None = attr()
    fmode: str | None = attr()
    dmode: str | None = attr()
    driver: FsDriver | None = None
    binary: FsBinary | None = None
    idmap: IdMap | None = None
    source: FsSource | None = None
    target: FsTarget
    readonly: Opaque | None = None
    space_hard_limit: Opaque | None = ignored("filesystem quotas apply to container drivers only")
    space_soft_limit: Opaque | None = ignored("filesystem quotas apply to container drivers only")
    boot: Boot | None = None
    alias: Alias | None = None
    address: Address | None = None
