"""Watching the domains directory with inotify (no polling), per file.

What counts as a change, and when it is acted on:

- A file renamed into the directory (IN_MOVED_TO) is complete by construction (how tools and
  most editors save: write aside, rename in): it is reported at once.
- A domain file renamed to another domain file name within the directory is reported at once
  under both names.
- Writes in place (IN_CLOSE_WRITE), removals (IN_MOVED_FROM, IN_DELETE) and mode changes
  (IN_ATTRIB) are debounced per file: the file is reported once it has been quiet for the
  debounce time, so an editor's save made of several steps (truncate and write in pieces; or
  move the original aside and write a new one) causes one reaction, and a half-written file or
  a file an editor briefly moved away is never acted on. Creation and single writes are not
  events at all: a file counts once it is closed after writing.
- A symlink or hard link created in the directory is complete when it appears, like a file
  renamed in: reported at once. A regular file's creation is no event (it counts once closed
  after writing).
- Events about the directory itself, or a lost event queue (IN_Q_OVERFLOW), ask for a full
  reread (after the quiet period too), since what changed is not known.

Only the files an event names are reported, so a fleet of files renamed in at once costs one
reread per file, not one reread of the whole directory per event.
"""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from asyncinotify import Event, Inotify, Mask

#: A file counts once it is complete: closed after writing, or renamed into place. Single writes
#: are not events (a half-written file must not be read), and the creation of a regular file is
#: ignored (its close follows); creation counts for what is complete when it appears (a symlink,
#: a hard link).
MASK = (Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE | Mask.ATTRIB | Mask.CREATE
        | Mask.DELETE_SELF | Mask.MOVE_SELF)

#: the key under which a pending full reread waits for its quiet period (never a file name)
_FULL = "/"


def is_candidate(name: str) -> bool:
    """Domain files are *.xml; dotfiles and editor leftovers are not."""
    if not name.endswith(".xml") or name.startswith((".", "#")):
        return False
    return not name.endswith(("~", ".swp", ".tmp", "#"))


@dataclass
class Changes:
    """What to reread: the named files (names in the directory), or everything (``full``)."""

    names: set[str] = field(default_factory=set)
    full: bool = False


class DirectoryWatch:
    def __init__(self, directory: Path, debounce: float) -> None:
        self.directory = directory
        self.debounce = debounce
        self._inotify: Inotify | None = None
        #: name (or _FULL) -> loop time at which it has been quiet long enough
        self._pending: dict[str, float] = {}
        #: rename cookie -> the domain file name it moved away (paired with its IN_MOVED_TO)
        self._moved_from: dict[int, str] = {}

    def start(self) -> None:
        # a bigger read buffer: a fleet of files renamed in at once is read in few syscalls
        self._inotify = Inotify(cache_size=256)
        self._inotify.sync_timeout = 0  # sync_get never waits: None when nothing is queued
        self._inotify.add_watch(self.directory, MASK)

    async def changed(self) -> Changes:
        """Return what changed, as soon as something may be acted on (see the module's doc)."""
        assert self._inotify is not None
        loop = asyncio.get_running_loop()
        out = Changes()
        while True:
            while (event := self._inotify.sync_get()) is not None:  # everything queued, no wait
                self._note(event, out, loop.time())
            now = loop.time()
            for name, due in list(self._pending.items()):
                if due <= now:
                    del self._pending[name]
                    if name == _FULL:
                        out.full = True
                    else:
                        out.names.add(name)
            if out.full or out.names:
                return out
            timeout = min(self._pending.values()) - now if self._pending else None
            await self._readable(timeout)

    def _note(self, event: Event, out: Changes, now: float) -> None:
        if event.mask & Mask.Q_OVERFLOW or event.name is None:
            # the queue overflowed (events lost) or the directory itself changed: reread all
            self._pending[_FULL] = now + self.debounce
            return
        name = event.name.name
        if not is_candidate(name):
            return
        if event.mask & Mask.CREATE and not self._complete_at_creation(name):
            return
        if event.mask & (Mask.MOVED_TO | Mask.CREATE):
            self._pending.pop(name, None)  # a complete file replaces whatever was under way
            out.names.add(name)
            old = self._moved_from.pop(event.cookie, None) if event.mask & Mask.MOVED_TO else None
            if old is not None and old in self._pending:
                # a rename within the directory (mv a.xml b.xml): the old name is gone for good,
                # told together with the new one (else the new file looks like a duplicate of it)
                del self._pending[old]
                out.names.add(old)
        else:
            if event.mask & Mask.MOVED_FROM:
                if len(self._moved_from) > 64:  # its pair never came (moved out of the directory)
                    self._moved_from.clear()
                self._moved_from[event.cookie] = name
            out.names.discard(name)  # renamed in, then written to: wait for the writes to end
            self._pending[name] = now + self.debounce

    def _complete_at_creation(self, name: str) -> bool:
        """A symlink (or a hard link to an existing file) is complete when it appears; a new
        regular file is being written and counts at its close."""
        try:
            st = os.lstat(self.directory / name)
        except OSError:
            return False  # gone already: its removal is an event of its own
        return not stat.S_ISREG(st.st_mode) or st.st_nlink > 1

    async def _readable(self, timeout: float | None) -> None:
        """Wait until inotify has events (or the timeout). Nothing is read here, so being
        cancelled (a SIGHUP won the race) never loses an event."""
        assert self._inotify is not None
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self._inotify.fd
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
