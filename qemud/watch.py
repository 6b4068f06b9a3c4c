"""Watching the domains directory with inotify (no polling), debounced.

An editor's save is several events (write a temporary file and rename it; or truncate and write
in pieces); all of them within the debounce window cause one reconcile.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from asyncinotify import Inotify, Mask

#: A file counts once it is complete: closed after writing, or renamed into place. Creation and
#: single writes are not events (a half-written file must not be read).
MASK = (Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE | Mask.ATTRIB
        | Mask.DELETE_SELF | Mask.MOVE_SELF)


def is_candidate(name: str) -> bool:
    """Domain files are *.xml; dotfiles and editor leftovers are not."""
    if not name.endswith(".xml") or name.startswith((".", "#")):
        return False
    return not name.endswith(("~", ".swp", ".tmp", "#"))


class DirectoryWatch:
    def __init__(self, directory: Path, debounce: float) -> None:
        self.directory = directory
        self.debounce = debounce
        self._inotify: Inotify | None = None

    def start(self) -> None:
        self._inotify = Inotify()
        self._inotify.add_watch(self.directory, MASK)

    async def changed(self) -> None:
        """Return once something relevant changed and the directory has been quiet for the
        debounce time."""
        assert self._inotify is not None
        it = self._inotify.__aiter__()
        while True:
            event = await it.__anext__()
            if event.name is None or is_candidate(event.name.name):
                break
        if event.name is not None and event.mask & Mask.MOVED_TO:
            return  # a complete file renamed into place (how editors and tools save): at once
        while True:  # the quiet period: swallow what follows closely
            try:
                await asyncio.wait_for(it.__anext__(), self.debounce)
            except asyncio.TimeoutError:
                return

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
