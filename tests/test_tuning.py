"""<cputune>, <blkiotune>, <memtune>: vCPU, emulator and I/O thread pinning and scheduling, and
the guest's cgroup, applied to real QEMU processes (and applied again after an adoption)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemud import tuning
from qemud.argv import build_argv
from qemud.caps import probe
from qemud.domain import parse_domain
from qemud.errors import DomainError
from qemud.launch import prepare
from qemud.paths import GuestPaths
from tests.support.daemon import Daemon, domain_xml, pid_alive
from tests.support.realize import realize_sync
from tests.support.tinyguest import TinyGuest

pytestmark = pytest.mark.qemu

PATHS = GuestPaths(Path("/run/qemud/domains/g"), Path("/var/lib/qemud/domains/g"))


def xml(tune: str, vcpus: str = "<vcpu>2</vcpu>", extra: str = "") -> str:
    return (f"<domain type='qemu'><name>g</name><memory unit='MiB'>64</memory>{vcpus}{extra}{tune}"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><memballoon model='none'/></devices></domain>")


@pytest.fixture(scope="module")
def caps():  # type: ignore[no-untyped-def]
    return probe("/usr/bin/qemu-system-x86_64")


def problems(text: str, caps) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(text), caps, PATHS)
    return [(p.path, p.message) for p in exc.value.problems]


# ---- applied to a real QEMU ------------------------------------------------------------------

def test_pinning_scheduling_and_cgroup_limits_reach_the_qemu_threads(caps) -> None:  # type: ignore[no-untyped-def]
    assert caps.host.cgroup, f"this test host must let qemud make cgroups: {caps.host.cgroup_reason}"
    assert {0, 1} <= caps.host.cpus, "the test needs two host CPUs"
    text = xml("""<cputune><shares>512</shares><global_period>100000</global_period>
                    <global_quota>150000</global_quota><period>100000</period><quota>50000</quota>
                    <vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='1' cpuset='0'/><emulatorpin cpuset='0'/>
                    <iothreadpin iothread='1' cpuset='1'/><vcpusched vcpus='1' scheduler='batch'/></cputune>
                  <memtune><hard_limit unit='MiB'>512</hard_limit><soft_limit unit='MiB'>256</soft_limit></memtune>""",
               extra="<iothreads>1</iothreads>")
    domain = parse_domain(text)
    name = "test-tuning-applied"
    seen: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="qt", dir="/tmp") as tmp:
        cmd = build_argv(domain, caps, GuestPaths(Path(tmp) / "run", Path(tmp) / "st"), paused=True)
        prepare(cmd)

        async def after_start(qmp, pid: int) -> None:  # type: ignore[no-untyped-def]
            await tuning.apply_over_qmp(qmp, cmd.tuning, caps.host, name, pid)
            cpus = {c["cpu-index"]: c["thread-id"] for c in await qmp.execute("query-cpus-fast")}
            [io] = await qmp.execute("query-iothreads")
            seen["vcpu0"] = os.sched_getaffinity(cpus[0])
            seen["vcpu1"] = os.sched_getaffinity(cpus[1])
            seen["vcpu1-sched"] = os.sched_getscheduler(cpus[1])
            seen["vcpu0-sched"] = os.sched_getscheduler(cpus[0])
            seen["iothread"] = os.sched_getaffinity(io["thread-id"])
            seen["emulator"] = os.sched_getaffinity(pid)
            seen["threads"] = cpus
            seen["pid"] = pid
            seen["cgroup"] = {root: Path(tuning.guest_dir(root, name)) for root in set(caps.host.cgroup_roots.values())}
            seen["files"] = _cgroup_files(caps.host, name, cpus)

        result = realize_sync(domain, cmd.argv, cmd.env, cmd.qmp, after_start=after_start)
    assert result.error is None and result.ok, (result.error, result.failed_checks)
    assert seen["vcpu0"] == {1} and seen["vcpu1"] == {0}
    assert seen["iothread"] == {1} and seen["emulator"] == {0}
    assert seen["vcpu1-sched"] == os.SCHED_BATCH and seen["vcpu0-sched"] == os.SCHED_OTHER
    files = seen["files"]
    assert isinstance(files, dict)
    if caps.host.cgroup == "v1":
        assert files["cpu.shares"] == "512"
        assert (files["cpu.cfs_period_us"], files["cpu.cfs_quota_us"]) == ("100000", "150000")
        assert files["vcpu0/cpu.cfs_quota_us"] == "50000"
        assert files["vcpu0/tasks"] == str(seen["threads"][0])  # type: ignore[index]
        assert files["memory.limit_in_bytes"] == str(512 << 20)
        assert files["memory.soft_limit_in_bytes"] == str(256 << 20)
    else:
        assert files["cpu.max"] == "150000 100000"
        assert files["vcpu0/cpu.max"] == "50000 100000"
        assert files["memory.max"] == str(512 << 20) and files["memory.high"] == str(256 << 20)
    tuning.release(caps.host, name)
    assert not any(p.exists() for p in seen["cgroup"].values())  # type: ignore[union-attr]


def _cgroup_files(host, name: str, cpus: dict[int, int]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    out = {}
    if host.cgroup == "v1":
        cpu = tuning.guest_dir(host.cgroup_roots["cpu"], name)
        mem = tuning.guest_dir(host.cgroup_roots["memory"], name)
        for f in ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us", "vcpu0/cpu.cfs_quota_us", "vcpu0/tasks"):
            out[f] = (cpu / f).read_text().strip()
        for f in ("memory.limit_in_bytes", "memory.soft_limit_in_bytes"):
            out[f] = (mem / f).read_text().strip()
    else:
        g = tuning.guest_dir(host.cgroup_roots["cpu"], name)
        for f in ("cpu.max", "vcpu0/cpu.max", "memory.max", "memory.high"):
            out[f] = (g / f).read_text().strip()
    return out


# ---- refused up front, naming the element ----------------------------------------------------

def test_a_pin_to_a_cpu_the_host_lacks_names_the_element_and_the_host_cpus(caps) -> None:  # type: ignore[no-untyped-def]
    one_cpu = dataclasses.replace(caps, host=dataclasses.replace(caps.host, cpus=frozenset({0})))
    got = problems(xml("<cputune><vcpupin vcpu='0' cpuset='0'/><vcpupin vcpu='1' cpuset='1'/></cputune>"), one_cpu)
    assert got == [("/domain/cputune/vcpupin[2]/@cpuset",
                    "names only host CPUs this host does not have (1; online CPUs: 0)")]


def test_a_cpu_set_reaching_beyond_the_host_is_cut_to_its_cpus_with_a_warning(caps) -> None:  # type: ignore[no-untyped-def]
    # libvirt's files often say cpuset='1-4,8-20,525' on a 2-CPU host: the kernel uses the CPUs it has
    one_cpu = dataclasses.replace(caps, host=dataclasses.replace(caps.host, cpus=frozenset({0, 1})))
    cmd = build_argv(parse_domain(xml("", vcpus="<vcpu cpuset='1-4,8-20,525'>2</vcpu>")), one_cpu, PATHS)
    assert cmd.tuning.vcpu_pins == {0: {1}, 1: {1}} and cmd.tuning.emulator_pin == {1}
    [warning] = [w for w in cmd.warnings if w.path == "/domain/vcpu/@cpuset"]
    assert "2, 3, 4, 8, 9, 10, 11, 12 ..." in warning.message and "only 1 of them are used" in warning.message


def test_a_pin_of_a_vcpu_or_iothread_the_guest_lacks_is_refused(caps) -> None:  # type: ignore[no-untyped-def]
    got = problems(xml("<cputune><vcpupin vcpu='2' cpuset='0'/><iothreadpin iothread='1' cpuset='0'/></cputune>"), caps)
    assert ("/domain/cputune/vcpupin[1]/@vcpu", "vCPU 2 does not exist (the guest has 2)") in got
    assert ("/domain/cputune/iothreadpin[1]/@iothread", "I/O thread 1 does not exist (the guest has none)") in got


def test_limits_without_a_usable_cgroup_say_why(caps) -> None:  # type: ignore[no-untyped-def]
    none = dataclasses.replace(caps, host=dataclasses.replace(
        caps.host, cgroup="", cgroup_reason="cgroup v2 controllers cpu are not delegated", cgroup_roots={}))
    got = problems(xml("<cputune><shares>100</shares></cputune><memtune><hard_limit>1048576</hard_limit></memtune>"), none)
    assert [p for p, _ in got] == ["/domain/cputune", "/domain/memtune"]
    assert all("cgroup v2 controllers cpu are not delegated" in m for _, m in got)
    # pinning alone needs no cgroup
    build_argv(parse_domain(xml("<cputune><vcpupin vcpu='0' cpuset='0'/></cputune>")), none, PATHS)


@pytest.mark.parametrize("tune, path, message", [
    ("<cputune><vcpusched vcpus='0-1' scheduler='fifo' priority='1'/><vcpusched vcpus='1' scheduler='batch'/></cputune>",
     "/domain/cputune", "'vcpusched' attributes 'vcpus' must not overlap"),
    ("<cputune><vcpusched vcpus='0' scheduler='fifo'/></cputune>", "/domain/cputune/vcpusched[1]",
     "scheduler 'fifo' needs a priority (1-99)"),
    ("<cputune><period>10</period></cputune>", "/domain/cputune", "<period> 10 is outside 1000-1000000 microseconds"),
    ("<cputune><vcpupin vcpu='0' cpuset='0'/><vcpupin vcpu='0' cpuset='1'/></cputune>", "/domain/cputune",
     "vCPU 0 is pinned twice"),
    ("<memtune><min_guarantee>1024</min_guarantee></memtune>", "/domain/memtune/min_guarantee",
     "a guaranteed minimum is a VMware setting; Linux (and so QEMU) has none"),
    ("<blkiotune><weight>5</weight></blkiotune>", "/domain/blkiotune", "I/O weight 5 is outside 100-1000"),
])
def test_bad_tuning_is_refused_naming_the_element(caps, tune: str, path: str, message: str) -> None:  # type: ignore[no-untyped-def]
    got = problems(xml(tune), caps)
    assert (path, message) in got, got


# ---- through the daemon: pinned before the guest runs, pinned again after adoption -------------

@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        d.start()
        yield d
    finally:
        d.close()


def test_the_daemon_pins_a_guest_and_pins_it_again_after_adoption(daemon: Daemon, guest: TinyGuest) -> None:
    d = daemon
    text = domain_xml(guest, "pinned").replace(
        "  <os>", "  <cputune><vcpupin vcpu='0' cpuset='1'/><emulatorpin cpuset='0'/></cputune>\n  <os>")
    d.drop("pinned.xml", text)
    running = d.wait_for("running", "pinned", timeout=60)
    pid = running.pid
    assert pid is not None
    vcpu = _vcpu_thread(pid)
    assert os.sched_getaffinity(vcpu) == {1}
    assert os.sched_getaffinity(pid) == {0}

    d.kill9()
    os.sched_setaffinity(vcpu, {0, 1})  # lost, as after a mistaken manual change
    after = d.mark()
    d.start()
    adopted = d.wait_for("adopted", "pinned", timeout=60, after=after)
    assert adopted.pid == pid and pid_alive(pid)
    d.wait_for("running", "pinned", timeout=30, after=after)
    assert os.sched_getaffinity(vcpu) == {1}
    d.assert_no("tuning-error", "pinned", within=0, after=after)


def _vcpu_thread(pid: int) -> int:
    """QEMU names its vCPU threads "CPU 0/TCG" (-name debug-threads=on)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        if comm.startswith("CPU 0/"):
            return int(tid)
    raise AssertionError(f"QEMU {pid} has no 'CPU 0/...' thread")
