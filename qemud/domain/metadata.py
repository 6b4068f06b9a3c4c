"""``<metadata>``: kept as the file has it; the qemud namespace in it carries qemud's own
per-domain settings, so the file stays a valid libvirt domain::

    <metadata>
      <qemud:settings xmlns:qemud="http://qemud.org/xmlns/domain/1.0">
        <qemud:autostart>yes</qemud:autostart>
        <qemud:restart policy="on-failure" max-retries="5" backoff="1" max-backoff="60"/>
        <qemud:shutdown timeout="120"/>
      </qemud:settings>
    </metadata>
"""

from typing import Literal

from pydantic import ConfigDict

from qemud.domain.base import Element, UInt, YesNo, attr, child, text


class Autostart(Element):
    value: YesNo = text(...)


class Restart(Element):
    #: always: whenever QEMU ends without being asked to; on-failure: not after a clean guest
    #: poweroff handled by on_poweroff; never: a dead QEMU stays crashed.
    policy: Literal["always", "on-failure", "never"] = attr("always")
    max_retries: UInt = attr(5, name="max-retries")
    backoff: UInt = attr(1)
    max_backoff: UInt = attr(60, name="max-backoff")


class Shutdown(Element):
    timeout: UInt = attr(120)


class Settings(Element):
    autostart: Autostart | None = child("qemud:autostart")
    restart: Restart | None = child("qemud:restart")
    shutdown: Shutdown | None = child("qemud:shutdown")


class Metadata(Element):
    """Everything in <metadata> is kept; only qemud's own element is read."""

    model_config = ConfigDict(extra="allow")

    qemud: Settings | None = child("qemud:settings")
