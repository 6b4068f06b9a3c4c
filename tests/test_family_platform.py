"""The platform family: <features> (hyperv, kvm, tcg, smm/tseg, ioapic), <clock>, <vcpus>, the
CPU's features, the PCI root's 64-bit hole, and the virtio driver options, translated and then
checked in a real QEMU 7.2 over QMP (qom-get of the properties they set)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from qemud.argv import build_argv
from qemud.caps import HostCaps, probe
from qemud.domain import parse_domain
from qemud.errors import DomainError
from qemud.launch import prepare
from qemud.paths import GuestPaths
from tests.support.realize import _connect, _kill

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"


@pytest.fixture(scope="module")
def caps() -> HostCaps:
    return probe(QEMU)


def domain_xml(body: str, *, machine: str = "pc", devices: str = "", vcpu: str = "<vcpu>1</vcpu>",
               dtype: str = "qemu") -> str:
    return (f"<domain type='{dtype}'><name>plat</name><memory unit='MiB'>64</memory>{vcpu}"
            f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>{body}"
            f"<devices><memballoon model='none'/>{devices}</devices></domain>")


def translate(xml: str, caps: HostCaps, tmp: Path | None = None):  # type: ignore[no-untyped-def]
    domain = parse_domain(xml)
    base = tmp or Path(tempfile.mkdtemp(prefix="qp", dir="/tmp"))
    return domain, build_argv(domain, caps, GuestPaths(base / "run", base / "state"), paused=True)


def problems(xml: str, caps: HostCaps) -> dict[str, str]:
    with pytest.raises(DomainError) as exc:
        translate(xml, caps)
    return {p.path: p.message for p in exc.value.problems}


async def _session(argv: list[str], env: dict[str, str], qmp: Path,
                   calls: list[tuple[str, dict[str, Any] | None]]) -> list[Any]:
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    q = None
    try:
        q, why = await _connect(proc, qmp, time.monotonic() + 20)
        if q is None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"QEMU did not start: {why} {out}")
        answers = []
        for name, args in calls:
            if name == "hmp":
                assert args is not None
                answers.append(await q.hmp(args["command-line"]))
            else:
                answers.append(await q.execute(name, args))
        return answers
    finally:
        if q is not None:
            await q.close()
        _kill(proc)
        if proc.stdout:
            proc.stdout.close()


def realize(xml: str, caps: HostCaps, calls: list[tuple[str, dict[str, Any] | None]]) -> list[Any]:
    """Start the domain paused in QEMU and return the answers to ``calls``."""
    with tempfile.TemporaryDirectory(prefix="qp", dir="/tmp") as tmp:
        _, cmd = translate(xml.replace("@TMP@", tmp), caps, Path(tmp))
        prepare(cmd)
        return asyncio.run(_session(cmd.argv, cmd.env, cmd.qmp, calls))


def qom(path: str, prop: str) -> tuple[str, dict[str, Any]]:
    return "qom-get", {"path": path, "property": prop}


# ---- <features><hyperv> ----------------------------------------------------------------------

HYPERV = """<features><acpi/><hyperv>
  <relaxed state='on'/><vapic state='on'/><spinlocks state='on' retries='8191'/>
  <runtime state='on'/><synic state='on'/><stimer state='on'><direct state='on'/></stimer>
  <reset state='on'/><vendor_id state='on' value='KVM Hv'/><frequencies state='on'/>
  <reenlightenment state='on'/><tlbflush state='on'/><ipi state='on'/><evmcs state='off'/>
  <avic state='on'/>
</hyperv></features>"""


def test_hyperv_flags_become_cpu_properties(caps: HostCaps) -> None:
    cpus, *got = realize(domain_xml(HYPERV), caps, [("query-cpus-fast", None)] + [
        qom("/machine/unattached/device[0]", p) for p in
        ("hv-relaxed", "hv-vapic", "hv-spinlocks", "hv-runtime", "hv-synic", "hv-stimer",
         "hv-stimer-direct", "hv-reset", "hv-vendor-id", "hv-frequencies", "hv-reenlightenment",
         "hv-tlbflush", "hv-ipi", "hv-evmcs", "hv-avic", "hv-vpindex")])
    assert cpus[0]["qom-path"] == "/machine/unattached/device[0]"
    assert got == [True, True, 8191, True, True, True, True, True, "KVM Hv", True, True, True, True,
                   False, True, False]


def test_hyperv_passthrough_and_crash_msrs(caps: HostCaps) -> None:
    xml = domain_xml("<features><acpi/><hyperv mode='passthrough'/></features>",
                     devices="<panic model='hyperv'/>")
    got = realize(xml, caps, [qom("/machine/unattached/device[0]", "hv-passthrough"),
                              qom("/machine/unattached/device[0]", "hv-crash"),
                              qom("/machine/unattached/device[0]", "hv-relaxed")])
    assert got == [True, True, False]  # TCG has no host enlightenments to pass through
    _, cmd = translate(xml, caps)
    assert any(w.path == "/domain/features/hyperv/@mode" for w in cmd.warnings)


def test_hyperv_vpindex_needs_kvm(caps: HostCaps) -> None:
    body = "<features><hyperv><vpindex state='on'/><synic state='on'/></hyperv></features>"
    p = problems(domain_xml(body), caps)
    assert "type='kvm'" in p["/domain/features/hyperv/vpindex"]
    kvm = dataclasses.replace(caps, kvm=True, kvm_reason="")
    _, cmd = translate(domain_xml(body, dtype="kvm"), kvm)
    assert cmd.argv[cmd.argv.index("-cpu") + 1] == "qemu64,hv-vpindex=on,hv-synic=on"


def test_hyperv_spinlocks_retries_checked(caps: HostCaps) -> None:
    p = problems(domain_xml("<features><hyperv><spinlocks state='on' retries='100'/></hyperv></features>"), caps)
    assert "4095" in p["/domain/features/hyperv/spinlocks/@retries"]
    p = problems(domain_xml("<features><hyperv><vendor_id state='on' value='0123456789abc'/></hyperv></features>"), caps)
    assert "12 characters" in p["/domain/features/hyperv/vendor_id/@value"]


# ---- <features><kvm>, <tcg>, <smm><tseg>, others -----------------------------------------------

KVM = """<features><acpi/><kvm><hidden state='on'/><hint-dedicated state='on'/>
<poll-control state='on'/><pv-ipi state='off'/><dirty-ring state='on' size='4096'/></kvm></features>"""


def test_kvm_features_become_cpu_properties(caps: HostCaps) -> None:
    cpu = "/machine/unattached/device[0]"
    assert realize(domain_xml(""), caps, [qom(cpu, "kvm")]) == [True]
    # hidden: the KVM signature is gone; the paravirt bits TCG filters out (with a warning)
    got = realize(domain_xml(KVM), caps, [qom(cpu, "kvm"), qom(cpu, "kvm-hint-dedicated"),
                                          qom(cpu, "kvm-poll-control")])
    assert got == [False, False, False]
    _, cmd = translate(domain_xml(KVM), caps)
    assert cmd.argv[cmd.argv.index("-cpu") + 1] == "qemu64,kvm=off,kvm-hint-dedicated=on,kvm-poll-control=on,kvm-pv-ipi=off"
    warned = {w.path for w in cmd.warnings}
    assert {"/domain/features/kvm/hint-dedicated", "/domain/features/kvm/poll-control"} <= warned


def test_kvm_dirty_ring_goes_on_the_kvm_accelerator(caps: HostCaps) -> None:
    _, cmd = translate(domain_xml(KVM), caps)
    assert cmd.argv[cmd.argv.index("-accel") + 1] == "tcg"
    assert any(w.path == "/domain/features/kvm/dirty-ring" for w in cmd.warnings)
    kvm = dataclasses.replace(caps, kvm=True, kvm_reason="")
    _, cmd = translate(domain_xml(KVM, dtype="kvm"), kvm)
    assert cmd.argv[cmd.argv.index("-accel") + 1] == "kvm,dirty-ring-size=4096"
    p = problems(domain_xml("<features><kvm><dirty-ring state='on' size='1000'/></kvm></features>"), caps)
    assert "power of 2" in p["/domain/features/kvm/dirty-ring/@size"]


def test_tcg_translation_cache_size(caps: HostCaps) -> None:
    xml = domain_xml("<features><tcg><tb-cache unit='KiB'>102400</tb-cache></tcg></features>")
    (jit,) = realize(xml, caps, [("hmp", {"command-line": "info jit"})])
    size = int(jit.split("gen code size")[1].split("/")[1].split()[0])
    assert 95 * 2**20 < size <= 100 * 2**20  # QEMU's buffer, less its guard pages
    kvm = dataclasses.replace(caps, kvm=True, kvm_reason="")
    p = problems(domain_xml("<features><tcg><tb-cache>1024</tb-cache></tcg></features>", dtype="kvm"), kvm)
    assert "type='qemu'" in p["/domain/features/tcg"]


def test_smm_tseg_size_on_q35(caps: HostCaps) -> None:
    xml = domain_xml("<features><smm state='on'><tseg unit='MiB'>48</tseg></smm></features>", machine="q35")
    assert realize(xml, caps, [qom("/machine/q35/mch", "extended-tseg-mbytes")]) == [48]
    p = problems(domain_xml("<features><smm state='on'><tseg>48</tseg></smm></features>"), caps)
    assert "q35" in p["/domain/features/smm/tseg"]
    p = problems(domain_xml("<features><smm state='on'><tseg unit='KiB'>12345</tseg></smm></features>",
                            machine="q35"), caps)
    assert "MiB" in p["/domain/features/smm/tseg"]


def test_other_architectures_features_are_refused_with_the_reason(caps: HostCaps) -> None:
    p = problems(domain_xml("<features><hpt resizing='enabled'/><gic version='3'/></features>"), caps)
    assert "POWER" in p["/domain/features/hpt"]
    assert "ARM" in p["/domain/features/gic"]


def test_ioapic_driver(caps: HostCaps) -> None:
    _, cmd = translate(domain_xml("<features><ioapic driver='qemu'/></features>", machine="q35"), caps)
    assert "kernel_irqchip=split" in cmd.argv[cmd.argv.index("-machine") + 1]
    p = problems(domain_xml("<features><ioapic driver='kvm'/></features>", machine="q35"), caps)
    assert "type='kvm'" in p["/domain/features/ioapic/@driver"]


# ---- <controller type='pci'><pcihole64> --------------------------------------------------------

def test_pcihole64_on_i440fx_and_q35(caps: HostCaps) -> None:
    hole = "<controller type='pci' index='0' model='{}'><pcihole64 unit='GiB'>1</pcihole64></controller>"
    got = realize(domain_xml("", devices=hole.format("pci-root")), caps,
                  [qom("/machine/i440fx", "pci-hole64-size")])
    assert got == [2**30]
    got = realize(domain_xml("", machine="q35", devices=hole.format("pcie-root")), caps,
                  [qom("/machine/q35", "pci-hole64-size")])
    assert got == [2**30]


# ---- <clock> -----------------------------------------------------------------------------------

def _rtc_datetime(tm: dict[str, int]) -> datetime.datetime:
    return datetime.datetime(tm["tm_year"] + 1900, tm["tm_mon"] + 1, tm["tm_mday"], tm["tm_hour"],
                             tm["tm_min"], tm["tm_sec"])


def test_variable_clock_with_localtime_basis(caps: HostCaps) -> None:
    xml = domain_xml("<clock offset='variable' adjustment='3600' basis='localtime'/>")
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Etc/GMT-5"  # the host's local time is UTC+5
    time.tzset()
    try:
        (tm,) = realize(xml, caps, [qom("/machine", "rtc-time")])
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()
    want = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(hours=6)
    assert abs((_rtc_datetime(tm) - want).total_seconds()) < 120


def test_catchup_timer(caps: HostCaps) -> None:
    xml = domain_xml("<clock offset='utc'><timer name='rtc' tickpolicy='catchup'><catchup slew='4636'/>"
                     "</timer></clock>")
    _, cmd = translate(xml, caps)
    assert cmd.argv[cmd.argv.index("-rtc") + 1] == "base=utc,driftfix=slew"
    assert any(w.path == "/domain/clock/timer[1]/catchup" for w in cmd.warnings)
    p = problems(domain_xml("<clock offset='utc'><timer name='rtc'><catchup slew='1'/></timer></clock>"), caps)
    assert "tickpolicy='catchup'" in p["/domain/clock/timer[1]/catchup"]


# ---- <vcpus> -----------------------------------------------------------------------------------

VCPUS = """<vcpu placement='static' current='3'>6</vcpu>
<vcpus>
  <vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>
  <vcpu id='1' enabled='no' hotpluggable='yes'/>
  <vcpu id='2' enabled='no' hotpluggable='yes'/>
  <vcpu id='3' enabled='no' hotpluggable='yes'/>
  <vcpu id='4' enabled='yes' hotpluggable='yes' order='2'/>
  <vcpu id='5' enabled='yes' hotpluggable='yes' order='3'/>
</vcpus>"""


def test_hotpluggable_vcpus_layout(caps: HostCaps) -> None:
    xml = domain_xml("<cpu><topology sockets='3' dies='1' cores='2' threads='1'/></cpu>", vcpu=VCPUS)
    cpus, slots = realize(xml, caps, [("query-cpus-fast", None), ("query-hotpluggable-cpus", None)])
    assert len(cpus) == 3
    plugged = {(s["props"]["socket-id"], s["props"]["core-id"]): s.get("qom-path") for s in slots}
    assert plugged[(2, 0)] == "/machine/peripheral/vcpu4"
    assert plugged[(2, 1)] == "/machine/peripheral/vcpu5"
    assert plugged[(0, 0)] is not None  # the fixed vCPU 0
    assert {k for k, v in plugged.items() if v is None} == {(0, 1), (1, 0), (1, 1)}


def test_vcpus_rules(caps: HostCaps) -> None:
    bad = VCPUS.replace("<vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>",
                        "<vcpu id='0' enabled='yes' hotpluggable='yes' order='1'/>")
    p = problems(domain_xml("", vcpu=bad), caps)
    assert "vCPU 0" in p["/domain/vcpus"]
    bad = VCPUS.replace("<vcpu id='1' enabled='no' hotpluggable='yes'/>",
                        "<vcpu id='1' enabled='no' hotpluggable='no'/>")
    p = problems(domain_xml("", vcpu=bad), caps)
    assert "hotpluggable" in p["/domain/vcpus/vcpu[2]/@hotpluggable"]


# ---- CPU features and checks -------------------------------------------------------------------

def test_unknown_cpu_feature_disabled_is_left_out(caps: HostCaps) -> None:
    assert "pconfig" not in caps.cpu_props and "avx512f" in caps.cpu_props
    xml = domain_xml("<cpu mode='custom' match='exact'><model fallback='forbid'>Icelake-Server</model>"
                     "<feature name='pconfig' policy='disable'/><feature name='avx512f' policy='disable'/></cpu>")
    (avx,) = realize(xml, caps, [qom("/machine/unattached/device[0]", "avx512f")])
    assert avx is False
    _, cmd = translate(xml, caps)
    assert cmd.argv[cmd.argv.index("-cpu") + 1] == "Icelake-Server,avx512f=off"
    assert any(w.path == "/domain/cpu/feature[1]/@name" and "pconfig" in w.message for w in cmd.warnings)


def test_unknown_cpu_feature_required_is_refused(caps: HostCaps) -> None:
    xml = domain_xml("<cpu mode='custom'><model>Icelake-Server</model>"
                     "<feature name='pconfig' policy='require'/></cpu>")
    p = problems(xml, caps)
    assert "'pconfig'" in p["/domain/cpu/feature[1]/@name"]


def test_libvirt_cpu_cache_and_physaddr_rules(caps: HostCaps) -> None:
    p = problems(domain_xml("<cpu mode='maximum'><cache level='2' mode='emulate'/></cpu>"), caps)
    assert "level='3'" in p["/domain/cpu/cache/@level"]
    p = problems(domain_xml("<cpu mode='custom'><model>qemu64</model><cache mode='passthrough'/></cpu>"), caps)
    assert "host-passthrough" in p["/domain/cpu/cache/@mode"]
    p = problems(domain_xml("<cpu mode='maximum'><maxphysaddr mode='emulate'/></cpu>"), caps)
    assert "bits" in p["/domain/cpu/maxphysaddr/@bits"]
    p = problems(domain_xml("<cpu mode='maximum'><maxphysaddr mode='passthrough' bits='42'/></cpu>"), caps)
    assert "passthrough" in p["/domain/cpu/maxphysaddr/@bits"]


# ---- virtio driver options -------------------------------------------------------------------

VIRTIO = """
<disk type='file' device='disk'><driver name='qemu' type='raw' packed='on' ats='on' page_per_vq='on'/>
  <source file='@TMP@/d.img'/><target dev='vda' bus='virtio'/></disk>
<controller type='scsi' index='0' model='virtio-scsi'><driver packed='on'/></controller>
<controller type='virtio-serial' index='0'><driver ats='on'/></controller>
<interface type='user'><mac address='52:54:00:11:22:33'/><model type='virtio'/><driver packed='on' ats='on'/></interface>
<input type='tablet' bus='virtio'><driver iommu='on' packed='on'/></input>
<rng model='virtio'><backend model='random'>/dev/urandom</backend><driver packed='on'/></rng>
<video><driver ats='on'/><model type='virtio' heads='1' primary='yes'/></video>
"""


def test_virtio_options_reach_the_devices(caps: HostCaps) -> None:
    def run(xml: str, calls: list[tuple[str, dict[str, Any] | None]]) -> list[Any]:
        with tempfile.TemporaryDirectory(prefix="qp", dir="/tmp") as tmp:
            Path(tmp, "d.img").write_bytes(b"\0" * 1024 * 1024)
            _, cmd = translate(xml.replace("@TMP@", tmp), caps, Path(tmp))
            prepare(cmd)
            return asyncio.run(_session(cmd.argv, cmd.env, cmd.qmp, calls))

    per = "/machine/peripheral"
    got = run(domain_xml("", devices=VIRTIO), [
        qom(f"{per}/virtio-disk0/virtio-backend", "packed"), qom(f"{per}/virtio-disk0", "ats"),
        qom(f"{per}/virtio-disk0", "page-per-vq"), qom(f"{per}/scsi0/virtio-backend", "packed"),
        qom(f"{per}/virtio-serial0", "ats"), qom(f"{per}/net0/virtio-backend", "packed"),
        qom(f"{per}/net0", "ats"), qom(f"{per}/input0/virtio-backend", "iommu_platform"),
        qom(f"{per}/rng0/virtio-backend", "packed"), qom(f"{per}/video0", "ats"),
        qom(f"{per}/rng0", "ats")])
    assert got == [True, True, True, True, True, True, True, True, True, True, False]


def test_virtio_iommu_on_a_transitional_device_is_refused(caps: HostCaps) -> None:
    rng = "<rng model='{}'><backend model='random'>/dev/urandom</backend><driver iommu='on'/></rng>"
    p = problems(domain_xml("", devices=rng.format("virtio")), caps)
    assert "transitional" in p["/domain/devices/rng[1]/driver/@iommu"]
    got = realize(domain_xml("", devices=rng.format("virtio-non-transitional")), caps,
                  [qom("/machine/peripheral/rng0/virtio-backend", "iommu_platform")])
    assert got == [True]
    # behind a PCIe root port QEMU makes the plain model modern-only
    port = ("<controller type='pci' index='1' model='pcie-root-port'/>"
            + rng.format("virtio").replace("</rng>", "<address type='pci' bus='1' slot='0'/></rng>"))
    got = realize(domain_xml("", machine="q35", devices=port), caps,
                  [qom("/machine/peripheral/rng0/virtio-backend", "iommu_platform")])
    assert got == [True]


def test_virtio_options_on_other_devices_are_refused(caps: HostCaps) -> None:
    xml = domain_xml("", devices="<interface type='user'><model type='e1000'/><driver packed='on'/></interface>")
    p = problems(xml, caps)
    assert "virtio" in p["/domain/devices/interface[1]/driver/@packed"]


def test_vcpus_without_current_count_the_enabled_ones(caps: HostCaps) -> None:
    vcpus = VCPUS.replace(" current='3'", "")
    domain, cmd = translate(domain_xml("", vcpu=vcpus), caps)
    assert domain.vcpus_online == 3
    assert cmd.argv[cmd.argv.index("-smp") + 1] == "1,sockets=6,cores=1,threads=1,maxcpus=6"
    assert sum(1 for a in cmd.argv if '"qemu64-x86_64-cpu"' in a) == 2


def test_ps2_off_removes_the_i8042(caps: HostCaps) -> None:
    xml = domain_xml("<features><ps2 state='off'/></features>", devices="<input type='tablet' bus='usb'/>")
    assert realize(xml, caps, [qom("/machine", "i8042")]) == [False]
    p = problems(domain_xml("<features><ps2 state='off'/></features>", devices="<input type='mouse' bus='ps2'/>"), caps)
    assert "PS/2" in p["/domain/devices/input[1]/@bus"]


def test_tsc_frequency(caps: HostCaps) -> None:
    xml = domain_xml("<clock offset='utc'><timer name='tsc' frequency='2500000000'/></clock>")
    assert realize(xml, caps, [qom("/machine/unattached/device[0]", "tsc-frequency")]) == [2500000000]


def test_pit_tick_policy(caps: HostCaps) -> None:
    xml = domain_xml("<clock offset='utc'><timer name='pit' tickpolicy='discard'/></clock>")
    _, cmd = translate(xml, caps)
    assert "kvm-pit.lost_tick_policy=discard" not in cmd.argv
    assert any(w.path == "/domain/clock/timer[1]/@tickpolicy" for w in cmd.warnings)
    kvm = dataclasses.replace(caps, kvm=True, kvm_reason="")
    _, cmd = translate(xml.replace("type='qemu'", "type='kvm'"), kvm)
    assert "kvm-pit.lost_tick_policy=discard" in cmd.argv
    p = problems(domain_xml("<clock offset='utc'><timer name='pit' tickpolicy='merge'/></clock>"), caps)
    assert "merge" in p["/domain/clock/timer[1]/@tickpolicy"]


def test_hyperv_newer_enlightenments(caps: HostCaps) -> None:
    body = ("<features><hyperv><tlbflush state='on'><direct state='on'/><extended state='on'/></tlbflush>"
            "<emsr_bitmap state='on'/><xmm_input state='on'/></hyperv></features>")
    cpu = "/machine/unattached/device[0]"
    got = realize(domain_xml(body), caps, [qom(cpu, p) for p in
                                           ("hv-tlbflush", "hv-tlbflush-direct", "hv-tlbflush-ext",
                                            "hv-emsr-bitmap", "hv-xmm-input")])
    assert got == [True] * 5
