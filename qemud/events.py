"""What happened, told once: every event is a sentence for a person plus structured fields.

Two sinks, chosen automatically (``--log-target`` overrides): the journal, through
journald's native protocol on a non-blocking socket (MESSAGE, PRIORITY, SYSLOG_IDENTIFIER=qemud, MESSAGE_ID,
QEMUD_EVENT and QEMUD_* fields), when journald's socket exists; otherwise readable lines on
stderr: ``MESSAGE  QEMUD_EVENT=... QEMUD_DOMAIN=...``. A journal that goes away, or stops
reading, does not lose events nor stall the daemon: they go to stderr until it is back.

The event names and their MESSAGE_IDs are an interface (``journalctl QEMUD_EVENT=crashed``,
``journalctl MESSAGE_ID=...``, the catalog): change them only on purpose.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import stat
import struct
import sys
import syslog
import time
import uuid
from dataclasses import dataclass
from typing import Any, TextIO

from qemud.errors import printable, utf8_safe

# syslog priorities, as journald takes them
ERR, WARNING, NOTICE, INFO, DEBUG = (syslog.LOG_ERR, syslog.LOG_WARNING, syslog.LOG_NOTICE, syslog.LOG_INFO,
                                     syslog.LOG_DEBUG)

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_ID_NAMESPACE = uuid.UUID("0b5a6a2c-54a4-4c47-9f0e-4a2f3b8f6d11")


@dataclass(frozen=True)
class EventKind:
    name: str
    subject: str
    explanation: str

    @property
    def message_id(self) -> str:
        """Stable: derived from the name, so it never changes while the name does not."""
        return uuid.uuid5(_ID_NAMESPACE, self.name).hex


_KINDS = [
    EventKind("daemon-started", "qemud started", "qemud started and watches @QEMUD_DOMAINS_DIR@."),
    EventKind("ready", "qemud is ready", "The domains directory was read and every running guest adopted."),
    EventKind("reloading", "qemud rereads its directory", "SIGHUP (systemctl reload qemud): the domains "
              "directory is read again."),
    EventKind("daemon-stopping", "qemud exits", "qemud exits. Guests keep running; the next qemud adopts them."),
    EventKind("defined", "A guest was defined", "The domain file @QEMUD_FILE@ defines guest @QEMUD_DOMAIN@."),
    EventKind("redefined", "A guest's definition changed", "The file of guest @QEMUD_DOMAIN@ changed; a running "
              "guest is restarted gracefully with the new definition."),
    EventKind("undefined", "A guest was removed", "The file of guest @QEMUD_DOMAIN@ was removed; the guest was "
              "shut down and is forgotten."),
    EventKind("invalid-definition", "A domain file is invalid", "qemud cannot accept @QEMUD_FILE@; the message "
              "names the element and the problem. A guest already running from this file keeps its last "
              "good definition. Fix the file; qemud rereads it when it is saved."),
    EventKind("duplicate-definition", "A domain file duplicates another", "Two files define the same name or "
              "UUID. The later one is refused; the guest of the first is untouched."),
    EventKind("starting", "A guest is starting", "QEMU is being started for guest @QEMUD_DOMAIN@."),
    EventKind("spawned", "QEMU was started", "QEMU pid @QEMUD_PID@ runs guest @QEMUD_DOMAIN@."),
    EventKind("running", "A guest is running", "Guest @QEMUD_DOMAIN@ runs (QEMU pid @QEMUD_PID@)."),
    EventKind("paused", "A guest is paused", "QEMU paused guest @QEMUD_DOMAIN@ (asked for, an I/O error, or a "
              "preserved crash or poweroff)."),
    EventKind("stopping", "A guest is stopping", "Guest @QEMUD_DOMAIN@ is being shut down."),
    EventKind("stopped", "A guest stopped", "Guest @QEMUD_DOMAIN@ is not running and will not be restarted until "
              "its file changes or it is started."),
    EventKind("crashed", "A guest's QEMU ended unexpectedly", "QEMU of guest @QEMUD_DOMAIN@ ended without being "
              "asked to (a signal, an abort, the OOM killer, a KVM error): @QEMUD_EXIT@. QEMU's last words are "
              "in the journal (QEMUD_SOURCE=qemu). qemud restarts it according to its restart policy."),
    EventKind("backoff", "A guest waits before its next restart", "Guest @QEMUD_DOMAIN@ failed repeatedly; the "
              "next start is in @QEMUD_NEXT_DELAY@ s."),
    EventKind("failed", "A guest failed", "Guest @QEMUD_DOMAIN@ failed to start too many times in a row and is "
              "not restarted again until its file changes or it is started by hand."),
    EventKind("adopted", "A running guest was adopted", "qemud found QEMU pid @QEMUD_PID@ of guest "
              "@QEMUD_DOMAIN@ running from before its own start and took it over without restarting it."),
    EventKind("orphan", "A QEMU without a record was taken over", "QEMU pid @QEMUD_PID@ ran guest @QEMUD_DOMAIN@ "
              "without a runtime record: qemud was killed between starting it and recording it. qemud took it "
              "over (a start it had not finished is begun again) rather than start a second QEMU."),
    EventKind("ended-while-down", "A guest ended while qemud was down", "QEMU of guest @QEMUD_DOMAIN@ ended "
              "while qemud was not running; its restart policy applies."),
    EventKind("helper-started", "A guest's helper process was started", "Helper @QEMUD_HELPER@ (swtpm for an "
              "emulated TPM, virtiofsd for a virtiofs share), pid @QEMUD_PID@, was started for guest @QEMUD_DOMAIN@ "
              "before its QEMU; it is ended after QEMU."),
    EventKind("helper-adopted", "A guest's helper process was adopted", "qemud found helper @QEMUD_HELPER@, pid "
              "@QEMUD_PID@, of guest @QEMUD_DOMAIN@ running from before its own start and took it over."),
    EventKind("helper-died", "A guest's helper process ended unexpectedly", "Helper @QEMUD_HELPER@ of guest "
              "@QEMUD_DOMAIN@ ended while QEMU ran (or while qemud was down); the guest lost its TPM or its "
              "share, so its QEMU is ended and the restart policy decides what follows. The helper's own log "
              "is in the guest's runtime directory."),
    EventKind("helper-exited", "A guest's helper process ended", "Helper @QEMUD_HELPER@ of guest @QEMUD_DOMAIN@ "
              "ended with its QEMU."),
    EventKind("shutdown-requested", "A guest was asked to shut down", "qemud pressed the ACPI power button of "
              "guest @QEMUD_DOMAIN@."),
    EventKind("shutdown-timeout", "A guest did not shut down in time", "Guest @QEMUD_DOMAIN@ did not power off "
              "within its shutdown timeout; QEMU is ended."),
    EventKind("shutdown-failed", "An ACPI shutdown request failed", "The power button could not be pressed "
              "over QMP; QEMU is ended instead."),
    EventKind("guest-shutdown", "A guest powered off, rebooted or panicked", "The guest itself shut down; "
              "on_poweroff, on_reboot or on_crash of its definition decides what follows."),
    EventKind("rebooted", "A guest rebooted", "Guest @QEMUD_DOMAIN@ was reset in place."),
    EventKind("panicked", "A guest kernel panicked", "The guest kernel of @QEMUD_DOMAIN@ reported a panic "
              "(pvpanic); on_crash decides what follows."),
    EventKind("stopping-all", "All guests are being shut down", "Host shutdown: every guest is shut down "
              "gracefully, in parallel, and kept down until qemud starts again."),
    EventKind("stopped-all", "All guests were shut down", "The host-shutdown stop of all guests ended; the "
              "message says how many were ended after the timeout."),
    EventKind("stays-stopped", "A guest stays stopped as asked", "Guest @QEMUD_DOMAIN@ was shut down with "
              "qemuctl and stays stopped until it is started or its file changes."),
    EventKind("control", "A guest was controlled with qemuctl", "An administrator asked for this through "
              "the control socket."),
    EventKind("reset", "A guest was reset", "Guest @QEMUD_DOMAIN@ was reset with qemuctl (the reset button)."),
    EventKind("record-error", "A runtime record could not be written", "Without its record a restarted qemud "
              "could not adopt the guest, so its QEMU was ended. Check the runtime directory."),
    EventKind("stale-record", "A runtime record was unreadable", "A runtime record could not be read and was "
              "removed."),
    EventKind("directory-error", "The domains directory cannot be read", "qemud cannot read its domains "
              "directory."),
    EventKind("already-running", "Another qemud runs", "Another qemud uses the same runtime directory."),
    EventKind("config-error", "The configuration is invalid", "qemud.conf cannot be used; the message says why."),
    EventKind("tuning-error", "A guest's host tuning could not be applied", "qemud adopted guest "
              "@QEMUD_DOMAIN@ but could not apply its <cputune>, <blkiotune> or <memtune> again (CPU pinning, "
              "scheduling, cgroup limits). The guest keeps running without them; the message says why."),
    EventKind("host-error", "The host cannot run qemud", "A host problem stopped qemud."),
    EventKind("internal-error", "qemud hit a bug", "qemud hit an internal error while handling a guest; the "
                                                   "guest's supervision goes on. Please report it."),
]
KINDS: dict[str, EventKind] = {k.name: k for k in _KINDS}


def catalog() -> str:
    """journald's message catalog for every event (installed so ``journalctl -x`` explains them)."""
    out = ["# qemud's journal message catalog. Generated by `python -m qemud.events`; do not edit.", ""]
    for k in _KINDS:
        out += [f"-- {k.message_id}", f"Subject: {k.subject}", "Defined-By: qemud",
                "", k.explanation, ""]
    return "\n".join(out)


class Journal:
    """journald's native protocol on a NON-BLOCKING datagram socket.

    systemd-python's journal.send blocks while journald does not read (stopped, hung, busy
    rotating): the datagram queue fills and sendmsg waits, and with it the whole supervisor.
    Here a full queue is an error like any other (BlockingIOError), and the event goes to
    stderr instead: a supervisor that stops supervising because its log is slow is worse than
    a log line in the other place."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @staticmethod
    def encode(message: str, fields: dict[str, str]) -> bytes:
        """KEY=value lines; a value with a newline as KEY, its 64-bit little-endian length, value."""
        out = bytearray()
        for key, value in (("MESSAGE", message), *fields.items()):
            v = str(value).encode("utf-8", "replace")
            if b"\n" in v:
                out += key.encode() + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
            else:
                out += key.encode() + b"=" + v + b"\n"
        return bytes(out)

    def send(self, message: str, **fields: str) -> None:
        """Raises OSError when journald cannot take it now (gone, not reading, too large)."""
        self.sock.sendto(self.encode(message, fields), self.path)


#: lines kept for a stderr that does not take them now (a stream to a hung journald): beyond
#: this, lines are dropped and counted rather than stalling the supervisor
STDERR_BACKLOG = 1 << 20


class EventLog:
    def __init__(self, target: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._fd = _nonblocking_pipe_fd(self.stream)
        self._pending = bytearray()  # what the non-blocking stderr has not taken yet
        self._dropped = 0
        self._journal: Journal | None = None
        if target == "journal" or (target == "auto" and os.path.exists(JOURNAL_SOCKET)):
            self._journal = Journal()
        self.target = "journal" if self._journal is not None else "stderr"

    def emit(self, event: str, message: str, priority: int = INFO, **fields: Any) -> None:
        """One event: ``event`` is the QEMUD_EVENT name, fields become QEMUD_<NAME>."""
        self._send(event, message, priority, fields)

    def line(self, source: str, message: str, priority: int = INFO, **fields: Any) -> None:
        """A line of a guest's console or of QEMU's stderr (QEMUD_SOURCE=console|qemu); not an event."""
        self._send(None, message, priority, {"source": source, **fields})

    def _send(self, event: str | None, message: str, priority: int, fields: dict[str, Any]) -> None:
        # a lone surrogate (a file name that is not UTF-8, decoded with surrogateescape) would
        # make the journal's and stderr's encoders raise
        qf = {f"QEMUD_{k.upper()}": utf8_safe(str(v)) for k, v in fields.items() if v is not None}
        if event is not None:
            qf["QEMUD_EVENT"] = event
            # an event quotes file names and values from files: on one line, whatever they hold
            message = printable(message)
        else:
            message = utf8_safe(message.replace("\n", "\\n"))
        if self._journal is not None:
            kind = KINDS.get(event) if event else None
            if kind is not None:
                qf["MESSAGE_ID"] = kind.message_id
            try:
                self._journal.send(message, PRIORITY=str(priority), SYSLOG_IDENTIFIER="qemud", **qf)
                return
            except OSError:
                pass  # journald went away: this one goes to stderr
        self._line(message, priority, qf)

    def _line(self, message: str, priority: int, qf: dict[str, str]) -> None:
        order = sorted(qf, key=lambda k: (k != "QEMUD_EVENT", k != "QEMUD_SOURCE", 0))
        # a field value with a newline (a file name may have one) must not end the line
        parts = [f"{k}={shlex.quote(printable(qf[k]))}" for k in order if k != "MESSAGE_ID"]
        stamp = time.strftime("%H:%M:%S")
        text = f"{stamp} {_PRIO.get(priority, '')}{message}  {' '.join(parts)}\n"
        if self._fd is not None:
            self._write_nonblocking(text.encode("utf-8", "replace"))
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never stop the supervisor

    def _write_nonblocking(self, data: bytes) -> None:
        """stderr that is a pipe or a socket (under systemd: a stream to journald, which may hang
        like its native socket): never wait for it. What it does not take now waits in a backlog;
        past :data:`STDERR_BACKLOG` lines are dropped, and their count is written once it drains."""
        assert self._fd is not None
        if len(self._pending) + len(data) > STDERR_BACKLOG:
            self._dropped += 1
        else:
            self._pending += data
        try:
            while self._pending:
                n = os.write(self._fd, self._pending)
                del self._pending[:n]
                if not self._pending and self._dropped:
                    note = (f"{time.strftime('%H:%M:%S')} warning: {self._dropped} log line(s) dropped: "
                            "stderr did not take them\n").encode()
                    self._dropped = 0
                    self._pending += note
        except BlockingIOError:
            pass
        except OSError:
            self._pending.clear()  # a closed stderr must never stop the supervisor


def _nonblocking_pipe_fd(stream: TextIO) -> int | None:
    """The fd of ``stream`` made non-blocking when it is a pipe or a socket, else None (a file or
    a terminal is written as it is: O_NONBLOCK on a terminal would reach the shell sharing it)."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError):
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return None
    try:
        stream.flush()
        os.set_blocking(fd, False)
    except (OSError, ValueError):
        return None
    return fd


_PRIO = {ERR: "error: ", WARNING: "warning: "}
_EVENT_LINE = re.compile(r"^(\d\d:\d\d:\d\d) (error: |warning: )?(.*)$")
_EVENT_SEP = "  QEMUD_EVENT="


def parse_line(line: str) -> tuple[str, str, str, dict[str, str]] | None:
    """An event line of the stderr sink read back: (time, level, message, fields without their
    QEMUD_ prefix), or None for anything else (console and QEMU lines, other output)."""
    m = _EVENT_LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    rest = m.group(3)
    cut = rest.find(_EVENT_SEP)
    if cut < 0:
        return None
    try:
        tokens = shlex.split(rest[cut + 2:])
    except ValueError:
        return None
    fields: dict[str, str] = {}
    for tok in tokens:
        key, eq, value = tok.partition("=")
        if not eq or not key.startswith("QEMUD_"):
            return None
        fields[key.removeprefix("QEMUD_")] = value
    return m.group(1), (m.group(2) or "").rstrip(": "), rest[:cut], fields


if __name__ == "__main__":
    sys.stdout.write(catalog())
