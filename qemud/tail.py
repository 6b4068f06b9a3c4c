"""Following a file as it grows (QEMU's stderr log), line by line, driven by inotify."""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from asyncinotify import Inotify, Mask, Watch

MAX_LINE = 4096


class RateLimit:
    """A token bucket: ``rate`` lines a second, bursts of ``burst``; counts what it drops."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()
        self.dropped = 0

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


class FileWatcher:
    """One inotify instance for every file the daemon follows (two per guest: QEMU's stderr log
    and the console log). The kernel gives a user 128 instances (fs.inotify.max_user_instances),
    shared with every other program of that user: one per file ran out at about 60 guests."""

    def __init__(self) -> None:
        self.ino = Inotify()
        self.callbacks: dict[int, list[Callable[[], None]]] = {}
        self.watches: dict[int, Watch] = {}
        self.task = asyncio.get_running_loop().create_task(self._read(), name="file-watcher")

    def watch(self, path: Path, callback: Callable[[], None]) -> tuple[int, Callable[[], None]]:
        w = self.ino.add_watch(path, Mask.MODIFY)
        self.watches[w.wd] = w
        self.callbacks.setdefault(w.wd, []).append(callback)
        return w.wd, callback

    def unwatch(self, handle: tuple[int, Callable[[], None]]) -> None:
        wd, callback = handle
        callbacks = self.callbacks.get(wd, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            self.callbacks.pop(wd, None)
            w = self.watches.pop(wd, None)
            if w is not None:
                try:
                    self.ino.rm_watch(w)
                except OSError:
                    pass  # the file is gone, and its watch with it

    async def _read(self) -> None:
        async for event in self.ino:
            wd = event.watch.wd if event.watch is not None else None
            for callback in list(self.callbacks.get(wd, ())):  # type: ignore[arg-type]
                callback()


_WATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FileWatcher] = weakref.WeakKeyDictionary()


def shared_watcher() -> FileWatcher:
    """The running event loop's one FileWatcher."""
    loop = asyncio.get_running_loop()
    w = _WATCHERS.get(loop)
    if w is None or w.task.done():
        w = _WATCHERS[loop] = FileWatcher()
    return w


class Follower:
    """Emits each line appended to ``path`` after ``start`` (default: its current end)."""

    def __init__(self, path: Path, emit: Callable[[str], None], on_dropped: Callable[[int], None],
                 start: int | None = None, rate: float = 100.0, burst: int = 200) -> None:
        self.path = path
        self.emit = emit
        self.on_dropped = on_dropped
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.pos = os.fstat(self.fd).st_size if start is None else start
        self.pending = b""
        self.limit = RateLimit(rate, burst)

    async def run(self) -> None:
        """Until cancelled: read whatever was appended each time the file is modified."""
        modified = asyncio.Event()
        watcher = shared_watcher()
        handle = watcher.watch(self.path, modified.set)
        try:
            self.drain()
            while True:
                await modified.wait()
                modified.clear()
                self.drain()
        finally:
            watcher.unwatch(handle)

    def drain(self) -> None:
        try:
            if os.fstat(self.fd).st_size < self.pos:  # truncated (a file console reopened by QEMU)
                self.pos = 0
                self.pending = b""
        except OSError:
            return
        while True:
            try:
                chunk = os.pread(self.fd, 65536, self.pos)
            except OSError:
                return
            if not chunk:
                break
            self.pos += len(chunk)
            self.pending += chunk
            *lines, self.pending = self.pending.split(b"\n")
            if len(self.pending) > MAX_LINE:
                lines.append(self.pending)
                self.pending = b""
            for raw in lines:
                if self.limit.allow():
                    self.emit(raw[:MAX_LINE].decode(errors="replace").rstrip("\r"))
        if self.limit.dropped and self.limit.allow():
            self.on_dropped(self.limit.dropped)
            self.limit.dropped = 0

    def close(self) -> None:
        """Read what is left, then stop."""
        self.drain()
        if self.pending:
            self.pending += b"\n"
            self.drain()
        os.close(self.fd)
