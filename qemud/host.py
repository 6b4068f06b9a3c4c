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
    #: hugepage pools: page size in KiB -> (nr_hugepages, free_hugepages), from
    #: /sys/kernel/mm/hugepages/hugepages-<size>kB
    hugepages: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: the kernel's default hugepage size in KiB (Hugepagesize in /proc/meminfo)
    hugepage_default_kib: int = 2048
    #: hugetlbfs mounts: page size in KiB -> mount point (qemud backs guests with hugetlb memfds,
    #: which need none; kept for reporting and for file-backed guests)
    hugetlbfs: dict[int, str] = field(default_factory=dict)
    #: the locked memory QEMU may have (RLIMIT_MEMLOCK of the daemon) in bytes; None when it is
    #: unlimited or the daemon has CAP_IPC_LOCK (root), which <memoryBacking><locked/> needs
    memlock_bytes: int | None = None

    def has(self, path: str) -> bool:
        return path in self.present

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["present"] = sorted(self.present)
        d["numa_nodes"] = list(self.numa_nodes)
        d["hugepages"] = {str(k): list(v) for k, v in self.hugepages.items()}
        d["hugetlbfs"] = {str(k): v for k, v in self.hugetlbfs.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HostFacts:
        return cls(numa_nodes=tuple(d.get("numa_nodes", (0,))), helpers=dict(d.get("helpers", {})),
                   present=frozenset(d.get("present", ())),
                   hugepages={int(k): (int(v[0]), int(v[1])) for k, v in d.get("hugepages", {}).items()},
                   hugepage_default_kib=int(d.get("hugepage_default_kib", 2048)),
                   hugetlbfs={int(k): str(v) for k, v in d.get("hugetlbfs", {}).items()},
                   memlock_bytes=d.get("memlock_bytes"))


#: device nodes and directories whose presence decides what a guest can have
WATCHED_PATHS: tuple[str, ...] = ("/dev/sgx_vepc",)

#: helper programs, by role: the first candidate that is executable wins
HELPER_CANDIDATES: dict[str, tuple[str, ...]] = {}


def _numa_nodes() -> tuple[int, ...]:
    try:
        nodes = sorted(int(n[4:]) for n in os.listdir("/sys/devices/system/node")
                       if n.startswith("node") and n[4:].isdigit())
    except OSError:
        nodes = []
    return tuple(nodes) or (0,)


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _hugepages() -> dict[int, tuple[int, int]]:
    base = "/sys/kernel/mm/hugepages"
    pools: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir(base)
    except OSError:
        return pools
    for n in names:
        if n.startswith("hugepages-") and n.endswith("kB") and n[10:-2].isdigit():
            pools[int(n[10:-2])] = (_read_int(f"{base}/{n}/nr_hugepages"),
                                    _read_int(f"{base}/{n}/free_hugepages"))
    return pools


def _hugepage_default_kib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 2048


def _hugetlbfs(default_kib: int) -> dict[int, str]:
    """hugetlbfs mounts by page size (``pagesize=`` mount option, else the default size)."""
    mounts: dict[int, str] = {}
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or parts[2] != "hugetlbfs":
            continue
        kib = default_kib
        for o in parts[3].split(","):
            if o.startswith("pagesize="):
                from qemud.domain.units import unit_bytes
                v = o[9:]
                num = v.rstrip("KMGkmg")
                kib = int(num) * (unit_bytes(v[len(num):] or "b") or 1) // 1024 if num.isdigit() else kib
        mounts.setdefault(kib, parts[1].replace("\\040", " "))
    return mounts


def _memlock_bytes() -> int | None:
    import resource
    if os.geteuid() == 0:
        return None  # root has CAP_IPC_LOCK: mlockall ignores the limit
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def read_host() -> HostFacts:
    """This host's facts, read now."""
    helpers = {}
    for role, candidates in HELPER_CANDIDATES.items():
        for c in candidates:
            if os.path.isfile(c) and os.access(c, os.X_OK):
                helpers[role] = c
                break
    present = frozenset(p for p in WATCHED_PATHS if os.path.exists(p))
    default_kib = _hugepage_default_kib()
    return HostFacts(numa_nodes=_numa_nodes(), helpers=helpers, present=present,
                     hugepages=_hugepages(), hugepage_default_kib=default_kib,
                     hugetlbfs=_hugetlbfs(default_kib), memlock_bytes=_memlock_bytes())
