"""Boot the tiny test guest under QEMU/TCG and time it (a dev tool, not a test).

For each machine type (``pc`` and ``q35`` by default) and each run it

1. starts ``qemu-system-x86_64 -accel tcg`` with the guest's kernel and initrd,
   the serial console on stdio and a QMP unix socket;
2. waits for :data:`tests.support.tinyguest.MARKER` on the serial console
   (boot time = QEMU start to marker);
3. types ``echo hel""lo`` on the console and waits for a ``hello`` line;
4. sends QMP ``system_powerdown`` and waits for QEMU to exit
   (powerdown time = command sent to process exit).

Usage (from the repository root)::

    python -m tests.support.check_tinyguest [--machine pc q35] [--runs 3]
    python tests/support/check_tinyguest.py      # works too
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

if not __package__:  # run as a file path: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.tinyguest import (  # noqa: E402
    ERROR_MARKER,
    KERNEL_CMDLINE,
    TinyGuest,
    TinyGuestError,
    ensure_guest,
)

_HELLO_RE = re.compile(rb"(?m)^hello\r?$")


class CheckFailed(Exception):
    """A check step failed; the message names it, the serial log is attached."""

    def __init__(self, step: str, serial: bytes) -> None:
        super().__init__(step)
        self.step = step
        self.serial = serial


@dataclasses.dataclass
class RunResult:
    machine: str
    boot_s: float       # QEMU spawned -> marker seen on the serial console
    echo_s: float       # command typed -> "hello" line seen
    powerdown_s: float  # system_powerdown sent -> QEMU process exited
    ack_s: float        # system_powerdown sent -> QMP reply received
    exit_code: int


class _Serial:
    """Collects QEMU's stdout (the guest's serial console) in the background."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.data = bytearray()
        self._changed = asyncio.Condition()
        self._eof = False
        self._task = asyncio.create_task(self._pump(stream))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            async with self._changed:
                self.data += chunk
                self._changed.notify_all()
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    async def wait_for(self, pattern: re.Pattern[bytes], start: int, timeout: float) -> int:
        """Wait until *pattern* matches at or after *start*; return the match end."""
        async def _wait() -> int:
            async with self._changed:
                while True:
                    m = pattern.search(self.data, start)
                    if m:
                        return m.end()
                    if self._eof:
                        raise EOFError
                    await self._changed.wait()
        return await asyncio.wait_for(_wait(), timeout)


async def run_once(guest: TinyGuest, machine: str, qemu: str, timeout: float) -> RunResult:
    """Boot, talk to, and power down one guest; raise :class:`CheckFailed` on failure."""
    with tempfile.TemporaryDirectory(prefix="tinyguest-check-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        argv = [
            qemu, "-accel", "tcg", "-machine", machine, "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", KERNEL_CMDLINE, "-serial", "stdio",
            "-qmp", f"unix:{sock},server=on,wait=off", "-no-reboot",
        ]
        t_start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        serial = _Serial(proc.stdout)
        try:
            step = f"waiting for {guest.marker} on the serial console"
            ready = re.compile(re.escape(guest.marker.encode()) + rb"|"
                               + re.escape(ERROR_MARKER.encode()) + rb".*")
            end = await serial.wait_for(ready, 0, timeout)
            if ERROR_MARKER.encode() in serial.data:
                raise CheckFailed("guest reported a setup error", bytes(serial.data))
            t_marker = time.monotonic()

            step = "typing `echo hel\"\"lo` and waiting for `hello`"
            t_typed = time.monotonic()
            proc.stdin.write(b'echo hel""lo\n')
            await proc.stdin.drain()
            await serial.wait_for(_HELLO_RE, end, timeout)
            t_hello = time.monotonic()

            step = "QMP system_powerdown"
            qmp = QMPClient("check-tinyguest")
            await qmp.connect(str(sock))
            t_cmd = time.monotonic()
            await qmp.execute("system_powerdown")
            t_ack = time.monotonic()
            step = "waiting for QEMU to exit after system_powerdown"
            rc = await asyncio.wait_for(proc.wait(), timeout)
            t_exit = time.monotonic()
            try:
                await qmp.disconnect()
            except Exception:  # QEMU is gone; the connection died with it
                pass
        except (TimeoutError, EOFError, OSError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
            raise CheckFailed(f"{machine}: {step}: {what}", bytes(serial.data)) from exc
        except CheckFailed:
            raise
        except Exception as exc:  # e.g. QMP errors
            raise CheckFailed(f"{machine}: {step}: {exc!r}", bytes(serial.data)) from exc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return RunResult(machine=machine, boot_s=t_marker - t_start, echo_s=t_hello - t_typed,
                         powerdown_s=t_exit - t_cmd, ack_s=t_ack - t_cmd, exit_code=rc)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms"


async def _main(args: argparse.Namespace) -> int:
    try:
        t0 = time.monotonic()
        guest = ensure_guest(args.cache_dir)
        print(f"guest: kernel {guest.kernel_version} ({time.monotonic() - t0:.2f} s to ensure)")
        print(f"  kernel: {guest.kernel}\n  initrd: {guest.initrd}")
    except TinyGuestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results: list[RunResult] = []
    failed = False
    for machine in args.machine:
        for run in range(1, args.runs + 1):
            try:
                r = await run_once(guest, machine, args.qemu, args.timeout)
            except CheckFailed as exc:
                failed = True
                print(f"FAIL {exc.step}", file=sys.stderr)
                print("---- serial console ----", file=sys.stderr)
                print(exc.serial.decode(errors="replace"), file=sys.stderr)
                print("------------------------", file=sys.stderr)
                continue
            results.append(r)
            print(f"{machine:4} run {run}: boot-to-marker {_ms(r.boot_s)}   "
                  f"echo {_ms(r.echo_s)}   powerdown-to-exit {_ms(r.powerdown_s)} "
                  f"(QMP ack {_ms(r.ack_s)})   exit code {r.exit_code}")
    for machine in args.machine:
        rs = [r for r in results if r.machine == machine]
        if len(rs) > 1:
            print(f"{machine:4} median: boot-to-marker "
                  f"{_ms(statistics.median(r.boot_s for r in rs))}   powerdown-to-exit "
                  f"{_ms(statistics.median(r.powerdown_s for r in rs))}")
    if failed:
        print("FAILED", file=sys.stderr)
        return 1
    print("OK")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--machine", nargs="+", default=["pc", "q35"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds allowed for each step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
