"""One supervised guest: an actor that owns its QEMU process, its QMP connection and its state.

Everything that can happen to a guest (a start or stop asked for, a new definition, QEMU's end,
a QMP event, a timer) arrives as a message in the guest's inbox and is handled in order by one
task, so no two causes ever race over the same guest. Nothing here blocks: waiting for QMP, for
a shutdown or for a backoff runs in small tasks that post their outcome back to the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from qemud import records, tuning
from qemud import helpers as helper_procs
from qemud.argv import Command, build_argv, element_of_qemu_error, emulator_for
from qemud.argv.tune import plan_tuning
from qemud.caps import HostCaps
from qemud.domain import Domain
from qemud.errors import DomainError, QemudError, report_lines
from qemud.events import ERR, INFO, NOTICE, WARNING, EventLog
from qemud.host import HostFacts
from qemud.helpers import Helper
from qemud.launch import discard, forget_secrets, prepare
from qemud.paths import GuestPaths
from qemud.policy import Backoff, RestartPolicy
from qemud.proc import (ExitInfo, QemuProcess, adopt, log_tail, pidfile_holder, qmp_fd_argv, qmp_listener,
                        spawn)
from qemud.qmp import Qmp, QmpError
from qemud.runas import RunAs, permission_hint
from qemud.tap import pass_taps
from qemud.states import ALIVE, State, StateMachine
from qemud.tail import Follower

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")
QMP_CONNECT_TIMEOUT = 30.0
#: how fast QEMU preallocates guest RAM, at worst (14 GiB took 75 s on a nested-virtualization host)
PREALLOC_BYTES_PER_S = 128 * 1024 * 1024
#: QMP calls while QEMU starts: a host busy starting many guests answers slowly, not never
QMP_START_TIMEOUT = 30.0
#: after `qemuctl reset`, how long guest resets stay in place before reboots relaunch QEMU again
RESET_GRACE = 2.0
QMP_TIMEOUT = 5.0
#: after `quit` over QMP, then after SIGTERM: how long before the next step
ESCALATE_STEP = 5.0


#: QEMU's logs (stderr, console) are rotated at a start when larger than this; one old copy kept
LOG_ROTATE_BYTES = 8 << 20


def rotate(path: Path) -> None:
    try:
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass


def definition_hash(domain: Domain) -> str:
    return hashlib.sha256(domain.model_dump_json(by_alias=True).encode()).hexdigest()[:16]


def restart_policy(domain: Domain, defaults: RestartPolicy) -> RestartPolicy:
    s = domain.metadata.qemud if domain.metadata is not None else None
    r = s.restart if s is not None else None
    if r is None:
        return defaults
    return RestartPolicy(mode=r.policy, max_retries=r.max_retries, backoff=float(r.backoff),
                         max_backoff=float(r.max_backoff), reset_after=defaults.reset_after)


def shutdown_timeout(domain: Domain, default: float) -> float:
    s = domain.metadata.qemud if domain.metadata is not None else None
    return float(s.shutdown.timeout) if s is not None and s.shutdown is not None else default


def autostart(domain: Domain) -> bool:
    s = domain.metadata.qemud if domain.metadata is not None else None
    return s.autostart.value if s is not None and s.autostart is not None else True


@dataclass(frozen=True)
class Env:
    """What a guest needs from the daemon."""

    caps_for: Callable[[str], Awaitable[HostCaps]]
    runtime: Path
    state: Path
    log: EventLog
    restart_defaults: RestartPolicy
    shutdown_default: float
    clock: Callable[[], float] = time.monotonic
    on_state: Callable[[], None] = lambda: None
    #: who QEMU runs as (qemud is root; qemud.runas), or None: qemud's own user
    runas: RunAs | None = None


class Guest:
    def __init__(self, env: Env, domain: Domain, file: str) -> None:
        self.env = env
        self.domain = domain
        self.file = file
        self.definition = definition_hash(domain)
        self.name = domain.name
        self.uuid = domain.uuid_value
        self.paths = GuestPaths.for_domain(env.runtime, env.state, self.name)
        self.sm = StateMachine(on_change=self._changed)
        self.backoff = Backoff(restart_policy(domain, env.restart_defaults))
        self.proc: QemuProcess | None = None
        #: the helper processes (swtpm, virtiofsd) of the current QEMU: started before it, ended after
        self.helpers: list[Helper] = []
        #: the definition whose translation problems were reported already (reported once)
        self._translation_reported: str | None = None
        self._lost_helpers: list[str] = []  # recorded helpers found gone at an adoption
        self.qmp: Qmp | None = None
        self.cmd: Command | None = None
        self.started_at: float | None = None  # monotonic, when it last reached running
        self.want_running = False
        self.last_exit: str | None = None  # how QEMU last ended, kept until the next end
        self._note: str | None = None  # what went wrong on the way (QMP, escalation), for that end
        self._resetting = False
        self.last_stderr: list[str] = []
        self.restarts = 0
        self.last_pid: int | None = None
        self.next_delay: float | None = None
        self._shutdown_seen: dict[str, Any] | None = None  # the SHUTDOWN event of this QEMU
        self._after_exit: str | None = None  # "start" | "remove" once the current QEMU ends
        self._removed = False
        self.resumed_removal = False  # adopted in the middle of a stop its file's removal caused
        self._timer: asyncio.TimerHandle | None = None
        self._escalation: asyncio.Task[None] | None = None
        self._followers: dict[str, tuple[Follower, asyncio.Task[None]]] = {}
        self._console_start: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._host: HostFacts | None = None  # the host facts QEMU was started with (tuning)
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"guest:{self.name}")
        self.gone = asyncio.Event()  # set once a removed guest has fully stopped
        self.settled = asyncio.Event()  # set once an adoption has been handled

    # ---- the public interface: messages ----------------------------------------------------
    def start(self, cause: str) -> None:
        self.inbox.put_nowait(("start", cause))

    def stop(self, cause: str) -> None:
        self.inbox.put_nowait(("stop", cause))

    def shutdown(self, cause: str, timeout: float | None = None) -> None:
        """A graceful stop with its own timeout (qemuctl shutdown --timeout)."""
        self.inbox.put_nowait(("stop", cause, timeout))

    def destroy(self, cause: str) -> None:
        self.inbox.put_nowait(("destroy", cause))

    def restart(self, cause: str) -> None:
        self.inbox.put_nowait(("restart", cause))

    async def qmp_command(self, cmd: str) -> None:
        """reset, pause, resume: straight to QMP (the state follows from QEMU's events)."""
        qmp_cmd = {"reset": "system_reset", "pause": "stop", "resume": "cont"}[cmd]
        if self.qmp is None:
            raise QmpError("no QMP connection")
        if cmd == "reset":
            # QEMU runs with -no-reboot (a guest reboot relaunches it); the reset button must
            # reset in place, so for this one reset QEMU resets, and the RESET event restores it
            await self.qmp.execute("set-action", {"reboot": "reset"}, timeout=QMP_TIMEOUT)
            self._resetting = True
        await self.qmp.execute(qmp_cmd, timeout=QMP_TIMEOUT)
        if cmd == "reset":
            self.env.log.emit("reset", f"{self.name}: reset by qemuctl", INFO, domain=self.name, uuid=self.uuid)

    async def console_device(self) -> str:
        """The pty of the guest's console (QEMU's first serial port), for qemuctl console."""
        from qemud.control import ControlError
        if self.qmp is None or self.state not in ALIVE:
            raise ControlError(f"{self.name} is {self.state.value}; its console needs a running QEMU")
        try:
            chardevs = await self.qmp.execute("query-chardev", timeout=QMP_TIMEOUT)
        except QmpError as exc:
            raise ControlError(str(exc)) from exc
        by_label = {c["label"]: c["filename"] for c in chardevs}
        for label in ("charserial0", "charconsole0"):
            fn = by_label.get(label, "")
            if fn.startswith("pty:"):
                return fn[4:]
        raise ControlError(f"{self.name} has no pty console (make its first <serial> type='pty' to attach to it)")

    def shutdown_timeout(self) -> float:
        return shutdown_timeout(self.domain, self.env.shutdown_default)

    def stderr_tail(self) -> list[str]:
        return log_tail(self.paths.run / "qemu.log")

    def redefine(self, domain: Domain, file: str) -> None:
        self.inbox.put_nowait(("redefine", domain, file))

    def remove(self, cause: str) -> None:
        self.inbox.put_nowait(("remove", cause))

    def adopt(self, rec: records.Record) -> bool:
        """Take over the QEMU a record names, if it is still that QEMU. Called before start."""
        proc = adopt(rec.pid, rec.create_time, rec.argv)
        # stopped because its file was removed: the daemon's reconcile decides with the file as
        # it is now (back: wanted again; still gone: removed), not the record
        self.resumed_removal = rec.asked == "remove"
        found, lost = helper_procs.adopt_all(rec.extra.get("helpers") or [])
        if proc is None:
            # QEMU is gone: its helpers (if still those processes) must not outlive it
            helper_procs.stop_sync(found)
            return False
        self.proc = proc
        self.last_pid = proc.pid
        self._spawn_task(self._watch_exit(proc))
        self.helpers, self._lost_helpers = found, lost
        for h in found:
            self._spawn_task(self._watch_helper(h))
        self._follow("qemu", self.paths.run / "qemu.log", proc)
        console = rec.extra.get("console_log")
        self._follow("console", Path(console) if console else None, proc)
        self.inbox.put_nowait(("adopted", proc, rec))
        return True

    async def close(self) -> None:
        """The daemon is exiting: let go of QEMU (it keeps running), end this guest's tasks."""
        self.task.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self.qmp is not None:
            await self._unwatched_reboots_reset()
            await self.qmp.close()
        if self.proc is not None:
            self.proc.close()
        for h in self.helpers:  # they keep running with QEMU, adopted at the next start
            h.proc.close()

    async def _unwatched_reboots_reset(self) -> None:
        """QEMU runs with -no-reboot: a guest reboot stops it and qemud starts it again. With no
        qemud to do that (a daemon restart, an upgrade), a guest that reboots would stay stopped,
        and the next qemud could not tell that stop from a poweroff (QMP says only 'shutdown').
        So while no qemud watches, a guest whose on_reboot is 'restart' resets in place, as
        libvirt's guests do; the next qemud turns relaunching back on when it adopts it."""
        action = self.domain.on_reboot.value if self.domain.on_reboot else "restart"
        if action != "restart" or self.state not in (State.RUNNING, State.PAUSED) or self.qmp is None:
            return
        with contextlib.suppress(QmpError, asyncio.TimeoutError):
            await self.qmp.execute("set-action", {"reboot": "reset"}, timeout=1.0)

    @property
    def state(self) -> State:
        return self.sm.state

    @property
    def removing(self) -> bool:
        """Asked to go (its file was removed) and not gone yet."""
        return self._removed and not self.gone.is_set()

    # ---- the actor -------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            msg = await self.inbox.get()
            try:
                await getattr(self, f"_on_{msg[0].replace('-', '_')}")(*msg[1:])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not end the guest's supervision
                self.env.log.emit("internal-error", f"{self.name}: internal error handling {msg[0]}: "
                                  f"{type(exc).__name__}: {exc}", ERR, domain=self.name, uuid=self.uuid)

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _changed(self, old: State, new: State, cause: str) -> None:
        prio = ERR if new in (State.FAILED,) else WARNING if new in (State.CRASHED, State.BACKOFF) else NOTICE
        self.env.log.emit(new.value, f"{self.name}: {new.value} ({cause})", prio, domain=self.name,
                          uuid=self.uuid, state=new.value, old_state=old.value, reason=cause,
                          pid=self.proc.pid if self.proc else self.last_pid, restarts=self.restarts or None,
                          next_delay=self.next_delay if new == State.BACKOFF else None,
                          exit=self.last_exit if new in (State.CRASHED, State.FAILED) else None)
        self.env.on_state()

    # ---- handlers --------------------------------------------------------------------------
    async def _on_start(self, cause: str) -> None:
        self.want_running = True
        st = self.state
        if st in ALIVE:
            if st == State.STOPPING:
                self._after_exit = "start"
            return
        self._cancel_timer()
        if st in (State.FAILED, State.BACKOFF, State.CRASHED):
            self.backoff.reset()
        await self._launch(cause)

    async def _on_stop(self, cause: str, timeout: float | None = None) -> None:
        self.want_running = False
        self._after_exit = None
        await self._stop(cause, timeout)

    async def _on_destroy(self, cause: str) -> None:
        self.want_running = False
        self._after_exit = None
        if self.state in ALIVE:
            self._note = cause
            if self.state != State.STOPPING:
                self.sm.set(State.STOPPING, cause)
            if self.proc is not None:
                self.proc.kill(signal.SIGKILL)  # destroy: pull the plug, as virsh destroy does
        else:
            await self._stop(cause)

    async def _on_restart(self, cause: str) -> None:
        self.want_running = True
        if self.state in ALIVE:
            if self.state != State.STOPPING:
                self._after_exit = "start"
                await self._stop(cause)
            else:
                self._after_exit = "start"
        else:
            self._cancel_timer()
            self.backoff.reset()
            await self._launch(cause)

    async def _on_remove(self, cause: str) -> None:
        self._removed = True
        self.want_running = False
        self._after_exit = "remove"
        if self.state in ALIVE:
            await self._stop(cause)
        else:
            self._cancel_timer()
            self.sm.set(State.STOPPED, cause)
            self._finish_removal()

    async def _on_redefine(self, domain: Domain, file: str) -> None:
        self.file = file
        new_hash = definition_hash(domain)
        if self._removed:
            # its file came back while the guest was being removed: it is wanted again
            self._removed = False
            self.domain, self.definition = domain, new_hash
            self.env.log.emit("redefined", f"{self.name}: defined again by {file}", INFO,
                              domain=self.name, uuid=self.uuid, file=file)
            if autostart(domain):
                self.want_running = True
                if self.state in ALIVE:
                    self._after_exit = "start"
                else:
                    await self._launch("its file is back")
            else:
                self._after_exit = None
            return
        if new_hash == self.definition:
            return
        self.domain = domain
        self.definition = new_hash
        self.backoff = Backoff(restart_policy(domain, self.env.restart_defaults))
        self.env.log.emit("redefined", f"{self.name}: definition changed in {file}", INFO,
                          domain=self.name, uuid=self.uuid, file=file)
        if self.state in ALIVE:
            self._after_exit = "start"
            self.want_running = True
            await self._stop("definition changed, restarting with the new one")
        elif autostart(domain) or self.want_running or self.state in (State.FAILED, State.BACKOFF, State.CRASHED):
            self._cancel_timer()
            self.want_running = True
            await self._launch("definition changed")

    async def _on_adopted(self, proc: QemuProcess, rec: records.Record) -> None:
        try:
            await self._adopted(proc, rec)
        finally:
            self.settled.set()

    async def _adopted(self, proc: QemuProcess, rec: records.Record) -> None:
        if proc is not self.proc:
            return
        self.want_running = rec.asked not in ("stop", "remove")
        self.started_at = self.env.clock() - max(0.0, time.time() - rec.started_at)
        self.cmd = None
        qmp = Qmp(self.name)
        try:
            await qmp.connect(rec.qmp, QMP_CONNECT_TIMEOUT)
            status = await qmp.execute("query-status", timeout=QMP_TIMEOUT)
        except QmpError as exc:
            await qmp.close()
            self._adopted_blind(proc, rec, str(exc))
            return
        self._attach_qmp(proc, qmp)
        # the previous qemud left reboots resetting in place while nobody watched (or was cut
        # off in a `qemuctl reset`): relaunching on a guest reboot is back on
        with contextlib.suppress(QmpError):
            await qmp.execute("set-action", {"reboot": "shutdown"}, timeout=QMP_TIMEOUT)
        await self._retune(proc, qmp)
        self.env.log.emit("adopted", f"{self.name}: adopted QEMU pid {proc.pid} ({status['status']})", NOTICE,
                          domain=self.name, uuid=self.uuid, pid=proc.pid)
        run = status.get("status")
        if run == "prelaunch":
            # the daemon died between spawning QEMU and letting its vCPUs run (-S): the start was
            # never finished and the guest never ran an instruction; it is begun again from the
            # top (what QMP setup the start needed is not in the record), not left paused forever
            self.sm.set(State.PAUSED, f"adopted pid {proc.pid}, a start the previous qemud did not finish")
            self._after_exit = "start" if self.want_running else None
            self._mark_asked("restart" if self.want_running else "stop")
            await self._quit()
            return
        if run == "shutdown":
            # it powered off (or panicked) while the daemon was down: its policy decides
            self.sm.set(State.PAUSED, "adopted after the guest shut down")
            await self._guest_shutdown({"guest": True, "reason": "guest-shutdown"})
        elif run in ("running",):
            self.sm.set(State.RUNNING, f"adopted pid {proc.pid}")
        else:
            self.sm.set(State.PAUSED, f"adopted pid {proc.pid} ({run})")
        if rec.asked in ("stop", "restart", "remove") and self.state in ALIVE and self.state != State.STOPPING:
            if rec.asked == "restart":  # a restart (qemuctl, a redefinition) is finished, not lost
                self._after_exit = "start"
                await self._stop("a restart was under way when the daemon restarted")
            else:
                await self._stop("a stop was under way when the daemon restarted")
        lost, self._lost_helpers = self._lost_helpers, []
        if lost and self.proc is proc and self.state in ALIVE and self.state != State.STOPPING:
            self._helper_gone(proc, ", ".join(lost), "gone when qemud restarted")
        for h in self.helpers:
            self.env.log.emit("helper-adopted", f"{self.name}: adopted helper {h.name}, pid {h.proc.pid}", INFO,
                              domain=self.name, uuid=self.uuid, pid=h.proc.pid, helper=h.name)

    def _adopted_blind(self, proc: QemuProcess, rec: records.Record, why: str) -> None:
        """A live QEMU of this guest whose QMP cannot be reached (its socket was deleted, or it
        does not answer). It is taken over, so no second QEMU is ever started beside it, but it
        cannot be supervised truthfully: without QMP its pauses, poweroffs and reboots are
        invisible and the power button cannot be pressed. So it is ended (SIGTERM, then SIGKILL:
        the only ways left) and, when its guest is wanted, started afresh, as libvirt does with
        a QEMU whose monitor it cannot reconnect to."""
        self.env.log.emit("adopted", f"{self.name}: adopted QEMU pid {proc.pid}, but its QMP is unreachable "
                          f"({why}); ending it" + (" and starting it afresh" if self.want_running else ""),
                          WARNING, domain=self.name, uuid=self.uuid, pid=proc.pid)
        self.sm.set(State.RUNNING, f"adopted pid {proc.pid}, QMP unreachable")
        self._after_exit = "start" if self.want_running else None
        self._note = f"its QMP was unreachable ({why})"
        self.sm.set(State.STOPPING, "QMP unreachable: only signals can end it")
        self._mark_asked("restart" if self.want_running else "stop")
        proc.kill(signal.SIGTERM)
        self._escalation = self._spawn_task(self._escalate_later(ESCALATE_STEP, 3))

    async def _retune(self, proc: QemuProcess, qmp: Qmp) -> None:
        """An adopted QEMU gets its pinning and cgroup again (a host reboot of the daemon, or a
        changed CPU set, may have lost them); a failure is reported, the guest keeps running."""
        try:
            caps = await self.env.caps_for(emulator_for(self.domain))
            plan, problems = plan_tuning(self.domain, caps)
            self._host = caps.host
            errors = [p for p in problems if p.severity != "warning"]
            if errors:
                raise tuning.TuningError("; ".join(f"{p.path}: {p.message}" for p in errors))
            await tuning.apply_over_qmp(qmp, plan, caps.host, self.name, proc.pid, timeout=QMP_TIMEOUT)
        except (QmpError, QemudError, OSError) as exc:
            self.env.log.emit("tuning-error", f"{self.name}: adopted, but its tuning could not be applied: {exc}",
                              WARNING, domain=self.name, uuid=self.uuid, pid=proc.pid)

    async def _on_qmp_ready(self, proc: QemuProcess, qmp: Qmp) -> None:
        if proc is not self.proc or self.state != State.STARTING:
            await qmp.close()
            return
        self._attach_qmp(proc, qmp)
        if self.cmd is not None:  # QEMU answers QMP once it has read its command line's secrets
            forget_secrets(self.cmd)
        try:
            for g in self.domain.devices.graphics:  # display passwords never go on a command line
                if g.passwd and g.type in ("vnc", "spice"):
                    await qmp.execute("set_password", {"protocol": g.type, "password": g.passwd},
                                      timeout=QMP_START_TIMEOUT)
            for command, arguments in (self.cmd.qmp_setup if self.cmd is not None else ()):
                await qmp.execute(command, arguments, timeout=QMP_START_TIMEOUT)
            if self.cmd is not None and self._host is not None:  # pinning before a vCPU runs
                await tuning.apply_over_qmp(qmp, self.cmd.tuning, self._host, self.name, proc.pid,
                                            timeout=QMP_START_TIMEOUT)
            await qmp.execute("cont", timeout=QMP_START_TIMEOUT)
            status = await qmp.execute("query-status", timeout=QMP_START_TIMEOUT)
        except QmpError as exc:
            self._note = f"QMP failed after start: {exc}"
            proc.kill()
            return
        except tuning.TuningError as exc:
            self._note = f"cannot apply <cputune>/<blkiotune>/<memtune>: {exc}"
            proc.kill()
            return
        self.started_at = self.env.clock()
        if self.cmd is not None:  # QEMU has opened its console's log by now
            self._follow("console", self.cmd.console_log, proc, self._console_start)
        if status.get("status") == "running":
            self.sm.set(State.RUNNING, f"QEMU pid {proc.pid} runs the guest")
        else:
            self.sm.set(State.PAUSED, f"QEMU pid {proc.pid} started ({status.get('status')})")
        if self._after_exit == "stop-now":
            self._after_exit = None
            await self._stop("stop asked for while starting")

    async def _on_qmp_failed(self, proc: QemuProcess, error: str) -> None:
        if proc is not self.proc:
            return
        self._note = error
        proc.kill()  # its end arrives as an exit message

    async def _on_qmp_event(self, proc: QemuProcess, event: dict[str, Any]) -> None:
        if proc is not self.proc:
            return
        name = event.get("event")
        data = event.get("data") or {}
        if name == "SHUTDOWN":
            self._shutdown_seen = data
            await self._guest_shutdown(data)
        elif name == "STOP":
            if self.state == State.RUNNING:
                self.sm.set(State.PAUSED, "QEMU paused the guest")
        elif name == "RESUME":
            if self.state == State.PAUSED:
                self.sm.set(State.RUNNING, "QEMU resumed the guest")
        elif name == "RESET":
            if self._resetting:
                # the firmware resets once more on its way up (SeaBIOS does): in place too, for a
                # moment, then reboots go back to relaunching QEMU
                self._resetting = False
                self._spawn_task(self._later(RESET_GRACE, ("reset-over", proc)))
            elif data.get("guest"):
                self.env.log.emit("rebooted", f"{self.name}: the guest rebooted (reset in place)", INFO,
                                  domain=self.name, uuid=self.uuid, pid=proc.pid)
        elif name == "GUEST_PANICKED":
            action = self.domain.on_crash.value if self.domain.on_crash else "destroy"
            self.env.log.emit("panicked", f"{self.name}: the guest kernel panicked (on_crash={action})", ERR,
                              domain=self.name, uuid=self.uuid, pid=proc.pid)
            if action == "preserve" and self.state == State.RUNNING:
                self.sm.set(State.PAUSED, "guest panicked, preserved for inspection")

    async def _guest_shutdown(self, data: dict[str, Any]) -> None:
        """QEMU (started with -no-shutdown) says the guest shut down; apply the domain's policy."""
        if self.state == State.STOPPING:
            await self._quit()  # the poweroff we asked for: now end QEMU
            return
        reason = str(data.get("reason", ""))
        if not data.get("guest", False) and reason not in ("guest-shutdown", "guest-reset", "guest-panic"):
            return  # host-initiated (quit, signal): its exit decides
        d = self.domain
        if reason == "guest-reset":
            happened, setting = "rebooted", "on_reboot"
            action = d.on_reboot.value if d.on_reboot else "restart"
        elif reason == "guest-panic":
            happened, setting = "panicked", "on_crash"
            action = d.on_crash.value if d.on_crash else "destroy"
        else:
            happened, setting = "powered off", "on_poweroff"
            action = d.on_poweroff.value if d.on_poweroff else "destroy"
        self.env.log.emit("guest-shutdown", f"{self.name}: the guest {happened}; {setting}={action}",
                          INFO, domain=self.name, uuid=self.uuid, pid=self.proc.pid if self.proc else None)
        if action == "preserve":
            if self.state == State.RUNNING:
                self.sm.set(State.PAUSED, f"guest {happened}, QEMU kept ({setting}={action})")
            return
        self.sm.set(State.STOPPING, f"guest {happened} ({setting}={action})")
        self._after_exit = "start" if action == "restart" else None
        if action != "restart":
            self.want_running = False
        await self._quit()

    async def _on_exited(self, proc: QemuProcess, info: ExitInfo) -> None:
        if proc is not self.proc:
            return
        self._cancel_escalation()
        self._stop_following()
        self.proc = None
        proc.close()
        if self.qmp is not None:  # closed on the side: the state change is told first
            self._spawn_task(self.qmp.close())
            self.qmp = None
        self.last_stderr = log_tail(self.paths.run / "qemu.log")
        await self._stop_helpers()
        records.remove(self.paths.run)
        discard(self.paths)  # transient disks' overlays end with their QEMU
        if self.cmd is not None:
            forget_secrets(self.cmd)
        if self._host is not None:
            with contextlib.suppress(QemudError):
                tuning.release(self._host, self.name)
        st = self.state
        if st == State.STOPPING:
            self.last_exit = info.describe() + (f"; {self._note}" if self._note else "")
            self._note = None
            self.sm.set(State.STOPPED, self.sm.cause if self.sm.cause.startswith("guest") else "QEMU ended as asked")
            after, self._after_exit = self._after_exit, None
            if after == "start" and not self._removed:
                await self._launch("restart")
            elif self._removed:
                self._finish_removal()
            return
        # QEMU ended without being asked to
        why = info.describe() + (f"; {self._note}" if self._note else "")
        self._note = None
        self.last_exit = why
        if self.last_stderr and not info.signal:
            # QEMU's last words explain an exit, not a signal
            why += f": {permission_hint(self.last_stderr[-1], self.env.runas)}"
            element = element_of_qemu_error(self.last_stderr[-1], self.cmd.elements) if self.cmd else None
            if element is not None:
                why += f" (from {element} in {self.file})"
        self.sm.set(State.CRASHED, why)
        if self._removed:
            self.sm.set(State.STOPPED, "definition removed")
            self._finish_removal()
            return
        if not self.want_running:
            self.sm.set(State.STOPPED, "not restarted: no start is wanted")
            return
        if self.backoff.policy.mode == "on-failure" and info.clean:
            self.want_running = False
            self.sm.set(State.STOPPED, "QEMU exited cleanly; restart policy is on-failure")
            return
        delay = self.backoff.died(self.env.clock(), self.started_at if st != State.STARTING else None)
        if delay is None:
            self.next_delay = None
            limit = self.backoff.policy.max_retries
            self.sm.set(State.FAILED, "restart policy is 'never'" if self.backoff.policy.mode == "never"
                        else f"{limit} failed starts in a row; edit the file or start it by hand")
            return
        self.restarts += 1
        if delay == 0:
            await self._launch(f"restart #{self.restarts} after a crash")
        else:
            self.next_delay = delay
            self.sm.set(State.BACKOFF, f"restart #{self.restarts} in {delay:g} s")
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay, self.inbox.put_nowait, ("backoff-over",))

    async def _on_helper_exited(self, h: Helper, info: Any) -> None:
        """A helper ended. While QEMU runs, that breaks the guest (its TPM, its shares): it is
        reported and handled as QEMU's own crash would be, QEMU ended and the restart policy
        decides. While QEMU is being stopped it is just the helper following QEMU out."""
        if h not in self.helpers:
            return  # stopped by qemud after QEMU ended
        self.helpers.remove(h)
        how = h.describe(info)
        words = h.last_words()
        # a helper following QEMU out (QEMU died first, its exit still in the inbox) is no crash of its own;
        # nor is one that ends while qemud is ending QEMU for a reason of its own (the note): that reason,
        # not the helper, is what the crash reports
        qemu_alive = self.proc is not None and not helper_procs.has_ended(self.proc)
        if (self.proc is not None and qemu_alive and self.state in ALIVE and self.state != State.STOPPING
                and self._note is None):
            self._helper_gone(self.proc, h.name, how + (f": {words}" if words and not info.signal else ""))
        else:
            self.env.log.emit("helper-exited", f"{self.name}: {how}", INFO, domain=self.name, uuid=self.uuid,
                              pid=h.proc.pid, helper=h.name)
        h.proc.close()

    def _helper_gone(self, proc: QemuProcess, name: str, why: str) -> None:
        self._note = f"its helper {name} ended ({why})"
        self.env.log.emit("helper-died", f"{self.name}: helper {name} ended ({why}); ending QEMU, the restart "
                          "policy decides what follows", ERR, domain=self.name, uuid=self.uuid, pid=proc.pid,
                          helper=name)
        proc.kill(signal.SIGKILL)  # its exit arrives as a crash, with the note saying why

    async def _stop_helpers(self) -> None:
        """End the helpers of a QEMU that has ended (none is ever left behind; a swtpm still
        holding the TPM state's lock would keep the next start from having its TPM)."""
        running, self.helpers = self.helpers, []
        if running:
            await helper_procs.stop(running)

    async def _on_reset_over(self, proc: QemuProcess) -> None:
        if proc is self.proc and self.qmp is not None:
            try:
                await self.qmp.execute("set-action", {"reboot": "shutdown"}, timeout=QMP_TIMEOUT)
            except QmpError:
                pass

    async def _later(self, delay: float, msg: tuple[Any, ...]) -> None:
        await asyncio.sleep(delay)
        self.inbox.put_nowait(msg)

    async def _on_backoff_over(self) -> None:
        self._timer = None
        if self.state == State.BACKOFF and self.want_running:
            await self._launch(f"restart #{self.restarts} after backoff")

    async def _on_escalate(self, step: int) -> None:
        if self.proc is None or self.state != State.STOPPING:
            return
        proc = self.proc
        if step == 1:
            self._note = "the guest ignored the ACPI shutdown request; QEMU was told to quit"
            self.env.log.emit("shutdown-timeout", f"{self.name}: no poweroff within the timeout, ending QEMU", WARNING,
                              domain=self.name, uuid=self.uuid, pid=proc.pid)
            await self._quit()
        elif step == 2:
            self._note = "QEMU did not quit; sent SIGTERM"
            proc.kill(signal.SIGTERM)
        else:
            self._note = "QEMU ignored SIGTERM; sent SIGKILL"
            proc.kill(signal.SIGKILL)
            return
        self._escalation = self._spawn_task(self._escalate_later(ESCALATE_STEP, step + 1))

    # ---- actions ---------------------------------------------------------------------------
    async def _launch(self, cause: str) -> None:
        self._shutdown_seen = None
        self._note = None
        self.next_delay = None
        self.sm.set(State.STARTING, cause)
        try:
            caps = await self.env.caps_for(emulator_for(self.domain))
            # in a thread: a large definition takes a while to translate, and the other guests'
            # events must not wait for it
            cmd = await asyncio.to_thread(build_argv, self.domain, caps, self.paths, paused=True)
            self._host = caps.host
            # in a thread: a first start may run swtpm_setup, which must not stall other guests
            await asyncio.to_thread(prepare, cmd, self.env.runas)
            holder = pidfile_holder(self.paths.pidfile)
            if holder is not None and self._adopt_orphan(holder):
                return
            if holder is not None:
                raise QemudError(f"a QEMU (pid {holder}) already runs this guest without a record; "
                                 "qemud will not start a second one")
            log_path = self.paths.run / "qemu.log"
            for f in (log_path, self.paths.console_log):
                rotate(f)
            log_start = log_path.stat().st_size if log_path.exists() else 0
            con = cmd.console_log
            self._console_start = con.stat().st_size if con is not None and con.exists() else 0
            # helpers first: their sockets listen once they are spawned, so QEMU finds them
            started = helper_procs.start(cmd.helpers, self.env.runas)
            try:
                listener = qmp_listener(cmd.qmp)
                taps: list[int] = []
                try:
                    argv = qmp_fd_argv(cmd.argv, listener.fileno())
                    if self.env.runas is not None:  # an unprivileged QEMU cannot open a tap itself
                        argv, taps = pass_taps(argv)
                    proc = spawn(argv, cmd.env, self.paths.run / "qemu.log", (listener.fileno(), *taps),
                                 self.env.runas, cmd.memlock_bytes)
                finally:
                    listener.close()
                    for fd in taps:
                        os.close(fd)
            except BaseException:
                helper_procs.stop_sync(started)
                raise
        except DomainError as exc:
            self._report_translation(exc)
            self._cannot_start("; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in exc.problems))
            return
        except (QemudError, OSError) as exc:
            self._cannot_start(str(exc))
            return
        self.cmd = cmd
        self.proc = proc
        self.last_pid = proc.pid
        self.helpers = started
        for h in started:
            self.env.log.emit("helper-started", f"{self.name}: helper {h.name} started, pid {h.proc.pid}", INFO,
                              domain=self.name, uuid=self.uuid, pid=h.proc.pid, helper=h.name)
            self._spawn_task(self._watch_helper(h))
        self._spawn_task(self._watch_exit(proc))
        self._follow("qemu", log_path, proc, log_start)
        try:
            self._write_record(proc, argv, cmd)
        except OSError as exc:
            self._note = f"cannot write its runtime record: {exc.strerror}"
            self.env.log.emit("record-error", f"{self.name}: {self._note}; ending QEMU", ERR,
                              domain=self.name, uuid=self.uuid, pid=proc.pid)
            proc.kill()  # a QEMU qemud could not adopt after a restart must not run
            return
        self.env.log.emit("spawned", f"{self.name}: QEMU started, pid {proc.pid}", INFO, domain=self.name,
                          uuid=self.uuid, pid=proc.pid)
        self._spawn_task(self._connect(proc, cmd.qmp, cmd.prealloc_bytes))

    def _adopt_orphan(self, pid: int) -> bool:
        """A QEMU of this guest (it holds the guest's pid file lock and names that pid file) that
        has no record: a previous qemud was killed between spawning it and writing the record.
        It is taken over like any recorded QEMU (a start it never finished is begun again), so
        the guest neither gets a second QEMU nor is refused for ever."""
        try:
            p = psutil.Process(pid)
            argv, ctime = p.cmdline(), p.create_time()
        except (psutil.Error, OSError):
            return False
        if not any(a == "-pidfile" and b == str(self.paths.pidfile) for a, b in zip(argv, argv[1:])):
            return False
        rec = records.Record(
            name=self.name, uuid=self.uuid, file=self.file, definition=self.definition, pid=pid, create_time=ctime,
            argv=argv, qmp=str(self.paths.qmp), log=str(self.paths.run / "qemu.log"), started_at=time.time(),
            domain=self.domain.model_dump(by_alias=True, exclude_unset=True))
        if not self.adopt(rec):
            return False
        self.env.log.emit("orphan", f"{self.name}: QEMU pid {pid} runs this guest without a record (qemud was "
                          "killed while starting it); taking it over", WARNING, domain=self.name, uuid=self.uuid,
                          pid=pid)
        with contextlib.suppress(OSError):
            records.write(self.paths.run, rec)
        return True

    def _write_record(self, proc: QemuProcess, argv: list[str], cmd: Command) -> None:
        records.write(self.paths.run, records.Record(
            name=self.name, uuid=self.uuid, file=self.file, definition=self.definition, pid=proc.pid,
            create_time=proc.create_time, argv=argv, qmp=str(cmd.qmp), log=str(self.paths.run / "qemu.log"),
            started_at=time.time(), domain=self.domain.model_dump(by_alias=True, exclude_unset=True),
            extra={"console_log": str(cmd.console_log) if cmd.console_log else None,
                   "helpers": [h.to_json() for h in self.helpers]}))

    def _report_translation(self, exc: DomainError) -> None:
        """A problem found when the definition is translated (a value QEMU cannot take, a host
        that lacks something) is reported like a problem found when reading the file: an
        invalid-definition naming the file and the element, once per definition."""
        if self._translation_reported == self.definition:
            return
        self._translation_reported = self.definition
        for line in report_lines(exc.with_file(self.file)):
            self.env.log.emit("invalid-definition", line, ERR, file=self.file, domain=self.name, uuid=self.uuid)

    def _cannot_start(self, why: str) -> None:
        """A start that failed before QEMU ran counts as a failed start."""
        self.last_exit = why
        self.sm.set(State.CRASHED, f"cannot start: {why}")
        delay = self.backoff.died(self.env.clock(), None)
        if delay is None or not self.want_running:
            self.sm.set(State.FAILED, f"cannot start: {why}")
            return
        self.restarts += 1
        self.next_delay = max(delay, self.backoff.policy.backoff)
        self.sm.set(State.BACKOFF, f"retry in {self.next_delay:g} s")
        self._timer = asyncio.get_running_loop().call_later(self.next_delay, self.inbox.put_nowait, ("backoff-over",))

    async def _stop(self, cause: str, timeout: float | None = None) -> None:
        st = self.state
        if st in (State.BACKOFF, State.CRASHED, State.FAILED):
            self._cancel_timer()
            self.sm.set(State.STOPPED, cause)
            return
        if st not in ALIVE or st == State.STOPPING:
            return
        proc = self.proc
        assert proc is not None
        if st == State.STARTING and self.qmp is None:
            self.sm.set(State.STOPPING, cause)
            proc.kill(signal.SIGKILL)  # not even booted yet
            return
        self.sm.set(State.STOPPING, cause)
        # a restart (qemuctl restart, a redefinition) is noted as such: a daemon killed before
        # QEMU ended finishes it, with a start, instead of leaving the guest stopped
        self._mark_asked({"start": "restart", "remove": "remove"}.get(self._after_exit or "", "stop"))
        if self._shutdown_seen is not None:
            await self._quit()
            return
        try:
            assert self.qmp is not None
            await self.qmp.execute("system_powerdown", timeout=QMP_TIMEOUT)
        except (QmpError, AssertionError) as exc:
            self.env.log.emit("shutdown-failed", f"{self.name}: ACPI shutdown request failed ({exc}); ending QEMU",
                              WARNING, domain=self.name, uuid=self.uuid)
            await self._quit()
            return
        self.env.log.emit("shutdown-requested", f"{self.name}: ACPI shutdown requested", INFO, domain=self.name,
                          uuid=self.uuid, pid=proc.pid)
        if timeout is None:
            timeout = shutdown_timeout(self.domain, self.env.shutdown_default)
        self._escalation = self._spawn_task(self._escalate_later(timeout, 1))

    async def _quit(self) -> None:
        """End QEMU now: QMP quit, SIGTERM a few seconds later if need be, then SIGKILL."""
        proc = self.proc
        if proc is None:
            return
        if self.state not in (State.STOPPING,):
            self.sm.set(State.STOPPING, "ending QEMU")
        self._cancel_escalation()
        ok = False
        if self.qmp is not None:
            try:
                await self.qmp.execute("quit", timeout=QMP_TIMEOUT)
                ok = True
            except QmpError:
                ok = False
        if not ok:
            proc.kill(signal.SIGTERM)
        self._escalation = self._spawn_task(self._escalate_later(ESCALATE_STEP, 2 if ok else 3))

    async def _escalate_later(self, delay: float, step: int) -> None:
        await asyncio.sleep(delay)
        self.inbox.put_nowait(("escalate", step))

    def _cancel_escalation(self) -> None:
        if self._escalation is not None:
            self._escalation.cancel()
            self._escalation = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _mark_asked(self, asked: str) -> None:
        """Note in the guest's record what was asked of it, for a daemon restarted meanwhile."""
        rec = records.load(self.paths.run)
        if rec is not None:
            rec.asked = asked
            try:
                records.write(self.paths.run, rec)
            except OSError:
                pass

    def _finish_removal(self) -> None:
        records.remove(self.paths.run)
        self.env.log.emit("undefined", f"{self.name}: definition removed, guest forgotten", INFO,
                          domain=self.name, uuid=self.uuid)
        self.gone.set()

    def _follow(self, source: str, path: Path | None, proc: QemuProcess, start: int | None = None) -> None:
        """A file QEMU writes, line by line into the journal: its stderr (QEMUD_SOURCE=qemu) or
        the guest's console (QEMUD_SOURCE=console). Rate-limited, with a note of what was dropped."""
        if path is None or source in self._followers:
            return
        prio = WARNING if source == "qemu" else INFO

        def emit(line: str) -> None:
            line = _CONTROL.sub("", line)
            if line.strip():
                self.env.log.line(source, f"{self.name}: {line}" if source == "qemu" else line, prio,
                                  domain=self.name, uuid=self.uuid, pid=proc.pid)

        def dropped(n: int) -> None:
            self.env.log.line(source, f"{self.name}: {n} lines of {'QEMU' if source == 'qemu' else 'console'} "
                              "output dropped (rate limit)", WARNING, domain=self.name, uuid=self.uuid, pid=proc.pid)
        try:
            f = Follower(path, emit, dropped, start)
        except OSError:
            return
        self._followers[source] = (f, self._spawn_task(f.run()))

    def _stop_following(self) -> None:
        for f, task in self._followers.values():
            task.cancel()
            f.close()  # what is left: the last lines of a dying QEMU are its most important ones
        self._followers.clear()

    def _attach_qmp(self, proc: QemuProcess, qmp: Qmp) -> None:
        self.qmp = qmp
        self._spawn_task(self._read_events(proc, qmp))

    # ---- helper tasks ----------------------------------------------------------------------
    async def _watch_exit(self, proc: QemuProcess) -> None:
        info = await proc.wait()
        self.inbox.put_nowait(("exited", proc, info))

    async def _watch_helper(self, h: Helper) -> None:
        info = await h.proc.wait()
        self.inbox.put_nowait(("helper-exited", h, info))

    async def _connect(self, proc: QemuProcess, path: Path, prealloc_bytes: int = 0) -> None:
        """Connect to a fresh QEMU's QMP. The socket listens before QEMU starts (qemud made it),
        so this waits only for QEMU's greeting, bounded (longer for a guest whose RAM QEMU
        preallocates first)."""
        qmp = Qmp(self.name)
        try:
            await qmp.connect(str(path), timeout=QMP_CONNECT_TIMEOUT + prealloc_bytes / PREALLOC_BYTES_PER_S)
        except QmpError as exc:
            self.inbox.put_nowait(("qmp-failed", proc, f"QMP did not come up: {exc}"))
            return
        self.inbox.put_nowait(("qmp-ready", proc, qmp))

    async def _read_events(self, proc: QemuProcess, qmp: Qmp) -> None:
        try:
            async for event in qmp.events():
                self.inbox.put_nowait(("qmp-event", proc, event))
        except Exception:  # noqa: BLE001 - EOF or a broken connection: the pidfd tells the end
            return
