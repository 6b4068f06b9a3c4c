"""The state machine and the restart policy, without QEMU: transitions and time are inputs."""

from __future__ import annotations

import asyncio

import pytest

from qemud.policy import Backoff, RestartPolicy
from qemud.states import TRANSITIONS, InvalidTransition, State, StateMachine


def test_state_strings_are_the_documented_interface() -> None:
    assert [s.value for s in State] == ["starting", "running", "paused", "stopping", "stopped",
                                        "crashed", "backoff", "failed"]


def test_every_transition_is_logged_with_its_cause_and_invalid_ones_raise() -> None:
    seen: list[tuple[str, str, str]] = []
    sm = StateMachine(on_change=lambda o, n, c: seen.append((o.value, n.value, c)))
    sm.set(State.STARTING, "file appeared")
    sm.set(State.RUNNING, "QMP says running")
    sm.set(State.RUNNING, "again")  # no change, nothing logged
    with pytest.raises(InvalidTransition):
        sm.set(State.BACKOFF, "a running guest cannot back off")
    sm.set(State.CRASHED, "killed by signal 9")
    assert seen == [("stopped", "starting", "file appeared"), ("starting", "running", "QMP says running"),
                    ("running", "crashed", "killed by signal 9")]
    assert sm.state == State.CRASHED and sm.cause == "killed by signal 9"


def test_failed_and_backoff_are_left_only_by_a_start_or_a_stop() -> None:
    for s in (State.FAILED, State.BACKOFF):
        assert TRANSITIONS[s] == {State.STARTING, State.STOPPED}


def test_state_changes_can_be_awaited() -> None:
    async def scenario() -> State:
        sm = StateMachine()
        waiter = asyncio.create_task(sm.wait_for(State.RUNNING, State.FAILED))
        await asyncio.sleep(0)
        sm.set(State.STARTING, "x")
        sm.set(State.RUNNING, "y")
        return await asyncio.wait_for(waiter, 1)
    assert asyncio.run(scenario()) == State.RUNNING


def test_backoff_first_restart_at_once_then_doubling_to_the_cap_then_failed() -> None:
    b = Backoff(RestartPolicy(max_retries=8, backoff=1, max_backoff=10, reset_after=60))
    now = 1000.0
    delays = [b.died(now + i, started_at=now + i - 0.5) for i in range(8)]
    assert delays == [0.0, 1, 2, 4, 8, 10, 10, None]


def test_backoff_resets_after_a_long_enough_run() -> None:
    b = Backoff(RestartPolicy(max_retries=5, backoff=1, max_backoff=60, reset_after=60))
    assert [b.died(t, started_at=t - 1) for t in (10.0, 20.0, 30.0)] == [0.0, 1, 2]
    # this run lasted 61 s: the count starts afresh, the restart is immediate again
    assert b.died(200.0, started_at=139.0) == 0.0


def test_five_failed_starts_in_a_row_means_failed_by_default() -> None:
    b = Backoff(RestartPolicy())
    results = [b.died(float(t), started_at=None) for t in range(5)]
    assert results[:4] == [0.0, 1, 2, 4] and results[4] is None


def test_policy_never_gives_up_at_once() -> None:
    assert Backoff(RestartPolicy(mode="never")).died(1.0, None) is None
