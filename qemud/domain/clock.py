"""``<clock>``: the guest's real-time clock and timers."""

from typing import Literal

from qemud.domain.base import Element, Many, UInt, YesNo, attr


class Catchup(Element):
    """``<catchup threshold slew limit>``: Xen's catch-up tuning; QEMU has no such knobs."""

    threshold: UInt | None = attr()
    slew: UInt | None = attr()
    limit: UInt | None = attr()


class Timer(Element):
    name: Literal["platform", "pit", "rtc", "hpet", "tsc", "kvmclock", "hypervclock",
                  "armvtimer"] = attr(...)
    present: YesNo | None = attr()
    tickpolicy: Literal["delay", "catchup", "merge", "discard"] | None = attr()
    track: Literal["boot", "guest", "wall", "realtime"] | None = attr()
    frequency: int | None = attr()
    mode: Literal["auto", "native", "emulate", "paravirt", "smpsafe"] | None = attr()
    catchup: Catchup | None = None


class Clock(Element):
    offset: Literal["utc", "localtime", "timezone", "variable", "absolute"] = attr("utc")
    adjustment: str | None = attr()
    basis: Literal["utc", "localtime"] | None = attr()
    timezone: str | None = attr()
    start: int | None = attr()
    timer: Many[Timer]
