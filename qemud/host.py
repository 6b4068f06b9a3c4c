"""Facts about this host that the translator depends on, read fresh at every probe (never
cached: hugepages, devices and helper binaries come and go).

The translator stays a pure function of (domain, capabilities, paths): it reads these facts from
``HostCaps.host`` and never looks at the host itself.  Tests build a :class:`HostFacts` by hand.
Each device family adds the facts it needs here, with the reader that fills them in.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class HostFacts:
    """What the host offers beyond the QEMU binary."""

    #: host NUMA node ids (/sys/devices/system/node/nodeN); (0,) where the kernel has no NUMA
    numa_nodes: tuple[int, ...] = (0,)
    #: helper programs found on this host, by role ("swtpm", "virtiofsd", ...) -> path
    helpers: dict[str, str] = field(default_factory=dict)
    #: host device nodes and directories that exist (paths, e.g. "/dev/vhost-vsock")
    present: frozenset[str] = frozenset()
    #: where secrets are kept, one file per secret (qemud.secrets); "" for the default
    secrets_dir: str = ""
    #: the x509 certificate directory for TLS network disks ("" when none is configured)
    tls_x509_dir: str = ""

    def has(self, path: str) -> bool:
        return path in self.present

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["present"] = sorted(self.present)
        d["numa_nodes"] = list(self.numa_nodes)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HostFacts:
        return cls(numa_nodes=tuple(d.get("numa_nodes", (0,))), helpers=dict(d.get("helpers", {})),
                   present=frozenset(d.get("present", ())), secrets_dir=str(d.get("secrets_dir", "")),
                   tls_x509_dir=str(d.get("tls_x509_dir", "")))

    @property
    def secrets(self) -> str:
        """The secrets directory in force."""
        if self.secrets_dir:
            return self.secrets_dir
        from qemud.secrets import default_secrets_dir
        return str(default_secrets_dir())


#: device nodes and directories whose presence decides what a guest can have
WATCHED_PATHS: tuple[str, ...] = ()

#: helper programs, by role: the first candidate that is executable wins
HELPER_CANDIDATES: dict[str, tuple[str, ...]] = {
    "qemu-img": ("/usr/bin/qemu-img", "/usr/local/bin/qemu-img"),  # transient disks' overlays
    "qemu-pr-helper": ("/usr/bin/qemu-pr-helper", "/usr/local/bin/qemu-pr-helper"),
}


def _numa_nodes() -> tuple[int, ...]:
    try:
        nodes = sorted(int(n[4:]) for n in os.listdir("/sys/devices/system/node")
                       if n.startswith("node") and n[4:].isdigit())
    except OSError:
        nodes = []
    return tuple(nodes) or (0,)


def read_host() -> HostFacts:
    """This host's facts, read now."""
    helpers = {}
    for role, candidates in HELPER_CANDIDATES.items():
        for c in candidates:
            if os.path.isfile(c) and os.access(c, os.X_OK):
                helpers[role] = c
                break
    present = frozenset(p for p in WATCHED_PATHS if os.path.exists(p))
    return HostFacts(numa_nodes=_numa_nodes(), helpers=helpers, present=present)
