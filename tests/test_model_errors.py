"""What a user sees for a bad domain file: always a DomainError (never another exception), whose
problems name the file, the element's XPath-like path and, where there is one, the line.

Three stages can refuse a file: reading it (size, kind of file), parsing it (well-formedness,
entities) and validating it (the model). A few things only the translator can judge (memory or
vCPUs beyond what QEMU takes); those are checked through ``build_argv`` with the recorded caps.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemud.argv import build_argv
from qemud.caps import HostCaps
from qemud.domain import load_domain, parse_domain
from qemud.errors import DomainError, Problem
from qemud.xmlload import MAX_XML_BYTES, element_lines
from tests.conftest import guest_paths
from tests.record_caps import load as load_caps

# ---- a readable base domain; each bad case changes one thing ---------------------------------

BASE = """\
<domain type='qemu'>
  <name>bad</name>
  <uuid>2b7a1e0c-3f4d-4c5b-8a69-7e8f90a1b2c3</uuid>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/srv/vm/a.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/vm/b.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def edit(old: str, new: str, base: str = BASE) -> str:
    assert base.count(old) == 1, old
    return base.replace(old, new)


def line_of(text: str, needle: str) -> int:
    """1-based line of the (only) line holding ``needle``."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


@dataclass(frozen=True)
class Bad:
    id: str
    xml: str
    path: str
    message: str | re.Pattern[str]  # exact text, or a pattern it must match
    line_needle: str | int | None  # the line the problem must point at, or text on that line


def _bad_cases() -> list[Bad]:
    cases = []

    def add(id: str, xml: str, path: str, message: str | re.Pattern[str], needle: str | int | None) -> None:
        cases.append(Bad(id, xml, path, message, needle))

    add("bad-enum-target-bus",
        edit("<target dev='vdb' bus='virtio'/>", "<target dev='vdb' bus='foo'/>"),
        "/domain/devices/disk[2]/target/@bus", "'foo' is not one of ide, sata, scsi, virtio, usb, fdc",
        "bus='foo'")
    add("bad-enum-disk-device",
        edit("<disk type='file' device='disk'>\n      <source file='/srv/vm/b.img'/>",
             "<disk type='file' device='harddisk'>\n      <source file='/srv/vm/b.img'/>"),
        "/domain/devices/disk[2]/@device", "'harddisk' is not one of disk, cdrom, floppy, lun",
        "device='harddisk'")
    add("bad-enum-clock-offset",
        edit("  <devices>", "  <clock offset='gmt'/>\n  <devices>"),
        "/domain/clock/@offset", "'gmt' is not one of utc, localtime, timezone, variable, absolute",
        "offset='gmt'")
    add("bad-enum-on-crash",
        edit("  <devices>", "  <on_crash>explode</on_crash>\n  <devices>"),
        "/domain/on_crash",
        "'explode' is not one of destroy, restart, preserve, rename-restart, coredump-destroy, coredump-restart",
        "<on_crash>")
    add("bad-yesno",
        edit("  <devices>", "  <pm>\n    <suspend-to-mem enabled='maybe'/>\n  </pm>\n  <devices>"),
        "/domain/pm/suspend-to-mem/@enabled", "'maybe' is not one of yes, no", "enabled='maybe'")
    add("unknown-element",
        edit("    <boot dev='hd'/>", "    <boot dev='hd'/>\n    <bogus/>"),
        "/domain/os/bogus",
        "element <bogus> is not supported by qemud here (refused rather than silently dropped)", "<bogus/>")
    add("unknown-element-in-device",
        edit("      <target dev='vdb' bus='virtio'/>", "      <target dev='vdb' bus='virtio'/>\n      <sparkle/>"),
        "/domain/devices/disk[2]/sparkle",
        "element <sparkle> is not supported by qemud here (refused rather than silently dropped)", "<sparkle/>")
    add("unknown-attribute",
        edit("<source file='/srv/vm/b.img'/>", "<source file='/srv/vm/b.img' frob='1'/>"),
        "/domain/devices/disk[2]/source/@frob",
        "attribute 'frob' is not supported by qemud here (refused rather than silently dropped)", "frob='1'")
    add("unknown-root-attribute",
        edit("<domain type='qemu'>", "<domain type='qemu' flavour='x'>"),
        "/domain/@flavour",
        "attribute 'flavour' is not supported by qemud here (refused rather than silently dropped)", "flavour=")
    add("missing-name", edit("  <name>bad</name>\n", ""),
        "/domain/name", "required element is missing", "<domain ")
    add("missing-memory", edit("  <memory unit='MiB'>512</memory>\n", ""),
        "/domain/memory", "required element is missing", "<domain ")
    add("missing-os", edit("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <boot dev='hd'/>\n  </os>\n", ""),
        "/domain/os", "required element is missing", "<domain ")
    add("missing-os-type", edit("    <type arch='x86_64' machine='pc'>hvm</type>\n", ""),
        "/domain/os/type", "required element is missing", "<os>")
    add("missing-disk-target", edit("      <target dev='vdb' bus='virtio'/>\n", ""),
        "/domain/devices/disk[2]/target", "required element is missing", 15)  # the <disk>
    add("missing-target-dev", edit("<target dev='vdb' bus='virtio'/>", "<target bus='virtio'/>"),
        "/domain/devices/disk[2]/target/@dev", "required attribute is missing", "<target bus='virtio'/>")
    add("missing-domain-type", edit("<domain type='qemu'>", "<domain>"),
        "/domain/@type", "required attribute is missing", "<domain>")
    add("memory-negative", edit(">512</memory>", ">-5</memory>"),
        "/domain/memory", "'-5' is not a non-negative integer", "<memory")
    add("memory-abc", edit(">512</memory>", ">abc</memory>"),
        "/domain/memory", "'abc' is not a non-negative integer", "<memory")
    add("memory-1e99", edit(">512</memory>", ">1e99</memory>"),
        "/domain/memory", "'1e99' is not a non-negative integer", "<memory")
    add("memory-float", edit(">512</memory>", ">1.5</memory>"),
        "/domain/memory", "'1.5' is not a non-negative integer", "<memory")
    add("memory-bad-unit", edit("<memory unit='MiB'>", "<memory unit='MiBs'>"),
        "/domain/memory/@unit", re.compile(r"^'MiBs' is not a unit libvirt knows"), "<memory")
    add("memory-superscript-digit", edit(">512</memory>", ">\u00b2</memory>"),
        "/domain/memory", "'\u00b2' is not a non-negative integer", "<memory")
    add("memory-non-ascii-digits", edit(">512</memory>", ">\u0665\u0661\u0662</memory>"),  # Arabic-Indic 512
        "/domain/memory", "'\u0665\u0661\u0662' is not a non-negative integer", "<memory")
    add("memory-empty", edit("<memory unit='MiB'>512</memory>", "<memory unit='MiB'/>"),
        "/domain/memory", re.compile(r"^(?!required element is missing)"), "<memory")  # it is there
    add("name-empty", edit("<name>bad</name>", "<name/>"),
        "/domain/name", re.compile(r"empty"), "<name/>")
    add("vcpu-abc", edit("<vcpu>1</vcpu>", "<vcpu>many</vcpu>"),
        "/domain/vcpu", "'many' is not a non-negative integer", "<vcpu>")
    add("vcpu-negative", edit("<vcpu>1</vcpu>", "<vcpu>-1</vcpu>"),
        "/domain/vcpu", "'-1' is not a non-negative integer", "<vcpu>")
    add("name-slash", edit("<name>bad</name>", "<name>a/b</name>"),
        "/domain/name", "'a/b': a domain name may not contain '/' (it becomes file names)", "<name>")
    add("name-leading-dot", edit("<name>bad</name>", "<name>.hidden</name>"),
        "/domain/name", "'.hidden': a domain name may not start with '.' (it becomes file names)", "<name>")
    add("name-newline", edit("<name>bad</name>", "<name>a&#10;b</name>"),
        "/domain/name", "'a\\nb': a domain name may not contain control characters or newlines", "<name>")
    add("name-tab", edit("<name>bad</name>", "<name>a&#9;b</name>"),
        "/domain/name", "'a\\tb': a domain name may not contain control characters or newlines", "<name>")
    add("name-1000-chars", edit("<name>bad</name>", f"<name>{'x' * 1000}</name>"),
        "/domain/name", "a domain name may have at most 200 bytes, this one has 1000", "<name>")
    add("name-200-multibyte", edit("<name>bad</name>", f"<name>{'é' * 101}</name>"),
        "/domain/name", "a domain name may have at most 200 bytes, this one has 202", "<name>")
    add("uuid-bad", edit("<uuid>2b7a1e0c-3f4d-4c5b-8a69-7e8f90a1b2c3</uuid>", "<uuid>not-a-uuid</uuid>"),
        "/domain/uuid", "'not-a-uuid' is not a UUID like 4dea22b3-1d52-d8f3-2516-782e98ab3fa0", "<uuid>")
    add("uuid-too-short", edit("<uuid>2b7a1e0c-3f4d-4c5b-8a69-7e8f90a1b2c3</uuid>", "<uuid>2b7a1e0c-3f4d</uuid>"),
        "/domain/uuid", "'2b7a1e0c-3f4d' is not a UUID like 4dea22b3-1d52-d8f3-2516-782e98ab3fa0", "<uuid>")
    add("type-xen", edit("<domain type='qemu'>", "<domain type='xen'>"),
        "/domain/@type", "domain type 'xen' is not supported: this is a Xen guest; qemud runs QEMU guests; "
        "use type='qemu' or type='kvm'", "<domain ")
    add("type-kqemu", edit("<domain type='qemu'>", "<domain type='kqemu'>"),
        "/domain/@type", "domain type 'kqemu' is not supported: the kqemu accelerator was removed from QEMU "
        "in 0.12; use type='qemu' or type='kvm'", "<domain ")
    add("type-unknown", edit("<domain type='qemu'>", "<domain type='bochs'>"),
        "/domain/@type", "domain type 'bochs' is not supported: qemud knows only qemu (TCG emulation) and kvm; "
        "use type='qemu' or type='kvm'", "<domain ")
    add("arch-arm", edit("<type arch='x86_64' machine='pc'>", "<type arch='aarch64' machine='pc'>"),
        "/domain/os/type/@arch", "'aarch64' is not an architecture qemud runs (x86_64, i686)", "aarch64")
    add("os-type-xen", edit(">hvm</type>", ">xen</type>"),
        "/domain/os/type", "'xen' is not one of hvm", "machine='pc'")
    add("bad-target-dev", edit("<target dev='vdb' bus='virtio'/>", "<target dev='disk2' bus='virtio'/>"),
        "/domain/devices/disk[2]/target/@dev", "'disk2' is not a disk target name like vda, sdb, hdc or fda",
        "dev='disk2'")
    add("bad-mac", edit("  </devices>", "    <interface type='user'>\n      <mac address='52:54:00:zz:00:01'/>\n"
                        "    </interface>\n  </devices>"),
        "/domain/devices/interface[1]/mac/@address",
        "'52:54:00:zz:00:01' is not a MAC address like 52:54:00:12:34:56", "<mac ")
    add("multicast-mac", edit("  </devices>", "    <interface type='user'>\n      <mac address='01:00:5e:00:00:01'/>\n"
                              "    </interface>\n  </devices>"),
        "/domain/devices/interface[1]/mac/@address",
        "'01:00:5e:00:00:01' is a multicast MAC address; a NIC needs a unicast one", "<mac ")
    add("bad-cpuset", edit("<vcpu>1</vcpu>", "<vcpu cpuset='3-1'>1</vcpu>"),
        "/domain/vcpu/@cpuset", "'3-1' is an empty CPU range", "<vcpu ")
    add("bad-timer-frequency", edit("  <devices>", "  <clock>\n    <timer name='tsc' frequency='fast'/>\n  </clock>\n  <devices>"),
        "/domain/clock/timer[1]/@frequency", "'fast' is not an integer", "frequency=")
    add("qemud-metadata-bad-policy",
        edit("  <devices>", "  <metadata>\n    <qemud:settings xmlns:qemud='http://qemud.org/xmlns/domain/1.0'>\n"
             "      <qemud:restart policy='sometimes'/>\n    </qemud:settings>\n  </metadata>\n  <devices>"),
        "/domain/metadata/qemud:settings/qemud:restart/@policy", "'sometimes' is not one of always, on-failure, never",
        "policy='sometimes'")
    add("qemu-commandline-bad-env",
        edit("<domain type='qemu'>", "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
             edit("  </devices>", "  </devices>\n  <qemu:commandline>\n    <qemu:env name='1BAD' value='x'/>\n"
                  "  </qemu:commandline>")),
        "/domain/qemu:commandline/qemu:env[1]/@name", "'1BAD' is not an environment variable name", "1BAD")
    add("root-not-domain", "<network>\n  <name>default</name>\n</network>\n",
        "/network", "the root element is <network>; a domain file holds <domain>", "<network>")
    return cases


BAD = _bad_cases()


@pytest.fixture()
def write(tmp_path: Path) -> Callable[[str | bytes, str], Path]:
    def _write(content: str | bytes, name: str = "guest.xml") -> Path:
        p = tmp_path / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p
    return _write


def load_error(path: Path) -> DomainError:
    """The DomainError load_domain raises for ``path`` (anything else fails the test)."""
    with pytest.raises(DomainError) as exc:
        load_domain(path)
    assert exc.type is DomainError
    assert exc.value.problems, "a DomainError without problems says nothing"
    return exc.value


def find(err: DomainError, path: str) -> Problem:
    hits = [p for p in err.problems if p.path == path]
    assert hits, f"no problem at {path}: {err}"
    return hits[0]


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_model_error(bad: Bad, write: Callable[..., Path]) -> None:
    f = write(bad.xml)
    err = load_error(f)
    p = find(err, bad.path)
    if isinstance(bad.message, str):
        assert p.message == bad.message
    else:
        assert bad.message.search(p.message), p.message
    assert p.severity == "error"
    assert p.file == str(f)
    if isinstance(bad.line_needle, int):
        assert p.line == bad.line_needle
    elif bad.line_needle is not None:
        assert p.line == line_of(bad.xml, bad.line_needle)
    # the one-line form: FILE:LINE: PATH: MESSAGE
    assert p.format() == f"{f}:{p.line}: {bad.path}: {p.message}"
    assert str(err) == "\n".join(q.format() for q in err.problems)
    # the same problems from the text as from the file
    with pytest.raises(DomainError) as again:
        parse_domain(bad.xml, str(f))
    assert again.value.problems == err.problems


def test_exact_message_of_the_bus_example(write: Callable[..., Path]) -> None:
    xml = edit("<target dev='vdb' bus='virtio'/>", "<target dev='vdb' bus='foo'/>")
    f = write(xml, "web1.xml")
    err = load_error(f)
    assert str(err) == (f"{f}:17: /domain/devices/disk[2]/target/@bus: "
                        "'foo' is not one of ide, sata, scsi, virtio, usb, fdc")


def test_every_problem_is_reported_at_once(write: Callable[..., Path]) -> None:
    xml = edit("<name>bad</name>", "<name>a/b</name>")
    xml = edit(">512</memory>", ">lots</memory>", xml)
    xml = edit("<target dev='vdb' bus='virtio'/>", "<target dev='vdb' bus='foo'/>", xml)
    xml = edit("<source file='/srv/vm/a.img'/>", "<source file='/srv/vm/a.img' frob='1'/>", xml)
    err = load_error(write(xml))
    assert {p.path for p in err.problems} >= {"/domain/name", "/domain/memory",
                                              "/domain/devices/disk[2]/target/@bus",
                                              "/domain/devices/disk[1]/source/@frob"}
    lines = {p.path: p.line for p in err.problems}
    assert lines["/domain/devices/disk[1]/source/@frob"] == line_of(xml, "frob=")
    assert lines["/domain/devices/disk[2]/target/@bus"] == line_of(xml, "bus='foo'")


def test_parse_domain_without_a_file_name() -> None:
    with pytest.raises(DomainError) as exc:
        parse_domain(edit("<name>bad</name>", "<name>a/b</name>"))
    (p,) = exc.value.problems
    assert p.file is None and p.line == 2
    assert p.format().startswith("<input>:2: /domain/name: ")


# ---- files that are not domain XML at all -----------------------------------------------------

BILLION_LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE domain [\n <!ENTITY lol "lol">\n'
                  + "".join(f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'
                            for i in range(1, 10))
                  + ']>\n<domain type="qemu"><name>&lol9;</name><memory>1024</memory>'
                  '<os><type>hvm</type></os></domain>\n')
XXE = ('<?xml version="1.0"?>\n<!DOCTYPE domain [\n  <!ENTITY xxe SYSTEM "file:///etc/passwd">\n]>\n'
       "<domain type='qemu'>\n  <name>&xxe;</name>\n  <memory>1024</memory>\n"
       "  <os><type>hvm</type></os>\n</domain>\n")
XXE_PARAMETER = ('<?xml version="1.0"?>\n<!DOCTYPE domain [\n  <!ENTITY % p SYSTEM "file:///etc/passwd">\n'
                 "  %p;\n]>\n<domain type='qemu'><name>x</name><memory>1024</memory>"
                 "<os><type>hvm</type></os></domain>\n")
DEEP_DEVICES = ("<domain type='qemu'>\n<name>deep</name>\n<memory>1024</memory>\n<os><type>hvm</type></os>\n"
                + "<devices>" * 10_000 + "</devices>" * 10_000 + "\n</domain>\n")
DEEP_ROOT = "<a>" * 10_000 + "</a>" * 10_000


@dataclass(frozen=True)
class BadFile:
    id: str
    make: Callable[[Path], Path]  # creates the bad thing in a directory, returns its path
    message: str | re.Pattern[str]
    line: int | None = None
    path: str = ""


def _file(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / name
        p.write_bytes(content)
        return p
    return make


def _fifo(d: Path) -> Path:
    p = d / "fifo.xml"
    os.mkfifo(p)
    return p


def _directory(d: Path) -> Path:
    p = d / "dir.xml"
    p.mkdir()
    return p


def _symlink_to_fifo(d: Path) -> Path:
    target = _fifo(d)
    p = d / "link.xml"
    p.symlink_to(target)
    return p


BAD_FILES = [
    BadFile("not-xml", _file("a.xml", b"this is not XML\n"),
            "not well-formed XML: syntax error (column 1)", 1),
    BadFile("truncated", _file("a.xml", b"<domain type='qemu'>\n  <name>x</name>\n  <memory>1024</mem"),
            re.compile(r"^not well-formed XML: .*"), 3),
    BadFile("unclosed-root", _file("a.xml", b"<domain type='qemu'>\n  <name>x</name>\n"),
            re.compile(r"^not well-formed XML: no element found"), 3),
    BadFile("binary-garbage", _file("a.xml", bytes(range(256)) * 8),
            re.compile(r"^not well-formed XML: "), 1),
    BadFile("non-utf8", _file("a.xml", b"<domain type='qemu'>\n  <name>caf\xe9</name>\n</domain>\n"),
            re.compile(r"^not well-formed XML: not well-formed \(invalid token\)"), 2),
    BadFile("nul-byte", _file("a.xml", b"<domain type='qemu'>\n  <name>a\x00b</name>\n</domain>\n"),
            re.compile(r"^not well-formed XML: "), 2),
    BadFile("two-roots", _file("a.xml", b"<domain type='qemu'/>\n<domain type='qemu'/>\n"),
            "not well-formed XML: junk after document element (column 1)", 2),
    BadFile("xxe", _file("a.xml", XXE.encode()), "XML entity declarations are not allowed in a domain file"),
    BadFile("xxe-parameter-entity", _file("a.xml", XXE_PARAMETER.encode()),
            "XML entity declarations are not allowed in a domain file"),
    BadFile("billion-laughs", _file("a.xml", BILLION_LAUGHS.encode()),
            "XML entity declarations are not allowed in a domain file"),
    BadFile("empty", _file("a.xml", b""), "is empty"),
    BadFile("whitespace-only", _file("a.xml", b"  \n\t\n"), "is empty"),
    BadFile("2MB", _file("a.xml", b"<domain type='qemu'>\n<!--" + b"x" * (2 * 1024 * 1024) + b"-->\n</domain>\n"),
            re.compile(rf"^is \d+ bytes; a domain file may have at most {MAX_XML_BYTES}$")),
    BadFile("deep-10000-devices", _file("a.xml", DEEP_DEVICES.encode()),
            "element <devices> is not supported by qemud here (refused rather than silently dropped)", 5,
            "/domain/devices/devices"),
    BadFile("deep-10000-root", _file("a.xml", DEEP_ROOT.encode()),
            "the root element is <a>; a domain file holds <domain>", 1, "/a"),
    BadFile("fifo", _fifo, "is a FIFO, not a regular file"),
    BadFile("symlink-to-fifo", _symlink_to_fifo, "is a FIFO, not a regular file"),
    BadFile("directory", _directory, re.compile(r"^is a directory")),
    BadFile("missing", lambda d: d / "nonexistent.xml", "no such file"),
    BadFile("dev-zero", lambda d: Path("/dev/zero"), "is a device node, not a regular file"),
]


def _load_with_timeout(path: Path, timeout: float = 10.0) -> BaseException | None:
    """load_domain in a thread: a blocking read (a FIFO without writer) fails the test instead
    of hanging it."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            load_domain(path)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if path.exists() and path.is_fifo():  # unblock the reader so the thread can end
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"load_domain({path}) blocked for more than {timeout} s")
    return result[0]


@pytest.mark.parametrize("bad", BAD_FILES, ids=[b.id for b in BAD_FILES])
def test_bad_file(bad: BadFile, tmp_path: Path) -> None:
    path = bad.make(tmp_path)
    exc = _load_with_timeout(path)
    assert isinstance(exc, DomainError) and type(exc) is DomainError, repr(exc)
    assert exc.problems
    p = exc.problems[0]
    assert p.file == str(path)
    assert p.path == bad.path
    if isinstance(bad.message, str):
        assert p.message == bad.message
    else:
        assert bad.message.search(p.message), p.message
    assert p.line == bad.line
    where = f"{path}:{bad.line}" if bad.line is not None else str(path)
    assert p.format().startswith(f"{where}: ")
    assert "\n" not in p.format()


def test_deep_nesting_inside_metadata_is_not_a_crash(tmp_path: Path) -> None:
    """<metadata> may hold anything; 10,000 levels of it are accepted or refused, never a crash."""
    xml = ("<domain type='qemu'><name>deep</name><memory>1024</memory><os><type>hvm</type></os><metadata>"
           + "<a>" * 10_000 + "</a>" * 10_000 + "</metadata></domain>")
    f = tmp_path / "deep.xml"
    f.write_text(xml)
    try:
        load_domain(f)
    except DomainError as exc:
        assert exc.problems and exc.problems[0].file == str(f)


def test_entities_in_text_are_not_expanded_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET")
    xml = XXE.replace("file:///etc/passwd", secret.as_uri())
    with pytest.raises(DomainError) as exc:
        parse_domain(xml)
    assert "TOP-SECRET" not in str(exc.value)


def test_parse_domain_of_text_that_is_not_unicode_data() -> None:
    """A str with a lone surrogate cannot be XML; parse_domain promises a DomainError for any input."""
    with pytest.raises(DomainError):
        parse_domain("<domain type='qemu'><name>\ud800</name></domain>")


def test_parse_domain_size_limit_applies_to_text_too() -> None:
    with pytest.raises(DomainError) as exc:
        parse_domain("<domain>" + " " * (2 * 1024 * 1024) + "</domain>")
    assert exc.value.problems[0].message.startswith("is ")


# ---- what only the translator can refuse ------------------------------------------------------

TRANSLATOR_BAD = [
    ("memory-huge", edit(">512</memory>", ">99999999999999999999999999</memory>"),
     "/domain/memory", "memory of 99999999999999999999999999 MiB is larger than any host qemud can run"),
    ("memory-huge-tib", edit("<memory unit='MiB'>512</memory>", "<memory unit='TiB'>100000</memory>"),
     "/domain/memory", "memory of 100000 TiB is larger than any host qemud can run"),
    ("memory-zero", edit(">512</memory>", ">0</memory>"),
     "/domain/memory", "0 MiB is less than the 1 MiB QEMU needs"),
    ("vcpu-100000", edit("<vcpu>1</vcpu>", "<vcpu>100000</vcpu>"),
     "/domain/vcpu", "100000 vCPUs is more than machine pc-i440fx-7.2 takes (255)"),
    ("vcpu-zero", edit("<vcpu>1</vcpu>", "<vcpu>0</vcpu>"),
     "/domain/vcpu", "a guest needs at least one vCPU"),
    ("vcpu-current-too-big", edit("<vcpu>1</vcpu>", "<vcpu current='4'>2</vcpu>"),
     "/domain/vcpu/@current", "must be between 1 and the vCPU count 2"),
    ("topology-mismatch", edit("  <devices>", "  <cpu>\n    <topology sockets='2' cores='2' threads='1'/>\n  </cpu>\n  <devices>"),
     "/domain/cpu/topology", "2 sockets x 1 dies x 2 cores x 1 threads = 4 vCPUs, but <vcpu> says 1"),
    ("name-too-long-for-socket", edit("<name>bad</name>", f"<name>{'n' * 150}</name>"),
     "/domain/name", re.compile(r"^the QMP socket path /run/qemud/domains/n{150}/qmp.sock is longer than the 107 bytes")),
    ("machine-unknown", edit("machine='pc'", "machine='pc-0.11'"),
     "/domain/os/type/@machine", re.compile(r"^machine type 'pc-0.11' is not supported by /usr/bin/qemu-system-x86_64 7\.2")),
    ("machine-not-x86-pc", edit("machine='pc'", "machine='microvm'"),
     "/domain/os/type/@machine", "machine type 'microvm' is not supported by qemud (use pc or q35)"),
    ("cpu-model-unknown", edit("  <devices>", "  <cpu mode='custom'>\n    <model>Pentium9000</model>\n  </cpu>\n  <devices>"),
     "/domain/cpu/model", "CPU model 'Pentium9000' is not known to /usr/bin/qemu-system-x86_64"),
    ("network-unknown", edit("  </devices>", "    <interface type='network'>\n      <source network='nope'/>\n    </interface>\n  </devices>"),
     "/domain/devices/interface[1]/source/@network", re.compile(r"^no network named 'nope' exists on this host \(known: default\)")),
    ("ide-on-q35", edit("machine='pc'", "machine='q35'", edit("bus='virtio'/>\n    </disk>\n  </devices>", "bus='ide'/>\n    </disk>\n  </devices>")),
     "/domain/devices/disk[2]/target/@bus", "a q35 machine has no IDE bus; use bus='sata'"),
    ("second-timer-bad-tickpolicy", edit("  <devices>", "  <clock offset='utc'>\n    <timer name='pit' tickpolicy='delay'/>\n"
                                         "    <timer name='rtc' tickpolicy='merge'/>\n  </clock>\n  <devices>"),
     "/domain/clock/timer[2]/@tickpolicy", "RTC tick policy 'merge' is not supported by QEMU"),
    ("duplicate-boot-order", edit("<target dev='vdb' bus='virtio'/>", "<target dev='vdb' bus='virtio'/><boot order='1'/>",
                                  edit("<target dev='vda' bus='virtio'/>", "<target dev='vda' bus='virtio'/><boot order='1'/>",
                                       edit("    <boot dev='hd'/>\n", ""))),
     "/domain/devices/disk[2]/boot/@order", "boot order 1 is used twice"),
]


@pytest.mark.parametrize(("id", "xml", "path", "message"), TRANSLATOR_BAD, ids=[t[0] for t in TRANSLATOR_BAD])
def test_translator_error(id: str, xml: str, path: str, message: str | re.Pattern[str], caps: HostCaps,
                          tmp_path: Path) -> None:
    f = tmp_path / "guest.xml"
    f.write_text(xml)
    domain = load_domain(f)  # the model accepts it ...
    with pytest.raises(DomainError) as exc:  # ... the translator does not
        build_argv(domain, caps, guest_paths(domain.name))
    assert type(exc.value) is DomainError
    p = find(exc.value, path)
    if isinstance(message, str):
        assert p.message == message
    else:
        assert message.search(p.message), p.message
    # decorated the way qemuctl does it: the file, and the line of the element
    decorated = exc.value.with_file(str(f), element_lines(xml))
    q = find(decorated, path)
    assert q.file == str(f) and q.line is not None
    assert q.format().startswith(f"{f}:{q.line}: {path}: ")


def test_kvm_unusable_names_the_reason(caps: HostCaps) -> None:
    import dataclasses
    no_kvm = dataclasses.replace(caps, kvm=False, kvm_reason="/dev/kvm does not exist")
    d = parse_domain(edit("<domain type='qemu'>", "<domain type='kvm'>"))
    with pytest.raises(DomainError) as exc:
        build_argv(d, no_kvm, guest_paths(d.name))
    p = find(exc.value, "/domain/@type")
    assert "/dev/kvm does not exist" in p.message and "type='qemu'" in p.message


# ---- user input that once escaped as another exception (each is a qemud bug) -----------------

T = ("<domain type='qemu'>\n  <name>x</name>\n  <memory unit='MiB'>64</memory>\n"
     "  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n  </os>\n{body}\n</domain>\n")

NEVER_CRASH = [
    ("clock-adjustment-huge", "  <clock offset='variable' adjustment='99999999999999999999'/>", "/domain/clock/@adjustment"),
    ("clock-adjustment-huge-negative", "  <clock offset='variable' adjustment='-99999999999999'/>", "/domain/clock/@adjustment"),
    ("clock-adjustment-double-sign", "  <clock offset='variable' adjustment='--5'/>", "/domain/clock/@adjustment"),
    ("clock-adjustment-superscript", "  <clock offset='variable' adjustment='\u00b2'/>", "/domain/clock/@adjustment"),
    ("clock-absolute-far-future", "  <clock offset='absolute' start='99999999999999'/>", "/domain/clock/@start"),
    ("clock-absolute-far-past", "  <clock offset='absolute' start='-99999999999999'/>", "/domain/clock/@start"),
    ("virtio-serial-port-not-a-number",
     "  <devices>\n    <channel type='pty'>\n      <target type='virtio' name='org.example.x'/>\n"
     "      <address type='virtio-serial' controller='0' bus='0' port='abc'/>\n    </channel>\n  </devices>",
     "/domain/devices/channel[1]/address/@port"),
    ("iscsi-lun-superscript",
     "  <devices>\n    <disk type='network' device='disk'>\n      <source protocol='iscsi' name='iqn.2024-01.org.example:t/\u00b2'>\n"
     "        <host name='192.0.2.1' port='3260'/>\n      </source>\n      <target dev='vda' bus='virtio'/>\n"
     "    </disk>\n  </devices>",
     "/domain/devices/disk[1]/source/@name"),
    ("rng-egd-backend-type-unknown",
     "  <devices>\n    <rng model='virtio'>\n      <backend model='egd' type='carrier-pigeon'>\n"
     "        <source mode='connect' host='127.0.0.1' service='1234'/>\n      </backend>\n    </rng>\n  </devices>",
     "/domain/devices/rng[1]/backend/@type"),
]


@pytest.mark.parametrize(("id", "body", "path"), NEVER_CRASH, ids=[c[0] for c in NEVER_CRASH])
def test_bad_values_are_domain_errors_not_crashes(id: str, body: str, path: str, caps: HostCaps) -> None:
    xml = T.format(body=body)
    try:
        d = parse_domain(xml, "guest.xml")
        build_argv(d, caps, guest_paths(d.name))
    except DomainError as exc:
        assert any(p.path.startswith(path.rsplit("/@", 1)[0]) for p in exc.problems), str(exc)
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} escaped instead of a DomainError at {path}: {exc}")
    pytest.fail(f"accepted; expected a DomainError at {path}")


# ---- robustness: any attribute value anywhere is a DomainError or an argv ----------------------

#: (template, where the value goes); "{v}" is replaced by an escaped attribute value
SLOTS = [
    "<memory unit='{v}'>1024</memory>",
    "<vcpu current='{v}'>2</vcpu>",
    "<vcpu cpuset='{v}'>1</vcpu>",
    "<clock offset='variable' adjustment='{v}'/>",
    "<clock offset='absolute' start='{v}'/>",
    "<clock offset='timezone' timezone='{v}'/>",
    "<clock><timer name='rtc' tickpolicy='{v}'/></clock>",
    "<cpu><topology sockets='{v}' cores='1' threads='1'/></cpu>",
    "<cpu mode='custom'><model>{v}</model></cpu>",
    "<cpu mode='host-model'><feature policy='require' name='{v}'/></cpu>",
    "<genid>{v}</genid>",
    "<iothreads>{v}</iothreads>",
    "<maxMemory slots='{v}' unit='GiB'>4</maxMemory>",
    "<devices><disk><source file='/a'/><target dev='{v}'/></disk></devices>",
    "<devices><disk><source file='/a'/><target dev='sda' bus='sata'/><address type='drive' controller='{v}'/></disk></devices>",
    "<devices><disk><source file='/a'/><target dev='vda'/><address type='pci' slot='{v}'/></disk></devices>",
    "<devices><disk><source file='/a'/><target dev='vda'/><driver iothread='{v}'/></disk></devices>",
    "<devices><disk><source file='/a'/><target dev='sda' bus='scsi'/><wwn>{v}</wwn></disk></devices>",
    "<devices><disk type='network'><source protocol='iscsi' name='{v}'><host name='h'/></source><target dev='vda'/></disk></devices>",
    "<devices><disk type='network'><source protocol='nbd' name='{v}'><host name='h' port='1'/></source><target dev='vda'/></disk></devices>",
    "<devices><controller type='pci' index='{v}' model='pci-bridge'/></devices>",
    "<devices><controller type='usb' model='{v}'/></devices>",
    "<devices><controller type='scsi' model='{v}'/></devices>",
    "<devices><controller type='scsi' model='virtio-scsi'><alias name='{v}'/></controller></devices>",
    "<devices><interface type='user'><model type='{v}'/></interface></devices>",
    "<devices><interface type='user'><alias name='{v}'/></interface></devices>",
    "<devices><interface type='server'><source address='{v}' port='5555'/></interface></devices>",
    "<devices><serial type='tcp'><source mode='bind' host='h' service='{v}'/></serial></devices>",
    "<devices><serial type='pty'><target port='{v}'/></serial></devices>",
    "<devices><serial type='pty'><target type='{v}'/></serial></devices>",
    "<devices><console type='pty'><target type='{v}'/></console></devices>",
    "<devices><channel type='pty'><target type='virtio' name='a'/><address type='virtio-serial' port='{v}'/></channel></devices>",
    "<devices><channel type='pty'><target type='{v}' name='a'/></channel></devices>",
    "<devices><channel type='pty'><target type='guestfwd' address='{v}' port='1'/></channel><interface type='user'/></devices>",
    "<devices><graphics type='vnc' port='{v}' autoport='no'/></devices>",
    "<devices><graphics type='vnc'><listen type='address' address='{v}'/></graphics></devices>",
    "<devices><graphics type='spice' port='{v}'/></devices>",
    "<devices><video><model type='qxl' vgamem='{v}'/></video></devices>",
    "<devices><input type='tablet' bus='usb'><address type='usb' port='{v}'/></input></devices>",
    "<devices><rng model='virtio'><backend model='random'>{v}</backend></rng></devices>",
    "<devices><rng model='virtio'><backend model='egd' type='{v}'><source mode='connect' host='h' service='1'/></backend></rng></devices>",
    "<devices><rng model='virtio'><rate bytes='{v}'/><backend model='builtin'/></rng></devices>",
    "<devices><sound model='ich9'><audio id='{v}'/></sound></devices>",
    "<devices><audio id='{v}' type='none'/></devices>",
    "<devices><watchdog model='i6300esb' action='{v}'/></devices>",
    "<devices><panic model='isa'><address type='isa' iobase='{v}'/></panic></devices>",
    "<devices><memballoon model='virtio'><stats period='{v}'/></memballoon></devices>",
    "<os><type>hvm</type><bootmenu enable='yes' timeout='{v}'/></os>",
    "<os><type>hvm</type><bios rebootTimeout='{v}'/></os>",
    "<os><type>hvm</type><loader type='pflash' readonly='yes'>{v}</loader></os>",
    "<os><type>hvm</type><loader type='pflash' readonly='yes'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram template='{v}'/></os>",
]

#: the recorded caps, as a module constant so that falsifying examples do not print them
CAPS = load_caps()

_xml_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff").filter(
    lambda c: c in "\t\n\r" or ord(c) >= 0x20)
VALUES = st.one_of(
    st.text(_xml_chars, max_size=30),
    st.sampled_from(["", "-1", "0", "1", "0x10", "99999999999999999999", "-99999999999999", "1e9", "--5",
                     "\u00b2", "\u0661\u0662", " 7 ", "yes", "none", "virtio", "a,b=c", "{}", "\"", "'"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)


def _attr_escape(v: str) -> str:
    return escape(v, {"'": "&apos;", '"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slot=st.sampled_from(SLOTS), value=VALUES)
def test_any_value_is_a_domain_error_or_an_argv(slot: str, value: str) -> None:
    caps = CAPS
    body = slot.format(v=_attr_escape(value))
    if body.startswith("<os>"):
        xml = f"<domain type='qemu'><name>x</name><memory>65536</memory>{body}</domain>"
    else:
        xml = f"<domain type='qemu'><name>x</name><memory>65536</memory><os><type>hvm</type></os>{body}</domain>"
    try:
        d = parse_domain(xml, "fuzz.xml")
        build_argv(d, caps, guest_paths(d.name))
    except DomainError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.message
            assert p.path == "" or p.path.startswith("/domain"), p
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} escaped for {body!r}: {exc}")
