"""Guest memory: ``-m``, the RAM backends (main RAM and NUMA cells), ``<memoryBacking>``,
``<numatune>``, HMAT, and the memory devices (DIMM, NVDIMM, virtio-mem, virtio-pmem, SGX EPC).

Where qemud differs from libvirt:

* hugepages are backed by ``memory-backend-memfd`` with ``hugetlb=on`` and ``hugetlbsize``, not by
  a file on a hugetlbfs mount: the guest gets the same pages from the same kernel pool, and the
  host needs no hugetlbfs mount (libvirt refuses without one);
* ``<numatune>`` is applied only through the backends' ``host-nodes``/``policy`` (qemud has no
  cgroup cpuset); ``mode='restrictive'`` becomes ``policy=bind``, the same restriction;
* ``placement='auto'``: libvirt asks numad where the guest should go; qemud has no numad and
  answers itself (:func:`auto_nodes`): the host NUMA node with the most free memory that holds
  the guest, else every node, with a warning saying which.
"""

from __future__ import annotations

from typing import Any

from qemud.argv.builder import Builder
from qemud.domain.cpu import Cell
from qemud.domain.memory import MemoryDevice, parse_nodeset
from qemud.domain.units import size_in_range

MIB = 1024 * 1024
#: the base page size of x86 hosts: a "hugepage" of this size is ordinary memory
SYSTEM_PAGE_KIB = 4
#: libvirt aligns DIMM and NVDIMM sizes to 2 MiB on x86
DIMM_ALIGN = 2 * MIB
_POLICY = {"strict": "bind", "preferred": "preferred", "interleave": "interleave", "restrictive": "bind"}


#: QEMU 7.2's TCG translation buffer on a 64-bit host with enough RAM: locked memory too
TCG_BUFFER = 1 << 30
#: Builder.counters key: guest memory QEMU allocates before it answers QMP (Command.prealloc_bytes)
#: Builder counter: the bytes QEMU locks (<memoryBacking><locked/>)
MEMLOCK = "memlock-bytes"
PREALLOC = "prealloc-bytes"
_NEED = "hugetlb-bytes-"  # Builder.counters key prefix: hugepage demand in bytes per page size


def _need(b: Builder, kib: int, nbytes: int) -> None:
    """Count ``nbytes`` of guest memory that takes ``kib`` KiB hugepages at start."""
    b.counters[f"{_NEED}{kib}"] = b.counters.get(f"{_NEED}{kib}", 0) + nbytes


def _cells(b: Builder) -> tuple[Cell, ...]:
    d = b.domain
    return d.cpu.numa.cell if d.cpu is not None and d.cpu.numa is not None else ()


def _cell_ids(b: Builder) -> list[int]:
    return [c.id if c.id is not None else i for i, c in enumerate(_cells(b))]


# ---- the machine's memory properties ---------------------------------------------------------

def memory_machine_props(b: Builder) -> list[tuple[str, object]]:
    """-machine properties the memory configuration decides (added with the machine)."""
    d = b.domain
    props: list[tuple[str, object]] = [("dump-guest-core", bool(d.memory.dumpCore))]
    mb = d.memoryBacking
    if mb is not None and mb.nosharepages is not None:
        props.append(("mem-merge", False))
    if not _cells(b) and _main_backend_needed(b):
        props.append(("memory-backend", "pc.ram"))
    if any(m.model == "nvdimm" for m in d.devices.memory):
        props.append(("nvdimm", True))
    numa = d.cpu.numa if d.cpu is not None else None
    if numa is not None and (numa.interconnects is not None or any(c.cache for c in numa.cell)):
        props.append(("hmat", True))
    epc = [m for m in d.devices.memory if m.model == "sgx-epc"]
    for i, m in enumerate(epc):
        props.append((f"sgx-epc.{i}.memdev", f"memepc{i}"))
        if m.target.node is not None:
            props.append((f"sgx-epc.{i}.node", m.target.node))
    return props


def _main_backend_needed(b: Builder) -> bool:
    """Whether main RAM (no NUMA cells) needs a backend object of its own."""
    mb = b.domain.memoryBacking
    if mb is not None and (mb.hugepages is not None or mb.source is not None or mb.access is not None
                           or mb.allocation is not None):
        return True
    return _numatune_memory(b) is not None or wants_auto_placement(b.domain)


# ---- numatune ----------------------------------------------------------------------------

def wants_auto_placement(domain: Any) -> bool:
    """libvirt's rule: <vcpu placement='auto'> and <numatune><memory placement='auto'> imply one
    another when the other is not given; a nodeset without a placement means static."""
    vcpu_auto = domain.vcpu is not None and domain.vcpu.placement == "auto"
    nt = domain.numatune
    mem = nt.memory[0] if nt is not None and nt.memory else None
    if mem is not None:
        return (mem.placement or ("static" if mem.nodeset else ("auto" if vcpu_auto else "static"))) == "auto"
    return vcpu_auto


def auto_nodes(domain: Any, host: Any) -> list[int] | None:
    """qemud's answer to placement='auto' (libvirt asks numad): the host NUMA node with the most
    free memory that holds all of the guest's memory, else every node; None when the domain
    does not ask for automatic placement.  Pure: read from the host facts."""
    if not wants_auto_placement(domain):
        return None
    nodes = list(host.numa_nodes) or [0]
    need = domain.memory.kib if domain.memory is not None else 0
    fits = [n for n in nodes if host.node_free_kib.get(n, 0) >= need]
    if fits:
        return [max(fits, key=lambda n: (host.node_free_kib.get(n, 0), -n))]
    return sorted(nodes)


def _numatune_memory(b: Builder):  # type: ignore[no-untyped-def]
    nt = b.domain.numatune
    return nt.memory[0] if nt is not None and nt.memory else None


def _check_numatune(b: Builder) -> bool:
    """libvirt's numatune rules, and the host's nodes. False when an error was reported."""
    d = b.domain
    nt = d.numatune
    ok = True
    mem = _numatune_memory(b)
    auto = wants_auto_placement(d)
    if mem is not None and not auto and mem.nodeset is None:
        b.error("/domain/numatune/memory/@nodeset", "placement='static' needs a nodeset naming the host "
                "NUMA nodes for the guest's memory")
        ok = False
    if auto:
        where = "/domain/numatune/memory/@placement" if mem is not None else "/domain/vcpu/@placement"
        if nt is not None and nt.memnode:
            b.error("/domain/numatune/memnode", "per-cell <memnode> binding cannot be combined with "
                    "automatic NUMA placement")
            return False
        nodes = auto_nodes(d, b.caps.host) or [0]
        b.warn(where, f"placement='auto': qemud has no numad and placed the guest on host NUMA "
               f"{'node' if len(nodes) == 1 else 'nodes'} {_list(nodes)}"
               f"{' (the most free memory)' if len(nodes) == 1 else ' (none holds it alone)'}")
        return ok
    if nt is None:
        return ok
    host = b.caps.host.numa_nodes
    items = ([("/domain/numatune/memory", mem.nodeset)] if mem is not None and mem.nodeset else [])
    cells = _cell_ids(b)
    seen: set[int] = set()
    for i, mn in enumerate(nt.memnode):
        path = f"/domain/numatune/memnode[{i + 1}]"
        if not cells:
            b.error(path, "<memnode> binds a guest NUMA cell, and the guest has no <cpu><numa> cells")
            return False
        if mn.cellid not in cells:
            b.error(f"{path}/@cellid", f"the guest has no NUMA cell {mn.cellid} (it has {_list(cells)})")
            ok = False
        if mn.cellid in seen:
            b.error(f"{path}/@cellid", f"cell {mn.cellid} is bound twice")
            ok = False
        seen.add(mn.cellid)
        if mem is not None and mem.mode == "restrictive" and mn.mode != "restrictive":
            b.error(f"{path}/@mode", "with <memory mode='restrictive'>, every <memnode> must be "
                    "mode='restrictive' too")
            ok = False
        items.append((path, mn.nodeset))
    for path, spec in items:
        for n in sorted(parse_nodeset(spec)):
            if n not in host:
                b.error(f"{path}/@nodeset", f"host NUMA node {n} does not exist here; this host has "
                        f"{'node' if len(host) == 1 else 'nodes'} {_list(list(host))}")
                ok = False
                break
    return ok


def _list(xs: list[int]) -> str:
    return ", ".join(map(str, xs))


def _host_policy(b: Builder, cell: int | None) -> dict[str, Any]:
    """host-nodes/policy of a backend for guest cell ``cell`` (None: main RAM)."""
    nt = b.domain.numatune
    if nt is None:
        return {}
    for mn in nt.memnode:
        if mn.cellid == cell:
            return {"host-nodes": sorted(parse_nodeset(mn.nodeset)), "policy": _POLICY[mn.mode]}
    mem = _numatune_memory(b)
    auto = auto_nodes(b.domain, b.caps.host)
    if auto is not None:
        return {"host-nodes": auto, "policy": _POLICY[mem.mode if mem is not None else "strict"]}
    if mem is not None and mem.nodeset:
        return {"host-nodes": sorted(parse_nodeset(mem.nodeset)), "policy": _POLICY[mem.mode]}
    return {}


# ---- hugepages -----------------------------------------------------------------------------

def _page_kib(b: Builder, node: int) -> tuple[int | None, str]:
    """The hugepage size (KiB) backing guest node ``node`` and the element that asked, or None for
    ordinary pages."""
    mb = b.domain.memoryBacking
    hp = mb.hugepages if mb is not None else None
    if hp is None:
        return None, ""
    if not hp.page:
        return b.caps.host.hugepage_default_kib, "/domain/memoryBacking/hugepages"
    default = None
    for i, p in enumerate(hp.page):
        path = f"/domain/memoryBacking/hugepages/page[{i + 1}]"
        if p.nodeset is not None and node in parse_nodeset(p.nodeset):
            return _or_system(p.kib), path
        if p.nodeset is None and default is None:
            default = (_or_system(p.kib), path)
    return default if default is not None else (None, "")


def _or_system(kib: int) -> int | None:
    return None if kib == SYSTEM_PAGE_KIB else kib


def _check_hugepages(b: Builder) -> bool:
    mb = b.domain.memoryBacking
    hp = mb.hugepages if mb is not None else None
    if hp is None:
        return True
    nodes = _cell_ids(b) or [0]
    ok = True
    defaults = [p for p in hp.page if p.nodeset is None]
    if len(defaults) > 1:
        b.error("/domain/memoryBacking/hugepages", "more than one <page> without a nodeset: which size "
                "backs the guest's memory is ambiguous")
        ok = False
    if not _cell_ids(b) and len(hp.page) > 1:
        b.error("/domain/memoryBacking/hugepages", "a guest without NUMA cells has one page size; "
                f"there are {len(hp.page)} <page> elements")
        ok = False
    covered: dict[int, str] = {}
    for i, p in enumerate(hp.page):
        path = f"/domain/memoryBacking/hugepages/page[{i + 1}]"
        if p.nodeset is None:
            continue
        for n in sorted(parse_nodeset(p.nodeset)):
            if n not in nodes:
                b.error(f"{path}/@nodeset", f"the guest has no NUMA node {n} (it has {_list(nodes)})")
                ok = False
                break
            if n in covered:
                b.error(f"{path}/@nodeset", f"guest node {n} is also in {covered[n]}")
                ok = False
            covered[n] = path
    for i, p in enumerate(hp.page):
        kib = p.kib
        if kib == SYSTEM_PAGE_KIB:
            continue
        if kib not in b.caps.host.hugepages:
            sizes = ", ".join(f"{k} KiB" for k in sorted(b.caps.host.hugepages)) or "none"
            b.error(f"/domain/memoryBacking/hugepages/page[{i + 1}]/@size",
                    f"this host has no {kib} KiB hugepages (its hugepage sizes: {sizes})")
            ok = False
    if b.domain.memoryBacking is not None and b.domain.memoryBacking.source is not None \
            and b.domain.memoryBacking.source.type == "anonymous":
        b.error("/domain/memoryBacking/source/@type", "anonymous memory cannot be hugepages; use "
                "type='memfd' or 'file' (or leave <source> out)")
        ok = False
    return ok


def _check_pool(b: Builder) -> None:
    """The host's hugepage pools must hold what the guest preallocates."""
    need = {int(k[len(_NEED):]): v for k, v in b.counters.items() if k.startswith(_NEED)}
    for kib, nbytes in sorted(need.items()):
        pages = -(-nbytes // (kib * 1024))
        pool = b.caps.host.hugepages.get(kib)
        if pool is None:
            continue  # reported with the <page>
        free = pool[1]
        if free < pages:
            if kib == b.caps.host.hugepage_default_kib:
                fix = f"echo {pool[0] - free + pages} > /proc/sys/vm/nr_hugepages"
            else:
                fix = f"echo {pool[0] - free + pages} > /sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"
            b.error("/domain/memoryBacking/hugepages",
                    f"needs {pages} free {kib} KiB hugepages, the host has {free}: {fix}")


# ---- backends ------------------------------------------------------------------------------

def _backend(b: Builder, oid: str, size: int, *, node: int | None, page_kib: int | None,
             shared: bool | None, discard: bool | None, policy: dict[str, Any] | None = None,
             prealloc_counts: bool = True) -> dict[str, Any]:
    """A memory-backend-* object for guest RAM (main RAM, a NUMA cell, a DIMM).

    ``discard`` (<discard/>, cell/@discard) is QEMU's discard-data, which only file backends
    have: qemud's backends are anonymous or memfd memory, which the kernel frees when QEMU exits
    anyway, so it needs no property."""
    mb = b.domain.memoryBacking
    source = mb.source.type if mb is not None and mb.source is not None else None
    alloc = mb.allocation if mb is not None else None
    prealloc = alloc is not None and alloc.mode == "immediate"
    if page_kib is not None:
        # hugetlb memfd: the guest gets the same pool pages a hugetlbfs file would give it
        obj: dict[str, Any] = {"qom-type": "memory-backend-memfd", "id": oid, "hugetlb": True,
                               "hugetlbsize": page_kib * 1024}
        obj["share"] = bool(shared)
        prealloc = True  # as libvirt: hugepages are taken at start, not faulted in later
        if size % (page_kib * 1024):
            # a hugetlbfs file would be rounded up; a hugetlb memfd cannot be sized at all
            b.error("/domain/memoryBacking/hugepages",
                    f"{oid}: {size >> 20} MiB of guest memory is not a whole number of {page_kib} KiB "
                    "hugepages; make the memory (or the NUMA cell) a multiple of the page size, or back "
                    "it with smaller pages")
        if prealloc_counts:
            _need(b, page_kib, size)
    elif source in ("file", "memfd") or shared:
        # source='file': libvirt maps a file in /var/lib/libvirt/qemu/ram; a memfd is the same
        # shmem to the guest (and to vhost-user back ends, which get its fd), needs no directory,
        # and leaves nothing behind (discard-data, a file's, has nothing to do)
        obj = {"qom-type": "memory-backend-memfd", "id": oid, "share": bool(shared)}
    else:
        obj = {"qom-type": "memory-backend-ram", "id": oid}
    if prealloc:
        obj["prealloc"] = True
        if prealloc_counts:
            b.counters[PREALLOC] = b.counters.get(PREALLOC, 0) + size
        if alloc is not None and alloc.threads:
            obj["prealloc-threads"] = alloc.threads
    obj["size"] = size
    obj.update(policy if policy is not None else _host_policy(b, node))
    return obj


def _shared(b: Builder, cell: Cell | None) -> bool | None:
    if cell is not None and cell.memAccess is not None:
        return cell.memAccess == "shared"
    mb = b.domain.memoryBacking
    if mb is not None and mb.access is not None:
        return mb.access.mode == "shared"
    return None


def _discard(b: Builder, cell: Cell | None) -> bool | None:
    if cell is not None and cell.discard is not None:
        return cell.discard
    mb = b.domain.memoryBacking
    return True if mb is not None and mb.discard is not None else None


# ---- -m, main RAM and NUMA ------------------------------------------------------------------

def add_memory(b: Builder) -> None:
    d = b.domain
    for size, path in ((d.memory, "/domain/memory"), (d.currentMemory, "/domain/currentMemory"),
                       (d.maxMemory, "/domain/maxMemory")):
        msg = size_in_range(size, "memory")
        if msg:
            b.error(path, msg)
            return
    cells = _cells(b)
    devs = d.devices.memory
    dev_bytes = sum(_device_size(m) for m in devs if m.model != "sgx-epc")
    if cells:
        mib = sum(c.mib for c in cells)  # libvirt: the guest's memory is the sum of its cells
    else:
        mib = -(-(d.memory.kib - dev_bytes // 1024) // 1024)
    if mib < 1:
        b.error("/domain/memory", f"{d.memory.value} {d.memory.unit} is less than the 1 MiB QEMU needs"
                + (" besides its memory devices" if dev_bytes else ""))
        return
    if d.currentMemory is not None and d.currentMemory.kib > d.memory.kib:
        b.error("/domain/currentMemory", "is larger than <memory>")
    mb = d.memoryBacking
    ok = _check_numatune(b) & _check_hugepages(b)
    alloc = mb.allocation if mb is not None else None
    if alloc is not None and alloc.threads is not None and not 1 <= alloc.threads <= 1024:
        b.error("/domain/memoryBacking/allocation/@threads", f"{alloc.threads} threads: give 1 to 1024")
        ok = False
    parts = [f"size={mib}M"]
    if d.maxMemory is not None:
        if not _maxmem(b, mib, parts):
            return
    elif devs:
        b.error("/domain/devices/memory", "memory devices need <maxMemory slots='N'> room to sit in")
        return
    b.add("-m", ",".join(parts))
    if mb is not None and mb.locked is not None:
        # mlockall() locks (and faults in, before QMP answers) all of QEMU: the guest's RAM and,
        # under TCG, the 1 GiB translation buffer (17 s for a 214 MiB guest here)
        need = d.memory.bytes
        locked = need + (0 if d.kvm else TCG_BUFFER)
        limit = b.caps.host.memlock_bytes
        if limit is not None and limit < locked:
            b.error("/domain/memoryBacking/locked", f"locking the guest's {need // MIB} MiB needs "
                    f"RLIMIT_MEMLOCK of at least {-(-locked // MIB)} MiB, and qemud may lock {limit // 1024} KiB; "
                    "raise it (LimitMEMLOCK=infinity in qemud's systemd unit)")
        b.add("-overcommit", "mem-lock=on")
        b.counters[PREALLOC] = b.counters.get(PREALLOC, 0) + locked
        b.counters[MEMLOCK] = locked  # QEMU's RLIMIT_MEMLOCK when it runs unprivileged
    if not ok:
        return
    if cells:
        _numa(b, cells)
    elif _main_backend_needed(b):
        kib, _ = _page_kib(b, 0)
        b.obj(_backend(b, "pc.ram", mib * MIB, node=None, page_kib=kib, shared=_shared(b, None),
                       discard=_discard(b, None)))


def _maxmem(b: Builder, mib: int, parts: list[str]) -> bool:
    d = b.domain
    mx = d.maxMemory
    assert mx is not None
    if mx.slots is None:
        b.error("/domain/maxMemory/@slots", "required attribute is missing")
        return False
    if mx.kib < d.memory.kib:
        b.error("/domain/maxMemory", "is smaller than <memory>")
        return False
    if mx.slots > 255:
        b.error("/domain/maxMemory/@slots", f"QEMU takes at most 255 memory slots, not {mx.slots}")
        return False
    maxkib = -(-mx.kib // 4) * 4  # QEMU wants it page aligned; libvirt aligns it too
    # QEMU puts hotpluggable memory above 4 GiB, each slot aligned to 1 GiB: all of it must fit
    # the guest CPU's physical address space (40 bits for QEMU's TCG CPUs)
    if (d.os.type.arch or "x86_64") == "i686":
        return _m(parts, mib, mx.slots, maxkib)  # QEMU checks no address limit for 32-bit CPUs
    bits = 40
    cpu = d.cpu
    if cpu is not None and cpu.maxphysaddr is not None and cpu.maxphysaddr.bits:
        bits = cpu.maxphysaddr.bits
    end = 4 * 1024 * MIB + max(0, maxkib * 1024 - mib * MIB) + mib * MIB + mx.slots * 1024 * MIB
    if end > 1 << bits:
        b.error("/domain/maxMemory", f"{mx.value} {mx.unit} of hotpluggable memory does not fit the guest "
                f"CPU's {bits}-bit physical address space ({(1 << bits) // (1024 ** 3)} GiB); make it smaller")
        return False
    return _m(parts, mib, mx.slots, maxkib)


def _m(parts: list[str], mib: int, slots: int, maxkib: int) -> bool:
    parts += [f"slots={slots}", f"maxmem={maxkib}k"]
    return True


def _numa(b: Builder, cells: tuple[Cell, ...]) -> None:
    """One memory backend and one -numa node per <cell>; distances and HMAT."""
    from qemud.domain.cpu import parse_cpuset
    n = b.domain.vcpus
    ids = _cell_ids(b)
    if sorted(ids) != list(range(len(cells))) or len(set(ids)) != len(ids):
        b.error("/domain/cpu/numa", "cell ids must be 0, 1, ... (one cell per id)")
        return
    numa = b.domain.cpu.numa if b.domain.cpu is not None else None
    hmat = numa is not None and (numa.interconnects is not None or any(c.cache for c in cells))
    initiators = _initiators(b, cells, ids) if hmat else {}
    seen_cpus: set[int] = set()
    for i, c in sorted(enumerate(cells), key=lambda ic: ids[ic[0]]):
        path = f"/domain/cpu/numa/cell[{i + 1}]"
        cpus = sorted(parse_cpuset(c.cpus)) if c.cpus else []
        if any(x >= n for x in cpus):
            b.error(f"{path}/@cpus", f"names a vCPU beyond the {n} the guest has")
            return
        if seen_cpus & set(cpus):
            b.error(f"{path}/@cpus", "a vCPU is in two cells")
            return
        seen_cpus |= set(cpus)
        kib, _ = _page_kib(b, ids[i])
        b.obj(_backend(b, f"ram-node{ids[i]}", c.mib * MIB, node=ids[i], page_kib=kib,
                       shared=_shared(b, c), discard=_discard(b, c)))
        spec = [f"nodeid={ids[i]}"]
        for lo, hi in _ranges(cpus):
            spec.append(f"cpus={lo}" if lo == hi else f"cpus={lo}-{hi}")
        if hmat:
            spec.append(f"initiator={initiators[ids[i]]}")
        spec.append(f"memdev=ram-node{ids[i]}")
        b.add("-numa", "node," + ",".join(spec))
    _distances(b, cells, ids)
    if hmat:
        _hmat(b, cells, ids)


def _distances(b: Builder, cells: tuple[Cell, ...], ids: list[int]) -> None:
    """-numa dist, completed as libvirt does: 10 to itself, the other direction the same."""
    dist: dict[tuple[int, int], int] = {}
    for i, c in enumerate(cells):
        if c.distances is None:
            continue
        for s in c.distances.sibling:
            if s.id not in ids:
                b.error(f"/domain/cpu/numa/cell[{i + 1}]/distances", f"sibling {s.id} is not a cell")
                return
            if not 10 <= s.value <= 255 or (s.id == ids[i]) != (s.value == 10):
                b.error(f"/domain/cpu/numa/cell[{i + 1}]/distances", f"distance {s.value} to {s.id}: a node "
                        "is 10 from itself and 11 to 255 from others")
                return
            dist[(ids[i], s.id)] = s.value
    if not dist:
        return
    for src in sorted(ids):
        for dst in sorted(ids):
            val = dist.get((src, dst)) or dist.get((dst, src)) or (10 if src == dst else 20)
            b.add("-numa", f"dist,src={src},dst={dst},val={val}")


def _initiators(b: Builder, cells: tuple[Cell, ...], ids: list[int]) -> dict[int, int]:
    """HMAT needs every node's initiator: itself when it has CPUs, else the first initiator an
    interconnect names for it, else the first node with CPUs (as libvirt)."""
    with_cpus = [ids[i] for i, c in enumerate(cells) if c.cpus]
    numa = b.domain.cpu.numa if b.domain.cpu is not None else None
    links = list(numa.interconnects.latency) + list(numa.interconnects.bandwidth) \
        if numa is not None and numa.interconnects is not None else []
    out: dict[int, int] = {}
    for i, c in enumerate(cells):
        if c.cpus:
            out[ids[i]] = ids[i]
            continue
        named = next((l.initiator for l in links if l.target == ids[i]), None)
        out[ids[i]] = named if named is not None else (with_cpus[0] if with_cpus else ids[i])
    return out


def _hmat(b: Builder, cells: tuple[Cell, ...], ids: list[int]) -> None:
    from qemud.domain.units import unit_bytes
    numa = b.domain.cpu.numa if b.domain.cpu is not None else None
    levels = {1: "first-level", 2: "second-level", 3: "third-level"}
    if numa is not None and numa.interconnects is not None:
        for kind, items in (("latency", numa.interconnects.latency), ("bandwidth", numa.interconnects.bandwidth)):
            for j, l in enumerate(items):
                path = f"/domain/cpu/numa/interconnects/{kind}[{j + 1}]"
                if l.initiator not in ids or l.target not in ids:
                    b.error(path, f"initiator {l.initiator} and target {l.target} must be NUMA cells")
                    continue
                hier = "memory" if l.cache is None else levels.get(l.cache)
                if hier is None:
                    b.error(f"{path}/@cache", "cache level must be 1, 2 or 3")
                    continue
                spec = f"hmat-lb,initiator={l.initiator},target={l.target},hierarchy={hier},data-type={l.type}-{kind}"
                if kind == "latency":
                    spec += f",latency={l.value}"
                else:
                    spec += f",bandwidth={l.value * (unit_bytes(l.unit or 'KiB') or 1024)}"
                b.add("-numa", spec)
    for i, c in enumerate(cells):
        for cache in c.cache:
            assoc = {"none": "none", "direct": "direct", "full": "complex"}[cache.associativity]
            pol = {"none": "none", "writeback": "write-back", "writethrough": "write-through"}[cache.policy]
            size = cache.size.value * (unit_bytes(cache.size.unit) or 1)
            line = cache.line.value * (unit_bytes(cache.line.unit) or 1)
            b.add("-numa", f"hmat-cache,node-id={ids[i]},size={size},level={cache.level},"
                  f"associativity={assoc},policy={pol},line={line}")


def _ranges(xs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for x in xs:
        if out and out[-1][1] == x - 1:
            out[-1] = (out[-1][0], x)
        else:
            out.append((x, x))
    return out


# ---- memory devices ------------------------------------------------------------------------

def _device_size(m: MemoryDevice) -> int:
    """The size QEMU gives a memory device: DIMMs and NVDIMMs aligned up to 2 MiB (libvirt),
    virtio-mem to its block size."""
    size = m.target.size.bytes
    if m.model in ("dimm", "nvdimm", "virtio-pmem"):
        return -(-size // DIMM_ALIGN) * DIMM_ALIGN
    if m.model == "virtio-mem":
        blk = m.target.block.bytes if m.target.block is not None else DIMM_ALIGN
        return -(-size // max(blk, 1)) * max(blk, 1)
    return size


def add_memory_devices(b: Builder) -> None:
    """<devices><memory>: a backend object and a device each (SGX EPC: a machine property);
    then the hugepage pool check for all guest RAM."""
    d = b.domain
    devs = d.devices.memory
    if devs and d.maxMemory is None:
        return  # add_memory said they need it
    cells = _cell_ids(b)
    slots = d.maxMemory.slots if d.maxMemory is not None and d.maxMemory.slots is not None else 0
    used: set[int] = set()
    for i, m in enumerate(devs):
        if m.address is not None and m.address.type == "dimm" and m.address.slot is not None:
            if m.address.slot in used:
                b.error(f"/domain/devices/memory[{i + 1}]/address/@slot", f"slot {m.address.slot} is taken by "
                        "another memory device")
            used.add(m.address.slot)
    counters = {"dimm": 0, "nvdimm": 0, "virtio-mem": 0, "virtio-pmem": 0, "sgx-epc": 0}
    for i, m in enumerate(devs):
        path = f"/domain/devices/memory[{i + 1}]"
        n = counters[m.model]
        counters[m.model] += 1
        _memory_device(b, m, path, n, cells, slots, used)
    if not b.problems:
        _check_pool(b)


def _memory_device(b: Builder, m: MemoryDevice, path: str, n: int, cells: list[int], slots: int,
                   used: set[int]) -> None:
    t = m.target
    src = m.source
    if m.uuid is not None:
        b.error(f"{path}/uuid", "an NVDIMM uuid exists on ppc64 guests only")
        return
    node = t.node
    if node is not None and cells and node not in cells:
        b.error(f"{path}/target/node", f"the guest has no NUMA node {node} (it has {_list(cells)})")
        return
    if node is not None and not cells and node != 0:
        b.error(f"{path}/target/node", f"the guest has no NUMA cells; node {node} does not exist")
        return
    if m.model != "virtio-pmem" and node is None and cells:
        node = 0
    size = _device_size(m)
    if size == 0:
        b.error(f"{path}/target/size", "a memory device needs a size")
        return
    if m.model == "virtio-mem" and t.block is not None:
        blk = t.block.bytes
        if blk < DIMM_ALIGN or blk & (blk - 1):
            b.error(f"{path}/target/block", f"{t.block.value} {t.block.unit}: virtio-mem blocks are a power of "
                    "two of at least 2 MiB")
            return
    kind = {"dimm": "dimm", "nvdimm": "nvdimm", "virtio-mem": "virtiomem", "virtio-pmem": "virtiopmem",
            "sgx-epc": "epc"}[m.model]
    dev_id = b.alias(m.alias, f"{kind}{n}", path)
    mem_id = f"mem{dev_id}"
    policy = None
    if src is not None and src.nodemask is not None:
        for h in sorted(parse_nodeset(src.nodemask)):
            if h not in b.caps.host.numa_nodes:
                b.error(f"{path}/source/nodemask", f"host NUMA node {h} does not exist here; this host has "
                        f"node{'s' if len(b.caps.host.numa_nodes) > 1 else ''} {_list(list(b.caps.host.numa_nodes))}")
                return
        policy = {"host-nodes": sorted(parse_nodeset(src.nodemask)), "policy": "bind"}
    if m.model == "sgx-epc":
        _sgx(b, m, path, n, size, policy)
        return
    if m.model in ("dimm", "nvdimm"):
        if not slots:
            b.error(path, "a DIMM needs a free slot: set <maxMemory slots='N'>")
            return
        slot = m.address.slot if m.address is not None and m.address.type == "dimm" else None
        if m.address is not None and m.address.type != "dimm":
            b.error(f"{path}/address/@type", f"a {m.model} sits in a DIMM slot, not on '{m.address.type}'")
            return
        if slot is None:
            slot = next((s for s in range(slots) if s not in used), None)
            if slot is None:
                b.error(path, f"all {slots} memory slots are taken")
                return
            used.add(slot)
        elif slot >= slots:
            b.error(f"{path}/address/@slot", f"slot {slot} is beyond the {slots} of <maxMemory slots>")
            return
    shared = None if m.access is None else m.access == "shared"
    if m.model in ("nvdimm", "virtio-pmem"):
        if src is None or not src.path:
            b.error(f"{path}/source/path", f"a {m.model} is backed by a host file; name it in <source><path>")
            return
        obj: dict[str, Any] = {"qom-type": "memory-backend-file", "id": mem_id, "mem-path": src.path}
        if shared is not None:
            obj["share"] = shared
        elif m.model == "virtio-pmem":
            obj["share"] = True
        if m.model == "nvdimm" and (src.pmem is None):
            obj["prealloc"] = True
            b.counters[PREALLOC] = b.counters.get(PREALLOC, 0) + size
        obj["size"] = size
        if src.alignsize is not None:
            obj["align"] = src.alignsize.bytes
        if src.pmem is not None:
            obj["pmem"] = True
        # no <nodemask>: the guest node's <numatune> binding, as libvirt does
        obj.update(policy if policy is not None else _host_policy(b, node))
    else:
        page_kib = None
        if src is not None and src.pagesize is not None:
            page_kib = _or_system(src.pagesize.kib)
            if page_kib is not None and page_kib not in b.caps.host.hugepages:
                b.error(f"{path}/source/pagesize", f"this host has no {page_kib} KiB hugepages")
                return
        elif b.domain.memoryBacking is not None and b.domain.memoryBacking.hugepages is not None:
            page_kib, _ = _page_kib(b, node or 0)
        obj = _backend(b, mem_id, size, node=node, page_kib=page_kib,
                       shared=shared if shared is not None else _shared(b, None),
                       discard=m.discard, policy=policy, prealloc_counts=m.model != "virtio-mem")
        if m.model == "virtio-mem":
            # virtio-mem plugs blocks on demand: the backend reserves nothing up front, and any
            # preallocation is the device's (of what it plugs), as libvirt does
            prealloc = obj.pop("prealloc", False)
            obj.pop("prealloc-threads", None)
            obj = {**{k: v for k, v in obj.items() if k != "size"}, "reserve": False, "size": size}
    b.obj(obj)
    dev: dict[str, Any]
    if m.model in ("dimm", "nvdimm"):
        dev = {"driver": "pc-dimm" if m.model == "dimm" else "nvdimm"}
        if node is not None:
            dev["node"] = node
        if m.model == "nvdimm":
            if t.label is not None:
                dev["label-size"] = t.label.size.bytes
            if t.readonly is not None:
                dev["unarmed"] = True
        dev.update({"memdev": mem_id, "id": dev_id, "slot": slot})
        if m.address is not None and m.address.base is not None:
            dev["addr"] = m.address.base
        b.device(dev)
        return
    if m.model == "virtio-mem":
        if not b.has_device("virtio-mem-pci", path, "a virtio-mem device"):
            return
        blk = t.block.bytes if t.block is not None else DIMM_ALIGN
        dev = {"driver": "virtio-mem-pci"}
        if node is not None:
            dev["node"] = node
        dev["block-size"] = blk
        if t.requested is not None:
            if t.requested.bytes > size or t.requested.bytes % blk:
                b.error(f"{path}/target/requested", f"must be a multiple of the {blk // 1024} KiB block size "
                        "and at most <size>")
                return
            dev["requested-size"] = t.requested.bytes
        dev["memdev"] = mem_id
        if prealloc:
            dev["prealloc"] = True
        if t.address is not None:
            dev["memaddr"] = t.address.base
        dev["id"] = dev_id
    else:
        if not b.has_device("virtio-pmem-pci", path, "a virtio-pmem device"):
            return
        dev = {"driver": "virtio-pmem-pci", "memdev": mem_id, "id": dev_id}
    dev.update(b.pci_props(m.address, path, m.model))
    b.device(dev)


def _sgx(b: Builder, m: MemoryDevice, path: str, n: int, size: int, policy: dict[str, Any] | None) -> None:
    """SGX EPC: a memory-backend-epc the machine's sgx-epc.N.memdev names (memory_machine_props)."""
    if not b.caps.host.has("/dev/sgx_vepc"):
        b.error(path, "an SGX EPC section needs /dev/sgx_vepc, which this host lacks (the host CPU has no "
                "SGX, or it is disabled in the firmware, or the kernel lacks CONFIG_X86_SGX_KVM)")
        return
    if "memory-backend-epc" not in b.caps.objects:
        b.error(path, f"an SGX EPC section needs QEMU's memory-backend-epc, which {b.caps.emulator} lacks")
        return
    if not b.domain.kvm:
        b.error(path, "SGX needs KVM (type='kvm'); QEMU cannot emulate it")
        return
    obj: dict[str, Any] = {"qom-type": "memory-backend-epc", "id": f"memepc{n}", "prealloc": True, "size": size}
    if policy:
        obj.update(policy)
    b.obj(obj)


__all__ = ["add_memory", "add_memory_devices", "memory_machine_props"]
