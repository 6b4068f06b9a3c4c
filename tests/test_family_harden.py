"""A guest's passt and dbus-daemon are adopted after a daemon restart although the program
qemud started (passt's shim, a shell script) has become them.

(The rest of the hardening work is tested in tests/test_systemd.py: the units' exposure and a
guest with every helper under the hardened qemud.service.)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from qemud import passt_shim
from qemud.helpers import _live_argv

PASST = "/usr/bin/passt"
CODE = "import time; time.sleep(60)"


@pytest.fixture
def became_passt() -> Iterator[int]:
    """A process whose command line is what the shim's exec leaves: PASST ARGS... --fd 7."""
    p = subprocess.Popen([PASST, "-c", CODE, "--fd", "7"], executable=sys.executable)
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _record(*passt_args: str) -> list[str]:
    """The shim's command line as the runtime record holds it (net.py's HelperSpec, fd filled in)."""
    return [sys.executable, "-I", passt_shim.__file__, "7", PASST, *passt_args]


def test_the_shim_that_became_passt_is_matched_by_its_new_command_line(became_passt: int) -> None:
    assert _live_argv(became_passt, _record("-c", CODE)) == [PASST, "-c", CODE, "--fd", "7"]


def test_another_program_in_the_recorded_pid_is_not_taken_for_passt(became_passt: int) -> None:
    record = _record("-c", "something else")
    assert _live_argv(became_passt, record) == record  # adopt() then refuses it


def test_other_helpers_keep_their_recorded_command_line(became_passt: int) -> None:
    record = ["/usr/bin/swtpm", "socket", "--ctrl", "type=unixio,fd=7"]
    assert _live_argv(became_passt, record) == record


def test_the_script_that_exec_ed_its_program_is_matched_by_that_program(became_passt: int) -> None:
    """The D-Bus display's private bus: bash runs a script whose last exec is dbus-daemon."""
    script = f"[ 5 = 3 ] || exec 3<&5 5<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec {PASST} -c '{CODE}' --fd 7"
    assert _live_argv(became_passt, ["/bin/bash", "-c", script]) == [PASST, "-c", CODE, "--fd", "7"]
    other = f"exec {PASST} -c 'something else' --fd 7"
    assert _live_argv(became_passt, ["/bin/bash", "-c", "true; " + other]) == ["/bin/bash", "-c", "true; " + other]
