"""Facts about this host that the translator depends on, read fresh at every probe (never
cached: hugepages, devices and helper binaries come and go).

The translator stays a pure function of (domain, capabilities, paths): it reads these facts from
``HostCaps.host`` and never looks at the host itself.  Tests build a :class:`HostFacts` by hand.
Each device family adds the facts it needs here, with the reader that fills them in.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class PciHostDevice:
    """One device under /sys/bus/pci/devices, as device assignment needs to know it."""

    #: the kernel driver it is bound to ("vfio-pci", "e1000e", ...), None when unbound
    driver: str | None = None
    #: its IOMMU group (/dev/vfio/N), None when the IOMMU is off
    iommu_group: int | None = None
    #: for an SR-IOV virtual function: its physical function's address, network interface and
    #: the VF's index there (the VF's MAC is set through them: ip link set PF vf N mac ...)
    pf: str | None = None
    pf_netdev: str | None = None
    vf_index: int | None = None


@dataclass(frozen=True)
class UsbHostDevice:
    """One device under /sys/bus/usb/devices (not its interfaces)."""

    bus: int
    device: int
    vendor: int
    product: int


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
    #: each host NUMA node's CPUs and free memory (KiB): qemud's own automatic placement
    node_cpus: dict[int, frozenset[int]] = field(default_factory=dict)
    node_free_kib: dict[int, int] = field(default_factory=dict)
    #: where qemud can make cgroups for guests: "v2", "v1" or "" (none; cgroup_reason says why)
    cgroup: str = ""
    cgroup_reason: str = "cgroups were not looked at"
    #: controller ("cpu", "io", "memory"; v1: "blkio" too) -> the directory qemud's guest
    #: cgroups go under (v2: one directory for all)
    cgroup_roots: dict[str, str] = field(default_factory=dict)
    #: host PCI devices by address ("0000:06:12.5"), for <hostdev type='pci'>
    pci_devices: dict[str, PciHostDevice] = field(default_factory=dict)
    #: host USB devices, for <hostdev type='usb'> (empty also where there is no USB bus:
    #: "/sys/bus/usb/devices" in ``present`` tells the two apart)
    usb_devices: tuple[UsbHostDevice, ...] = ()
    #: UUIDs of the mediated devices that exist (/sys/bus/mdev/devices)
    mdev_devices: frozenset[str] = frozenset()
    #: SCSI generic nodes by SCSI address "host:bus:target:unit" -> "/dev/sgN"
    scsi_generic: dict[str, str] = field(default_factory=dict)
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
        d["cpus"] = sorted(self.cpus)
        d["node_cpus"] = {str(k): sorted(v) for k, v in self.node_cpus.items()}
        d["node_free_kib"] = {str(k): v for k, v in self.node_free_kib.items()}
        d["usb_devices"] = [asdict(u) for u in self.usb_devices]
        d["mdev_devices"] = sorted(self.mdev_devices)
        d["hugepages"] = {str(k): list(v) for k, v in self.hugepages.items()}
        d["hugetlbfs"] = {str(k): v for k, v in self.hugetlbfs.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HostFacts:
        return cls(numa_nodes=tuple(d.get("numa_nodes", (0,))), helpers=dict(d.get("helpers", {})),
                   present=frozenset(d.get("present", ())), cpus=frozenset(d.get("cpus", (0,))),
                   node_cpus={int(k): frozenset(v) for k, v in d.get("node_cpus", {}).items()},
                   node_free_kib={int(k): int(v) for k, v in d.get("node_free_kib", {}).items()},
                   cgroup=d.get("cgroup", ""), cgroup_reason=d.get("cgroup_reason", "cgroups were not looked at"),
                   cgroup_roots=dict(d.get("cgroup_roots", {})),
                   pci_devices={k: PciHostDevice(**v) for k, v in d.get("pci_devices", {}).items()},
                   usb_devices=tuple(UsbHostDevice(**u) for u in d.get("usb_devices", ())),
                   mdev_devices=frozenset(d.get("mdev_devices", ())),
                   scsi_generic=dict(d.get("scsi_generic", {})),
                   hugepages={int(k): (int(v[0]), int(v[1])) for k, v in d.get("hugepages", {}).items()},
                   hugepage_default_kib=int(d.get("hugepage_default_kib", 2048)),
                   hugetlbfs={int(k): str(v) for k, v in d.get("hugetlbfs", {}).items()},
                   memlock_bytes=d.get("memlock_bytes"),
                   secrets_dir=str(d.get("secrets_dir", "")), tls_x509_dir=str(d.get("tls_x509_dir", "")))

    @property
    def secrets(self) -> str:
        """The secrets directory in force."""
        if self.secrets_dir:
            return self.secrets_dir
        from qemud.secrets import default_secrets_dir
        return str(default_secrets_dir())


#: device nodes and directories whose presence decides what a guest can have
WATCHED_PATHS: tuple[str, ...] = (
    "/dev/vhost-vsock", "/dev/sev", "/etc/pki/nssdb", "/dev/tpm0", "/dev/tpmrm0",
    "/dev/vfio/vfio", "/sys/bus/usb/devices", "/dev/vhost-scsi",  # device assignment (hostdev)
    "/dev/sgx_vepc",  # SGX EPC memory devices
    "/dev/dri",  # DRM render nodes: OpenGL displays (egl-headless, <gl enable='yes'>)
    "/usr/share/dbus-1/session.conf",  # the private bus of a D-Bus display (dbus-daemon)
)
#: device nodes that come numbered (glob patterns): every match is added to ``present``
WATCHED_GLOBS: tuple[str, ...] = ("/dev/input/event*", "/dev/vhost-vdpa-*")

#: helper programs, by role: the first candidate that is executable wins
HELPER_CANDIDATES: dict[str, tuple[str, ...]] = {
    # a <filesystem><binary path> names its own; these are where Debian and Fedora put it
    "virtiofsd": ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"),
    "swtpm": ("/usr/bin/swtpm",),
    "swtpm_setup": ("/usr/bin/swtpm_setup",),
    "qemu-img": ("/usr/bin/qemu-img", "/usr/local/bin/qemu-img"),  # transient disks' overlays
    "qemu-pr-helper": ("/usr/bin/qemu-pr-helper", "/usr/local/bin/qemu-pr-helper"),
    "passt": ("/usr/bin/passt",),  # <interface type='user'><backend type='passt'>
    "dbus-daemon": ("/usr/bin/dbus-daemon",),  # <graphics type='dbus'> on a private bus
}


def _numa_nodes() -> tuple[int, ...]:
    try:
        nodes = sorted(int(n[4:]) for n in os.listdir("/sys/devices/system/node")
                       if n.startswith("node") and n[4:].isdigit())
    except OSError:
        nodes = []
    return tuple(nodes) or (0,)


def _node_facts(nodes: tuple[int, ...]) -> tuple[dict[int, frozenset[int]], dict[int, int]]:
    """Each NUMA node's CPUs (cpulist) and free memory (meminfo MemFree, KiB)."""
    from qemud.domain.cpu import parse_cpuset
    cpus: dict[int, frozenset[int]] = {}
    free: dict[int, int] = {}
    for n in nodes:
        base = f"/sys/devices/system/node/node{n}"
        try:
            with open(f"{base}/cpulist") as f:
                text = f.read().strip()
            cpus[n] = parse_cpuset(text) if text else frozenset()
        except (OSError, ValueError):
            pass
        try:
            with open(f"{base}/meminfo") as f:
                for line in f:
                    if "MemFree:" in line:
                        free[n] = int(line.split()[-2])
        except (OSError, ValueError, IndexError):
            pass
    return cpus, free


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
        if _systemd_unit(base) and not _delegated(base):
            # root may write any cgroup, but one systemd manages without delegation is not ours
            return "", (f"qemud's cgroup {base} belongs to systemd and is not delegated to qemud "
                        "(Delegate=yes in qemud.service)"), {}
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


def _systemd_unit(path: str) -> bool:
    return path.rstrip("/").endswith((".service", ".scope"))


def _delegated(path: str) -> bool:
    """systemd marks a cgroup it delegates with the trusted.delegate (or user.delegate) xattr."""
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, name) in (b"1", b"1\n"):
                return True
        except OSError:
            continue
    return False


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
    present = frozenset(p for p in WATCHED_PATHS if os.path.exists(p))
    default_kib = _hugepage_default_kib()
    present |= frozenset(p for g in WATCHED_GLOBS for p in glob.glob(g))
    version, reason, roots = read_cgroups()
    nodes = _numa_nodes()
    node_cpus, node_free = _node_facts(nodes)
    return HostFacts(numa_nodes=nodes, helpers=helpers, present=present, cpus=_cpus(),
                     node_cpus=node_cpus, node_free_kib=node_free,
                     cgroup=version, cgroup_reason=reason, cgroup_roots=roots,
                     pci_devices=_pci_devices(), usb_devices=_usb_devices(),
                     mdev_devices=_listdir_set("/sys/bus/mdev/devices"), scsi_generic=_scsi_generic(),
                     hugepages=_hugepages(), hugepage_default_kib=default_kib,
                     hugetlbfs=_hugetlbfs(default_kib), memlock_bytes=_memlock_bytes())


# ---- readers for device assignment (<hostdev>) ------------------------------------------------

def _listdir_set(path: str) -> frozenset[str]:
    try:
        return frozenset(os.listdir(path))
    except OSError:
        return frozenset()


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _pci_devices(root: str = "/sys/bus/pci/devices") -> dict[str, PciHostDevice]:
    out: dict[str, PciHostDevice] = {}
    try:
        names = os.listdir(root)
    except OSError:
        return out
    for name in names:
        d = os.path.join(root, name)
        group = _link_name(os.path.join(d, "iommu_group"))
        pf = _link_name(os.path.join(d, "physfn"))
        pf_netdev = vf_index = None
        if pf is not None:
            pfdir = os.path.join(root, pf)
            nets = sorted(_listdir_set(os.path.join(pfdir, "net")))
            pf_netdev = nets[0] if nets else None
            for link in _listdir_set(pfdir):
                if link.startswith("virtfn") and link[6:].isdigit() and _link_name(os.path.join(pfdir, link)) == name:
                    vf_index = int(link[6:])
        out[name] = PciHostDevice(driver=_link_name(os.path.join(d, "driver")),
                                  iommu_group=int(group) if group and group.isdigit() else None,
                                  pf=pf, pf_netdev=pf_netdev, vf_index=vf_index)
    return out


def _usb_devices(root: str = "/sys/bus/usb/devices") -> tuple[UsbHostDevice, ...]:
    out = []
    for name in sorted(_listdir_set(root)):
        if ":" in name:
            continue  # an interface of a device, not a device
        d = os.path.join(root, name)
        vals = [_read(os.path.join(d, f)) for f in ("busnum", "devnum", "idVendor", "idProduct")]
        try:
            out.append(UsbHostDevice(bus=int(vals[0] or ""), device=int(vals[1] or ""),
                                     vendor=int(vals[2] or "", 16), product=int(vals[3] or "", 16)))
        except ValueError:
            continue
    return tuple(out)


def _scsi_generic(root: str = "/sys/bus/scsi/devices") -> dict[str, str]:
    out = {}
    for name in _listdir_set(root):
        sg = sorted(_listdir_set(os.path.join(root, name, "scsi_generic")))
        if name.count(":") == 3 and sg:
            out[name] = f"/dev/{sg[0]}"
    return out
