"""Hostile and broken input through the real daemon: one qemud, one healthy guest, and then every
kind of bad file dropped into its directory.

For each: the event names the file and the problem, no traceback, the healthy guest's QEMU is the
same process and still runs, and the daemon still reacts to a normal file. Special files (FIFO,
socket, device node) must not block the daemon; a 100 MB file is refused by its size, not read;
files created and deleted faster than the daemon reads them are no trouble. One case is read back
from a real journald (``journalctl -o json``).

The tests of this module share one daemon (module scope) and run in file order; each checks the
healthy guest afterwards (the ``healthy_guest_untouched`` fixture).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from qemud.xmlload import MAX_XML_BYTES
from tests.support.daemon import Daemon, Event, domain_xml, pid_alive
from tests.support.journald import Namespace
from tests.support.tinyguest import TinyGuest
from tests.test_model_errors import BILLION_LAUGHS, DEEP_DEVICES, XXE

pytestmark = pytest.mark.qemu

RUN_TIMEOUT = 30.0
#: how soon the daemon reacts to a renamed-in file (it reacts at once to a rename; generous for a
#: loaded machine, far below "blocked")
PROMPT = 5.0


class Run:
    """The shared daemon and its healthy guest."""

    def __init__(self, d: Daemon, guest: TinyGuest, pid: int, running: Event) -> None:
        self.d = d
        self.guest = guest
        self.pid = pid
        self.running = running
        self.n = 0

    def xml(self, name: str, **kw: object) -> str:
        """A valid domain that is defined but not started (no QEMU: the point is the reading)."""
        kw.setdefault("autostart", False)
        return domain_xml(self.guest, name, **kw)  # type: ignore[arg-type]

    def move_in(self, made: Path, filename: str | bytes) -> Path | bytes:
        """Rename something made in the scratch dir into the domains dir (the daemon reacts)."""
        if isinstance(filename, bytes):
            dest_b = os.fsencode(self.d.domains) + b"/" + filename
            os.rename(made, dest_b)
            return dest_b
        dest = self.d.domains / filename
        os.rename(made, dest)
        return dest

    def drop_bytes(self, filename: str | bytes, data: bytes) -> Path | bytes:
        self.n += 1
        tmp = self.d.scratch / f".h{self.n}"
        tmp.write_bytes(data)
        return self.move_in(tmp, filename)

    def invalid(self, path: Path | str | bytes, *needles: str, event: str = "invalid-definition",
                timeout: float = 10.0) -> Event:
        """The error event about ``path``; its message names the file and holds each needle."""
        shown = _shown(path)
        ev = self.d.wait_for(event, timeout=timeout, after=0,
                             pred=lambda e: e.get("file") == shown and all(n in e.message for n in needles))
        assert ev.level == "error", ev.raw
        assert shown in ev.message, ev.raw
        for n in needles:
            assert n in ev.message, f"{n!r} not in {ev.raw}"
        return ev

    def still_reacts(self) -> Event:
        """A normal file is handled promptly (the daemon is not blocked, not dead)."""
        self.n += 1
        name = f"probe{self.n}"
        t0 = time.monotonic()
        mark = self.d.mark()
        self.d.drop(f"{name}.xml", self.xml(name))
        ev = self.d.wait_for("defined", name, timeout=PROMPT, after=mark)
        assert ev.received - t0 < PROMPT
        return ev


def _shown(path: Path | str | bytes) -> str:
    """A path as the daemon's events show it (file names are made printable)."""
    from qemud.errors import printable
    return printable(os.fsdecode(path) if isinstance(path, bytes) else str(path))


@pytest.fixture(scope="module")
def run(guest: TinyGuest) -> Iterator[Run]:
    d = Daemon()
    try:
        d.start(timeout=30)
        d.drop("healthy.xml", domain_xml(guest, "healthy", serial_path=d.scratch / "healthy.console"))
        running = d.wait_for("running", "healthy", timeout=RUN_TIMEOUT)
        assert running.pid is not None
        yield Run(d, guest, running.pid, running)
    finally:
        print(d.log_text())
        d.close()


@pytest.fixture(autouse=True)
def healthy_guest_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    if "run" not in request.fixturenames:
        yield
        return
    r: Run = request.getfixturevalue("run")
    yield
    d = r.d
    assert d.running, f"qemud exited\n{d.tail()}"
    assert "Traceback" not in d.log_text(), d.tail()
    assert not d.events("internal-error"), d.tail()
    assert pid_alive(r.pid) and d.qemu_pid("healthy") == r.pid
    # not stopped, not restarted, not redefined: no event about it since it ran
    assert d.events(domain="healthy", after=r.running.index + 1) == []


# ---- files that are not domain XML --------------------------------------------------------------

BROKEN = [
    ("truncated.xml", b"<domain type='qemu'>\n  <name>t</name>\n  <memory>1024</mem", "not well-formed XML"),
    ("not-xml.xml", b"this is not XML at all\n", "not well-formed XML: syntax error"),
    ("binary.xml", bytes(range(256)) * 64, "not well-formed XML"),
    ("latin1.xml", b"<domain type='qemu'>\n  <name>caf\xe9</name>\n</domain>\n", "not well-formed XML"),
    ("xxe.xml", XXE.encode(), "XML entity declarations are not allowed"),
    ("laughs.xml", BILLION_LAUGHS.encode(), "XML entity declarations are not allowed"),
    ("deep.xml", DEEP_DEVICES.encode(), "/domain/devices/devices: element <devices> is not supported"),
    ("empty.xml", b"", "is empty"),
]


@pytest.mark.parametrize(("filename", "data", "problem"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_is_reported(run: Run, filename: str, data: bytes, problem: str) -> None:
    path = run.drop_bytes(filename, data)
    run.invalid(path, problem)


def test_xxe_does_not_leak_the_file(run: Run) -> None:
    log = run.d.log_text()
    assert "root:x:0:0" not in log
    assert "lollollol" not in log


def test_100mb_file_is_refused_by_its_size_without_being_read(run: Run) -> None:
    proc = psutil.Process(run.d.pid)
    before = proc.memory_info().rss
    big = run.d.scratch / "big"
    with open(big, "wb") as fh:  # 100 MB of real data (not sparse): a reader would pay for it
        fh.write(b"<domain type='qemu'>\n<!--")
        chunk = b"x" * (1024 * 1024)
        for _ in range(100):
            fh.write(chunk)
        fh.write(b"-->\n</domain>\n")
    size = big.stat().st_size
    t0 = time.monotonic()
    path = run.move_in(big, "big.xml")
    ev = run.invalid(path, f"is {size} bytes; a domain file may have at most {MAX_XML_BYTES}")
    assert ev.received - t0 < PROMPT
    grew = proc.memory_info().rss - before
    assert grew < 20 * 1024 * 1024, f"qemud's RSS grew by {grew} bytes reading a 100 MB file"
    run.d.remove("big.xml")


# ---- special files: never block ----------------------------------------------------------------

def _fifo(where: Path) -> Path:
    os.mkfifo(where)
    return where


def _socket(where: Path) -> Path:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(where))
    s.listen(1)  # a listening socket: a connect would succeed and a read would wait forever
    _keep.append(s)
    return where


def _device(where: Path) -> Path:
    os.mknod(where, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless data
    return where


_keep: list[socket.socket] = []


@pytest.mark.parametrize(("filename", "make", "kind"), [
    ("fifo.xml", _fifo, "FIFO"), ("sock.xml", _socket, "socket"), ("zero.xml", _device, "device"),
], ids=["fifo", "socket", "device-node"])
def test_special_file_is_refused_and_does_not_block(run: Run, filename: str, make: object, kind: str) -> None:
    made = make(run.d.scratch / f"made-{filename}")  # type: ignore[operator]
    path = run.move_in(made, filename)
    run.invalid(path, "not a regular file")
    run.still_reacts()


def test_symlinks_to_special_files_do_not_block(run: Run) -> None:
    target = _fifo(run.d.root_scratch / "fifo-target")
    link = run.d.scratch / "link-fifo"
    link.symlink_to(target)
    path = run.move_in(link, "link-fifo.xml")
    run.invalid(path, "not a regular file")
    link2 = run.d.scratch / "link-dev"
    link2.symlink_to("/dev/zero")
    path2 = run.move_in(link2, "link-dev.xml")
    run.invalid(path2, "refused: /dev/zero is writable by others")  # refused before it is opened
    run.still_reacts()


# ---- symlinks -----------------------------------------------------------------------------------

def test_symlink_loop(run: Run) -> None:
    a = run.d.scratch / "loop"
    a.symlink_to(run.d.domains / "loop.xml")
    path = run.move_in(a, "loop.xml")
    run.invalid(path, "Too many levels of symbolic links")
    run.still_reacts()


def test_symlink_to_a_file_elsewhere(run: Run) -> None:
    """A link to a file outside the directory is read like any file: /etc/passwd is not XML (and
    its content does not reach the log); a valid domain file elsewhere defines its guest."""
    link = run.d.scratch / "passwd"
    link.symlink_to("/etc/passwd")
    path = run.move_in(link, "passwd.xml")
    run.invalid(path, "not well-formed XML")
    assert "root:x:0:0" not in run.d.log_text()
    real = run.d.root_scratch / "elsewhere-real.xml"
    real.write_text(run.xml("elsewhere"))
    link2 = run.d.scratch / "elsewhere"
    link2.symlink_to(real)
    mark = run.d.mark()
    run.move_in(link2, "elsewhere.xml")
    defined = run.d.wait_for("defined", "elsewhere", timeout=PROMPT, after=mark)
    assert defined["file"] == str(run.d.domains / "elsewhere.xml")


# ---- a file that is gone before it is read -------------------------------------------------------

def test_files_deleted_between_the_event_and_the_read(run: Run) -> None:
    d = run.d
    mark = d.mark()
    xml = run.xml("racer")
    for i in range(60):
        p = d.domains / "racer.xml"
        if i % 3 == 0:  # renamed in, then deleted
            tmp = d.scratch / "racer.tmp"
            tmp.write_text(xml)
            os.rename(tmp, p)
        elif i % 3 == 1:  # written in place (close-after-write), then deleted
            p.write_text(xml)
        else:  # broken, then deleted
            p.write_text("<domain")
        if i % 5 == 4:  # swapped for a FIFO between the daemon's stat and its open
            fifo = d.scratch / "racer.fifo"
            os.mkfifo(fifo)
            os.rename(fifo, p)
        if i % 2:
            time.sleep(0.002 * (i % 7))
        p.unlink()
    run.still_reacts()
    # whatever was seen of it: no guest is left defined by a file that is gone (its removal may
    # still be on its way)
    deadline = time.monotonic() + 10
    while True:
        racer = [e.event for e in d.events(domain="racer", after=mark)]
        if racer.count("defined") == racer.count("undefined") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert racer.count("defined") == racer.count("undefined"), racer
    assert not d.events("spawned", "racer", after=mark)
    for e in d.events("invalid-definition", after=mark):
        if "racer" in e.get("file", ""):
            assert e["file"] == str(d.domains / "racer.xml")


# ---- names ------------------------------------------------------------------------------------

NAMES = [
    ("name-slash.xml", "a/b", "a domain name may not contain '/'"),
    ("name-dotdot.xml", "..", "a domain name may not start with '.'"),
    ("name-newline.xml", "a&#10;b", "a domain name may not contain control characters or newlines"),
    ("name-1000.xml", "n" * 1000, "a domain name may have at most 200 bytes, this one has 1000"),
]


@pytest.mark.parametrize(("filename", "name", "problem"), NAMES, ids=[n[0] for n in NAMES])
def test_bad_domain_name(run: Run, filename: str, name: str, problem: str) -> None:
    path = run.drop_bytes(filename, run.xml("placeholder").replace("<name>placeholder</name>",
                                                                   f"<name>{name}</name>").encode())
    run.invalid(path, "/domain/name", problem)


def test_name_with_commas_runs_with_exactly_that_name(run: Run) -> None:
    d = run.d
    mark = d.mark()
    d.drop("a,b.xml", domain_xml(run.guest, "a,b=c", serial_path=d.scratch / "comma.console"))
    running = d.wait_for("running", "a,b=c", timeout=RUN_TIMEOUT, after=mark)
    assert running.pid is not None
    argv = psutil.Process(running.pid).cmdline()
    names = [argv[i + 1] for i, a in enumerate(argv) if a == "-name"]
    assert names == ["guest=a,,b=c,debug-threads=on"] or names[0].startswith("guest=a,,b=c,"), names


def test_file_names_with_newline_and_not_utf8(run: Run) -> None:
    """The event stays one line, and names the file (its unprintable bytes escaped)."""
    d = run.d
    nl = run.drop_bytes("nl\nname.xml", run.xml("x").replace("<memory unit='MiB'>256", "<memory unit='MiB'>-5").encode())
    ev = run.invalid(nl, "/domain/memory")
    assert "nl\\nname.xml" in ev.message
    assert not any(line.raw.startswith("name.xml") for line in d.lines), "a file name broke a log line"
    raw = run.drop_bytes(b"caf\xe9.xml", b"not xml")
    run.invalid(raw, "not well-formed XML")
    run.still_reacts()


# ---- values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory", ["-5", "abc", "1e99"])
def test_bad_memory(run: Run, memory: str) -> None:
    xml = run.xml("m").replace("<memory unit='MiB'>256</memory>", f"<memory unit='MiB'>{memory}</memory>")
    path = run.drop_bytes(f"mem{memory}.xml", xml.encode())
    run.invalid(path, "/domain/memory", repr(memory))


def test_100000_vcpus_is_an_error_naming_the_file_and_element(run: Run) -> None:
    """Refused by the translator (QEMU's limit for the machine), which runs at start: the error
    still names the file and <vcpu>, and no QEMU is started."""
    d = run.d
    mark = d.mark()
    xml = domain_xml(run.guest, "many").replace("<vcpu>1</vcpu>", "<vcpu>100000</vcpu>")
    path = run.drop_bytes("many.xml", xml.encode())
    run.invalid(path, "/domain/vcpu", "100000 vCPUs")
    assert not d.events("spawned", "many", after=mark)


def test_two_files_with_one_name(run: Run) -> None:
    path = run.drop_bytes("healthy-copy.xml", domain_xml(run.guest, "healthy", uuid="6d6f1c02-8a4b-4f3e-9d55-ba9876543210",
                                                         memory_mib=128).encode())
    run.invalid(path, "domain name 'healthy' is already defined by", str(run.d.domains / "healthy.xml"),
                event="duplicate-definition")


# ---- files that are large but under the size limit ---------------------------------------------

def test_many_bad_devices_are_reported_in_a_bounded_number_of_lines(run: Run) -> None:
    """30,000 bad <serial> elements (900 KB): 20 lines and a count, not 30,000 journal entries."""
    body = "<serial type='nonsense'/>" * 30_000
    xml = run.xml("floody").replace("<memballoon model='none'/>", body)
    path = run.drop_bytes("floody.xml", xml.encode())
    last = run.invalid(path, "more problems (qemuctl validate lists them all)")
    assert "29980 more problems" in last.message
    assert len(run.d.events("invalid-definition", pred=lambda e: e.get("file") == str(path))) == 21


def test_40000_nics_are_refused_at_once_and_the_daemon_stays_responsive(run: Run) -> None:
    """Translating 40,000 NICs took 8 minutes in the PCI planner, on the daemon's event loop: no
    other guest was supervised meanwhile. Now the count is refused before any planning (and the
    translation runs off the event loop anyway)."""
    d = run.d
    mark = d.mark()
    xml = domain_xml(run.guest, "nics").replace("<memballoon model='none'/>",
                                                "<interface type='user'/>" * 40_000 + "<memballoon model='none'/>")
    t0 = time.monotonic()
    path = run.drop_bytes("nics.xml", xml.encode())
    ev = run.invalid(path, "/domain/devices", "40000 devices; qemud takes at most 1024", timeout=20)
    assert ev.received - t0 < 10
    run.still_reacts()
    assert not d.events("spawned", "nics", after=mark)


# ---- last: the daemon still works ---------------------------------------------------------------

def test_daemon_still_reacts_at_the_end(run: Run) -> None:
    ev = run.still_reacts()
    assert ev.run == 1  # the same daemon all along
    # every hostile file is still there and reported once: a rescan (SIGHUP) reports nothing new
    n = len(run.d.events("invalid-definition"))
    run.d.mark()
    assert run.d.proc is not None
    run.d.proc.send_signal(1)
    run.d.wait_for("reloading", timeout=10)
    run.still_reacts()
    assert len(run.d.events("invalid-definition")) == n


# ---- the journal -------------------------------------------------------------------------------

def test_invalid_file_in_the_real_journal_names_the_file_and_the_element() -> None:
    ns = Namespace()
    base = Path(tempfile.mkdtemp(prefix="qh", dir="/tmp"))
    base.chmod(0o711)  # QEMU runs as the qemud user: it passes through to its guests
    (base / "domains").mkdir()
    qemud = Path(sys.executable).parent / "qemud"
    p = subprocess.Popen(ns.cmd([str(qemud), "--domains-dir", str(base / "domains"), "--state-dir", str(base / "s")]),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ns.wait_for(20, "SYSLOG_IDENTIFIER=qemud", "QEMUD_EVENT=ready")
        f = base / "domains" / "j-bad.xml"
        tmp = base / "j-bad.tmp"
        tmp.write_text("<domain type='qemu'>\n  <name>jbad</name>\n  <memory unit='MiB'>abc</memory>\n"
                       "  <os><type>hvm</type></os>\n</domain>\n")
        os.rename(tmp, f)
        (entry,) = ns.wait_for(20, "QEMUD_EVENT=invalid-definition")
        assert entry["QEMUD_FILE"] == str(f)
        assert entry["PRIORITY"] == "3"
        assert entry["MESSAGE"].startswith(f"{f}:3: /domain/memory: ")
        assert "'abc'" in entry["MESSAGE"]
    finally:
        p.terminate()
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        ns.close()
        shutil.rmtree(base, ignore_errors=True)
    assert b"Traceback" not in err


# ---- virtiofsd's -o list, read by the real virtiofsd --------------------------------------------

@pytest.mark.parametrize("trick", ["\\,source=/tmp", ",source=/tmp", "\\\\,source=/tmp", "\\101"])
def test_virtiofs_directory_reaches_the_real_virtiofsd_as_one_path(trick: str) -> None:
    """dir='/srv\\,source=/' once made virtiofsd serve the host's root: qemud doubled the comma
    (QemuOpts' escape) where virtiofsd's fuse_opt takes a backslash. Run the real virtiofsd with
    the options qemud writes: it must look for exactly the directory named in the file."""
    import dataclasses
    from xml.sax.saxutils import quoteattr

    from qemud.argv import build_argv
    from qemud.domain import parse_domain
    from tests.conftest import guest_paths
    from tests.record_caps import load

    caps = load()
    caps = dataclasses.replace(caps, host=dataclasses.replace(caps.host, helpers={"virtiofsd": "/usr/lib/qemu/virtiofsd"}))
    base = Path(tempfile.mkdtemp(prefix="qv", dir="/tmp"))
    try:
        missing = f"{base}/missing{trick}"
        xml = ("<domain type='qemu'><name>v</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>"
               "<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB' memAccess='shared'/></numa></cpu><devices>"
               f"<filesystem type='mount'><driver type='virtiofs'/><source dir={quoteattr(missing)}/>"
               "<target dir='tag'/></filesystem></devices></domain>")
        d = parse_domain(xml, "v.xml")
        (h,) = build_argv(d, caps, guest_paths("v")).helpers
        o = h.argv[h.argv.index("-o") + 1]
        r = subprocess.run(["/usr/lib/qemu/virtiofsd", "-o", o, f"--socket-path={base}/s.sock", "-f"],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode != 0
        assert f'failed to stat source ("{missing}")' in r.stderr, r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
