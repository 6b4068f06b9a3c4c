"""The tuning plan: ``<cputune>``, ``<blkiotune>``, ``<memtune>`` and ``<vcpu cpuset>`` turned into
what qemud does to QEMU's threads and cgroup once QEMU runs (:mod:`qemud.tuning` does it).

Pure, like the rest of the translator: it checks the plan against the host facts in the
capabilities (online CPUs, usable cgroups) and reports every problem with the element's path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qemud.caps import HostCaps
from qemud.domain import Domain
from qemud.domain.cpu import parse_cpuset
from qemud.errors import Problem

#: libvirt scheduler names -> os.SCHED_* names
SCHEDULERS = {"other": "SCHED_OTHER", "batch": "SCHED_BATCH", "idle": "SCHED_IDLE", "fifo": "SCHED_FIFO",
              "rr": "SCHED_RR"}


@dataclass(frozen=True)
class ThreadLimit:
    """A CPU bandwidth limit (microseconds of CPU per period); quota None or -1: unlimited."""

    period: int | None = None
    quota: int | None = None

    def __bool__(self) -> bool:
        return self.period is not None or self.quota is not None


@dataclass(frozen=True)
class BlkioDeviceTune:
    path: str
    weight: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None
    read_bps: int | None = None
    write_bps: int | None = None


@dataclass
class Tuning:
    """What qemud applies to one QEMU process; empty when the domain asks for nothing."""

    #: vCPU index -> host CPUs (vcpupin, else <vcpu cpuset>)
    vcpu_pins: dict[int, frozenset[int]] = field(default_factory=dict)
    emulator_pin: frozenset[int] | None = None
    #: I/O thread id (1, 2, ...: QEMU object "iothreadN") -> host CPUs
    iothread_pins: dict[int, frozenset[int]] = field(default_factory=dict)
    #: thread -> (SCHED_* name, priority)
    vcpu_sched: dict[int, tuple[str, int]] = field(default_factory=dict)
    iothread_sched: dict[int, tuple[str, int]] = field(default_factory=dict)
    emulator_sched: tuple[str, int] | None = None
    # the guest's cgroup
    shares: int | None = None
    limit: ThreadLimit = ThreadLimit()  # the whole guest (global_period / global_quota)
    vcpu_limit: ThreadLimit = ThreadLimit()  # each vCPU (period / quota)
    emulator_limit: ThreadLimit = ThreadLimit()
    iothread_limit: ThreadLimit = ThreadLimit()
    blkio_weight: int | None = None
    blkio_devices: tuple[BlkioDeviceTune, ...] = ()
    mem_hard: int | None = None  # bytes
    mem_soft: int | None = None
    mem_swap_hard: int | None = None  # memory + swap, bytes

    @property
    def needs_cgroup(self) -> bool:
        return any((self.shares is not None, self.limit, self.vcpu_limit, self.emulator_limit,
                    self.iothread_limit, self.blkio_weight is not None, self.blkio_devices,
                    self.mem_hard is not None, self.mem_soft is not None, self.mem_swap_hard is not None))

    @property
    def realtime(self) -> bool:
        """Whether a thread gets a real-time scheduler (fifo, rr)."""
        scheds = [*self.vcpu_sched.values(), *self.iothread_sched.values()]
        if self.emulator_sched is not None:
            scheds.append(self.emulator_sched)
        return any(p in ("SCHED_FIFO", "SCHED_RR") for p, _ in scheds)

    @property
    def per_thread_groups(self) -> bool:
        """libvirt's layout: per-thread limits put every thread in a child group of its own."""
        return bool(self.vcpu_limit or self.emulator_limit or self.iothread_limit)

    @property
    def empty(self) -> bool:
        return not (self.vcpu_pins or self.emulator_pin or self.iothread_pins or self.vcpu_sched
                    or self.iothread_sched or self.emulator_sched or self.needs_cgroup)

    def to_json(self) -> dict[str, Any]:
        """A summary for records and ``qemuctl``: what was asked for."""
        out: dict[str, Any] = {}
        if self.vcpu_pins:
            out["vcpu_pins"] = {str(k): sorted(v) for k, v in sorted(self.vcpu_pins.items())}
        if self.emulator_pin is not None:
            out["emulator_pin"] = sorted(self.emulator_pin)
        if self.iothread_pins:
            out["iothread_pins"] = {str(k): sorted(v) for k, v in sorted(self.iothread_pins.items())}
        if self.needs_cgroup:
            out["cgroup"] = True
        return out


def _vcpus_placed_automatically(domain: Domain) -> bool:
    """<vcpu placement='auto'>, or no vCPU placement and automatic memory placement (libvirt's
    rule; see memory.wants_auto_placement)."""
    from qemud.argv.memory import wants_auto_placement
    v = domain.vcpu
    if v is not None and v.placement is not None:
        return v.placement == "auto"
    return wants_auto_placement(domain)


def _limit(period: Any, quota: Any) -> ThreadLimit:
    p = period.value if period is not None and period.value != 0 else None
    q = quota.value if quota is not None and quota.value != 0 else None
    return ThreadLimit(p, q)


def plan_tuning(domain: Domain, caps: HostCaps) -> tuple[Tuning, list[Problem]]:
    """The tuning plan for ``domain`` on this host, and every problem with it."""
    problems: list[Problem] = []
    t = Tuning()
    host_cpus = caps.host.cpus
    nvcpus = domain.vcpus

    def check_cpus(cpus: frozenset[int], path: str) -> frozenset[int]:
        """The kernel takes an affinity mask with at least one online CPU and ignores the rest
        (libvirt's files often name more CPUs than a host has); none online is an error."""
        outside = sorted(cpus - host_cpus)
        have = ",".join(map(str, sorted(host_cpus)))
        named = f"{', '.join(map(str, outside[:8]))}{' ...' if len(outside) > 8 else ''}"
        if not cpus & host_cpus:
            problems.append(Problem(path, f"names only host CPUs this host does not have ({named}; "
                                          f"online CPUs: {have})"))
        elif outside:
            problems.append(Problem(path, f"names host CPUs this host does not have ({named}); "
                                          f"only {','.join(map(str, sorted(cpus & host_cpus)))} of them are used",
                                    "warning"))
        return cpus & host_cpus

    default = None
    if domain.vcpu is not None and domain.vcpu.cpuset:
        default = check_cpus(parse_cpuset(domain.vcpu.cpuset), "/domain/vcpu/@cpuset")
    if _vcpus_placed_automatically(domain):
        # libvirt pins to the CPUs of the nodes numad named; qemud's own choice (memory.auto_nodes)
        from qemud.argv.memory import auto_nodes
        nodes = auto_nodes(domain, caps.host) or []
        cpus = frozenset().union(*(caps.host.node_cpus.get(n, frozenset()) for n in nodes)) & host_cpus
        default = cpus or None
    ct = domain.cputune
    pinned: dict[int, frozenset[int]] = {}
    if ct is not None:
        for i, p in enumerate(ct.vcpupin):
            path = f"/domain/cputune/vcpupin[{i + 1}]"
            if p.vcpu >= nvcpus:
                problems.append(Problem(f"{path}/@vcpu", f"vCPU {p.vcpu} does not exist (the guest has {nvcpus})"))
                continue
            pinned[p.vcpu] = check_cpus(p.cpus, f"{path}/@cpuset")
    if default is not None or pinned:
        for v in range(nvcpus):
            cpus = pinned.get(v, default)
            if cpus is not None:
                t.vcpu_pins[v] = cpus
    t.emulator_pin = default
    if ct is None:
        _blkio_mem(domain, t, problems)
        _need_cgroup(t, caps, problems)
        return t, problems
    if ct.emulatorpin is not None:
        t.emulator_pin = check_cpus(ct.emulatorpin.cpus, "/domain/cputune/emulatorpin/@cpuset")
    iothreads = set(domain.iothread_ids)
    for i, p in enumerate(ct.iothreadpin):
        path = f"/domain/cputune/iothreadpin[{i + 1}]"
        if p.iothread not in iothreads:
            problems.append(Problem(f"{path}/@iothread", f"I/O thread {p.iothread} does not exist "
                                    f"(the guest has {', '.join(map(str, sorted(iothreads))) or 'none'})"))
            continue
        t.iothread_pins[p.iothread] = check_cpus(p.cpus, f"{path}/@cpuset")
    for i, s in enumerate(ct.vcpusched):
        ids = parse_cpuset(s.vcpus) if s.vcpus else frozenset(range(nvcpus))
        bad = sorted(ids - set(range(nvcpus)))
        if bad:
            problems.append(Problem(f"/domain/cputune/vcpusched[{i + 1}]/@vcpus",
                                    f"vCPU {bad[0]} does not exist (the guest has {nvcpus})"))
        for v in ids - set(bad):
            t.vcpu_sched[v] = (SCHEDULERS[s.scheduler], s.priority or 0)
    for i, s in enumerate(ct.iothreadsched):
        ids = parse_cpuset(s.iothreads) if s.iothreads else frozenset(iothreads)
        bad = sorted(ids - iothreads)
        if bad:
            problems.append(Problem(f"/domain/cputune/iothreadsched[{i + 1}]/@iothreads",
                                    f"I/O thread {bad[0]} does not exist"))
        for v in ids - set(bad):
            t.iothread_sched[v] = (SCHEDULERS[s.scheduler], s.priority or 0)
    if ct.emulatorsched is not None:
        t.emulator_sched = (SCHEDULERS[ct.emulatorsched.scheduler], ct.emulatorsched.priority or 0)
    if ct.shares is not None:
        t.shares = ct.shares.value
    t.limit = _limit(ct.global_period, ct.global_quota)
    t.vcpu_limit = _limit(ct.period, ct.quota)
    t.emulator_limit = _limit(ct.emulator_period, ct.emulator_quota)
    t.iothread_limit = _limit(ct.iothread_period, ct.iothread_quota)
    _blkio_mem(domain, t, problems)
    _need_cgroup(t, caps, problems)
    return t, problems


def _blkio_mem(domain: Domain, t: Tuning, problems: list[Problem]) -> None:
    bt = domain.blkiotune
    if bt is not None:
        if bt.weight is not None and bt.weight.value:
            t.blkio_weight = bt.weight.value
        devs = []
        for i, d in enumerate(bt.device):
            if not d.path.startswith("/"):
                problems.append(Problem(f"/domain/blkiotune/device[{i + 1}]/path",
                                        f"'{d.path}' is not an absolute path to a block device"))
                continue
            val = lambda x: x.value if x is not None and x.value else None  # noqa: E731
            devs.append(BlkioDeviceTune(d.path, val(d.weight), val(d.read_iops_sec), val(d.write_iops_sec),
                                        val(d.read_bytes_sec), val(d.write_bytes_sec)))
        t.blkio_devices = tuple(devs)
    mt = domain.memtune
    if mt is not None:
        if mt.min_guarantee is not None:
            problems.append(Problem("/domain/memtune/min_guarantee",
                                    "a guaranteed minimum is a VMware setting; Linux (and so QEMU) has none"))
        # libvirt's "unlimited" is VIR_DOMAIN_MEMORY_PARAM_UNLIMITED: 2^53-1 KiB or more
        unlimited = lambda s: s is None or s.kib >= (1 << 53) - 1  # noqa: E731
        t.mem_hard = None if unlimited(mt.hard_limit) else mt.hard_limit.bytes  # type: ignore[union-attr]
        t.mem_soft = None if unlimited(mt.soft_limit) else mt.soft_limit.bytes  # type: ignore[union-attr]
        t.mem_swap_hard = None if unlimited(mt.swap_hard_limit) else mt.swap_hard_limit.bytes  # type: ignore[union-attr]


def _need_cgroup(t: Tuning, caps: HostCaps, problems: list[Problem]) -> None:
    if not t.needs_cgroup or caps.host.cgroup:
        return
    where = []
    if t.shares is not None or t.limit or t.per_thread_groups:
        where.append("/domain/cputune")
    if t.blkio_weight is not None or t.blkio_devices:
        where.append("/domain/blkiotune")
    if t.mem_hard is not None or t.mem_soft is not None or t.mem_swap_hard is not None:
        where.append("/domain/memtune")
    for w in where:
        problems.append(Problem(w, f"needs a cgroup for the guest, which qemud cannot make here: {caps.host.cgroup_reason}"))
