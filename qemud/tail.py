"""Following a file as it grows (QEMU's stderr log), line by line, driven by inotify."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from asyncinotify import Inotify, Mask

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
        with Inotify() as ino:
            ino.add_watch(self.path, Mask.MODIFY)
            self.drain()
            async for _ in ino:
                self.drain()

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
