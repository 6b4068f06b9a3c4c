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
    #: online host CPUs (/sys/devices/system/cpu/online)
    cpus: frozenset[int] = frozenset({0})
    #: where qemud can make cgroups for guests: "v2", "v1" or "" (none; cgroup_reason says why)
    cgroup: str = ""
    cgroup_reason: str = "cgroups were not looked at"
    #: controller ("cpu", "io", "memory"; v1: "blkio" too) -> the directory qemud's guest
    #: cgroups go under (v2: one directory for all)
    cgroup_roots: dict[str, str] = field(default_factory=dict)

    def has(self, path: str) -> bool:
        return path in self.present

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["present"] = sorted(self.present)
        d["numa_nodes"] = list(self.numa_nodes)
        d["cpus"] = sorted(self.cpus)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HostFacts:
        return cls(numa_nodes=tuple(d.get("numa_nodes", (0,))), helpers=dict(d.get("helpers", {})),
                   present=frozenset(d.get("present", ())), cpus=frozenset(d.get("cpus", (0,))),
                   cgroup=d.get("cgroup", ""), cgroup_reason=d.get("cgroup_reason", "cgroups were not looked at"),
                   cgroup_roots=dict(d.get("cgroup_roots", {})))


#: device nodes and directories whose presence decides what a guest can have
WATCHED_PATHS: tuple[str, ...] = ("/dev/vhost-vsock", "/dev/sev", "/etc/pki/nssdb")
#: patterns of device nodes whose presence is read the same way (evdev inputs)
WATCHED_GLOBS: tuple[str, ...] = ("/dev/input/event*",)

#: helper programs, by role: the first candidate that is executable wins
HELPER_CANDIDATES: dict[str, tuple[str, ...]] = {}


def _numa_nodes() -> tuple[int, ...]:
    try:
        nodes = sorted(int(n[4:]) for n in os.listdir("/sys/devices/system/node")
                       if n.startswith("node") and n[4:].isdigit())
    except OSError:
        nodes = []
    return tuple(nodes) or (0,)


def _cpus() -> frozenset[int]:
    from qemud.domain.cpu import parse_cpuset
    try:
        with open("/sys/devices/system/cpu/online") as f:
            return parse_cpuset(f.read().strip())
    except (OSError, ValueError):
        return frozenset(range(os.cpu_count() or 1))


#: the controllers qemud's tuning uses, by cgroup version
V2_CONTROLLERS = ("cpu", "io", "memory")
V1_CONTROLLERS = ("cpu", "blkio", "memory")


def _cgroups(mounts: str, self_cgroup: str) -> tuple[str, str, dict[str, str]]:
    """(version, reason, roots): where this process may make cgroups for its guests.

    cgroup v2 (the unified hierarchy mounted at /sys/fs/cgroup): under the daemon's own cgroup,
    which must be delegated to it (systemd's ``Delegate=yes``): writable, with the controllers
    available.  cgroup v1 (or hybrid with the controllers in v1): under the daemon's own cgroup
    of each controller's hierarchy, where writable (root).  Pure: tests pass the two files."""
    own: dict[str, str] = {}
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for c in (parts[1].split(",") if parts[1] else [""]):
                own[c] = parts[2]
    v1: dict[str, str] = {}
    v2_mount = None
    for line in mounts.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        if f[2] == "cgroup2" and f[1] == "/sys/fs/cgroup":
            v2_mount = f[1]
        elif f[2] == "cgroup":
            for c in f[3].split(","):
                if c in V1_CONTROLLERS:
                    v1[c] = f[1]
    if v2_mount is not None:
        base = os.path.join(v2_mount, own.get("", "/").lstrip("/"))
        try:
            with open(os.path.join(base, "cgroup.controllers")) as fh:
                have = set(fh.read().split())
        except OSError as exc:
            return "", f"cannot read {base}/cgroup.controllers: {exc.strerror}", {}
        missing = [c for c in V2_CONTROLLERS if c not in have]
        if missing:
            return "", (f"cgroup v2 controllers {', '.join(missing)} are not delegated to qemud's cgroup {base} "
                        "(run it from qemud.service, which has Delegate=yes)"), {}
        if not os.access(os.path.join(base, "cgroup.subtree_control"), os.W_OK):
            return "", f"qemud's cgroup {base} is not writable by it (not delegated: Delegate=yes in qemud.service)", {}
        return "v2", "", {c: base for c in V2_CONTROLLERS}
    roots = {}
    for c in V1_CONTROLLERS:
        if c not in v1:
            return "", f"no cgroup hierarchy has the {c} controller", {}
        path = os.path.join(v1[c], own.get(c, "/").lstrip("/"))
        if not os.access(path, os.W_OK):
            return "", f"the {c} cgroup {path} is not writable by qemud (run it as root)", {}
        roots[c] = path
    return "v1", "", roots


def read_cgroups() -> tuple[str, str, dict[str, str]]:
    try:
        with open("/proc/self/mounts") as m, open("/proc/self/cgroup") as c:
            return _cgroups(m.read(), c.read())
    except OSError as exc:
        return "", f"cannot read this process's cgroups: {exc.strerror}", {}


def read_host() -> HostFacts:
    """This host's facts, read now."""
    helpers = {}
    for role, candidates in HELPER_CANDIDATES.items():
        for c in candidates:
            if os.path.isfile(c) and os.access(c, os.X_OK):
                helpers[role] = c
                break
    import glob
    present = frozenset([p for p in WATCHED_PATHS if os.path.exists(p)]
                        + [p for g in WATCHED_GLOBS for p in glob.glob(g)])
    version, reason, roots = read_cgroups()
    return HostFacts(numa_nodes=_numa_nodes(), helpers=helpers, present=present, cpus=_cpus(),
                     cgroup=version, cgroup_reason=reason, cgroup_roots=roots)
