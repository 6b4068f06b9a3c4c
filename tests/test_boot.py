"""Direct kernel boot of the tiny test guest, from a domain XML, in real QEMU (TCG)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from qemud.argv import build_argv
from qemud.caps import probe
from qemud.domain import parse_domain
from qemud.launch import prepare
from qemud.paths import GuestPaths
from qemud.qmp import Qmp
from tests.support.tinyguest import ensure_guest

pytestmark = pytest.mark.qemu


def _domain_xml(kernel: Path, initrd: Path, console_sock: Path, machine: str) -> str:
    return f"""<domain type='qemu'>
  <name>tiny-{machine}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <serial type='unix'>
      <source mode='bind' path='{console_sock}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def _connect(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> socket.socket:
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited with {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_direct_kernel_boot_reaches_marker_and_powers_off(tmp_path: Path, machine: str) -> None:
    guest = ensure_guest()
    console = tmp_path / "console.sock"
    domain = parse_domain(_domain_xml(guest.kernel, guest.initrd, console, machine))
    paths = GuestPaths(tmp_path / "run", tmp_path / "state")
    cmd = build_argv(domain, probe("/usr/bin/qemu-system-x86_64"), paths)
    assert ["-kernel", str(guest.kernel)] == cmd.argv[cmd.argv.index("-kernel"):cmd.argv.index("-kernel") + 2]
    prepare(cmd)
    proc = subprocess.Popen(cmd.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **cmd.env})
    try:
        sock = _connect(console, proc, time.monotonic() + 10)
        sock.settimeout(60)
        seen = b""
        while guest.marker.encode() not in seen:
            chunk = sock.recv(4096)
            assert chunk, f"console closed before the marker; got {seen[-500:]!r}"
            seen += chunk
        # the guest honours ACPI: after a QMP powerdown it powers off; QEMU (run with -no-shutdown,
        # so qemud can apply on_poweroff) reports the guest's SHUTDOWN and quits when told to
        async def powerdown() -> dict:
            q = Qmp()
            await q.connect(str(paths.qmp), timeout=10)
            try:
                await q.execute("system_powerdown")
                async for ev in q.events():
                    if ev["event"] == "SHUTDOWN":
                        await q.execute("quit")
                        return ev
            finally:
                await q.close()
            return {}
        event = asyncio.run(asyncio.wait_for(powerdown(), 30))
        assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert proc.wait(timeout=30) == 0
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
