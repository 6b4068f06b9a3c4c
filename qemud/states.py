"""A guest's life as a state machine, in the spirit of supervisord's process states and
qemu.qmp's Runstate: one Enum, transitions only through one guarded setter, each with its cause,
and awaitable changes.

The strings are an interface (logs, journal fields, ``qemuctl list``): change them only on purpose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import Enum


class State(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    BACKOFF = "backoff"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


S = State
#: Every allowed transition. Anything else is a bug in qemud, raised as such.
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.STARTING, S.RUNNING, S.PAUSED}),  # RUNNING/PAUSED: adoption
    S.STARTING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING, S.STOPPED, S.CRASHED}),
    S.RUNNING: frozenset({S.PAUSED, S.STOPPING, S.STOPPED, S.CRASHED, S.STARTING}),
    S.PAUSED: frozenset({S.RUNNING, S.STOPPING, S.STOPPED, S.CRASHED, S.STARTING}),
    S.STOPPING: frozenset({S.STOPPED, S.CRASHED}),
    S.CRASHED: frozenset({S.STARTING, S.BACKOFF, S.FAILED, S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}
#: States in which a QEMU process exists.
ALIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING})


class InvalidTransition(RuntimeError):
    """qemud tried a transition its state machine does not have: a bug."""


class StateMachine:
    """The state of one guest, its cause, and a way to wait for changes."""

    def __init__(self, on_change: Callable[[State, State, str], None] | None = None,
                 initial: State = State.STOPPED) -> None:
        self._state = initial
        self.cause = "defined"
        self._on_change = on_change
        self._changed = asyncio.Condition() if _has_loop() else None

    @property
    def state(self) -> State:
        return self._state

    def set(self, new: State, cause: str) -> None:
        """The one way to change state. Same-state sets are ignored (nothing happened)."""
        old = self._state
        if new == old:
            return
        if new not in TRANSITIONS[old]:
            raise InvalidTransition(f"{old} -> {new} ({cause})")
        self._state = new
        self.cause = cause
        if self._on_change is not None:
            self._on_change(old, new, cause)
        if self._changed is not None:
            cond = self._changed

            async def notify() -> None:
                async with cond:
                    cond.notify_all()
            asyncio.get_running_loop().create_task(notify())

    async def wait_for(self, *states: State) -> State:
        """Wait until the state is one of ``states``."""
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: self._state in states)
        return self._state


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False
