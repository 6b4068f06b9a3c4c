"""qemud: the daemon. A directory of domain files becomes running, watched, restarted guests.

Desired state comes from the files, actual state from the processes, and one reconcile path
brings them together, whether a file changed, the daemon started, or it was asked to reread.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections.abc import Callable
import fcntl
import os
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from qemud import __version__, notify, records
from qemud.caps import HostCaps, probe
from qemud.config import Config, load_config, with_storage_config
from qemud.runas import memlock_ceiling, passage, unreachable
from qemud.runas import resolve as resolve_runas
from qemud.domain import Domain, load_domain
from qemud.errors import DomainError, HostError, QemudError, report_lines
from qemud.events import ERR, INFO, NOTICE, WARNING, EventLog
from qemud.guest import Env, Guest, autostart, definition_hash
from qemud.heap import HeapTrim
from qemud.paths import Dirs
from qemud.policy import RestartPolicy
from qemud.watch import DirectoryWatch, is_candidate


def untrusted(path: str | Path) -> str | None:
    """Why a domain file or directory cannot be trusted, or None (in the spirit of sshd's
    StrictModes): it, and every directory on its real path, must be owned by root or the daemon's
    user and writable by no one else. Symlinks are resolved and checked the same way."""
    me = os.geteuid()
    real = Path(os.path.realpath(path))
    for p in [real, *real.parents]:
        try:
            st = os.stat(p)
        except OSError as exc:
            return f"cannot check {p}: {exc.strerror}"
        if st.st_uid not in (0, me):
            return f"{p} belongs to uid {st.st_uid}, not to root or qemud's user"
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and p != real
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
            return f"{p} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (chmod go-w {p})"
    return None


PIDFILE = "qemud.pid"  # holds the daemon's pid and its lock: one daemon per runtime directory


class AskedStops:
    """Guests stopped with qemuctl stay stopped across daemon restarts, until started or their
    file changes. Kept in the persistent state directory, with the definition it applied to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            data = json.loads(path.read_text())
            self._names: dict[str, str] = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._names = {}
        self.definitions: Callable[[str], str | None] = lambda name: None

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def definition(self, name: str) -> str | None:
        return self._names.get(name)

    def add(self, name: str) -> None:
        self._names[name] = self.definitions(name) or ""
        self._save()

    def discard(self, name: str) -> None:
        if self._names.pop(name, None) is not None:
            self._save()

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self._names))
            os.replace(tmp, self.path)
        except OSError:
            pass


#: the key of a file that must be read again at its next event (refused, or not stat-able)
NEVER = (-1, -1, -1)


@dataclass
class Parsed:
    """A domain file as last read. ``key`` is the identity it was read with (inode, size,
    mtime): the same key, the same contents, not read again."""

    key: tuple[int, int, int]
    domain: Domain | None
    error: DomainError | None
    mtime: float  # new files are taken oldest first
    report_key: tuple[int, int, int]  # its error is logged once per report_key
    definition: str = ""  # definition_hash(domain), computed once per read


class Daemon:
    def __init__(self, config: Config, dirs: Dirs, log: EventLog, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.dirs = dirs
        self.log = log
        self.guests: dict[str, Guest] = {}  # by domain name
        self._parsed: dict[str, Parsed] = {}  # by file path, reread only when the file changes
        self._need_full = False  # the directory could not be read: the next reconcile rereads all
        self._reported: dict[str, tuple[int, int, int]] = {}  # file -> version whose error was logged
        self._caps: dict[str, tuple[tuple[int, int, int], HostCaps]] = {}
        #: who QEMU runs as (qemud is root), or None (QEMU runs as qemud's own user)
        self.runas = resolve_runas(config.qemu_user, config.qemu_group)
        self._apply_config(config)
        self._stop = asyncio.Event()
        self._rescan = asyncio.Event()
        self.asked_stops = AskedStops(dirs.state / "asked-stops.json")
        self.heap = HeapTrim()  # frees what guest starts left in the C heap, once they settle

    def _apply_config(self, config: Config) -> None:
        """Settings that can change at a reload: restart and shutdown defaults, networks."""
        self.config = config
        self._networks = config.networks
        self._caps = {}  # host caps carry the networks: probe results come from the disk cache
        self._probing: dict[tuple[str, tuple[int, int, int] | None], asyncio.Task[HostCaps]] = {}
        self.env = Env(caps_for=self._caps_for, runtime=self.dirs.runtime, state=self.dirs.state, log=self.log,
                       restart_defaults=RestartPolicy(max_retries=config.max_retries, backoff=config.backoff,
                                                      max_backoff=config.max_backoff,
                                                      reset_after=config.reset_after),
                       shutdown_default=config.shutdown_timeout, on_state=self.state_changed,
                       runas=self.runas)
        for g in self.guests.values():
            g.env = self.env

    def reload_config(self) -> None:
        if self.config_path is None:
            return
        try:
            config = load_config(self.config_path, explicit=False)
            runas = resolve_runas(config.qemu_user, config.qemu_group)
        except QemudError as exc:
            self.log.emit("config-error", f"{exc}; keeping the previous configuration", ERR)
            return
        self.runas = runas  # for QEMUs started from now on; running ones keep their user
        self._apply_config(config)

    async def _caps_for(self, emulator: str) -> HostCaps:
        """A QEMU binary's capabilities: probed once (in a worker thread: a slow or hung probe
        never stalls the daemon), then from memory; the disk cache makes restarts cheap."""
        # keyed by the binary's identity too: a QEMU replaced (an upgrade, or anything else put
        # at that path) is probed again, never started with what the old one could do
        try:
            st = os.stat(emulator)
            key: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None  # gone: probe says so, in its words
        cached = self._caps.get(emulator)
        if cached is not None and key is not None and cached[0] == key:
            return cached[1]
        # one probe per binary at a time: a fleet of files arriving at once starts all its
        # guests before the first probe is back, and each used to probe (from the disk cache,
        # or, on a first start, by running QEMU) on its own
        flights = self._probing
        flight = flights.get((emulator, key))
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._probe(emulator, key))
            flights[(emulator, key)] = flight
            flight.add_done_callback(lambda _: flights.pop((emulator, key), None))
        return await asyncio.shield(flight)  # one waiter cancelled does not cancel the others' probe

    async def _probe(self, emulator: str, key: tuple[int, int, int] | None) -> HostCaps:
        cache = self._caps
        caps = (await asyncio.to_thread(probe, emulator)).with_networks(self._networks)
        caps = with_storage_config(caps, self.config)
        caps = caps.with_tls(self.config.tls_dirs)
        if self.runas is not None:  # an unprivileged QEMU locks memory only up to its rlimit
            caps = dataclasses.replace(caps, host=dataclasses.replace(caps.host, memlock_bytes=memlock_ceiling()))
        if key is not None:
            cache[emulator] = (key, caps)  # into a cache a reload has replaced meanwhile: dropped
        return caps

    # ---- the reconcile path --------------------------------------------------------------
    def _check(self, path: str) -> None:
        """Reread one domain file into ``_parsed`` (or forget it, when gone): its trust (StrictModes),
        then, if its identity changed, its contents."""
        try:
            st = os.stat(path)  # follows symlinks, never opens
        except FileNotFoundError:
            # gone (or a dangling symlink): forgotten, and an error it had may be told again
            self._parsed.pop(path, None)
            self._reported.pop(path, None)
            return
        except OSError as exc:  # a symlink loop, a permission problem
            self._parsed[path] = Parsed(NEVER, None, DomainError.at("", f"cannot be read: {exc.strerror}")
                                        .with_file(path), 0.0, (0, 0, exc.errno or 0))
            return
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        distrust = untrusted(path)
        if distrust:
            self._parsed[path] = Parsed(NEVER, None, DomainError.at("", f"refused: {distrust}").with_file(path),
                                        st.st_mtime, (st.st_ino, st.st_mode, st.st_uid))
            return
        p = self._parsed.get(path)
        if p is not None and p.key == key:
            return  # the same file as read before (a chmod that keeps it trusted), error or not
        if not stat.S_ISREG(st.st_mode):
            p = Parsed(key, None, DomainError.at("", "is not a regular file").with_file(path), st.st_mtime, key)
        else:
            try:
                domain = load_domain(path)
                p = Parsed(key, domain, None, st.st_mtime, key, definition_hash(domain))
            except DomainError as exc:
                p = Parsed(key, None, exc, st.st_mtime, key)
        self._parsed[path] = p

    def _scan(self, only: set[str] | None = None) -> dict[str, tuple[str, Domain, str]]:
        """name -> (file, domain, definition hash) wanted by the directory. Only the files in
        ``only`` are reread (None: every file, at startup, SIGHUP and inotify overflow); the
        others count as last read. Errors are logged once per version."""
        unchanged = {name: (g.file, g.domain, g.definition) for name, g in self.guests.items()}
        if self._need_full:
            only = None
        try:
            why = untrusted(self.dirs.domains)
            names = None if only is not None else [e.name for e in os.scandir(self.dirs.domains)]
        except OSError as exc:
            self.log.emit("directory-error", f"cannot read {self.dirs.domains}: {exc.strerror}", ERR)
            self._need_full = True
            return unchanged
        if why:
            # whoever may write the directory could make qemud start QEMU with any file: nothing
            # in it is read (running guests keep their definitions) until that is fixed
            if self._reported.get(str(self.dirs.domains)) != (0, 0, hash(why)):
                self._reported[str(self.dirs.domains)] = (0, 0, hash(why))
                self.log.emit("directory-error", f"{self.dirs.domains}: refused: {why}", ERR,
                              file=str(self.dirs.domains))
            self._need_full = True  # what changed meanwhile was not read: all of it, once trusted
            return unchanged
        self._reported.pop(str(self.dirs.domains), None)
        if names is not None:
            self._need_full = False
            paths = {os.path.join(self.dirs.domains, n) for n in names if is_candidate(n)}
            for path in [p for p in self._parsed if p not in paths]:
                del self._parsed[path]
                self._reported.pop(path, None)
        else:
            paths = only or set()
        for path in paths:
            self._check(path)
        return self._wanted()

    def _wanted(self) -> dict[str, tuple[str, Domain, str]]:
        """name -> (file, domain, definition hash) from the files as last read (no I/O)."""
        wanted: dict[str, tuple[str, Domain, str]] = {}
        uuids: dict[str, str] = {}
        # a file that defines a guest already keeps it: a duplicate never takes over, whatever
        # the modification times do later; new files are taken oldest first
        owned = {g.file for g in self.guests.values()}
        for path, p in sorted(self._parsed.items(), key=lambda kv: (kv[0] not in owned, kv[1].mtime, kv[0])):
            domain = p.domain
            if domain is None:
                self._report_invalid(path, p.report_key, p.error)
                # a running guest keeps its last good definition
                for g in self.guests.values():
                    if g.file == path:
                        wanted[g.name] = (path, g.domain, g.definition)
                continue
            self._reported.pop(path, None)
            other = wanted.get(domain.name)
            if other is not None and other[0] != path:
                self._report_duplicate(path, p.report_key, f"domain name '{domain.name}' is already defined by {other[0]}")
                continue
            uuid = domain.uuid_value
            if uuid in uuids and uuids[uuid] != path:
                self._report_duplicate(path, p.report_key, f"UUID {uuid} is already used by {uuids[uuid]}")
                continue
            uuids[uuid] = path
            wanted[domain.name] = (path, domain, p.definition)
        return wanted

    def _report_invalid(self, path: str, key: tuple[int, int, int], error: DomainError | None) -> None:
        if self._reported.get(path) == key:
            return
        self._reported[path] = key
        for line in report_lines(error) if error else []:
            self.log.emit("invalid-definition", line, ERR, file=path)

    def _report_duplicate(self, path: str, key: tuple[int, int, int], why: str) -> None:
        if self._reported.get(path) == key:
            return
        self._reported[path] = key
        self.log.emit("duplicate-definition", f"{path}: refused: {why}", ERR, file=path)

    def reconcile(self, only: set[str] | None = None) -> None:
        """Bring the guests in line with the directory: with ``only``, after rereading just
        those files (paths); without, after rereading every file."""
        wanted = self._scan(only)
        for name, guest in list(self.guests.items()):
            if name not in wanted and not guest.removing:
                guest.remove("its file was removed")
                self._forget_when_gone(name, guest)
        for name, (path, domain, definition) in wanted.items():
            guest = self.guests.get(name)
            if guest is None:
                guest = Guest(self.env, domain, path)
                self.guests[name] = guest
                self.log.emit("defined", f"{name}: defined by {path}", INFO, domain=name,
                              uuid=domain.uuid_value, file=path)
                if name in self.asked_stops and self.asked_stops.definition(name) == definition:
                    self.log.emit("stays-stopped", f"{name}: stays stopped, as asked with qemuctl", INFO,
                                  domain=name, uuid=domain.uuid_value)
                elif autostart(domain):
                    self.asked_stops.discard(name)
                    guest.start("its file appeared" if self._started else "autostart")
            else:
                resumed, guest.resumed_removal = guest.resumed_removal, False
                if definition != guest.definition or guest.file != path or guest.removing:
                    self.asked_stops.discard(name)  # a changed file clears an asked-for stop
                    guest.redefine(domain, path)
                elif resumed and autostart(domain) and name not in self.asked_stops:
                    # the daemon died while the guest stopped for its file's removal, and the file
                    # came back meanwhile: it is wanted, as if it had come back while qemud ran
                    guest.start("its file is back")

    def _forget_when_gone(self, name: str, guest: Guest) -> None:
        async def forget() -> None:
            await guest.gone.wait()
            if self.guests.get(name) is guest:
                del self.guests[name]
                await guest.close()
                # its file may be back already: then it is a new guest (the files as last read
                # say so; every change to them since has been reread at its own event)
                self.reconcile(set())
        asyncio.get_running_loop().create_task(forget())

    # ---- adoption ------------------------------------------------------------------------
    def adopt_all(self) -> list[Guest]:
        """Take over every recorded QEMU that still runs; remove stale records."""
        adopted: list[Guest] = []
        for directory, rec in records.load_all(self.dirs.runtime / "domains"):
            if rec is None:
                records.remove(directory)
                continue
            try:
                domain = Domain.model_validate(rec.domain)
            except Exception:  # noqa: BLE001 - a record from another qemud version
                domain = None
            if domain is None:
                self.log.emit("stale-record", f"{rec.name}: its record cannot be read; QEMU pid {rec.pid} "
                              "is left alone", WARNING, domain=rec.name, pid=rec.pid)
                records.remove(directory)
                continue
            guest = Guest(self.env, domain, rec.file)
            guest.definition = rec.definition  # what QEMU actually runs
            if guest.adopt(rec):
                self.guests[rec.name] = guest
                adopted.append(guest)
            else:
                records.remove(directory)
                self.guests[rec.name] = guest
                self.log.emit("ended-while-down", f"{rec.name}: QEMU pid {rec.pid} ended while qemud was not running",
                              WARNING, domain=rec.name, uuid=rec.uuid, pid=rec.pid)
                guest.start("QEMU ended while qemud was not running")
        return adopted

    def stop_all(self) -> None:
        """Host shutdown (qemud --stop-guests, SIGUSR1): every guest shut down gracefully, in
        parallel, and kept down until the daemon starts again."""
        self.log.emit("stopping-all", f"shutting down all {len(self.guests)} guest(s)", NOTICE)
        for g in self.guests.values():
            g.stop("host shutdown")

    def status_line(self) -> str:
        return notify.summary(g.state.value for g in self.guests.values())

    def state_changed(self) -> None:
        """Every guest state change: systemd's STATUS= follows."""
        if self._started:
            notify.status(self.status_line())
        self.heap.soon()

    # ---- main loop -------------------------------------------------------------------------
    _started = False

    async def run(self) -> int:
        try:
            self.dirs.runtime.mkdir(parents=True, exist_ok=True, mode=0o755)
            (self.dirs.runtime / "domains").mkdir(exist_ok=True, mode=0o700)
            self.dirs.state.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.dirs.state / "domains").mkdir(exist_ok=True, mode=0o700)
            # QEMU's user passes through (search, not list) to its guests' directories
            for d in (self.dirs.runtime, self.dirs.runtime / "domains", self.dirs.state,
                      self.dirs.state / "domains"):
                passage(d, self.runas)
            for d in (self.dirs.runtime / "domains", self.dirs.state / "domains"):
                if why := unreachable(d, self.runas):
                    raise HostError(why)
            lock = open(self.dirs.runtime / PIDFILE, "a+")
        except OSError as exc:
            # read-only, full, or not ours: without its lock and records qemud cannot supervise
            # (a second daemon could not be kept out, a restart could not adopt): say so and exit
            raise HostError(f"cannot use the runtime directory {self.dirs.runtime}: "
                            f"{exc.strerror or exc} ({exc.filename or self.dirs.runtime})") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.log.emit("already-running", f"another qemud already runs with {self.dirs.runtime}", ERR)
            return 1
        try:
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
        except OSError:
            pass  # the lock is what matters; the pid in it is for people
        if not self.dirs.domains.is_dir():
            self.log.emit("directory-error", f"the domains directory {self.dirs.domains} does not exist", ERR)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._rescan.set)
        loop.add_signal_handler(signal.SIGUSR1, self.stop_all)
        watch = DirectoryWatch(self.dirs.domains, self.config.debounce)
        watch.start()
        self.log.emit("daemon-started", f"qemud {__version__} watching {self.dirs.domains}", NOTICE,
                      domains_dir=str(self.dirs.domains), runtime_dir=str(self.dirs.runtime))
        adopted = self.adopt_all()
        if adopted:  # READY means: every live guest is adopted and its state known
            await asyncio.wait([loop.create_task(g.settled.wait()) for g in adopted], timeout=30)
        self.reconcile()
        self._started = True
        self.asked_stops.definitions = lambda n: self.guests[n].definition if n in self.guests else None
        from qemud.control import SOCKET, ControlServer
        control = ControlServer(self, self.dirs.runtime / SOCKET, self.config.control_group, self.log)
        await control.start()  # before READY: `systemctl start qemud && qemuctl list` must work
        self.log.emit("ready", f"ready: {len(self.guests)} guest(s) defined", NOTICE)
        notify.ready(self.status_line())
        changes = loop.create_task(self._follow(watch))
        dog = loop.create_task(notify.watchdog())
        await self._stop.wait()
        notify.stopping()
        await control.close()
        changes.cancel()
        dog.cancel()
        watch.close()
        self.log.emit("daemon-stopping", "qemud exits; guests keep running and are adopted at the next start", NOTICE)
        for g in list(self.guests.values()):
            await g.close()
        lock.close()
        return 0

    async def _follow(self, watch: DirectoryWatch) -> None:
        while True:
            changed = asyncio.get_running_loop().create_task(watch.changed())
            hup = asyncio.get_running_loop().create_task(self._rescan.wait())
            done, pending = await asyncio.wait({changed, hup}, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            only: set[str] | None = None  # SIGHUP, an overflow, the directory itself: reread all
            if hup in done:
                self._rescan.clear()
                notify.reloading()
                self.log.emit("reloading", "rereading the configuration and the domains directory", INFO)
                self.reload_config()
            else:
                changes = changed.result()
                if not changes.full:
                    only = {os.path.join(self.dirs.domains, n) for n in changes.names}
            self.reconcile(only)
            if hup in done:
                notify.ready(self.status_line())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qemud", description="Supervise QEMU guests defined by libvirt domain XML files.")
    p.add_argument("--config", type=Path, help="configuration file (default /etc/qemud/qemud.conf as root, "
                   "~/.config/qemud/qemud.conf otherwise)")
    p.add_argument("--domains-dir", type=Path, help="directory of domain XML files (default /etc/qemud/domains)")
    p.add_argument("--state-dir", type=Path, help="one directory for runtime and persistent state "
                   "(default /run/qemud and /var/lib/qemud)")
    p.add_argument("--log-target", choices=("auto", "journal", "stderr"), default="auto",
                   help="where events go: the journal when journald runs (auto, the default), or stderr")
    p.add_argument("--stop-guests", action="store_true",
                   help="shut down every guest gracefully, in parallel, and wait (for host shutdown); "
                        "the running daemon does it and keeps them down, or, without one, this command")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="with --stop-guests: seconds to wait for all guests before ending their QEMU")
    p.add_argument("--version", action="version", version=f"qemud {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = EventLog(args.log_target)
    dirs = Dirs.default()
    try:
        config = load_config(args.config or dirs.config, explicit=args.config is not None)
    except QemudError as exc:
        log.emit("config-error", str(exc), ERR)
        return 1
    domains = args.domains_dir or config.domains_dir or dirs.domains
    if args.state_dir is not None:
        base = args.state_dir.absolute()
        dirs = Dirs(dirs.config, domains.absolute(), base, base)
    else:
        dirs = Dirs(dirs.config, domains.absolute(), dirs.runtime, dirs.state)
    if args.stop_guests:
        from qemud.stopall import stop_guests
        return asyncio.run(stop_guests(dirs.runtime, args.timeout, log))
    try:
        daemon = Daemon(config, dirs, log, args.config or Dirs.default().config)
    except QemudError as exc:  # [qemu] user or group: root, or missing
        log.emit("config-error", f"{args.config or dirs.config}: {exc}", ERR)
        return 1
    try:
        return asyncio.run(daemon.run())
    except KeyboardInterrupt:
        return 130
    except HostError as exc:
        log.emit("host-error", str(exc), ERR)
        return 1


if __name__ == "__main__":
    sys.exit(main())
