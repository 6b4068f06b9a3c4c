"""The client side of the control socket; a few standard modules only, so qemuctl starts fast
(not even typing: the annotations below are never evaluated; not even the socket module, whose
import builds its enums in about 2 ms: _socket, underneath it, has all a Unix socket needs)."""

from __future__ import annotations

import json
import os

import _socket as socket

VERSION = 1


class NotRunning(Exception):
    pass


class Refused(Exception):
    pass


class Client:
    def __init__(self, path: str, timeout: float | None = 600.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise NotRunning(f"qemud is not running (no socket at {path})") from None
        except PermissionError:
            self.sock.close()
            raise Refused(f"permission denied: {path} (root and members of qemud's control group only)") from None
        self.buf = b""

    def send(self, obj: dict[str, object]) -> None:
        """Send a request; a daemon that refused us may have closed already: its answer is
        still to be read."""
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def call(self, cmd: str, **args: object) -> object:
        self.send({"v": VERSION, "cmd": cmd, **args})
        reply = self.read_reply()
        if not reply.get("ok"):
            raise Refused(str(reply.get("error", "refused")))
        return reply.get("result")

    def read_reply(self) -> dict[str, object]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Refused("qemud closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise Refused("qemud answered something that is not an object")
        return reply

    def close(self) -> None:
        self.sock.close()


def socket_path(state_dir: str | None, socket_arg: str | None) -> str:
    if socket_arg:
        return socket_arg
    if state_dir:
        return os.path.join(os.path.abspath(state_dir), "qemud.sock")
    if os.geteuid() == 0:
        return "/run/qemud/qemud.sock"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "qemud", "qemud.sock")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "qemud", "run", "qemud.sock")
