"""The control socket: ``qemud.sock`` in the runtime directory, JSON lines, version 1.

Request:  ``{"v": 1, "cmd": "list"}`` or ``{"v": 1, "cmd": "start", "name": "web1"}``
Response: ``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "error": "..."}``

One request per line, answered in order. ``console`` answers once and then the connection
carries the guest's console both ways, raw, until either side closes it.

Access is checked on every connection by the peer's credentials (SO_PEERCRED): root, the
daemon's own user, and members of the configured group; anyone else gets "permission denied"
and nothing reaches a guest. The socket's mode and group match.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from qemud.events import INFO, WARNING, EventLog
from qemud.states import ALIVE, State

if TYPE_CHECKING:
    from qemud.daemon import Daemon
    from qemud.guest import Guest

VERSION = 1
SOCKET = "qemud.sock"
MAX_REQUEST = 65536

GUEST_COMMANDS = ("start", "shutdown", "destroy", "restart", "reset", "pause", "resume")


class ControlError(Exception):
    pass


def peer_allowed(sock: socket.socket, group: str | None) -> tuple[bool, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    if uid in (0, os.geteuid()):
        return True, uid
    if group:
        try:
            g = grp.getgrnam(group)
        except KeyError:
            return False, uid
        if gid == g.gr_gid:
            return True, uid
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            return False, uid
        if user in g.gr_mem or g.gr_gid in os.getgrouplist(user, gid):
            return True, uid
    return False, uid


class ControlServer:
    def __init__(self, daemon: Daemon, path: Path, group: str | None, log: EventLog) -> None:
        self.daemon = daemon
        self.path = path
        self.group = group
        self.log = log
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
        mode = 0o600
        if self.group:
            try:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
                mode = 0o660
            except (KeyError, OSError) as exc:
                self.log.emit("config-error", f"control group '{self.group}' cannot be used ({exc}); "
                              "only root can use the control socket", WARNING)
        os.chmod(self.path, mode)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            allowed, uid = peer_allowed(sock, self.group)
            if not allowed:
                await self._send(writer, {"v": VERSION, "ok": False, "error": "permission denied"})
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, {"v": VERSION, "ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError
                except ValueError:
                    await self._send(writer, {"v": VERSION, "ok": False, "error": "not a JSON object"})
                    continue
                if req.get("cmd") == "console":
                    await self._console(req, reader, writer)
                    return
                try:
                    result = await self.handle(req)
                    reply: dict[str, Any] = {"v": VERSION, "ok": True, "result": result}
                except ControlError as exc:
                    reply = {"v": VERSION, "ok": False, "error": str(exc)}
                if "id" in req:
                    reply["id"] = req["id"]
                await self._send(writer, reply)
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except OSError:
                pass

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    # ---- commands ------------------------------------------------------------------------
    async def handle(self, req: dict[str, Any]) -> Any:
        v = req.get("v", VERSION)
        if v != VERSION:
            raise ControlError(f"protocol version {v} is not supported (this qemud speaks {VERSION})")
        cmd = req.get("cmd")
        if cmd == "version":
            from qemud import __version__
            return {"qemud": __version__, "protocol": VERSION}
        if cmd == "list":
            _prune()
            return [guest_info(g) for g in sorted(self.daemon.guests.values(), key=lambda g: g.name)]
        if cmd == "status":
            return guest_info(self._guest(req), detail=True)
        if cmd in GUEST_COMMANDS:
            if req.get("all"):
                guests = list(self.daemon.guests.values())
                results = await asyncio.gather(*(self._act(cmd, g, req) for g in guests), return_exceptions=True)
                return {g.name: (r if not isinstance(r, Exception) else {"error": str(r)})
                        for g, r in zip(guests, results)}
            return await self._act(cmd, self._guest(req), req)
        raise ControlError(f"unknown command {cmd!r}")

    def _guest(self, req: dict[str, Any]) -> Guest:
        name = req.get("name")
        if not isinstance(name, str):
            raise ControlError("a guest name is required")
        g = self.daemon.guests.get(name)
        if g is None:
            raise ControlError(f"no guest named '{name}'")
        return g

    async def _act(self, cmd: str, g: Guest, req: dict[str, Any]) -> dict[str, Any]:
        timeout = req.get("timeout")
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise ControlError("timeout must be a number of seconds")
        by = "qemuctl"
        if cmd == "start":
            self.daemon.asked_stops.discard(g.name)
            g.start(f"started by {by}")
            want = (State.RUNNING, State.PAUSED, State.FAILED, State.BACKOFF)
        elif cmd == "shutdown":
            self.daemon.asked_stops.add(g.name)
            g.shutdown(f"shut down by {by}", timeout)
            want = (State.STOPPED, State.FAILED)
        elif cmd == "destroy":
            self.daemon.asked_stops.add(g.name)
            g.destroy(f"destroyed by {by}")
            want = (State.STOPPED, State.FAILED)
        elif cmd == "restart":
            self.daemon.asked_stops.discard(g.name)
            g.restart(f"restarted by {by}")
            want = (State.RUNNING, State.PAUSED, State.FAILED, State.BACKOFF)
        else:  # reset, pause, resume: QMP on a running QEMU
            if g.state not in ALIVE or g.qmp is None:
                raise ControlError(f"{g.name} is {g.state.value}; {cmd} needs a running QEMU")
            await g.qmp_command(cmd)
            return guest_info(g)
        self.log.emit("control", f"{g.name}: {cmd} asked for by qemuctl", INFO, domain=g.name, uuid=g.uuid)
        wait = float(timeout) + 30 if timeout is not None else g.shutdown_timeout() + 30
        try:
            await asyncio.wait_for(g.sm.wait_for(*want), wait)
        except asyncio.TimeoutError:
            pass  # report the state it is in
        return guest_info(g)

    async def _console(self, req: dict[str, Any], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        try:
            g = self._guest(req)
            pty = await g.console_device()
        except ControlError as exc:
            await self._send(writer, {"v": VERSION, "ok": False, "error": str(exc)})
            return
        try:
            fd = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            await self._send(writer, {"v": VERSION, "ok": False, "error": f"cannot open the console {pty}: {exc.strerror}"})
            return
        await self._send(writer, {"v": VERSION, "ok": True, "result": {"console": pty}})
        loop = asyncio.get_running_loop()
        from_guest: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)

        def readable() -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if from_guest.full():
                return  # a slow client loses output rather than slowing the daemon
            from_guest.put_nowait(data)

        loop.add_reader(fd, readable)

        async def pump_out() -> None:
            while True:
                data = await from_guest.get()
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        async def pump_in() -> None:
            while True:
                data = await reader.read(4096)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    try:
                        n = os.write(fd, view)
                        view = view[n:]
                    except BlockingIOError:
                        await asyncio.sleep(0.01)

        tasks = [asyncio.ensure_future(pump_out()), asyncio.ensure_future(pump_in())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            loop.remove_reader(fd)
            os.close(fd)


def guest_info(g: Guest, detail: bool = False) -> dict[str, Any]:
    pid = g.proc.pid if g.proc is not None else None
    info: dict[str, Any] = {
        "name": g.name, "uuid": g.uuid, "state": g.state.value, "pid": pid, "restarts": g.restarts,
        "file": g.file, "uptime": round(time.monotonic() - g.started_at, 1) if g.started_at and pid else None,
        "cause": g.sm.cause,
    }
    usage = _usage(pid, detail)
    info.update(cpu_percent=usage.get("cpu_percent"), rss=usage.get("rss"))
    if detail:
        pol = g.backoff.policy
        info.update(
            last_exit=g.last_exit, stderr=g.last_stderr[-10:] if g.last_stderr else g.stderr_tail(),
            restart_policy={"policy": pol.mode, "max_retries": pol.max_retries, "backoff": pol.backoff,
                            "max_backoff": pol.max_backoff}, next_delay=g.next_delay,
            shutdown_timeout=g.shutdown_timeout(), io=usage.get("io"), net=usage.get("net"),
            qmp=str(g.paths.qmp), console_log=str(g.paths.console_log))
    return info


_CPU: dict[int, psutil.Process] = {}


def _prune() -> None:
    """Forget processes that ended (once per request, not once per guest)."""
    live = {g for g in psutil.pids()}
    for dead in [k for k in _CPU if k not in live]:
        del _CPU[dead]


def _usage(pid: int | None, detail: bool = False) -> dict[str, Any]:
    """CPU (since the last ask) and RSS of a QEMU process; with ``detail`` its disk and network
    I/O too."""
    if pid is None:
        return {}
    try:
        p = _CPU.get(pid)
        if p is None:
            p = _CPU[pid] = psutil.Process(pid)
            p.cpu_percent(None)
        with p.oneshot():
            out: dict[str, Any] = {"cpu_percent": p.cpu_percent(None), "rss": p.memory_info().rss}
            if detail:
                try:
                    io = p.io_counters()
                    out["io"] = {"read_bytes": io.read_bytes, "write_bytes": io.write_bytes}
                except (psutil.Error, AttributeError):
                    out["io"] = None
        if detail:
            out["net"] = _net(pid)
        return out
    except psutil.Error:
        _CPU.pop(pid, None)
        return {}


def _net(pid: int) -> dict[str, int] | None:
    """Bytes through the tap devices QEMU holds (user-mode networking has none to count)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return None
    rx = tx = 0
    found = False
    for fd in fds:
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("iff:"):
                dev = line.split()[1]
                try:
                    rx += int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())
                    tx += int(Path(f"/sys/class/net/{dev}/statistics/rx_bytes").read_text())
                    found = True
                except (OSError, ValueError):
                    pass
    return {"rx_bytes": rx, "tx_bytes": tx} if found else None
