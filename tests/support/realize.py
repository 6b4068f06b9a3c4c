"""Start a translated domain in real QEMU and check over QMP that QEMU built what the domain says.

:func:`realize` runs ``argv`` exactly as given (only ``env`` is merged into the environment),
waits for the QMP socket, asks QEMU what it built and compares that with the domain model:

* ``query-name`` / ``query-uuid``: the domain's name and UUID;
* ``query-memory-size-summary``: base memory equals ``<memory>`` (minus DIMMs; with NUMA cells,
  their sum), within 1 % or
  2 MiB, as libvirt's own measurement of its corpus allows;
* ``query-cpus-fast``: as many vCPUs as are online (``<vcpu current=...>`` or ``<vcpu>``);
* ``query-block`` (+ ``query-named-block-nodes``): every file/block disk's image is attached to a
  device; every CD-ROM/floppy without media exists as a device;
* HMP ``info network``: every NIC's MAC (``<mac>``, or the one in argv for NICs without one).

Then QEMU is asked to ``quit`` (killed if it does not) and reaped.  No QEMU outlives the call,
whatever happens (errors, timeouts, cancellation).  Use ``paused=True`` in ``build_argv`` (``-S``):
the checks need no running guest.

Command line (a quick manual check of one domain file)::

    python -m tests.support.realize DOMAIN.xml [--timeout 20]
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

if not __package__:  # run as a file path: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qemud.domain import Domain  # noqa: E402
from qemud.errors import QemudError  # noqa: E402
from qemud.qmp import Qmp, QmpError  # noqa: E402

__all__ = ["RealizeResult", "realize", "realize_sync", "check_domain", "first_error_line",
           "argv_props"]

MIB = 1024 * 1024
#: what qemud does to a QEMU once QMP answers: ``after_start(qmp, pid)``
AfterStart = Callable[[Qmp, int], Awaitable[None]]
#: Seconds QEMU gets to exit after QMP ``quit`` before it is killed.
QUIT_GRACE = 5.0
#: A QEMU that holds its guest's RAM (preallocated) gets this many more seconds per GiB to free it.
QUIT_GRACE_PER_GIB = 1.0


def quit_grace(domain: Domain) -> float:
    """Seconds QEMU gets to exit: freeing 14 GiB of preallocated RAM takes more than 5 s here."""
    mb = getattr(domain, "memoryBacking", None)
    if mb is None or (mb.hugepages is None and (mb.allocation is None or mb.allocation.mode != "immediate")):
        return QUIT_GRACE
    return QUIT_GRACE + QUIT_GRACE_PER_GIB * domain.memory.bytes / (1 << 30)


#: How long to keep polling after a QMP failure to see whether QEMU is exiting.
EXIT_GRACE = 2.0
#: Output kept from QEMU (its stderr and stdout, merged).
MAX_OUTPUT = 64 * 1024

#: Devices that hold removable media (a drive-less one is an empty CD-ROM / floppy drive).
_MEDIA_DEVICES = {"ide-cd", "scsi-cd", "floppy"}


@dataclass
class RealizeResult:
    """What happened. ``ok`` only when QEMU started, answered every query and every check passed."""

    ok: bool = False
    failed_checks: list[str] = field(default_factory=list)
    #: Why QEMU could not be brought up or asked: its output when it exited, else the exception.
    error: str | None = None
    #: QMP answered (QEMU got through its start-up).
    started: bool = False
    #: The overall timeout hit (QEMU hung starting, or a query never answered).
    timed_out: bool = False
    #: QEMU's exit status when it exited on its own before the checks were done (else None).
    exit_status: int | None = None
    #: QEMU's stdout+stderr (truncated to MAX_OUTPUT).
    output: str = ""
    #: Raw answers: query name -> result (HMP ``info network`` under "info network").
    queries: dict[str, Any] = field(default_factory=dict)
    #: Queries that failed: name -> message.
    query_errors: dict[str, str] = field(default_factory=dict)
    duration: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- argv reading --------------------------------------------------------------------------

def _split_qemuopts(value: str) -> list[str]:
    """``a=b,,c,d=e`` -> ``['a=b,c', 'd=e']`` (``,,`` is an escaped comma)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if i + 1 < len(value) and value[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_option_value(value: str, implied: str = "driver") -> dict[str, Any]:
    """A -device/-blockdev/-netdev value as a dict: JSON, or QemuOpts with an implied first key."""
    if value.lstrip().startswith("{"):
        try:
            out = json.loads(value)
            return out if isinstance(out, dict) else {}
        except ValueError:
            return {}
    props: dict[str, Any] = {}
    for n, part in enumerate(_split_qemuopts(value)):
        if "=" in part:
            k, _, v = part.partition("=")
            props[k] = v
        elif n == 0 and part:
            props[implied] = part
        elif part:
            props[part] = "on"
    return props


def argv_props(argv: list[str], option: str) -> list[dict[str, Any]]:
    """Every value of ``option`` (e.g. ``-device``) in argv, parsed, in order."""
    implied = {"-device": "driver", "-netdev": "type", "-blockdev": "driver"}.get(option, "type")
    out = []
    for i, a in enumerate(argv[:-1]):
        if a == option or a == "-" + option:
            out.append(parse_option_value(argv[i + 1], implied))
    return out


# ---- the checks ----------------------------------------------------------------------------

def _base_bytes(domain: Domain) -> int:
    """The base memory QEMU should report: with NUMA cells their sum (libvirt sizes the guest by
    its cells, whatever <memory> says), else <memory> minus the memory devices."""
    cpu = getattr(domain, "cpu", None)
    cells = cpu.numa.cell if cpu is not None and cpu.numa is not None else ()
    if cells:
        return sum(c.mib for c in cells) * MIB
    return domain.memory.bytes - _dimm_bytes(domain)


def _dimm_bytes(domain: Domain) -> int:
    """Memory of hot-pluggable memory devices (``<devices><memory>``: DIMMs, NVDIMMs, virtio-mem,
    virtio-pmem), which ``<memory>`` includes but QEMU reports as plugged memory (or not at all),
    not base memory.  An SGX EPC section is not guest RAM and not in ``<memory>``."""
    total = 0
    for mem in getattr(domain.devices, "memory", ()) or ():
        if getattr(mem, "model", None) == "sgx-epc":
            continue
        target = getattr(mem, "target", None)
        size = getattr(target, "size", None)
        b = getattr(size, "bytes", None)
        if isinstance(b, int):
            total += b
    return total


def _peripheral_id(qdev: str) -> str:
    """``/machine/peripheral/virtio-disk0/virtio-backend`` -> ``virtio-disk0``; an id stays."""
    m = re.match(r"/machine/peripheral/([^/]+)", qdev or "")
    return m.group(1) if m else (qdev or "")


def _inserted_names(inserted: dict[str, Any]) -> str:
    """Every file name QEMU knows for a medium (top node, image chain), as one searchable text."""
    names = [str(inserted.get("file", ""))]
    img = inserted.get("image")
    while isinstance(img, dict):
        names.append(str(img.get("filename", "")))
        img = img.get("backing-image")
    return "\n".join(names)


def check_domain(domain: Domain, argv: list[str], queries: dict[str, Any]) -> list[str]:
    """Compare QEMU's answers with the domain; one message per failed check."""
    failed: list[str] = []

    name = queries.get("query-name")
    if name is not None:
        got = name.get("name") if isinstance(name, dict) else None
        if got != domain.name:
            failed.append(f"name: QEMU says {got!r}, the domain says {domain.name!r}")

    uuid = queries.get("query-uuid")
    if uuid is not None:
        got = str(uuid.get("UUID", "")) if isinstance(uuid, dict) else ""
        if got.lower() != domain.uuid_value.lower():
            failed.append(f"uuid: QEMU says {got!r}, the domain says {domain.uuid_value!r}")

    mem = queries.get("query-memory-size-summary")
    if mem is not None:
        base = mem.get("base-memory") if isinstance(mem, dict) else None
        want = _base_bytes(domain)
        if not isinstance(base, int):
            failed.append(f"memory: QEMU reports no base memory ({mem!r})")
        elif abs(base - want) > max(want * 0.01, 2 * MIB):
            failed.append(f"memory: QEMU has {base} bytes ({base / MIB:.1f} MiB) of base memory, "
                          f"the domain says {want} bytes ({want / MIB:.1f} MiB)")

    cpus = queries.get("query-cpus-fast")
    if cpus is not None:
        n = len(cpus) if isinstance(cpus, list) else -1
        if n != domain.vcpus_online:
            failed.append(f"vcpus: QEMU has {n} vCPUs, the domain says {domain.vcpus_online} online")

    blocks = queries.get("query-block")
    if blocks is not None:
        failed += _check_disks(domain, argv, blocks if isinstance(blocks, list) else [],
                               queries.get("qom-list /machine/peripheral"))

    net = queries.get("info network")
    if net is not None:
        failed += _check_nics(domain, argv, str(net))
    return failed


def _check_disks(domain: Domain, argv: list[str], blocks: list[dict[str, Any]],
                 peripherals: Any) -> list[str]:
    failed: list[str] = []
    attached = [b for b in blocks if isinstance(b, dict) and (b.get("qdev") or b.get("device"))]
    with_media = [(b, _inserted_names(b["inserted"])) for b in attached if isinstance(b.get("inserted"), dict)]
    qdev_ids = {_peripheral_id(str(b.get("qdev") or "")) for b in attached}
    qdev_ids |= {str(b.get("device")) for b in attached if b.get("device")}
    if isinstance(peripherals, list):
        qdev_ids |= {str(p.get("name")) for p in peripherals if isinstance(p, dict)}
    empty_devices = [d for d in argv_props(argv, "-device")
                     if d.get("driver") in _MEDIA_DEVICES and not d.get("drive") and d.get("id")]
    empty_iter = iter(empty_devices)
    for i, d in enumerate(domain.devices.disk):
        what = f"disk {d.target.dev} (disk[{i + 1}])"
        if d.type not in ("file", "block"):
            continue
        path = d.path
        if path:
            lines_match = any(path in names.split("\n") for _, names in with_media)
            if not lines_match and not any(path in names for _, names in with_media):
                failed.append(f"disk: {what}: no device has {path} inserted (query-block)")
        elif d.device in ("cdrom", "floppy"):
            dev = next(empty_iter, None)
            if dev is None:
                failed.append(f"disk: {what}: an empty {d.device} drive, but argv has no drive-less "
                              "CD-ROM/floppy device for it")
            elif str(dev["id"]) not in qdev_ids:
                failed.append(f"disk: {what}: QEMU has no device {dev['id']} (query-block)")
    return failed


_MACADDR = re.compile(r"macaddr=([0-9a-fA-F:]{17})")


def _check_nics(domain: Domain, argv: list[str], info: str) -> list[str]:
    failed: list[str] = []
    have = {m.lower() for m in _MACADDR.findall(info)}
    # a hostdev interface is a VF given to the guest: QEMU has no NIC (and no MAC) for it
    nics = [(i, n) for i, n in enumerate(domain.devices.interface) if n.type != "hostdev"]
    explicit = {n.mac.address.lower() for _, n in nics if n.mac is not None}
    argv_nics = [d for d in argv_props(argv, "-device") if "netdev" in d and d.get("mac")]
    same_count = len(argv_nics) == len(nics)
    spare = [str(d["mac"]).lower() for d in argv_nics if str(d["mac"]).lower() not in explicit]
    for k, (i, iface) in enumerate(nics):
        what = f"interface[{i + 1}]"
        if iface.mac is not None:
            mac = iface.mac.address.lower()
        elif same_count:
            mac = str(argv_nics[k]["mac"]).lower()
        elif spare:
            mac = spare.pop(0)
        else:
            failed.append(f"nic: {what} has no <mac> and argv has no NIC with a MAC for it")
            continue
        if mac not in have:
            failed.append(f"nic: {what}: MAC {mac} is not in 'info network'")
    return failed


# ---- QEMU's output ---------------------------------------------------------------------------

_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\s+")
#: Lines QEMU prints on success too: never the reason it failed.
_INFO = re.compile(r"^(char device redirected to |VNC server running on |QEMU waiting for connection)")
_WARNING = re.compile(r"^([^:]*: )?warning: ")
_PROGRAM = re.compile(r"^qemu(-system-[\w.-]+)?: ")


def first_error_line(output: str) -> str:
    """The line of QEMU's output that says why it failed: the first error (``qemu-system-x: ...``
    and not a warning), else the first line that is neither a warning nor information; without
    the timestamp that ``-msg timestamp=on`` adds."""
    lines = [_TIMESTAMP.sub("", ln).strip() for ln in output.splitlines()]
    lines = [ln for ln in lines if ln]
    candidates = [ln for ln in lines if not _INFO.match(ln) and not _WARNING.match(ln)]
    for ln in candidates:
        if _PROGRAM.match(ln):
            return ln
    if candidates:
        return candidates[0]
    return lines[0] if lines else ""


# ---- running QEMU --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort only
        pass


def _read_output(log: Any) -> str:
    try:
        log.flush()
        size = os.fstat(log.fileno()).st_size
        log.seek(max(0, size - MAX_OUTPUT))
        return log.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""


async def _wait_exit(proc: subprocess.Popen[bytes], seconds: float) -> int | None:
    """Poll the Popen until QEMU exits or ``seconds`` pass; its status, or None."""
    deadline = time.monotonic() + seconds
    while True:
        rc = proc.poll()
        if rc is not None or time.monotonic() >= deadline:
            return rc
        await asyncio.sleep(0.02)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Make sure QEMU is gone and reaped (synchronous: safe in ``finally`` during cancellation)."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # D state; nothing more a parent can do
        pass


async def _connect(proc: subprocess.Popen[bytes], path: Path, deadline: float) -> tuple[Qmp | None, str]:
    """Connect to QMP as soon as QEMU has created the socket. (None, why) if QEMU exited."""
    last = ""
    while True:
        if proc.poll() is not None:
            return None, last
        if os.path.exists(path):
            q = Qmp("realize")
            try:
                await q.connect(str(path), timeout=max(0.5, deadline - time.monotonic()))
                return q, ""
            except QmpError as exc:  # not listening yet, or QEMU died while starting
                last = str(exc)
        await asyncio.sleep(0.02)


async def realize(domain: Domain, argv: list[str], env: dict[str, str], qmp_path: Path | str, *,
                  timeout: float = 20, after_start: AfterStart | None = None) -> RealizeResult:
    """Start ``argv``, check the running QEMU against ``domain`` over QMP, stop it.

    ``after_start(qmp, pid)`` runs once QMP answers, before the checks: what qemud itself does to
    a QEMU it started (its tuning); a :class:`qemud.errors.QemudError` from it fails the start."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    qmp_path = Path(qmp_path)
    result = RealizeResult()
    log = tempfile.TemporaryFile(prefix="qemu-out-")
    proc: subprocess.Popen[bytes] | None = None
    q: Qmp | None = None
    try:
        with contextlib.suppress(OSError):
            if qmp_path.is_socket():  # a stale socket from an earlier run would look ready
                qmp_path.unlink()
        try:
            proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, close_fds=True,
                                    preexec_fn=_die_with_parent)
        except OSError as exc:
            result.error = f"cannot run {argv[0] if argv else '(empty argv)'}: {exc.strerror or exc}"
            return result
        stage = "waiting for QMP"
        try:
            async with asyncio.timeout(timeout):
                q, why = await _connect(proc, qmp_path, deadline)
                if q is None:
                    result.exit_status = proc.poll()
                    result.error = "QEMU exited while starting" + (f" ({why})" if why else "")
                    return result
                if after_start is not None:
                    stage = "applying the tuning"
                    try:
                        await after_start(q, proc.pid)
                    except QemudError as exc:
                        result.error = str(exc)
                        return result
                stage = "asking QMP"
                await _query(q, proc, result)
                if result.exit_status is not None:
                    return result
                result.started = True
                result.failed_checks = check_domain(domain, argv, result.queries)
                result.failed_checks += [f"{name}: {msg}" for name, msg in result.query_errors.items()]
                stage = "stopping QEMU"
                grace = quit_grace(domain)
                with contextlib.suppress(QmpError):
                    await q.execute("quit", timeout=grace)
                if await _wait_exit(proc, grace) is None:
                    result.failed_checks.append(f"quit: QEMU did not exit within {grace:g} s of QMP quit")
        except TimeoutError:
            result.timed_out = True
            result.error = f"timed out after {timeout:g} s {stage}"
            if stage == "stopping QEMU":  # the checks themselves are done
                result.error = None
                result.failed_checks.append(f"quit: QEMU did not exit within {timeout:g} s")
        result.ok = result.started and not result.failed_checks and result.error is None
        return result
    finally:
        if q is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(q.close(), 2)
        if proc is not None:
            _kill(proc)
        out = _read_output(log)
        log.close()
        result.output = out
        if result.exit_status is not None and out.strip():
            result.error = out.strip()
        result.duration = round(time.monotonic() - t0, 3)


_QUERIES: list[tuple[str, dict[str, Any] | None]] = [
    ("query-name", None), ("query-uuid", None), ("query-memory-size-summary", None),
    ("query-cpus-fast", None), ("query-block", None), ("query-named-block-nodes", {"flat": True}),
]


async def _query(q: Qmp, proc: subprocess.Popen[bytes], result: RealizeResult) -> None:
    """Run every query; a failure because QEMU went away sets ``result.exit_status``."""
    calls: list[tuple[str, Any]] = [(name, args) for name, args in _QUERIES]
    calls.append(("info network", None))
    calls.append(("qom-list /machine/peripheral", None))
    for name, args in calls:
        try:
            if name == "info network":
                result.queries[name] = await q.hmp("info network")
            elif name.startswith("qom-list "):
                result.queries[name] = await q.execute("qom-list", {"path": name.split(" ", 1)[1]})
            else:
                result.queries[name] = await q.execute(name, args)
        except QmpError as exc:
            rc = await _wait_exit(proc, EXIT_GRACE) if proc.poll() is None else proc.poll()
            if rc is not None:  # QEMU died under us: it did not start after all
                result.exit_status = rc
                result.error = f"QEMU exited ({rc}) during {name}: {exc}"
                return
            if name != "qom-list /machine/peripheral":
                result.query_errors[name] = str(exc)


def realize_sync(domain: Domain, argv: list[str], env: dict[str, str], qmp_path: Path | str, *,
                 timeout: float = 20, after_start: AfterStart | None = None) -> RealizeResult:
    """:func:`realize` for synchronous callers (runs its own event loop)."""
    return asyncio.run(realize(domain, argv, env, qmp_path, timeout=timeout, after_start=after_start))


def main(args: list[str] | None = None) -> int:
    import argparse
    import shutil

    from qemud.argv import build_argv, emulator_for
    from qemud.caps import probe
    from qemud.domain import load_domain
    from qemud.errors import QemudError
    from qemud.launch import prepare
    from qemud.paths import GuestPaths

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("xml")
    ap.add_argument("--timeout", type=float, default=20)
    ns = ap.parse_args(args)
    tmp = Path(tempfile.mkdtemp(prefix="rz", dir="/tmp"))
    try:
        domain = load_domain(ns.xml)
        cmd = build_argv(domain, probe(emulator_for(domain)), GuestPaths(tmp / "run", tmp / "state"),
                         paused=True)
        prepare(cmd)
        r = realize_sync(domain, cmd.argv, cmd.env, cmd.qmp, timeout=ns.timeout)
    except QemudError as exc:
        print(f"rejected: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = r.to_json()
    print(json.dumps(d, indent=1, default=str))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
