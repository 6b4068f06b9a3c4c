"""A guest's passt is adopted after a daemon restart although its shim has become passt.

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
