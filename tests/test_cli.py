"""``qemuctl`` as an administrator runs it: a separate process, its exit status and its output.

Exit status: 0 success, 1 failure (any file invalid), 2 usage error. No input produces a
traceback (nor qemuctl's "internal error" line, which stands for one).

These tests run the real console script against this machine's QEMU (qemuctl probes it; the
probe is cached). Domains here are type='qemu' so that they do not depend on /dev/kvm, and use
no libvirt network so that they do not depend on the host's network definitions.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qemud.caps import probe
from tests.conftest import DOMAINS, opts_dict, options
from tests.record_caps import load as load_recorded_caps
from tests.test_model_errors import BAD, BAD_FILES, NEVER_CRASH, TRANSLATOR_BAD, T, BadFile

QEMUCTL_SCRIPT = Path(sys.executable).parent / "qemuctl"
QEMUCTL = [sys.executable, "-m", "qemud.cli.qemuctl"]
EMULATOR = "/usr/bin/qemu-system-x86_64"


def qemuctl(*args: str | os.PathLike[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([*QEMUCTL, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    both = r.stdout + r.stderr
    assert "Traceback" not in both, both
    assert "internal error" not in both, both


def _portable(case: str) -> bool:
    """Golden cases that any host with QEMU can validate: no KVM, no libvirt network."""
    root = ET.parse(DOMAINS / f"{case}.xml").getroot()
    return root.get("type") == "qemu" and not any(
        i.get("type") == "network" for i in root.findall("devices/interface"))


PORTABLE = sorted(p.stem for p in DOMAINS.glob("*.xml") if _portable(p.stem))

#: <problem line>: FILE[:LINE]: [PATH: ][warning: ]MESSAGE
LINE = re.compile(r"^(?P<file>.+?)(?::(?P<line>\d+))?: (?:(?P<path>/[^ ]*): )?(?P<warn>warning: )?(?P<msg>.+)$")


@pytest.fixture()
def state() -> Iterator[Path]:
    """A short state directory: unix socket paths under pytest's long tmp_path would not fit."""
    d = Path(tempfile.mkdtemp(prefix="qs", dir="/tmp"))
    d.chmod(0o711)  # QEMU runs as the qemud user: it passes through to its guests
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_portable_cases_exist() -> None:
    assert len(PORTABLE) >= 8, PORTABLE


# ---- the console script -----------------------------------------------------------------------

def test_console_script_is_installed_and_runs() -> None:
    assert QEMUCTL_SCRIPT.is_file(), QEMUCTL_SCRIPT
    r = subprocess.run([str(QEMUCTL_SCRIPT), "validate", str(DOMAINS / "minimal-pc.xml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{DOMAINS / 'minimal-pc.xml'}: OK\n"
    no_traceback(r)


def test_help_exits_0() -> None:
    r = qemuctl("--help")
    assert r.returncode == 0
    assert "validate" in r.stdout and "argv" in r.stdout and "Exit status" in r.stdout


# ---- usage errors: 2 --------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    [],
    ["validate"],
    ["argv"],
    ["frobnicate"],
    ["--no-such-option", "validate", "x.xml"],
    ["validate", "--no-such-option", "x.xml"],
    ["argv", "a.xml", "b.xml"],
    ["--state-dir"],
], ids=["nothing", "validate-no-file", "argv-no-file", "unknown-command", "unknown-global-option",
        "unknown-validate-option", "argv-two-files", "state-dir-no-value"])
def test_usage_errors_exit_2(args: list[str]) -> None:
    r = qemuctl(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "usage:" in r.stderr
    assert r.stdout == ""
    no_traceback(r)


# ---- validate ---------------------------------------------------------------------------------

def test_validate_all_valid_exits_0() -> None:
    files = [DOMAINS / f"{c}.xml" for c in PORTABLE]
    r = qemuctl("validate", *files)
    assert r.returncode == 0, r.stdout + r.stderr
    ok = [line for line in r.stdout.splitlines() if line.endswith(": OK")]
    assert ok == [f"{f}: OK" for f in files]
    for line in r.stdout.splitlines():
        if not line.endswith(": OK"):
            m = LINE.match(line)
            assert m and m["warn"], f"only OK lines and warnings expected: {line!r}"
    assert r.stderr == ""
    no_traceback(r)


def test_validate_any_invalid_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text(BAD[0].xml)  # target bus 'foo'
    good = DOMAINS / "minimal-pc.xml"
    r = qemuctl("validate", good, bad, good)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0] == f"{good}: OK" and lines[-1] == f"{good}: OK"
    assert f"{bad}:17: /domain/devices/disk[2]/target/@bus: 'foo' is not one of ide, sata, scsi, virtio, usb, fdc" in lines
    assert f"{bad}: OK" not in lines
    no_traceback(r)


def test_validate_reports_every_problem_of_a_file_one_per_line(tmp_path: Path) -> None:
    xml = BAD[0].xml.replace("<name>bad</name>", "<name>a/b</name>").replace(">512</memory>", ">lots</memory>")
    f = tmp_path / "several.xml"
    f.write_text(xml)
    r = qemuctl("validate", f)
    assert r.returncode == 1
    parsed = [LINE.match(line) for line in r.stdout.splitlines()]
    assert all(parsed), r.stdout
    assert {m["path"] for m in parsed if m} >= {"/domain/name", "/domain/memory", "/domain/devices/disk[2]/target/@bus"}
    for m in parsed:
        assert m and m["file"] == str(f) and m["line"] is not None and not m["warn"]


def test_validate_translator_errors_carry_lines(tmp_path: Path) -> None:
    (_, xml, path, _) = next(t for t in TRANSLATOR_BAD if t[0] == "vcpu-100000")
    f = tmp_path / "many-cpus.xml"
    f.write_text(xml)
    r = qemuctl("validate", f)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"{f}:5: /domain/vcpu: 100000 vCPUs is more than machine pc-i440fx-7.2 takes (255)"]


def test_validate_warns_about_ignored_elements(tmp_path: Path) -> None:
    """<seclabel>, <resource> and <backingStore> of a `virsh dumpxml` are accepted with a warning."""
    xml = (DOMAINS / "dumpxml-pc.xml").read_text().replace("<domain type='kvm' id='3'>", "<domain type='qemu'>")
    f = tmp_path / "dumpxml.xml"
    f.write_text(xml)
    r = qemuctl("validate", f)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == f"{f}: OK"
    warnings = [LINE.match(line) for line in lines[:-1]]
    assert all(m and m["warn"] and m["file"] == str(f) for m in warnings), lines
    by_path = {m["path"]: m["msg"] for m in warnings if m}
    assert by_path["/domain/seclabel"] == ("ignored: qemud applies no SELinux/AppArmor labels of its own; "
                                          "qemud's own isolation applies (README: security)")
    assert by_path["/domain/resource"].startswith("ignored: ")
    assert by_path["/domain/devices/disk[1]/backingStore"] == "ignored: backing chains are read from the image itself"
    # -q: errors only, no warnings, no OK
    q = qemuctl("validate", "-q", f)
    assert q.returncode == 0 and q.stdout == "" and q.stderr == ""


def test_validate_quiet_still_prints_errors(tmp_path: Path) -> None:
    f = tmp_path / "bad.xml"
    f.write_text(BAD[0].xml)
    r = qemuctl("validate", "--quiet", f, DOMAINS / "minimal-pc.xml")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{f}:17: /domain/devices/disk[2]/target/@bus: 'foo' is not one of ide, sata, scsi, virtio, usb, fdc"]


# ---- argv -------------------------------------------------------------------------------------

def _argv_json(state: Path, file: Path) -> list[str]:
    r = qemuctl("--state-dir", state, "argv", "--json", file)
    assert r.returncode == 0, r.stdout + r.stderr
    no_traceback(r)
    out = json.loads(r.stdout)
    assert isinstance(out, list) and all(isinstance(a, str) for a in out)
    return out


@pytest.mark.parametrize("case", PORTABLE)
def test_argv_json_is_a_list_starting_with_the_emulator(case: str, state: Path) -> None:
    argv = _argv_json(state, DOMAINS / f"{case}.xml")
    root = ET.parse(DOMAINS / f"{case}.xml").getroot()
    assert argv[0] == (root.findtext("devices/emulator") or EMULATOR)
    assert "-nodefaults" in argv


@pytest.mark.parametrize("case", PORTABLE)
def test_plain_argv_is_a_shell_line_of_the_same_list(case: str, state: Path) -> None:
    f = DOMAINS / f"{case}.xml"
    as_json = _argv_json(state, f)
    r = qemuctl("--state-dir", state, "argv", f)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.count("\n") == 1
    assert shlex.split(r.stdout) == as_json


def test_plain_argv_puts_the_environment_first(tmp_path: Path, state: Path) -> None:
    xml = (DOMAINS / "minimal-pc.xml").read_text().replace(
        "</os>", "</os>\n  <clock offset='timezone' timezone='America/Argentina/Buenos_Aires'/>")
    f = tmp_path / "tz.xml"
    f.write_text(xml)
    as_json = _argv_json(state, f)
    r = qemuctl("--state-dir", state, "argv", f)
    assert r.returncode == 0, r.stderr
    words = shlex.split(r.stdout)
    assert words[0] == "TZ=America/Argentina/Buenos_Aires"
    assert words[1:] == as_json


def test_state_dir_holds_the_qmp_socket(state: Path) -> None:
    state = state / "s d,x=y"
    argv = _argv_json(state, DOMAINS / "minimal-pc.xml")
    qmp = [opts_dict(v, "backend") for v in options(argv, "-chardev")]
    (path,) = [c["path"] for c in qmp if c["id"] == "qmp"]
    assert path == str(state / "domains" / "minimal" / "qmp.sock")
    assert Path(path).parent.is_dir()  # the runtime directory is made, ready for QEMU


def test_state_dir_relative_is_made_absolute(tmp_path: Path) -> None:
    r = subprocess.run([*QEMUCTL, "--state-dir", "rel", "argv", "--json", str(DOMAINS / "minimal-pc.xml")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)
    qmp = [opts_dict(v, "backend") for v in options(argv, "-chardev")]
    (path,) = [c["path"] for c in qmp if c["id"] == "qmp"]
    assert path == str(tmp_path / "rel" / "domains" / "minimal" / "qmp.sock")


def test_argv_copies_the_nvram_template_into_the_state_dir(tmp_path: Path) -> None:
    assert Path("/usr/share/OVMF/OVMF_VARS_4M.fd").is_file(), "Debian's ovmf is missing: make deps installs it"
    xml = (DOMAINS / "uefi-ovmf.xml").read_text().replace("<domain type='kvm'>", "<domain type='qemu'>")
    xml = xml.replace("<cpu mode='host-passthrough' check='none' migratable='on'>", "<cpu mode='maximum'>")
    xml = re.sub(r"<interface type='network'>.*?</interface>", "", xml, flags=re.S)
    f = tmp_path / "uefi.xml"
    f.write_text(xml)
    state = tmp_path / "state"
    argv = _argv_json(state, f)
    nvram = state / "domains" / "win-uefi" / "nvram_VARS.fd"
    assert nvram.is_file()
    assert nvram.read_bytes() == Path("/usr/share/OVMF/OVMF_VARS_4M.fd").read_bytes()
    assert any(json.loads(a).get("filename") == str(nvram) for a in options(argv, "-blockdev"))
    # a second run keeps the guest's variables
    nvram.write_bytes(b"guest variables")
    _argv_json(state, f)
    assert nvram.read_bytes() == b"guest variables"


@pytest.mark.parametrize("case", ["minimal-pc", "serial-types", "injection-names", "boot-menu-order"])
def test_argv_matches_the_golden_file(case: str, state: Path) -> None:
    """The CLI gives the translator's argv: the golden one, with the state directory's paths."""
    host = probe(EMULATOR)
    recorded = load_recorded_caps()
    assert host.version[:2] == recorded.version[:2] and host.devices == recorded.devices, (
        f"this host's QEMU {host.version} differs from the recorded {recorded.version}: "
        "re-record with python -m tests.record_caps and review the golden files")
    golden = json.loads((DOMAINS / f"{case}.argv.json").read_text())
    argv = _argv_json(state, DOMAINS / f"{case}.xml")
    name = ET.parse(DOMAINS / f"{case}.xml").getroot().findtext("name") or ""

    def rebase(a: str) -> str:
        new = str(state / "domains" / name)
        for old in (f"/run/qemud/domains/{name}", f"/var/lib/qemud/domains/{name}"):
            a = a.replace(old.replace(",", ",,"), new.replace(",", ",,")).replace(old, new)  # QemuOpts, then plain
        return a
    assert argv == [rebase(a) for a in golden]


def test_argv_of_an_invalid_file_prints_problems_on_stderr(tmp_path: Path) -> None:
    f = tmp_path / "bad.xml"
    f.write_text(BAD[0].xml)
    r = qemuctl("--state-dir", tmp_path / "s", "argv", "--json", f)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{f}:17: /domain/devices/disk[2]/target/@bus: 'foo' is not one of ide, sata, scsi, virtio, usb, fdc"]
    assert not (tmp_path / "s").exists()  # nothing is prepared for a file that is refused


# ---- no traceback, whatever the input ----------------------------------------------------------

def _make_text(content: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / "guest.xml"
        p.write_text(content)
        return p
    return make


INPUTS: list[tuple[str, Callable[[Path], Path]]] = (
    [(f"model-{b.id}", _make_text(b.xml)) for b in BAD]
    + [(f"file-{b.id}", b.make) for b in BAD_FILES if isinstance(b, BadFile)]
    + [(f"translator-{t[0]}", _make_text(t[1])) for t in TRANSLATOR_BAD]
    + [(f"value-{c[0]}", _make_text(T.format(body=c[1]))) for c in NEVER_CRASH]
)


@pytest.mark.parametrize(("id", "make"), INPUTS, ids=[i for i, _ in INPUTS])
def test_validate_bad_input_exits_1_without_traceback(id: str, make: Callable[[Path], Path], tmp_path: Path) -> None:
    f = make(tmp_path)
    r = qemuctl("validate", f, timeout=30)  # a FIFO must not block: the timeout fails the test
    no_traceback(r)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines, "a refused file must say why"
    for line in lines:
        m = LINE.match(line)
        assert m, f"not FILE[:LINE]: [PATH: ]MESSAGE: {line!r}"
        assert m["file"] == str(f)
    assert r.stderr == ""


@pytest.mark.parametrize(("id", "make"), [i for i in INPUTS if i[0].startswith(("file-", "value-"))],
                         ids=[i for i, _ in INPUTS if i.startswith(("file-", "value-"))])
def test_argv_bad_input_exits_1_without_traceback(id: str, make: Callable[[Path], Path], tmp_path: Path) -> None:
    f = make(tmp_path)
    r = qemuctl("--state-dir", tmp_path / "state", "argv", "--json", f, timeout=30)
    no_traceback(r)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.strip(), "a refused file must say why"
