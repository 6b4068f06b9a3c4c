"""Applying a tuning plan (:mod:`qemud.argv.tune`) to a running QEMU: the OS-effects side.

Called while QEMU is still paused (``-S``: its vCPU threads exist but run nothing yet) and again
after a daemon restart adopts it, so an adopted guest keeps its pinning.  Everything here is
idempotent.

The guest's cgroup (only when the domain asks for shares, quotas, I/O or memory limits) is
``<root>/qemud/<name>.guest`` under the daemon's own cgroup of each controller (cgroup v1) or its
delegated cgroup (v2).  With per-thread limits (``<period>``/``<quota>``, ``<emulator_*>``,
``<iothread_*>``) every thread goes into a child group of its own, as libvirt lays them out:
``vcpuN``, ``iothreadN``, ``emulator``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from qemud.argv.tune import ThreadLimit, Tuning
from qemud.errors import QemudError
from qemud.host import HostFacts


class TuningError(QemudError):
    """The host refused a setting the domain asks for."""


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise TuningError(f"cannot write {value.strip()!r} to {path}: {exc.strerror}") from exc


def guest_dir(root: str, name: str) -> Path:
    return Path(root) / "qemud" / f"{name}.guest"


def _mkdir(p: Path) -> None:
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TuningError(f"cannot make the cgroup {p}: {exc.strerror}") from exc


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def apply(t: Tuning, host: HostFacts, name: str, pid: int, vcpus: dict[int, int],
          iothreads: dict[int, int]) -> None:
    """Apply ``t`` to QEMU ``pid``. ``vcpus``: vCPU index -> thread id (QMP query-cpus-fast);
    ``iothreads``: I/O thread id -> thread id (QMP query-iothreads, object "iothreadN")."""
    if t.empty:
        return
    if t.needs_cgroup:
        _cgroup(t, host, name, pid, vcpus, iothreads)
    special = set(vcpus.values()) | set(iothreads.values())
    emulator = [tid for tid in thread_ids(pid) if tid not in special]
    for index, cpus in t.vcpu_pins.items():
        if index in vcpus:
            _affinity(vcpus[index], cpus, f"vCPU {index}")
    for tid_id, cpus in t.iothread_pins.items():
        if tid_id in iothreads:
            _affinity(iothreads[tid_id], cpus, f"I/O thread {tid_id}")
    if t.emulator_pin is not None:
        for tid in emulator:
            _affinity(tid, t.emulator_pin, "the emulator", missing_ok=True)
    for index, (policy, prio) in t.vcpu_sched.items():
        if index in vcpus:
            _sched(vcpus[index], policy, prio, f"vCPU {index}")
    for tid_id, (policy, prio) in t.iothread_sched.items():
        if tid_id in iothreads:
            _sched(iothreads[tid_id], policy, prio, f"I/O thread {tid_id}")
    if t.emulator_sched is not None:
        for tid in emulator:
            _sched(tid, *t.emulator_sched, "the emulator", missing_ok=True)


def _affinity(tid: int, cpus: frozenset[int], what: str, missing_ok: bool = False) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except ProcessLookupError:
        if not missing_ok:
            raise TuningError(f"{what}'s thread {tid} is gone") from None
    except OSError as exc:
        raise TuningError(f"cannot pin {what} (thread {tid}) to CPUs {sorted(cpus)}: {exc.strerror}") from exc


def _sched(tid: int, policy: str, prio: int, what: str, missing_ok: bool = False) -> None:
    try:
        os.sched_setscheduler(tid, getattr(os, policy), os.sched_param(prio))
    except ProcessLookupError:
        if not missing_ok:
            raise TuningError(f"{what}'s thread {tid} is gone") from None
    except OSError as exc:
        raise TuningError(f"cannot give {what} (thread {tid}) scheduler {policy} priority {prio}: {exc.strerror}") from exc


def _device_number(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TuningError(f"/domain/blkiotune/device/path: {path}: {exc.strerror} on this host") from exc
    if not stat.S_ISBLK(st.st_mode):
        raise TuningError(f"/domain/blkiotune/device/path: {path} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _blkio_weight(d: Path, dev: str | None, weight: int) -> None:
    """The proportional I/O weight: BFQ's file (the only weight v1 kernels of today still have)."""
    f = d / "blkio.bfq.weight_device" if dev else d / "blkio.bfq.weight"
    if not f.exists():
        raise TuningError("/domain/blkiotune: this kernel has no BFQ I/O scheduler cgroup files, "
                          "so I/O weights cannot be set")
    try:
        with open(f, "w") as fh:
            fh.write(f"{dev} {weight}" if dev else str(weight))
    except OSError as exc:
        if dev and exc.errno == errno.EOPNOTSUPP:
            raise TuningError(f"/domain/blkiotune/device/weight: block device {dev} does not use the BFQ I/O "
                              "scheduler, the only one with per-device weights (echo bfq > "
                              "/sys/dev/block/" + dev + "/queue/scheduler)") from exc
        raise TuningError(f"cannot write I/O weight {weight} to {f}: {exc.strerror}") from exc


def _rt_budget(d: Path, siblings: int = 1) -> None:
    """With the kernel's RT group scheduling (cgroup v1 cpu.rt_runtime_us), a new group gets no
    real-time CPU time, and a fifo/rr thread in it cannot be set: hand it its parent's budget."""
    f = d / "cpu.rt_runtime_us"
    if not f.exists():
        return
    if int(f.read_text().strip() or 0) > 0:
        return
    parent = d.parent / "cpu.rt_runtime_us"
    want = int(parent.read_text().strip() or 0) if parent.exists() else 0
    if want <= 0 and d.parent.name == "qemud":
        _rt_budget(d.parent)
        want = int(parent.read_text().strip() or 0)
    try:
        _write(f, str(want // max(1, siblings)))
    except TuningError as exc:
        raise TuningError(f"cannot give the cgroup {d} real-time CPU time for <vcpusched>/<iothreadsched> "
                          f"fifo or rr (another guest holds it?): {exc}") from exc


def _cgroup(t: Tuning, host: HostFacts, name: str, pid: int, vcpus: dict[int, int],
            iothreads: dict[int, int]) -> None:
    if host.cgroup == "v2":
        _cgroup_v2(t, Path(host.cgroup_roots["cpu"]), name, pid, vcpus, iothreads)
    elif host.cgroup == "v1":
        _cgroup_v1(t, host.cgroup_roots, name, pid, vcpus, iothreads)
    else:
        raise TuningError(f"the guest needs a cgroup, which qemud cannot make here: {host.cgroup_reason}")


def _groups(t: Tuning, pid: int, vcpus: dict[int, int], iothreads: dict[int, int]) -> dict[str, tuple[list[int], ThreadLimit]]:
    """Child group -> (its threads, its CPU limit), libvirt's per-thread layout."""
    special = set(vcpus.values()) | set(iothreads.values())
    out: dict[str, tuple[list[int], ThreadLimit]] = {
        "emulator": ([tid for tid in thread_ids(pid) if tid not in special], t.emulator_limit)}
    for i, tid in sorted(vcpus.items()):
        out[f"vcpu{i}"] = ([tid], t.vcpu_limit)
    for i, tid in sorted(iothreads.items()):
        out[f"iothread{i}"] = ([tid], t.iothread_limit)
    return out


def _cgroup_v1(t: Tuning, roots: dict[str, str], name: str, pid: int, vcpus: dict[int, int],
               iothreads: dict[int, int]) -> None:
    cpu = guest_dir(roots["cpu"], name)
    blkio = guest_dir(roots["blkio"], name)
    mem = guest_dir(roots["memory"], name)
    if t.shares is not None or t.limit or t.per_thread_groups:
        _mkdir(cpu)
        _write(cpu / "cgroup.procs", str(pid))
        if t.shares is not None:
            _write(cpu / "cpu.shares", str(max(2, t.shares)))
        _v1_limit(cpu, t.limit)
        if t.realtime:
            _rt_budget(cpu)
        if t.per_thread_groups:
            groups = _groups(t, pid, vcpus, iothreads)
            for sub, (tids, limit) in groups.items():
                _mkdir(cpu / sub)
                _v1_limit(cpu / sub, limit)
                if t.realtime:  # each thread's group gets its part of the guest's budget
                    _rt_budget(cpu / sub, len(groups))
                for tid in tids:
                    with contextlib.suppress(TuningError):  # a thread that ended meanwhile
                        _write(cpu / sub / "tasks", str(tid))
    if t.blkio_weight is not None or t.blkio_devices:
        _mkdir(blkio)
        _write(blkio / "cgroup.procs", str(pid))
        if t.blkio_weight is not None:
            _blkio_weight(blkio, None, t.blkio_weight)
        for d in t.blkio_devices:
            dev = _device_number(d.path)
            if d.weight is not None:
                _blkio_weight(blkio, dev, d.weight)
            for f, v in (("read_iops_device", d.read_iops), ("write_iops_device", d.write_iops),
                         ("read_bps_device", d.read_bps), ("write_bps_device", d.write_bps)):
                if v is not None:
                    _write(blkio / f"blkio.throttle.{f}", f"{dev} {v}")
    if t.mem_hard is not None or t.mem_soft is not None or t.mem_swap_hard is not None:
        _mkdir(mem)
        _write(mem / "cgroup.procs", str(pid))
        # memory+swap must never be below memory: raise it first when both grow
        if t.mem_swap_hard is not None and t.mem_hard is not None:
            with contextlib.suppress(TuningError):
                _write(mem / "memory.memsw.limit_in_bytes", str(t.mem_swap_hard))
        if t.mem_hard is not None:
            _write(mem / "memory.limit_in_bytes", str(t.mem_hard))
        if t.mem_swap_hard is not None:
            _write(mem / "memory.memsw.limit_in_bytes", str(t.mem_swap_hard))
        if t.mem_soft is not None:
            _write(mem / "memory.soft_limit_in_bytes", str(t.mem_soft))


def _v1_limit(d: Path, limit: ThreadLimit) -> None:
    if limit.period is not None:
        _write(d / "cpu.cfs_period_us", str(limit.period))
    if limit.quota is not None:
        _write(d / "cpu.cfs_quota_us", str(limit.quota))


def _v2_max(limit: ThreadLimit) -> str:
    quota = "max" if limit.quota in (None, -1) else str(limit.quota)
    return f"{quota} {limit.period or 100000}"


def _cgroup_v2(t: Tuning, root: Path, name: str, pid: int, vcpus: dict[int, int],
               iothreads: dict[int, int]) -> None:
    _v2_delegate(root)
    g = guest_dir(str(root), name)
    _mkdir(g)
    parent = g.parent
    with contextlib.suppress(TuningError):
        _write(parent / "cgroup.subtree_control", "+cpu +io +memory")
    _write(g / "cgroup.procs", str(pid))
    if t.shares is not None:
        # libvirt's conversion of cgroup v1 shares (2-262144, default 1024) to v2 weight (1-10000)
        _write(g / "cpu.weight", str(max(1, min(10000, 1 + ((max(2, t.shares) - 2) * 9999) // 262142))))
    if t.limit:
        _write(g / "cpu.max", _v2_max(t.limit))
    if t.blkio_weight is not None:
        _write(g / "io.weight", f"default {t.blkio_weight}")
    for d in t.blkio_devices:
        dev = _device_number(d.path)
        if d.weight is not None:
            _write(g / "io.weight", f"{dev} {d.weight}")
        parts = [f"{k}={v}" for k, v in (("riops", d.read_iops), ("wiops", d.write_iops),
                                          ("rbps", d.read_bps), ("wbps", d.write_bps)) if v is not None]
        if parts:
            _write(g / "io.max", f"{dev} {' '.join(parts)}")
    if t.mem_hard is not None:
        _write(g / "memory.max", str(t.mem_hard))
    if t.mem_soft:
        _write(g / "memory.high", str(t.mem_soft))
    if t.mem_swap_hard is not None:
        # v2 counts swap on its own; libvirt's swap_hard_limit is memory + swap
        _write(g / "memory.swap.max", str(max(0, t.mem_swap_hard - (t.mem_hard or 0))))
    if t.per_thread_groups:
        _write(g / "cgroup.subtree_control", "+cpu")
        for sub, (tids, limit) in _groups(t, pid, vcpus, iothreads).items():
            _mkdir(g / sub)
            _write(g / sub / "cgroup.type", "threaded")
            if limit:
                _write(g / sub / "cpu.max", _v2_max(limit))
            for tid in tids:
                with contextlib.suppress(TuningError):
                    _write(g / sub / "cgroup.threads", str(tid))


def _v2_delegate(root: Path) -> None:
    """cgroup v2's rule: a group that hands controllers to children holds no process itself.
    The daemon (and whatever else sits in its delegated cgroup) moves to a leaf, ``daemon``."""
    control = (root / "cgroup.subtree_control").read_text().split()
    if all(c in control for c in ("cpu", "io", "memory")):
        return
    leaf = root / "daemon"
    _mkdir(leaf)
    for p in (root / "cgroup.procs").read_text().split():
        with contextlib.suppress(TuningError):
            _write(leaf / "cgroup.procs", p)
    _write(root / "cgroup.subtree_control", "+cpu +io +memory")
    _mkdir(root / "qemud")


def release(host: HostFacts, name: str) -> None:
    """Remove the guest's cgroups once its QEMU has ended (children first). Best effort: a
    cgroup still holding an exiting QEMU's threads is removed at the next start."""
    roots = set(host.cgroup_roots.values()) if host.cgroup else set()
    for root in roots:
        g = guest_dir(root, name)
        if not g.is_dir():
            continue
        for sub in sorted((p for p in g.iterdir() if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        try:
            g.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBUSY):
                raise TuningError(f"cannot remove the cgroup {g}: {exc.strerror}") from exc


async def apply_over_qmp(qmp: object, t: Tuning, host: HostFacts, name: str, pid: int,
                         timeout: float = 10.0) -> None:
    """Ask QEMU (a :class:`qemud.qmp.Qmp`) for its vCPU and I/O thread ids, then :func:`apply`."""
    if t.empty:
        return
    execute = getattr(qmp, "execute")
    cpus = await execute("query-cpus-fast", timeout=timeout)
    vcpus = {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}
    iothreads: dict[int, int] = {}
    if t.iothread_pins or t.iothread_sched or t.per_thread_groups:
        for it in await execute("query-iothreads", timeout=timeout):
            ident = str(it.get("id", ""))
            if ident.startswith("iothread") and ident[8:].isdigit():
                iothreads[int(ident[8:])] = int(it["thread-id"])
    apply(t, host, name, pid, vcpus, iothreads)
