"""``<seclabel>``: libvirt's security labels (SELinux, AppArmor, DAC).

qemud has no security driver: it applies no labels, and QEMU runs with qemud's own isolation
(its seccomp sandbox; its own user, see the README). The labels are read and checked as libvirt
checks them, so a file libvirt would refuse is refused here too, and then reported as a warning.
"""

from typing import Literal

from qemud.domain.base import Element, YesNo, attr


class Seclabel(Element):
    type: Literal["dynamic", "static", "none"] | None = attr()
    model: str | None = attr()
    relabel: YesNo | None = attr()
    labelskip: YesNo | None = attr()
    label: str | None = None
    imagelabel: str | None = None
    baselabel: str | None = None


def check_labels(labels: tuple[Seclabel, ...] | None) -> tuple[Seclabel, ...] | None:
    """libvirt's rules for a domain's or a device's labels: with more than one, each names its
    model, and no model twice."""
    if not labels:
        return labels
    if len(labels) > 1 and any(not s.model for s in labels):
        raise ValueError("missing security model when using multiple labels")
    seen: set[str] = set()
    for s in labels:
        if s.model:
            if s.model in seen:
                raise ValueError(f"seclabel for model {s.model} is already provided")
            seen.add(s.model)
    return labels
