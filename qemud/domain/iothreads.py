"""``<iothreadids>`` and ``<defaultiothread>``: the guest's I/O threads and their pools."""

from qemud.domain.base import Element, Many, UInt, attr


class IoThreadPoll(Element):
    """``<poll max grow shrink>``: QEMU's adaptive polling of an iothread."""

    max: UInt | None = attr()
    grow: UInt | None = attr()
    shrink: UInt | None = attr()


class IoThreadId(Element):
    id: UInt = attr(...)
    thread_pool_min: UInt | None = attr()
    thread_pool_max: UInt | None = attr()
    poll: IoThreadPoll | None = None


class IoThreadIds(Element):
    iothread: Many[IoThreadId]


class DefaultIoThread(Element):
    """The main loop's worker pool (QEMU's ``main-loop`` object)."""

    thread_pool_min: UInt | None = attr()
    thread_pool_max: UInt | None = attr()
