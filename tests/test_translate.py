"""Translator behaviour that golden files do not show: host-dependent refusals."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from qemud.argv import build_argv
from qemud.caps import probe
from qemud.domain import parse_domain
from qemud.errors import DomainError
from qemud.paths import GuestPaths

PATHS = GuestPaths(Path("/run/qemud/domains/g"), Path("/var/lib/qemud/domains/g"))


def xml(dtype: str = "qemu", extra_devices: str = "", machine: str = "pc", cpu: str = "") -> str:
    return f"""<domain type='{dtype}'><name>g</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64' machine='{machine}'>hvm</type></os>{cpu}
      <devices>{extra_devices}</devices></domain>"""


@pytest.fixture(scope="module")
def caps():  # type: ignore[no-untyped-def]
    return probe("/usr/bin/qemu-system-x86_64")


def test_kvm_where_kvm_is_unusable_is_a_clear_error_not_a_fallback(caps) -> None:  # type: ignore[no-untyped-def]
    no_kvm = dataclasses.replace(caps, kvm=False, kvm_reason="/dev/kvm does not exist")
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(xml("kvm")), no_kvm, PATHS)
    [problem] = exc.value.problems
    assert problem.path == "/domain/@type"
    assert "/dev/kvm does not exist" in problem.message and "type='qemu'" in problem.message


def test_kvm_translates_to_the_kvm_accelerator(caps) -> None:  # type: ignore[no-untyped-def]
    with_kvm = dataclasses.replace(caps, kvm=True, kvm_reason="")
    argv = build_argv(parse_domain(xml("kvm", cpu="<cpu mode='host-passthrough'/>")), with_kvm, PATHS).argv
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"


def test_host_passthrough_under_tcg_is_refused(caps) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(xml(cpu="<cpu mode='host-passthrough'/>")), caps, PATHS)
    assert exc.value.problems[0].path == "/domain/cpu/@mode"


def test_unknown_machine_type_names_the_attribute(caps) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(xml(machine="pc-0.11")), caps, PATHS)
    assert exc.value.problems[0].path == "/domain/os/type/@machine"
    assert "pc-0.11" in exc.value.problems[0].message


def test_unknown_network_is_an_error_naming_it(caps) -> None:  # type: ignore[no-untyped-def]
    dev = "<interface type='network'><source network='nosuchnet'/></interface>"
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(xml(extra_devices=dev)), caps.with_networks({}), PATHS)
    assert exc.value.problems[0].path == "/domain/devices/interface[1]/source/@network"
    assert "nosuchnet" in exc.value.problems[0].message
    argv = build_argv(parse_domain(xml(extra_devices=dev)), caps.with_networks({"nosuchnet": "br0"}), PATHS).argv
    assert any('"br":"br0"' in a for a in argv)


def test_all_problems_are_reported_at_once(caps) -> None:  # type: ignore[no-untyped-def]
    dev = ("<interface type='network'><source network='x'/></interface>"
           "<watchdog model='diag288'/>")  # an s390 watchdog: not on x86
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(xml(extra_devices=dev)), caps.with_networks({}), PATHS)
    assert len(exc.value.problems) == 2


def test_nic_without_mac_keeps_its_mac_across_translations(caps) -> None:  # type: ignore[no-untyped-def]
    dev = "<interface type='user'/><interface type='user'/>"
    a1 = build_argv(parse_domain(xml(extra_devices=dev)), caps, PATHS).argv
    a2 = build_argv(parse_domain(xml(extra_devices=dev)), caps, PATHS).argv
    macs = [a.split('"mac":"')[1][:17] for a in a1 if '"mac":"' in a]
    assert len(set(macs)) == 2 and all(m.startswith("52:54:00:") for m in macs)
    assert a1 == a2


def test_missing_emulator_is_reported_by_validate(tmp_path: Path) -> None:
    f = tmp_path / "g.xml"
    f.write_text(xml(extra_devices="<emulator>/nonexistent/qemu</emulator>"))
    r = subprocess.run([sys.executable, "-m", "qemud.cli.qemuctl", "validate", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "/nonexistent/qemu does not exist" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("features,want_code,want_vars", [
    # Debian's ovmf: 40 secure boot with Microsoft's keys enrolled, 50 secure boot, 60 plain
    ("", "OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd"),  # the first descriptor by priority
    ("<feature enabled='no' name='enrolled-keys'/>", "OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.fd"),
    ("<feature enabled='no' name='secure-boot'/>", "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
])
def test_firmware_efi_is_selected_from_the_descriptors(caps, features: str, want_code: str,  # type: ignore[no-untyped-def]
                                                       want_vars: str) -> None:
    xml_text = f"""<domain type='qemu'><name>g</name><memory unit='MiB'>64</memory>
      <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><firmware>{features}</firmware></os>
      <features><acpi/></features><devices/></domain>"""
    cmd = build_argv(parse_domain(xml_text), caps, PATHS)
    code = [a for a in cmd.argv if "pflash0-file" in a and "filename" in a][0]
    assert f"/usr/share/OVMF/{want_code}" in code
    [copy] = [p for p in cmd.prepare if p.kind == "copy"]  # the guest's own NVRAM, from the template
    assert copy.source == Path(f"/usr/share/OVMF/{want_vars}") and copy.dest.parent == PATHS.state
    secure = want_code != "OVMF_CODE_4M.fd"
    assert ("smm=on" in cmd.argv[cmd.argv.index("-machine") + 1]) == secure


def test_firmware_efi_that_no_descriptor_has_names_the_problem(caps) -> None:  # type: ignore[no-untyped-def]
    xml_text = """<domain type='qemu'><name>g</name><memory unit='MiB'>64</memory>
      <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>
      <firmware><feature enabled='yes' name='no-such-feature'/></firmware></os><devices/></domain>"""
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(xml_text), caps, PATHS)
    assert exc.value.problems[0].path == "/domain/os/@firmware"
    assert "no-such-feature=yes" in exc.value.problems[0].message


def test_virtio_net_queue_sizes_are_powers_of_two_from_256_to_1024(caps) -> None:  # type: ignore[no-untyped-def]
    nic = "<interface type='user'><model type='virtio'/><driver rx_queue_size='{}' tx_queue_size='256'/></interface>"
    cmd = build_argv(parse_domain(xml(extra_devices=nic.format(512))), caps, PATHS)
    assert '"rx_queue_size":512' in " ".join(cmd.argv) and '"tx_queue_size":256' in " ".join(cmd.argv)
    with pytest.raises(DomainError) as exc:
        build_argv(parse_domain(xml(extra_devices=nic.format(511))), caps, PATHS)
    [p] = exc.value.problems
    assert p.path == "/domain/devices/interface[1]/driver/@rx_queue_size" and "power of two" in p.message
