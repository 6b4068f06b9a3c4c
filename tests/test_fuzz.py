"""Fuzzing the parser and the translator: whatever the domain XML, only qemud's own errors escape.

Two strategies, both drawing on libvirt's own test inputs (the corpus at CORPUS, read once):

* **vocabulary**: a valid skeleton (name, memory, os) with a random tree of elements below
  <domain> and <devices>, where each element's children, attribute names and attribute values
  are the ones seen under that element in the corpus (so the generator speaks libvirt's
  language and reaches deep into every family), mixed with random strings;
* **mutation**: a corpus file itself, changed: elements dropped, duplicated, reordered, moved
  elsewhere, attribute values swapped with values of the same attribute in other files or
  replaced by random strings, text replaced.

Each example goes through ``parse_domain`` and ``build_argv`` with the recorded capabilities;
anything but a ``QemudError`` (``DomainError`` included) is a qemud bug.

The default run is bounded and deterministic (``derandomize``). A long run (``make fuzz``)::

    QEMUD_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py -x
"""

from __future__ import annotations

import os
import random
import traceback
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemud.argv import build_argv
from qemud.domain import parse_domain
from qemud.errors import DomainError, QemudError
from tests.conftest import guest_paths
from tests.record_caps import load as load_caps

#: libvirt's 854 test inputs, copied into the repository (tests/data/libvirt); QEMUD_CORPUS
#: points at another set
CORPUS = Path(os.environ.get("QEMUD_CORPUS", Path(__file__).resolve().parent / "data" / "libvirt"))

#: the recorded caps, as a module constant so that falsifying examples do not print them
CAPS = load_caps()

#: the default run: a fixed number of examples, derandomized (the same ones every time, in CI too);
#: a long run (QEMUD_FUZZ_EXAMPLES=N, `make fuzz`) draws new random ones each time
LONG = "QEMUD_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("QEMUD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, print_blob=LONG,
                suppress_health_check=list(HealthCheck), database=None)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@dataclass
class Vocabulary:
    """What the corpus says about each element, by tag (namespaces as {uri}tag)."""

    files: list[Path] = field(default_factory=list)
    children: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    attrs: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    values: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    attr_values: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # by attribute name
    texts: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


@lru_cache(maxsize=1)
def vocabulary() -> Vocabulary:
    v = Vocabulary()
    for f in sorted(CORPUS.glob("*.xml")):
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError:
            continue
        if root.tag != "domain":
            continue
        v.files.append(f)
        for el in root.iter():
            if not isinstance(el.tag, str):
                continue
            for child in el:
                if isinstance(child.tag, str):
                    v.children[el.tag].add(child.tag)
            for k, val in el.attrib.items():
                v.attrs[el.tag].add(k)
                v.values[(el.tag, k)].add(val)
                v.attr_values[k].add(val)
            if el.text and el.text.strip():
                v.texts[el.tag].add(el.text.strip())
    assert len(v.files) > 500, f"the corpus at {CORPUS} looks incomplete ({len(v.files)} domain files)"
    return v


def _sorted(s: set[str]) -> list[str]:
    return sorted(s)


#: characters XML 1.0 can carry
XML_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff").filter(
    lambda c: c in "\t\n\r" or ord(c) >= 0x20)
ODD_VALUES = ["", "-1", "-5", "0", "abc", "1e99", "100000", "4294967296", "18446744073709551616",
              "0x10", "yes", "no", "on", "off", "none", "default", " ", "a,b=c", "/", "..", "../../etc/passwd",
              "\u00b2", "\u0661", "\n", "'\"", "x" * 300]
RANDOM_TEXT = st.one_of(st.text(XML_CHARS, max_size=20), st.sampled_from(ODD_VALUES),
                        st.integers(-(2**66), 2**66).map(str))


def _value(draw: st.DrawFn, tag: str, attr: str) -> str:
    v = vocabulary()
    choice = draw(st.integers(0, 9))
    if choice < 6 and v.values.get((tag, attr)):
        return draw(st.sampled_from(_sorted(v.values[(tag, attr)])))
    if choice < 8 and v.attr_values.get(attr):
        return draw(st.sampled_from(_sorted(v.attr_values[attr])))
    return draw(RANDOM_TEXT)


def _text(draw: st.DrawFn, tag: str) -> str | None:
    v = vocabulary()
    choice = draw(st.integers(0, 9))
    if choice < 5 and v.texts.get(tag):
        return draw(st.sampled_from(_sorted(v.texts[tag])))
    if choice < 7:
        return None
    return draw(RANDOM_TEXT)


def _element(draw: st.DrawFn, tag: str, depth: int) -> ET.Element:
    v = vocabulary()
    el = ET.Element(tag)
    names = _sorted(v.attrs.get(tag, set()))
    if names:
        for k in draw(st.lists(st.sampled_from(names), max_size=min(5, len(names)), unique=True)):
            el.set(k, _value(draw, tag, k))
    if draw(st.integers(0, 19)) == 0:  # an attribute never seen on this element
        el.set(draw(st.sampled_from(_sorted(set(v.attr_values)))), draw(RANDOM_TEXT))
    el.text = _text(draw, tag)
    kids = _sorted(v.children.get(tag, set()))
    if kids and depth < 5:
        for k in draw(st.lists(st.sampled_from(kids), max_size=4 if depth else 8)):
            el.append(_element(draw, k, depth + 1))
    return el


@st.composite
def vocabulary_domains(draw: st.DrawFn) -> str:
    """A valid skeleton and, below <domain> and <devices>, elements from the corpus: mostly whole
    subtrees libvirt's tests use (so that many examples get through the parser and exercise the
    translator), some generated from the vocabulary; then a few values changed."""
    v = vocabulary()
    subtrees = corpus_subtrees()
    root = ET.Element("domain", {"type": draw(st.sampled_from(["qemu", "qemu", "kvm"]))})
    ET.SubElement(root, "name").text = draw(st.one_of(st.just("fuzz"), st.from_regex(r"[a-z][a-z0-9._-]{0,20}", fullmatch=True)))
    mem = ET.SubElement(root, "memory", {"unit": "MiB"})
    mem.text = "256"
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": draw(st.sampled_from(["pc", "q35"]))}).text = "hvm"
    top = _sorted(v.children["domain"] - {"name", "memory", "os", "devices", "{%s}commandline" % QEMU_NS})
    for tag in draw(st.lists(st.sampled_from(top), max_size=4, unique=True)):
        root.append(_pick(draw, tag, subtrees))
    devices = ET.SubElement(root, "devices")
    for tag in draw(st.lists(st.sampled_from(_sorted(v.children["devices"])), min_size=1, max_size=6)):
        devices.append(_pick(draw, tag, subtrees))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(0, 2))):
        _perturb(root, rnd, draw)
    return ET.tostring(root, encoding="unicode")


@lru_cache(maxsize=1)
def corpus_subtrees() -> dict[str, list[str]]:
    """Serialized children of <domain> and of <devices> in the corpus, by tag (deduplicated)."""
    out: dict[str, set[str]] = defaultdict(set)
    for f in vocabulary().files:
        root = ET.parse(f).getroot()
        for parent in (root, root.find("devices")):
            if parent is None:
                continue
            for c in parent:
                if isinstance(c.tag, str) and c.tag not in ("name", "memory", "os", "devices"):
                    out[c.tag].add(ET.tostring(c, encoding="unicode"))
    return {k: sorted(x) for k, x in out.items()}


def _pick(draw: st.DrawFn, tag: str, subtrees: dict[str, list[str]]) -> ET.Element:
    # the simplest draw (0, what hypothesis shrinks to) is the corpus's own element
    if subtrees.get(tag) and draw(st.integers(0, 7)) < 7:
        return ET.fromstring(draw(st.sampled_from(subtrees[tag])))
    return _element(draw, tag, 1)


def _perturb(root: ET.Element, rnd: random.Random, draw: st.DrawFn) -> None:
    """One attribute value changed: to another value the corpus has for it, or a random string."""
    with_attrs = [e for e in root.iter() if e.attrib]
    if not with_attrs:
        return
    el = rnd.choice(with_attrs)
    k = rnd.choice(sorted(el.attrib))
    el.set(k, _value(draw, el.tag, k))


# ---- the mutation strategy ---------------------------------------------------------------------

def _all(root: ET.Element) -> list[tuple[ET.Element, ET.Element]]:
    """(parent, element) for every element below the root."""
    return [(p, c) for p in root.iter() for c in p]


def _mutate(root: ET.Element, rnd: random.Random, draw: st.DrawFn) -> None:
    v = vocabulary()
    pairs = _all(root)
    if not pairs:
        return
    parent, el = rnd.choice(pairs)
    op = draw(st.sampled_from(["drop", "duplicate", "reorder", "move", "swap-value", "random-value",
                               "random-text", "drop-attr", "foreign-child"]))
    if op == "drop":
        parent.remove(el)
    elif op == "duplicate":
        parent.insert(list(parent).index(el), ET.fromstring(ET.tostring(el)))
    elif op == "reorder":
        kids = list(parent)
        rnd.shuffle(kids)
        for k in list(parent):
            parent.remove(k)
        parent.extend(kids)
    elif op == "move":
        parent.remove(el)
        rnd.choice([root, *(c for _, c in _all(root))]).append(el)
    elif op == "swap-value" and el.attrib:
        k = rnd.choice(sorted(el.attrib))
        others = _sorted(v.attr_values.get(k, set()))
        if others:
            el.set(k, rnd.choice(others))
    elif op == "random-value" and el.attrib:
        el.set(rnd.choice(sorted(el.attrib)), draw(RANDOM_TEXT))
    elif op == "random-text":
        el.text = draw(RANDOM_TEXT)
    elif op == "drop-attr" and el.attrib:
        del el.attrib[rnd.choice(sorted(el.attrib))]
    elif op == "foreign-child" and isinstance(el.tag, str):
        # a child seen under some element of the corpus, placed here
        tag = draw(st.sampled_from(_sorted({c for kids in v.children.values() for c in kids})))
        el.append(_element(draw, tag, 4))


@st.composite
def mutated_corpus_files(draw: st.DrawFn) -> str:
    v = vocabulary()
    f = draw(st.sampled_from(v.files))
    root = ET.parse(f).getroot()
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, 6))):
        _mutate(root, rnd, draw)
    return ET.tostring(root, encoding="unicode")


# ---- the property ------------------------------------------------------------------------------

def check(xml: str) -> None:
    try:
        d = parse_domain(xml, "fuzz.xml")
        build_argv(d, CAPS, guest_paths(d.name), paused=True)
    except DomainError as exc:
        assert exc.problems, "a DomainError without problems"
        for p in exc.problems:
            assert p.message and "\n" not in p.format(), p
            assert p.path == "" or p.path.startswith("/"), p
    except QemudError:
        pass
    except Exception as exc:  # noqa: BLE001 - the point of the test
        tb = "".join(traceback.format_exception(exc)[-6:])
        pytest.fail(f"{type(exc).__name__} escaped: {exc}\n{tb}\n--- input ---\n{xml}")


def test_corpus_vocabulary_is_rich() -> None:
    """The generators are not vacuous: the corpus gives many elements under <devices>."""
    v = vocabulary()
    assert {"disk", "interface", "controller", "hostdev", "filesystem", "tpm"} <= v.children["devices"]
    assert "bus" in v.attrs["target"] and "virtio" in v.values[("target", "bus")]


@FUZZ
@given(xml=vocabulary_domains())
def test_fuzz_vocabulary_domains(xml: str) -> None:
    check(xml)


@FUZZ
@given(xml=mutated_corpus_files())
def test_fuzz_mutated_corpus_files(xml: str) -> None:
    check(xml)


# ---- what the fuzzer and the hostile-input tests found (each was a qemud bug) --------------------

def test_value_with_a_newline_stays_on_one_line_in_the_message() -> None:
    """A value quoted in a message (here an attribute holding '&#10;') used to put a raw newline
    into `qemuctl validate`'s one-line output and the journal's message."""
    xml = ("<domain type='qemu'><name>x</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>"
           "<devices><memballoon model='virtio'><address type='pci' slot='&#10;'/></memballoon></devices></domain>")
    with pytest.raises(DomainError) as exc:
        parse_domain(xml, "nl.xml")
    line = exc.value.problems[0].format()
    assert "\n" not in line and "'\\n'" in line


def test_event_line_with_a_newline_or_non_utf8_file_name_stays_one_line() -> None:
    """A file named 'a<newline>b.xml' split the stderr event line in two (the second half forged
    a line); a file name that is not UTF-8 made the writer raise and the event was lost."""
    import io
    import os

    from qemud.events import ERR, EventLog, parse_line

    out = io.StringIO()
    log = EventLog(target="stderr", stream=out)
    for name in ("/d/a\nb.xml", os.fsdecode(b"/d/caf\xe9.xml")):
        log.emit("invalid-definition", f"{name}: is empty", ERR, file=name)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (parse_line(x) for x in lines)
    assert first is not None and first[3]["FILE"] == "/d/a\\nb.xml" and first[2].startswith("/d/a\\nb.xml: ")
    assert second is not None and second[3]["FILE"] == "/d/caf\\xe9.xml"


def _translate(xml: str):  # type: ignore[no-untyped-def]
    d = parse_domain(xml, "r.xml")
    return build_argv(d, CAPS, guest_paths(d.name))


def test_acpi_table_path_with_a_colon_is_refused() -> None:
    """QEMU splits -acpitable file= on ':' and reads every piece: 'a.dat:/etc/shadow' handed the
    guest a second file (found by the injection property over the ACPI table slot)."""
    xml = ("<domain type='qemu'><name>x</name><memory unit='MiB'>64</memory><os><type>hvm</type>"
           "<acpi><table type='slic'>/var/lib/slic.dat:/etc/shadow</table></acpi></os>"
           "<features><acpi/></features></domain>")
    with pytest.raises(DomainError) as exc:
        _translate(xml)
    (p,) = exc.value.problems
    assert p.path == "/domain/os/acpi/table[1]" and "':'" in p.message


@pytest.mark.parametrize(("host", "portal"), [("192.0.2.1", "192.0.2.1:3260"), ("2001:db8::1", "[2001:db8::1]:3260"),
                                              ("iscsi.example.org", "iscsi.example.org:3260"),
                                              ("h,1", None), ('","driver":"evil', None), ("a/b", None)])
def test_iscsi_portal_host_is_an_address_or_refused(host: str, portal: str | None) -> None:
    """libiscsi reads the portal's last ':' as the port and ',' as a portal group tag: an IPv6
    address went in unbracketed, and any string was taken as a host (also in http/ftp URLs)."""
    from xml.sax.saxutils import quoteattr

    from tests.conftest import json_options
    xml = ("<domain type='qemu'><name>x</name><memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>"
           "<disk type='network'><source protocol='iscsi' name='iqn.2024-01.org.example:t/0'>"
           f"<host name={quoteattr(host)} port='3260'/></source><target dev='vda' bus='virtio'/></disk></devices></domain>")
    if portal is None:
        with pytest.raises(DomainError) as exc:
            _translate(xml)
        assert exc.value.problems[0].path == "/domain/devices/disk[1]/source/host/@name"
        http = xml.replace("protocol='iscsi' name='iqn.2024-01.org.example:t/0'", "protocol='https' name='a.iso'")
        with pytest.raises(DomainError):
            _translate(http)
        return
    cmd = _translate(xml)
    (node,) = [n for n in json_options(cmd.argv, "-blockdev") if n["node-name"] == "drive0-file"]
    assert node["portal"] == portal


@pytest.mark.parametrize("name", ["web1,dir=", "web1,mode=0666", "a,b"])
def test_emulated_tpm_of_a_guest_whose_name_has_a_comma_is_refused(name: str) -> None:
    """swtpm splits --tpmstate dir=... on ',' with no escape: a guest named 'web1,dir=' kept its TPM
    state in another directory (/tpm/tpm2), 'web1,mode=...' in web1's. Such a name is fine
    without an emulated TPM."""
    import dataclasses

    caps = dataclasses.replace(CAPS, host=dataclasses.replace(
        CAPS.host, helpers={"swtpm": "/usr/bin/swtpm", "swtpm_setup": "/usr/bin/swtpm_setup"}))
    base = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>"
            "<devices>{}</devices></domain>")
    d = parse_domain(base.format("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"), "t.xml")
    with pytest.raises(DomainError) as exc:
        build_argv(d, caps, guest_paths(d.name))
    (p,) = exc.value.problems
    assert p.path == "/domain/devices/tpm[1]/backend/@type" and "','" in p.message
    plain = parse_domain(base.format(""), "t.xml")
    assert build_argv(plain, caps, guest_paths(plain.name)).argv


def test_initrd_path_with_a_comma_is_refused() -> None:
    """QEMU's -initrd is 'file1 args,file2,...' for a multiboot kernel (its documentation): a
    comma in the path loaded a second file into the guest."""
    xml = ("<domain type='qemu'><name>x</name><memory unit='MiB'>64</memory><os><type>hvm</type>"
           "<kernel>/boot/mb.elf</kernel><initrd>/boot/a,/etc/shadow</initrd></os></domain>")
    with pytest.raises(DomainError) as exc:
        _translate(xml)
    (p,) = exc.value.problems
    assert p.path == "/domain/os/initrd" and "','" in p.message


def test_40000_devices_are_refused_before_planning() -> None:
    """The PCI planner's work grows with the square of the device count: 40,000 NICs took 8
    minutes of the daemon's time. More than MAX_DEVICES are refused at once."""
    import time

    from qemud.argv import MAX_DEVICES
    xml = ("<domain type='qemu'><name>x</name><memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>"
           + "<interface type='user'/>" * 40_000 + "</devices></domain>")
    d = parse_domain(xml, "n.xml")
    t0 = time.monotonic()
    with pytest.raises(DomainError) as exc:
        build_argv(d, CAPS, guest_paths(d.name))
    assert time.monotonic() - t0 < 1.0
    (p,) = exc.value.problems
    assert p.path == "/domain/devices" and f"at most {MAX_DEVICES}" in p.message


def test_problem_reports_are_bounded() -> None:
    from qemud.errors import MAX_REPORTED, Problem, report_lines
    err = DomainError([Problem(f"/domain/devices/serial[{i}]", "bad", file="f.xml") for i in range(1, 1001)])
    lines = report_lines(err)
    assert len(lines) == MAX_REPORTED + 1
    assert lines[-1] == f"f.xml: {1000 - MAX_REPORTED} more problems (qemuctl validate lists them all)"
    assert report_lines(DomainError(err.problems[:3])) == [p.format() for p in err.problems[:3]]


def test_two_usb_controllers_of_model_none() -> None:
    """Found by the mutation fuzzer: a duplicated <controller type='usb' model='none'/> raised
    StopIteration out of the USB checks."""
    xml = ("<domain type='qemu'><name>x</name><memory unit='MiB'>64</memory><os><type machine='q35'>hvm</type></os>"
           "<devices><controller type='usb' model='none'/><controller type='usb' model='none'/></devices></domain>")
    with pytest.raises(DomainError) as exc:
        _translate(xml)
    assert any(p.path == "/domain/devices/controller[2]" and "USB is disabled" in p.message
               for p in exc.value.problems), exc.value
