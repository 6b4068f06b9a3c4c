"""Guest memory: <memoryBacking> (hugepages, memfd, locked, nosharepages), <memory dumpCore>,
<numatune>, NUMA cells with HMAT, and the memory devices (DIMM, NVDIMM, virtio-mem), translated
and realized in real QEMU 7.2, checked over QMP (query-memdev, qom-get, query-memory-devices)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from qemud.argv import build_argv
from qemud.caps import HostCaps, probe
from qemud.domain import parse_domain
from qemud.errors import DomainError
from qemud.host import HostFacts, read_host
from qemud.launch import prepare
from qemud.paths import GuestPaths
from qemud.qmp import Qmp
from tests.support.realize import check_domain

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
MIB = 1024 * 1024
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
FREE_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"


@pytest.fixture(scope="module")
def caps() -> HostCaps:
    return probe(QEMU)


def domain_xml(body: str, *, memory: str = "<memory unit='MiB'>64</memory>", vcpus: int = 1,
               cpu: str = "", devices: str = "") -> str:
    return f"""<domain type='qemu'>
  <name>memtest</name>
  <uuid>0b3e0c2a-6a43-4c2a-8f3e-5b0f2b7d9a11</uuid>
  {memory}
  {body}
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  {cpu}
  <devices>{devices}</devices>
</domain>"""


def translate(xml: str, caps: HostCaps, tmp: Path, host: HostFacts | None = None):  # type: ignore[no-untyped-def]
    domain = parse_domain(xml)
    if host is not None:
        caps = dataclasses.replace(caps, host=host)
    cmd = build_argv(domain, caps, GuestPaths(tmp / "run", tmp / "state"), paused=True)
    return domain, cmd


def objects(argv: list[str]) -> dict[str, dict[str, Any]]:
    """The JSON -object options of an argv, by id."""
    out = {}
    for i, a in enumerate(argv):
        if a == "-object" and argv[i + 1].startswith("{"):
            o = json.loads(argv[i + 1])
            out[o["id"]] = o
    return out


def devices(argv: list[str]) -> list[dict[str, Any]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device" and argv[i + 1].startswith("{")]


def opt(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def error_of(xml: str, caps: HostCaps, tmp: Path, host: HostFacts | None = None) -> list[tuple[str, str]]:
    with pytest.raises(DomainError) as ei:
        translate(xml, caps, tmp, host)
    return [(p.path, p.message) for p in ei.value.problems]


# ---- running QEMU --------------------------------------------------------------------------

def run_in_qemu(domain, cmd, ask: Callable[[Qmp], Any], timeout: float = 30):  # type: ignore[no-untyped-def]
    """Start the translated guest, run the standard realize checks (name, uuid, base memory,
    vCPUs) and ``ask`` (a coroutine function of the QMP client) against it, then stop it."""
    prepare(cmd)

    async def go() -> tuple[list[str], Any]:
        proc = subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        q = Qmp("memtest")
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                    raise AssertionError(f"QEMU exited ({proc.returncode}): {out}")
                if os.path.exists(cmd.qmp):
                    try:
                        await q.connect(str(cmd.qmp), timeout=2)
                        break
                    except Exception:  # noqa: BLE001 - not listening yet
                        pass
                assert time.monotonic() < deadline, "QEMU did not open QMP"
                await asyncio.sleep(0.05)
            queries = {n: await q.execute(n) for n in
                       ("query-name", "query-uuid", "query-memory-size-summary", "query-cpus-fast")}
            failed = check_domain(domain, cmd.argv, queries)
            answer = await ask(q)
            try:
                await q.execute("quit")
            except Exception:  # noqa: BLE001 - QEMU closes the socket as it quits
                pass
            return failed, answer
        finally:
            try:
                await asyncio.wait_for(q.close(), 2)
            except Exception:  # noqa: BLE001
                pass
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return asyncio.run(go())


@contextmanager
def hugepage_pool(extra: int) -> Iterator[int]:
    """``extra`` more 2 MiB hugepages in the default pool for the test; the old size restored."""
    old = int(Path(NR_HUGEPAGES).read_text())
    try:
        Path(NR_HUGEPAGES).write_text(f"{old + extra}\n")
        yield int(Path(FREE_2M).read_text())
    finally:
        Path(NR_HUGEPAGES).write_text(f"{old}\n")


# ---- hugepages ------------------------------------------------------------------------------

def test_hugepage_guest_runs_on_the_host_pool(caps: HostCaps) -> None:
    xml = domain_xml("<memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages></memoryBacking>")
    with hugepage_pool(40) as free_before, tempfile.TemporaryDirectory(prefix="qm", dir="/tmp") as t:
        assert free_before >= 32, f"the kernel gave only {free_before} free 2 MiB pages"
        domain, cmd = translate(xml, caps, Path(t), read_host())
        ram = objects(cmd.argv)["pc.ram"]
        assert ram["qom-type"] == "memory-backend-memfd"
        assert ram["hugetlb"] is True and ram["hugetlbsize"] == 2 * MIB and ram["prealloc"] is True
        assert "memory-backend=pc.ram" in opt(cmd.argv, "-machine")[0]
        assert cmd.prealloc_bytes == 64 * MIB  # qemud waits longer for QMP

        async def ask(q: Qmp) -> Any:
            return {"memdev": await q.execute("query-memdev"),
                    "hugetlb": await q.execute("qom-get", {"path": "/objects/pc.ram", "property": "hugetlb"}),
                    "size": await q.execute("qom-get", {"path": "/objects/pc.ram", "property": "hugetlbsize"}),
                    "type": await q.execute("qom-get", {"path": "/objects/pc.ram", "property": "type"}),
                    "free": int(Path(FREE_2M).read_text())}
        failed, got = run_in_qemu(domain, cmd, ask)
    assert failed == []
    assert got["hugetlb"] is True and got["size"] == 2 * MIB
    assert got["type"] == "memory-backend-memfd"
    (memdev,) = [m for m in got["memdev"] if m["id"] == "pc.ram"]
    assert memdev["size"] == 64 * MIB and memdev["prealloc"] is True
    assert free_before - got["free"] == 32  # the guest's 64 MiB came from the pool


def test_hugepage_pool_too_small_names_the_fix(caps: HostCaps, tmp_path: Path) -> None:
    xml = domain_xml("<memoryBacking><hugepages/></memoryBacking>")
    host = HostFacts(hugepages={2048: (0, 0), 1048576: (0, 0)})
    assert error_of(xml, caps, tmp_path, host) == [
        ("/domain/memoryBacking/hugepages",
         "needs 32 free 2048 KiB hugepages, the host has 0: echo 32 > /proc/sys/vm/nr_hugepages")]
    # the same guest on a host with the pool translates
    _, cmd = translate(xml, caps, tmp_path, HostFacts(hugepages={2048: (32, 32)}))
    assert objects(cmd.argv)["pc.ram"]["hugetlbsize"] == 2 * MIB


def test_hugepage_size_the_host_lacks(caps: HostCaps, tmp_path: Path) -> None:
    xml = domain_xml("<memoryBacking><hugepages><page size='5' unit='MiB'/></hugepages></memoryBacking>")
    assert error_of(xml, caps, tmp_path, HostFacts(hugepages={2048: (9, 9)})) == [
        ("/domain/memoryBacking/hugepages/page[1]/@size",
         "this host has no 5120 KiB hugepages (its hugepage sizes: 2048 KiB)")]


def test_hugepages_per_cell(caps: HostCaps, tmp_path: Path) -> None:
    xml = domain_xml("<memoryBacking><hugepages><page size='1' unit='GiB' nodeset='1'/>"
                     "<page size='2' unit='MiB'/></hugepages></memoryBacking>",
                     memory="<memory unit='MiB'>1536</memory>", vcpus=2,
                     cpu="<cpu><numa><cell id='0' cpus='0' memory='512' unit='MiB'/>"
                         "<cell id='1' cpus='1' memory='1024' unit='MiB'/></numa></cpu>")
    host = HostFacts(hugepages={2048: (256, 256), 1048576: (1, 1)})
    _, cmd = translate(xml, caps, tmp_path, host)
    o = objects(cmd.argv)
    assert o["ram-node0"]["hugetlbsize"] == 2 * MIB and o["ram-node1"]["hugetlbsize"] == 1 << 30
    # node 0 takes 256 2 MiB pages, node 1 one 1 GiB page: a pool one short fails
    assert error_of(xml, caps, tmp_path, HostFacts(hugepages={2048: (255, 255), 1048576: (1, 1)})) == [
        ("/domain/memoryBacking/hugepages",
         "needs 256 free 2048 KiB hugepages, the host has 255: echo 256 > /proc/sys/vm/nr_hugepages")]
    # a system-size "hugepage" is ordinary memory
    xml4k = domain_xml("<memoryBacking><hugepages><page size='4' unit='KiB'/></hugepages></memoryBacking>")
    _, cmd = translate(xml4k, caps, tmp_path, HostFacts())
    assert objects(cmd.argv)["pc.ram"]["qom-type"] == "memory-backend-ram"


def test_hugepage_host_facts_are_read() -> None:
    host = read_host()
    assert 2048 in host.hugepages  # x86 kernels always have the 2 MiB pool
    assert host.hugepages[2048][0] == int(Path(NR_HUGEPAGES).read_text())
    assert HostFacts.from_json(json.loads(json.dumps(host.to_json()))) == host


# ---- memfd, shared NUMA cells -----------------------------------------------------------------

def test_memfd_shared_numa_cells(caps: HostCaps) -> None:
    xml = domain_xml("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>",
                     memory="<memory unit='MiB'>96</memory>", vcpus=2,
                     cpu="<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/>"
                         "<cell id='1' cpus='1' memory='32' unit='MiB' memAccess='private'/></numa></cpu>")
    with tempfile.TemporaryDirectory(prefix="qm", dir="/tmp") as t:
        domain, cmd = translate(xml, caps, Path(t))

        async def ask(q: Qmp) -> Any:
            types = [await q.execute("qom-get", {"path": f"/objects/ram-node{i}", "property": "type"})
                     for i in (0, 1)]
            return {"memdev": await q.execute("query-memdev"), "types": types}
        failed, got = run_in_qemu(domain, cmd, ask)
    assert failed == []
    assert got["types"] == ["memory-backend-memfd", "memory-backend-memfd"]
    by_id = {m["id"]: m for m in got["memdev"]}
    assert by_id["ram-node0"]["share"] is True and by_id["ram-node0"]["size"] == 64 * MIB
    assert by_id["ram-node1"]["share"] is False and by_id["ram-node1"]["size"] == 32 * MIB


def test_file_source_immediate_allocation(caps: HostCaps) -> None:
    """source='file' (libvirt: a file in its RAM directory) is a memfd here; 'immediate' is prealloc."""
    xml = domain_xml("<memoryBacking><source type='file'/><access mode='shared'/>"
                     "<allocation mode='immediate' threads='2'/></memoryBacking>")
    with tempfile.TemporaryDirectory(prefix="qm", dir="/tmp") as t:
        domain, cmd = translate(xml, caps, Path(t))
        assert objects(cmd.argv)["pc.ram"] == {"qom-type": "memory-backend-memfd", "id": "pc.ram", "share": True,
                                               "prealloc": True, "prealloc-threads": 2, "size": 64 * MIB}
        assert cmd.prealloc_bytes == 64 * MIB

        async def ask(q: Qmp) -> Any:
            return await q.execute("query-memdev")
        failed, memdev = run_in_qemu(domain, cmd, ask)
    assert failed == []
    (ram,) = memdev
    assert ram["prealloc"] is True and ram["share"] is True


# ---- machine properties: dumpCore, nosharepages, locked ------------------------------------

def test_dump_core_merge_and_lock(caps: HostCaps) -> None:
    xml = domain_xml("<memoryBacking><nosharepages/><locked/><source type='memfd'/></memoryBacking>",
                     memory="<memory unit='MiB' dumpCore='on'>64</memory>")
    with tempfile.TemporaryDirectory(prefix="qm", dir="/tmp") as t:
        domain, cmd = translate(xml, caps, Path(t))
        machine = opt(cmd.argv, "-machine")[0]
        assert "dump-guest-core=on" in machine and "mem-merge=off" in machine
        assert opt(cmd.argv, "-overcommit") == ["mem-lock=on"]

        async def ask(q: Qmp) -> Any:
            got = {p: await q.execute("qom-get", {"path": "/machine", "property": p})
                   for p in ("dump-guest-core", "mem-merge")}
            (ram,) = await q.execute("query-memdev")
            return got | {"backend merge": ram["merge"], "backend dump": ram["dump"]}
        failed, got = run_in_qemu(domain, cmd, ask)
    assert failed == []
    # the guest RAM's backend follows: not merged (KSM), in core dumps
    assert got == {"dump-guest-core": True, "mem-merge": False, "backend merge": False, "backend dump": True}


def test_locked_needs_a_memlock_limit(caps: HostCaps, tmp_path: Path) -> None:
    xml = domain_xml("<memoryBacking><locked/></memoryBacking>")
    assert error_of(xml, caps, tmp_path, HostFacts(memlock_bytes=8 * MIB)) == [
        ("/domain/memoryBacking/locked",
         "locking the guest's 64 MiB needs RLIMIT_MEMLOCK of at least 1088 MiB, and qemud may lock 8192 KiB; "
         "raise it (LimitMEMLOCK=infinity in qemud's systemd unit)")]


def test_memory_from_numa_cells_when_absent(caps: HostCaps, tmp_path: Path) -> None:
    xml = domain_xml("", memory="", vcpus=2,
                     cpu="<cpu><numa><cell id='1' cpus='1' memory='32' unit='MiB'/>"
                         "<cell id='0' cpus='0' memory='32768' unit='KiB'/></numa></cpu>")
    domain, cmd = translate(xml, caps, tmp_path)
    assert domain.memory.bytes == 64 * MIB
    assert opt(cmd.argv, "-m") == ["size=64M"]


# ---- numatune -------------------------------------------------------------------------------

def test_numatune_on_an_absent_host_node(caps: HostCaps, tmp_path: Path) -> None:
    one_node = HostFacts(numa_nodes=(0,))
    xml = domain_xml("<numatune><memory mode='strict' nodeset='0-1'/></numatune>")
    assert error_of(xml, caps, tmp_path, one_node) == [
        ("/domain/numatune/memory/@nodeset", "host NUMA node 1 does not exist here; this host has node 0")]
    cells = "<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>"
    xml = domain_xml("<numatune><memnode cellid='0' mode='preferred' nodeset='3'/></numatune>", cpu=cells)
    assert error_of(xml, caps, tmp_path, one_node) == [
        ("/domain/numatune/memnode[1]/@nodeset", "host NUMA node 3 does not exist here; this host has node 0")]
    # on a host that has those nodes, they become the backends' host-nodes and policy
    _, cmd = translate(xml, caps, tmp_path, HostFacts(numa_nodes=(0, 1, 2, 3)))
    node0 = objects(cmd.argv)["ram-node0"]
    assert node0["host-nodes"] == [3] and node0["policy"] == "preferred"


def test_automatic_placement_picks_the_node_with_the_most_free_memory(caps: HostCaps, tmp_path: Path) -> None:
    # libvirt asks numad; qemud answers itself from the host's free memory per node
    two = HostFacts(numa_nodes=(0, 1), cpus=frozenset({0, 1, 2, 3}),
                    node_cpus={0: frozenset({0, 1}), 1: frozenset({2, 3})},
                    node_free_kib={0: 1 << 20, 1: 8 << 20})
    xml = domain_xml("<numatune><memory mode='interleave' placement='auto'/></numatune>").replace(
        "<vcpu>", "<vcpu placement='auto'>")
    _, cmd = translate(xml, caps, tmp_path, two)
    ram = objects(cmd.argv)["pc.ram"]
    assert ram["host-nodes"] == [1] and ram["policy"] == "interleave"
    assert cmd.tuning.vcpu_pins == {0: {2, 3}} and cmd.tuning.emulator_pin == {2, 3}
    [w] = [w for w in cmd.warnings if w.path == "/domain/numatune/memory/@placement"]
    assert w.message == ("placement='auto': qemud has no numad and placed the guest on host NUMA node 1 "
                         "(the most free memory)")
    # no node holds it alone: every node
    full = dataclasses.replace(two, node_free_kib={0: 1024, 1: 1024})
    _, cmd = translate(xml, caps, tmp_path, full)
    assert objects(cmd.argv)["pc.ram"]["host-nodes"] == [0, 1]


def test_numatune_binds_main_ram_in_qemu(caps: HostCaps) -> None:
    xml = domain_xml("<numatune><memory mode='strict' nodeset='0'/></numatune>")
    with tempfile.TemporaryDirectory(prefix="qm", dir="/tmp") as t:
        domain, cmd = translate(xml, caps, Path(t), HostFacts(numa_nodes=(0,)))

        async def ask(q: Qmp) -> Any:
            return await q.execute("query-memdev")
        failed, memdev = run_in_qemu(domain, cmd, ask)
    assert failed == []
    (ram,) = memdev
    assert ram["host-nodes"] == [0] and ram["policy"] == "bind"


@pytest.mark.parametrize("body, cpu, path, message", [
    ("<numatune><memory mode='interleave' placement='static'/></numatune>", "", "/domain/numatune/memory/@nodeset",
     "placement='static' needs a nodeset"),
    ("<numatune><memnode cellid='0' nodeset='0'/></numatune>", "", "/domain/numatune/memnode[1]",
     "the guest has no <cpu><numa> cells"),
    ("<numatune><memory mode='restrictive' nodeset='0'/><memnode cellid='0' mode='strict' nodeset='0'/></numatune>",
     "<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>", "/domain/numatune/memnode[1]/@mode",
     "every <memnode> must be mode='restrictive'"),
    ("<numatune><memnode cellid='1' nodeset='0'/></numatune>",
     "<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>", "/domain/numatune/memnode[1]/@cellid",
     "the guest has no NUMA cell 1"),
])
def test_numatune_misconfigurations(caps: HostCaps, tmp_path: Path, body: str, cpu: str, path: str,
                                    message: str) -> None:
    errs = error_of(domain_xml(body, cpu=cpu), caps, tmp_path, HostFacts(numa_nodes=(0,)))
    assert [p for p, _ in errs] == [path]
    assert message in errs[0][1]


def test_empty_nodeset_is_refused(caps: HostCaps, tmp_path: Path) -> None:
    with pytest.raises(DomainError) as ei:
        parse_domain(domain_xml("<numatune><memory nodeset='0,^0'/></numatune>"))
    assert [(p.path, p.message) for p in ei.value.problems] == [
        ("/domain/numatune/memory[1]/@nodeset", "'0,^0' names no node at all")]


# ---- HMAT -----------------------------------------------------------------------------------

def test_hmat_in_qemu(caps: HostCaps) -> None:
    cpu = """<cpu><numa>
      <cell id='0' cpus='0' memory='64' unit='MiB'>
        <cache level='1' associativity='direct' policy='writeback'>
          <size value='10' unit='KiB'/><line value='8' unit='B'/>
        </cache>
      </cell>
      <cell id='1' memory='32' unit='MiB'/>
      <interconnects>
        <latency initiator='0' target='0' type='access' value='5'/>
        <latency initiator='0' target='0' cache='1' type='access' value='10'/>
        <bandwidth initiator='0' target='0' type='access' value='204800' unit='KiB'/>
        <bandwidth initiator='0' target='0' cache='1' type='access' value='208896' unit='KiB'/>
      </interconnects></numa></cpu>"""
    xml = domain_xml("", memory="<memory unit='MiB'>96</memory>", cpu=cpu)
    with tempfile.TemporaryDirectory(prefix="qm", dir="/tmp") as t:
        domain, cmd = translate(xml, caps, Path(t))
        numa = opt(cmd.argv, "-numa")
        assert "hmat=on" in opt(cmd.argv, "-machine")[0]
        assert "node,nodeid=1,initiator=0,memdev=ram-node1" in numa
        assert "hmat-lb,initiator=0,target=0,hierarchy=first-level,data-type=access-latency,latency=10" in numa
        assert "hmat-lb,initiator=0,target=0,hierarchy=memory,data-type=access-bandwidth,bandwidth=209715200" in numa
        assert "hmat-cache,node-id=0,size=10240,level=1,associativity=direct,policy=write-back,line=8" in numa

        async def ask(q: Qmp) -> Any:
            return await q.execute("qom-get", {"path": "/machine", "property": "hmat"})
        failed, hmat = run_in_qemu(domain, cmd, ask)
    assert failed == [] and hmat is True


def test_distances_are_completed(caps: HostCaps, tmp_path: Path) -> None:
    cpu = ("<cpu><numa><cell id='0' cpus='0' memory='32' unit='MiB'><distances><sibling id='1' value='21'/>"
           "</distances></cell><cell id='1' cpus='1' memory='32' unit='MiB'/></numa></cpu>")
    _, cmd = translate(domain_xml("", vcpus=2, cpu=cpu), caps, tmp_path)
    assert [a for a in opt(cmd.argv, "-numa") if a.startswith("dist")] == [
        "dist,src=0,dst=0,val=10", "dist,src=0,dst=1,val=21", "dist,src=1,dst=0,val=21", "dist,src=1,dst=1,val=10"]


# ---- memory devices -------------------------------------------------------------------------

def test_dimm_nvdimm_virtio_mem_in_qemu(caps: HostCaps) -> None:
    with tempfile.TemporaryDirectory(prefix="qm", dir="/tmp") as t:
        nvfile = Path(t) / "nvdimm"
        devs = f"""
          <memory model='dimm'><target><size unit='MiB'>128</size><node>0</node></target>
            <address type='dimm' slot='2'/></memory>
          <memory model='nvdimm' access='shared'><source><path>{nvfile}</path></source>
            <target><size unit='MiB'>64</size><node>1</node><label><size unit='KiB'>128</size></label></target></memory>
          <memory model='virtio-mem'><target><size unit='MiB'>256</size><node>0</node>
            <block unit='KiB'>2048</block><requested unit='MiB'>64</requested></target></memory>"""
        xml = domain_xml("", memory="<memory unit='MiB'>544</memory>", vcpus=2,
                         cpu="<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/>"
                             "<cell id='1' cpus='1' memory='32' unit='MiB'/></numa></cpu>", devices=devs)
        xml = xml.replace("<vcpu>", "<maxMemory slots='4' unit='GiB'>2</maxMemory>\n  <vcpu>")
        domain, cmd = translate(xml, caps, Path(t))
        assert opt(cmd.argv, "-m") == ["size=96M,slots=4,maxmem=2097152k"]
        assert "nvdimm=on" in opt(cmd.argv, "-machine")[0]
        d = {x["id"]: x for x in devices(cmd.argv)}
        assert d["dimm0"] == {"driver": "pc-dimm", "node": 0, "memdev": "memdimm0", "id": "dimm0", "slot": 2}
        assert d["nvdimm0"]["label-size"] == 128 * 1024 and d["nvdimm0"]["slot"] == 0
        assert d["virtiomem0"]["requested-size"] == 64 * MIB and d["virtiomem0"]["block-size"] == 2 * MIB
        o = objects(cmd.argv)
        assert o["memnvdimm0"]["mem-path"] == str(nvfile) and o["memnvdimm0"]["share"] is True
        assert o["memvirtiomem0"]["reserve"] is False

        async def ask(q: Qmp) -> Any:
            return {"devs": await q.execute("query-memory-devices"),
                    "summary": await q.execute("query-memory-size-summary")}
        failed, got = run_in_qemu(domain, cmd, ask)
    assert failed == []  # base memory: the cells, 96 MiB
    by_type = {x["type"]: x["data"] for x in got["devs"]}
    assert set(by_type) == {"dimm", "nvdimm", "virtio-mem"}
    assert by_type["dimm"]["size"] == 128 * MIB and by_type["dimm"]["slot"] == 2 and by_type["dimm"]["node"] == 0
    # an NVDIMM's label area comes out of its size
    assert by_type["nvdimm"]["size"] == 64 * MIB - 128 * 1024 and by_type["nvdimm"]["node"] == 1
    # virtio-mem: the guest (paused, no driver yet) has plugged nothing of the 64 MiB asked for
    vm = by_type["virtio-mem"]
    assert (vm["requested-size"], vm["max-size"], vm["size"], vm["node"]) == (64 * MIB, 256 * MIB, 0, 0)
    assert got["summary"]["base-memory"] == 96 * MIB
    assert got["summary"]["plugged-memory"] == 128 * MIB + 64 * MIB - 128 * 1024


def test_memory_device_misconfigurations(caps: HostCaps, tmp_path: Path) -> None:
    cell = "<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>"
    dimm = "<memory model='dimm'><target><size unit='MiB'>128</size><node>{}</node></target></memory>"
    no_max = domain_xml("", memory="<memory unit='MiB'>192</memory>", cpu=cell, devices=dimm.format(0))
    assert error_of(no_max, caps, tmp_path) == [
        ("/domain/devices/memory", "memory devices need <maxMemory slots='N'> room to sit in")]
    bad_node = no_max.replace("<node>0</node>", "<node>1</node>").replace(
        "<vcpu>", "<maxMemory slots='2' unit='GiB'>1</maxMemory><vcpu>")
    assert error_of(bad_node, caps, tmp_path) == [
        ("/domain/devices/memory[1]/target/node", "the guest has no NUMA node 1 (it has 0)")]
    huge = bad_node.replace("unit='GiB'>1</maxMemory>", "unit='TiB'>2</maxMemory>").replace("<node>1", "<node>0")
    (path, msg), = error_of(huge, caps, tmp_path)
    assert path == "/domain/maxMemory" and "40-bit physical address space" in msg


def test_sgx_epc_needs_host_sgx(caps: HostCaps, tmp_path: Path) -> None:
    epc = "<memory model='sgx-epc'><target><size unit='MiB'>64</size><node>0</node></target></memory>"
    xml = domain_xml("", memory="<memory unit='MiB'>64</memory>",
                     cpu="<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>", devices=epc)
    xml = xml.replace("<vcpu>", "<maxMemory slots='2' unit='MiB'>256</maxMemory><vcpu>").replace(
        "type='qemu'", "type='kvm'")
    # QEMU 7.2 here is built without SGX (no memory-backend-epc): pretend it has it, so the host
    # check is what fails
    kvm_caps = dataclasses.replace(caps, kvm=True, objects=caps.objects | {"memory-backend-epc"})
    assert error_of(xml, dataclasses.replace(kvm_caps, objects=caps.objects), tmp_path,
                    HostFacts(present=frozenset({"/dev/sgx_vepc"}))) == [
        ("/domain/devices/memory[1]", f"an SGX EPC section needs QEMU's memory-backend-epc, which {caps.emulator} lacks")]
    errs = error_of(xml, kvm_caps, tmp_path, HostFacts())
    assert errs == [("/domain/devices/memory[1]", "an SGX EPC section needs /dev/sgx_vepc, which this host lacks "
                     "(the host CPU has no SGX, or it is disabled in the firmware, or the kernel lacks "
                     "CONFIG_X86_SGX_KVM)")]
    # with SGX on the host it becomes an EPC backend the machine names
    _, cmd = translate(xml, kvm_caps, tmp_path, HostFacts(present=frozenset({"/dev/sgx_vepc"})))
    assert "sgx-epc.0.memdev=memepc0,sgx-epc.0.node=0" in opt(cmd.argv, "-machine")[0]
    assert objects(cmd.argv)["memepc0"] == {"qom-type": "memory-backend-epc", "id": "memepc0", "prealloc": True,
                                            "size": 64 * MIB}


@pytest.mark.parametrize("devs, path, message", [
    ("<memory model='dimm'><target><size unit='MiB'>2</size></target><address type='dimm' slot='1'/></memory>"
     "<memory model='dimm'><target><size unit='MiB'>2</size></target><address type='dimm' slot='1'/></memory>",
     "/domain/devices/memory[2]/address/@slot", "slot 1 is taken by another memory device"),
    ("<memory model='virtio-mem'><target><size unit='MiB'>64</size><block unit='KiB'>3072</block></target></memory>",
     "/domain/devices/memory[1]/target/block", "3072 KiB: virtio-mem blocks are a power of two of at least 2 MiB"),
    ("<memory model='dimm'><target><size>0</size></target></memory>",
     "/domain/devices/memory[1]/target/size", "a memory device needs a size"),
    ("<memory model='dimm'><target><size unit='MiB'>2</size></target><address type='dimm' slot='4'/></memory>",
     "/domain/devices/memory[1]/address/@slot", "slot 4 is beyond the 4 of <maxMemory slots>"),
])
def test_memory_device_placement_errors(caps: HostCaps, tmp_path: Path, devs: str, path: str, message: str) -> None:
    xml = domain_xml("", cpu="<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>", devices=devs)
    xml = xml.replace("<vcpu>", "<maxMemory slots='4' unit='GiB'>1</maxMemory><vcpu>")
    assert error_of(xml, caps, tmp_path) == [(path, message)]
