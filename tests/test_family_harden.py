"""A guest's passt and dbus-daemon are adopted after a daemon restart although the program
qemud started (passt's shim, a shell script) has become them.

(The rest of the hardening work is tested in tests/test_systemd.py: the units' exposure and a
guest with every helper under the hardened qemud.service.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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


BRIDGE_CHECK = r"""
import json, subprocess, sys
from qemud.tap import pass_taps
subprocess.run(["ip", "link", "add", "qdbr0", "type", "bridge"], check=True)
argv = ["qemu", "-netdev", json.dumps({"type": "bridge", "br": "qdbr0", "helper": "/usr/lib/qemu/qemu-bridge-helper",
                                       "id": "hostnet0"})]
out, fds = pass_taps(argv)
nd = json.loads(out[2])
ports = subprocess.run(["ip", "-o", "link", "show", "master", "qdbr0"], capture_output=True, text=True).stdout
print(json.dumps({"netdev": nd, "fds": len(fds), "ports": ports}))
"""


def test_a_bridged_nic_gets_a_tap_qemud_put_on_the_bridge() -> None:
    """QEMU as the qemud user cannot run qemu-bridge-helper to any effect (not setuid on Debian,
    and no_new_privs from QEMU's own -sandbox): qemud makes the tap, adds it to the bridge, brings
    it up and hands QEMU its descriptor. In a network namespace of its own (no host bridge)."""
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", BRIDGE_CHECK], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["netdev"] == {"type": "tap", "id": "hostnet0", "fd": got["netdev"].get("fd")} and got["fds"] == 1, got
    assert "master qdbr0" in got["ports"] and "UP" in got["ports"].split(">")[0], got["ports"]
