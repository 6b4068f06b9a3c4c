"""The one module that speaks QMP, through the QEMU project's ``qemu.qmp`` client.

Every call has a timeout: one slow or hung QEMU never blocks the caller for longer than asked.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from qemud.errors import QemudError

DEFAULT_TIMEOUT = 10.0


class QmpError(QemudError):
    """A QMP conversation failed: QEMU answered an error, went away, or did not answer in time."""


class Qmp:
    """A QMP connection to one QEMU."""

    def __init__(self, name: str = "qemu") -> None:
        self._client = QMPClient(name)
        self._events = self._client.events
        self._listener_opened = False

    @property
    def client(self) -> QMPClient:
        return self._client

    async def connect(self, address: str | socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Connect to QEMU's QMP server (a unix socket path, or a connected socket)."""
        try:
            await asyncio.wait_for(self._client.connect(address), timeout)
        except asyncio.TimeoutError as exc:
            await self.close()
            raise QmpError(f"QMP did not answer within {timeout:g} s") from exc
        except (ConnectError, QMPError, OSError) as exc:
            await self.close()
            raise QmpError(f"cannot connect to QMP: {exc}") from exc

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except asyncio.TimeoutError as exc:
            raise QmpError(f"QMP command {command} did not answer within {timeout:g} s") from exc
        except ExecuteError as exc:
            raise QmpError(f"QMP command {command} failed: {exc}") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP command {command} failed: {exc or type(exc).__name__}") from exc

    async def hmp(self, command_line: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """A human-monitor command through QMP (for facts only HMP gives, like ``info network``)."""
        out = await self.execute("human-monitor-command", {"command-line": command_line}, timeout)
        return str(out)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """QMP events as dicts, until the connection ends."""
        async for event in self._events:
            yield dict(event)

    async def close(self) -> None:
        try:
            await self._client.disconnect()
        except (QMPError, OSError, EOFError):
            pass
