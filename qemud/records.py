"""Runtime records: what a restarted daemon needs to adopt a guest it did not start.

One JSON file per guest in its runtime directory, written atomically (temporary file, rename)
so a daemon killed mid-write leaves the old record or the new one, never half of one.

No fsync: a record only has to outlive the daemon's process, and the page cache does that. It
names a running QEMU, and no QEMU survives what the page cache does not survive (a host crash);
in production the runtime directory is /run, a tmpfs that a reboot empties anyway. A record
damaged by a power loss on a disk-backed directory reads as unreadable (removed at the next
start) or names a QEMU whose identity check fails. An fsync, on the other hand, blocks the
event loop on every start and stop (a quarter of the daemon's time starting 200 guests on ext4).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemud.runas import create_new, open_regular

RECORD = "record.json"


@dataclass
class Record:
    name: str
    uuid: str
    file: str
    definition: str  # hash of the definition QEMU runs
    pid: int
    create_time: float
    argv: list[str]
    qmp: str
    log: str
    started_at: float  # wall clock, for uptime
    domain: dict[str, Any] = field(default_factory=dict)  # the definition QEMU runs (model, XML keys)
    asked: str = ""  # what qemud asked of it: "" | "stop" | "restart"
    extra: dict[str, Any] = field(default_factory=dict)


def write(directory: Path, rec: Record) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = directory / f".{RECORD}.tmp"
    data = json.dumps(asdict(rec), indent=1).encode()
    fd = create_new(tmp)  # QEMU's user may create names here: nothing planted is followed
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, directory / RECORD)


def remove(directory: Path) -> None:
    """Forget a record. One that cannot be removed (a read-only runtime directory) stays: it
    names a QEMU that has ended, which the identity check at the next adoption tells."""
    try:
        (directory / RECORD).unlink()
    except OSError:
        pass


def _read(path: Path) -> bytes:
    """A record's bytes, if it is qemud's own regular file: a guest's directory is writable by
    QEMU's user, and a record planted there would make qemud adopt (and later kill) any process."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise OSError(f"{path} is not qemud's")
        with open(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def load(directory: Path) -> Record | None:
    try:
        return Record(**json.loads(_read(directory / RECORD)))
    except (OSError, ValueError, TypeError):
        return None


def load_all(domains_dir: Path) -> list[tuple[Path, Record | None]]:
    """Every record under ``domains_dir``/*/; None for one that cannot be read (to be removed)."""
    out: list[tuple[Path, Record | None]] = []
    try:
        dirs = sorted(p for p in domains_dir.iterdir() if p.is_dir())
    except FileNotFoundError:
        return out
    for d in dirs:
        f = d / RECORD
        if not f.exists():
            continue
        try:
            raw = json.loads(_read(f))
            out.append((d, Record(**raw)))
        except (OSError, ValueError, TypeError):
            out.append((d, None))
    return out
