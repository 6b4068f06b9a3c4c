"""A real systemd-journald for the tests, in a private mount namespace (none runs here).

``Namespace`` starts ``unshare --mount --propagation private`` running a small shell that mounts
tmpfs on /run/systemd/journal and /run/log/journal (and on the catalog directories, so
``journalctl --update-catalog`` touches nothing outside), starts systemd-journald, waits for its
socket, and then sleeps; every command of the test runs inside with nsenter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

JOURNALD = "/lib/systemd/systemd-journald"

_SETUP = r"""
set -e
mount -t tmpfs tmpfs /run/systemd/journal 2>/dev/null || { mkdir -p /run/systemd/journal; mount -t tmpfs tmpfs /run/systemd/journal; }
mkdir -p /run/log/journal && mount -t tmpfs tmpfs /run/log/journal
mkdir -p /var/lib/systemd/catalog && mount -t tmpfs tmpfs /var/lib/systemd/catalog
mkdir -p /usr/lib/systemd/catalog && mount -t tmpfs tmpfs /usr/lib/systemd/catalog
%s &
JPID=$!
for i in $(seq 1 500); do [ -S /run/systemd/journal/socket ] && break; sleep 0.01; done
[ -S /run/systemd/journal/socket ] || { echo "journald did not start" >&2; exit 1; }
echo "ready $JPID"
exec sleep infinity
"""


class Namespace:
    def __init__(self) -> None:
        os.makedirs("/run/systemd", exist_ok=True)
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                                      _SETUP % JOURNALD], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("ready "):
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            self.close()
            raise RuntimeError(f"journald namespace did not come up: {line!r} {err}")
        self.pid = self.proc.pid
        self.journald_pid = int(line.split()[1])

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["nsenter", "-t", str(self.pid), "-m", "--", *argv]

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=60, **kw)

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        r = self.run(["journalctl", "--no-pager", "-o", "json", "--directory", "/run/log/journal", *matches])
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_for(self, timeout: float, *matches: str, where: Any = None) -> list[dict[str, Any]]:
        """Entries matching, once there is at least one (journald writes asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            entries = [e for e in self.journal(*matches) if where is None or where(e)]
            if entries:
                return entries
            if time.monotonic() > deadline:
                raise AssertionError(f"no journal entry for {matches} within {timeout} s")
            time.sleep(0.1)

    def kill_journald(self) -> None:
        os.kill(self.journald_pid, signal.SIGKILL)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def repo() -> Path:
    return Path(__file__).resolve().parents[2]
