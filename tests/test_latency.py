"""The daemon's reaction times (issue 8): the directory watch, per-file rereads, the order of a
stop's steps. The watch is tested on a real inotify instance over a real directory; the daemon
tests run the real qemud.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import pytest

from qemud.watch import Changes, DirectoryWatch
from tests.support.daemon import Daemon, domain_xml
from tests.support.tinyguest import ensure_guest


async def _collect(watch: DirectoryWatch, until: set[str], timeout: float) -> list[tuple[float, Changes]]:
    """Every Changes (with its arrival time) until ``until`` has been named, or the timeout."""
    got: list[tuple[float, Changes]] = []
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not until <= seen:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            ch = await asyncio.wait_for(watch.changed(), left)
        except asyncio.TimeoutError:
            break
        got.append((time.monotonic(), ch))
        seen |= ch.names
    return got


def _run(debounce: float, act, until: set[str], timeout: float = 10.0) -> tuple[float, list[tuple[float, Changes]]]:
    """Watch a fresh directory, call ``act(directory, scratch)``; returns (when act returned, what the watch said)."""
    async def main() -> tuple[float, list[tuple[float, Changes]]]:
        with tempfile.TemporaryDirectory() as tmp:
            d, scratch = Path(tmp, "domains"), Path(tmp, "x")
            d.mkdir()
            scratch.mkdir()
            watch = DirectoryWatch(d, debounce)
            watch.start()
            try:
                collecting = asyncio.get_running_loop().create_task(_collect(watch, until, timeout))
                await asyncio.sleep(0.05)
                done = await asyncio.to_thread(act, d, scratch)
                return done, await collecting
            finally:
                watch.close()
    return asyncio.run(main())


def test_a_file_renamed_in_is_reported_at_once_despite_a_long_debounce() -> None:
    def act(d: Path, scratch: Path) -> float:
        (scratch / "a.xml").write_text("<domain/>")
        os.rename(scratch / "a.xml", d / "a.xml")
        return time.monotonic()

    done, got = _run(5.0, act, {"a.xml"})
    assert got and got[0][1].names == {"a.xml"} and not got[0][1].full
    assert got[0][0] - done < 1.0  # not the 5 s quiet period


def test_writes_in_place_are_reported_once_after_the_quiet_period() -> None:
    def act(d: Path, scratch: Path) -> float:
        with open(d / "a.xml", "w") as fh:  # truncate, first half: not a complete file
            fh.write("<domain>")
        time.sleep(0.1)
        with open(d / "a.xml", "a") as fh:
            fh.write("</domain>")
        return time.monotonic()

    done, got = _run(0.4, act, {"a.xml"})
    assert [ch.names for _, ch in got] == [{"a.xml"}]  # one report for both writes
    assert got[0][0] - done >= 0.35  # only after the last write has been quiet for the debounce


def test_a_removal_waits_for_the_quiet_period_and_a_rename_back_ends_it() -> None:
    """An editor that moves the original aside and writes a new one: the file is never reported
    missing in between."""
    def act(d: Path, scratch: Path) -> float:
        (d / "a.xml").write_text("<domain/>")
        time.sleep(0.6)  # its write has been reported by now
        os.rename(d / "a.xml", d / "a.xml~")
        time.sleep(0.1)
        with open(d / "a.xml", "w") as fh:
            fh.write("<domain/>")
        os.unlink(d / "a.xml~")
        return time.monotonic()

    done, got = _run(0.4, act, {"a.xml", "never"}, timeout=2.5)
    # the first write, then exactly one report for the move aside + rewrite, after the quiet period
    assert [ch.names for _, ch in got] == [{"a.xml"}, {"a.xml"}]
    assert got[1][0] - done >= 0.35


def test_a_storm_of_renames_is_one_report_naming_every_file() -> None:
    names = {f"g{i:03}.xml" for i in range(200)}

    def act(d: Path, scratch: Path) -> float:
        for n in sorted(names):
            (scratch / n).write_text("<domain/>")
        # the watcher is not reading while this runs (a thread holds no event loop): all queued
        for n in sorted(names):
            os.rename(scratch / n, d / n)
        return time.monotonic()

    async def main() -> list[Changes]:
        with tempfile.TemporaryDirectory() as tmp:
            d, scratch = Path(tmp, "domains"), Path(tmp, "x")
            d.mkdir()
            scratch.mkdir()
            watch = DirectoryWatch(d, 5.0)
            watch.start()
            try:
                act(d, scratch)  # in the loop's thread: nothing is read until changed() runs
                first = await asyncio.wait_for(watch.changed(), 2)
                return [first]
            finally:
                watch.close()

    got = asyncio.run(main())
    assert got[0].names == names and not got[0].full


def test_an_event_queue_overflow_asks_for_a_full_reread() -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())

    async def main() -> Changes:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp, "domains")
            d.mkdir()
            watch = DirectoryWatch(d, 0.1)
            watch.start()
            try:
                (d / ".a").write_text("x")
                for _ in range(limit // 2 + 10):  # two events per rename: more than the queue holds
                    os.rename(d / ".a", d / ".b")
                    os.rename(d / ".b", d / ".a")
                return await asyncio.wait_for(watch.changed(), 5)
            finally:
                watch.close()

    assert asyncio.run(main()).full


@pytest.mark.qemu
def test_a_file_being_written_is_not_read_when_another_file_arrives() -> None:
    """Each event rereads only the file it names: a file still being written in place (no
    close yet) is not parsed because some other file was renamed in meanwhile."""
    guest = ensure_guest()
    d = Daemon()
    try:
        d.start(timeout=30)
        xml_a = domain_xml(guest, "half", autostart=False)
        after = d.mark()
        with open(d.path("half.xml"), "w") as fh:
            fh.write(xml_a[: len(xml_a) // 2])
            fh.flush()
            d.drop("whole.xml", domain_xml(guest, "whole", autostart=False))
            d.wait_for("defined", "whole", timeout=10, after=after)
            d.assert_no("invalid-definition", within=0.5, after=after)
            fh.write(xml_a[len(xml_a) // 2:])
        d.wait_for("defined", "half", timeout=10, after=after)
        assert not d.events("invalid-definition", after=after)
    finally:
        print(d.log_text())
        d.close()


def test_a_symlink_created_in_the_directory_is_reported_and_a_new_file_only_once_closed() -> None:
    def act(d: Path, scratch: Path) -> float:
        (scratch / "target.xml").write_text("<domain/>")
        os.symlink(scratch / "target.xml", d / "link.xml")
        fh = open(d / "new.xml", "w")  # created, still being written: no report yet
        fh.write("<dom")
        fh.flush()
        time.sleep(0.5)
        fh.write("ain/>")
        fh.close()
        return time.monotonic()

    done, got = _run(0.1, act, {"link.xml", "new.xml"})
    assert [ch.names for _, ch in got] == [{"link.xml"}, {"new.xml"}]
    assert got[1][0] >= done  # new.xml only after its close


def test_guests_starting_together_share_one_probe_of_their_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fleet of files arriving at once starts all its guests before the first probe of their
    QEMU binary is back: they wait for that one probe instead of each running its own."""
    import qemud.daemon as daemon_mod
    from qemud.config import Config
    from qemud.events import EventLog
    from qemud.paths import Dirs

    calls: list[str] = []
    real = daemon_mod.probe

    def counted(emulator: str, *a: object, **kw: object):  # the real probe, counted
        calls.append(emulator)
        time.sleep(0.2)  # the others arrive while it runs
        return real(emulator, *a, **kw)

    monkeypatch.setattr(daemon_mod, "probe", counted)
    dirs = Dirs(tmp_path / "qemud.conf", tmp_path / "domains", tmp_path / "run", tmp_path / "state")
    d = daemon_mod.Daemon(Config(), dirs, EventLog("stderr"))

    async def main() -> list:
        return await asyncio.gather(*(d._caps_for("/usr/bin/qemu-system-x86_64") for _ in range(10)))

    caps = asyncio.run(main())
    assert calls == ["/usr/bin/qemu-system-x86_64"]
    assert all(c is caps[0] for c in caps)


def test_a_rename_within_the_directory_is_reported_at_once_under_both_names() -> None:
    """mv a.xml b.xml: the old name's removal comes with the new file, not a quiet period later
    (else b.xml would look like a duplicate of a.xml, which still seemed to be there)."""
    def act(d: Path, scratch: Path) -> float:
        (scratch / "a.xml").write_text("<domain/>")
        os.rename(scratch / "a.xml", d / "a.xml")
        time.sleep(0.3)
        os.rename(d / "a.xml", d / "b.xml")
        return time.monotonic()

    done, got = _run(5.0, act, {"a.xml", "b.xml", "never"}, timeout=1.5)
    assert [ch.names for _, ch in got] == [{"a.xml"}, {"a.xml", "b.xml"}]
    assert got[1][0] - done < 1.0


@pytest.mark.qemu
def test_a_domain_file_renamed_within_the_directory_keeps_its_guest_without_a_duplicate() -> None:
    guest = ensure_guest()
    d = Daemon()
    try:
        d.start(timeout=30)
        after = d.mark()
        d.drop("a.xml", domain_xml(guest, "mv", autostart=False))
        d.wait_for("defined", "mv", timeout=10, after=after)
        after = d.mark()
        os.rename(d.path("a.xml"), d.path("b.xml"))
        d.assert_no("duplicate-definition", within=1.0, after=after)
        assert not d.events("undefined", after=after) and not d.events("defined", after=after)
    finally:
        print(d.log_text())
        d.close()
