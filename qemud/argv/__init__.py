"""The translator: a pure function from (domain, host capabilities, guest paths) to QEMU's argv.

Nothing here touches the host: files the guest needs made beforehand (its runtime directory, an
NVRAM copied from its template) are returned as :class:`Prepare` steps for the launcher.  Every
problem found is collected, so one run reports them all; :class:`DomainError` carries them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemud.argv.builder import Builder, HelperSpec, Prepare
from qemud.argv.chardev import add_channels, add_serials
from qemud.argv.controllers import add_other_controllers, add_pci_controllers
from qemud.argv.disks import add_disks, add_iothreads
from qemud.argv.filesystem import add_filesystems
from qemud.argv.tpm import add_tpms
from qemud.argv.display import add_audio, add_graphics, add_hubs, add_inputs, add_sound, add_video
from qemud.argv.hostdev import add_hostdevs
from qemud.argv.machine import (add_boot, add_clock, add_cpu, add_identity, add_lifecycle,
                                add_machine, add_smp)
from qemud.argv.memory import MEMLOCK, PREALLOC, add_memory, add_memory_devices
from qemud.argv.iommu import add_iommu
from qemud.argv.launchsec import add_launch_security
from qemud.argv.misc import add_balloon, add_panics, add_rngs, add_watchdogs
from qemud.argv.redirdev import add_redirdevs
from qemud.argv.shmem import add_shmems
from qemud.argv.sysinfo import add_acpi_tables, add_sysinfo
from qemud.argv.vsock import add_vsock
from qemud.argv.qemuopts import opts
from qemud.argv.tune import Tuning, plan_tuning
from qemud.caps import HostCaps
from qemud.domain import Domain, ignored_warnings
from qemud.errors import DomainError, Problem
from qemud.paths import MAX_SOCKET_PATH, GuestPaths

DEFAULT_EMULATORS = {"x86_64": "/usr/bin/qemu-system-x86_64", "i686": "/usr/bin/qemu-system-i386"}


@dataclass(frozen=True)
class Command:
    """What starting a guest takes."""

    argv: list[str]
    env: dict[str, str]
    qmp: Path
    prepare: list[Prepare] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    console_log: Path | None = None
    #: what qemud does to QEMU's threads and cgroup once it runs (cputune, blkiotune, memtune)
    tuning: Tuning = field(default_factory=Tuning)
    #: QEMU ids and node names -> the XML element each comes from (see element_of_qemu_error)
    elements: dict[str, str] = field(default_factory=dict)
    #: QMP commands run on the paused QEMU before ``cont``: (command, arguments)
    qmp_setup: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: processes started before QEMU and stopped after it (swtpm, virtiofsd)
    helpers: list[HelperSpec] = field(default_factory=list)
    #: guest RAM QEMU preallocates before it answers QMP (<allocation mode='immediate'>, hugepages):
    #: it takes seconds per GiB, so whoever waits for QMP must wait longer
    prealloc_bytes: int = 0
    #: memory QEMU locks (<locked/>): an unprivileged QEMU is started with this RLIMIT_MEMLOCK
    memlock_bytes: int = 0


def emulator_for(domain: Domain) -> str:
    """The QEMU binary: <emulator>, or the one for the guest's architecture."""
    if domain.devices.emulator is not None:
        return domain.devices.emulator.path
    return DEFAULT_EMULATORS[domain.os.type.arch or "x86_64"]


#: more devices than this are refused before anything is planned: libvirt's largest test input
#: has 248, QEMU's PCI space ends at a few thousand, and the PCI planner's work grows with the
#: square of the count (40,000 NICs took 8 minutes, every other guest unsupervised meanwhile)
MAX_DEVICES = 1024


def _device_count(domain: Domain) -> int:
    devices = domain.devices
    return sum(len(v) for name in type(devices).model_fields
               if isinstance(v := getattr(devices, name), (list, tuple)))


def build_argv(domain: Domain, caps: HostCaps, paths: GuestPaths, *, paused: bool = False) -> Command:
    """QEMU's command line for ``domain``. Raises DomainError listing every problem."""
    problems: list[Problem] = []
    if (n := _device_count(domain)) > MAX_DEVICES:
        raise DomainError.at("/domain/devices", f"{n} devices; qemud takes at most {MAX_DEVICES} in a guest")
    mname = domain.os.type.machine or "pc"
    machine = caps.machine(mname)
    if machine is None:
        known = sorted({m.alias for m in caps.machines.values() if m.alias} | {"pc-i440fx-*", "pc-q35-*"})
        raise DomainError.at("/domain/os/type/@machine",
                             f"machine type '{mname}' is not supported by {caps.emulator} "
                             f"{'.'.join(map(str, caps.version))} (try {', '.join(known)})")
    q35 = "q35" in machine.name
    if not (q35 or "i440fx" in machine.name):
        raise DomainError.at("/domain/os/type/@machine",
                             f"machine type '{mname}' is not supported by qemud (use pc or q35)")
    b = Builder(domain, caps, paths, machine, q35)
    if len(str(paths.qmp).encode()) > MAX_SOCKET_PATH:
        b.error("/domain/name", f"the QMP socket path {paths.qmp} is longer than the {MAX_SOCKET_PATH} "
                "bytes a unix socket can have; use a shorter name or runtime directory")
    b.add(emulator_for(domain))
    b.add("-name", opts(("guest", domain.name), ("debug-threads", True)))
    if paused:
        b.add("-S")
    add_machine(b)
    add_launch_security(b)
    add_cpu(b)
    add_memory(b)
    add_smp(b)
    add_identity(b)
    add_sysinfo(b)
    b.add("-no-user-config", "-nodefaults")
    # QEMU's seccomp sandbox; spawning is allowed only for the bridge helper a bridged NIC needs
    spawn = any(i.type in ("bridge", "network") for i in domain.devices.interface)
    b.add("-sandbox", "on," + opts(obsolete="deny", elevateprivileges="deny",
                                   spawn="allow" if spawn else "deny", resourcecontrol="deny"))
    b.add("-chardev", "socket," + opts(("id", "qmp"), ("path", str(paths.qmp)), ("server", True), ("wait", False)))
    b.add("-mon", "chardev=qmp,mode=control")
    # QEMU locks its pid file: a second QEMU for the same guest cannot start
    b.add("-pidfile", str(paths.pidfile))
    add_clock(b)
    add_lifecycle(b)
    _assign_boot_order(b)
    add_boot(b)
    add_acpi_tables(b)
    add_pci_controllers(b)  # reserves every explicit PCI address first
    add_iommu(b)
    # libvirt's placement order: the primary video card first, then controllers and the rest
    add_graphics(b)
    add_video(b)
    add_other_controllers(b)
    add_iothreads(b)
    add_hubs(b)
    add_disks(b)
    add_filesystems(b)
    add_interfaces_and_chardevs(b)
    add_tpms(b)
    add_inputs(b)
    add_audio(b)
    add_sound(b)
    add_watchdogs(b)
    add_redirdevs(b)
    add_hostdevs(b)
    add_rngs(b)
    add_balloon(b)
    add_panics(b)
    add_shmems(b)
    add_vsock(b)
    add_memory_devices(b)
    _passthrough(b)
    tuning, tune_problems = plan_tuning(domain, caps)
    b.problems += [p for p in tune_problems if p.severity != "warning"]
    b.warnings += [p for p in tune_problems if p.severity == "warning"]
    problems = b.problems
    if problems:
        raise DomainError(problems)
    b.add("-msg", "timestamp=on")
    prepare = [Prepare("rundir", paths.run), *b.prepare]
    return Command(argv=b.args, env=b.env, qmp=paths.qmp, prepare=prepare,
                   warnings=ignored_warnings(domain) + b.warnings, console_log=b.console_log,
                   tuning=tuning, qmp_setup=b.qmp_setup, helpers=list(b.helpers),
                   prealloc_bytes=b.counters.get(PREALLOC, 0), memlock_bytes=b.counters.get(MEMLOCK, 0),
                   elements=dict(b.elements))


_ECHO = re.compile(r"-(?:device|blockdev|chardev|netdev|object|audiodev|fsdev|tpmdev) (\{.*\}|[^\s:]+):")


def element_of_qemu_error(message: str, elements: dict[str, str]) -> str | None:
    """The XML element behind the option QEMU refused at start: QEMU echoes the option
    (``-blockdev {...}: Could not open ...``); its id or node name leads to the element."""
    m = _ECHO.search(message)
    if m is None:
        return None
    text = m.group(1)
    names: list[str] = []
    if text.startswith("{"):
        try:
            import json
            obj = json.loads(text)
        except ValueError:
            obj = {}
        names = [str(obj[k]) for k in ("id", "node-name", "chardev", "drive", "netdev") if k in obj]
    else:
        names = re.findall(r"(?:^|,)id=([^,]+)", text)
    for name in names:
        for cand in (name, name.split("-")[0], name[4:] if name.startswith("char") else None,
                     name[7:] if name.startswith("hostnet") else None):
            if cand and cand in elements:
                return elements[cand]
    return None


def add_interfaces_and_chardevs(b: Builder) -> None:
    from qemud.argv.net import add_interfaces
    from qemud.argv.smartcard import add_smartcards
    add_interfaces(b)
    add_smartcards(b)
    add_serials(b)
    add_channels(b)


def _assign_boot_order(b: Builder) -> None:
    """<boot order> on devices, or libvirt's mapping of <os><boot dev=...> onto the first disk,
    CD-ROM, floppy or NIC as bootindex 1, 2, ..."""
    dev = b.domain.devices
    per_device = [(d.boot.order, d, f"/domain/devices/disk[{i + 1}]/boot") for i, d in enumerate(dev.disk) if d.boot]
    per_device += [(n.boot.order, n, f"/domain/devices/interface[{i + 1}]/boot") for i, n in enumerate(dev.interface) if n.boot]
    per_device += [(h.boot.order, h, f"/domain/devices/hostdev[{i + 1}]/boot") for i, h in enumerate(dev.hostdev) if h.boot]
    if per_device and b.domain.os.boot:
        b.error("/domain/os/boot", "per-device <boot order> and <os><boot dev> cannot be combined")
        return
    if per_device:
        seen: dict[int, str] = {}
        for order, item, path in per_device:
            if order in seen:
                b.error(f"{path}/@order", f"boot order {order} is used twice")
            seen[order] = path
            b.bootindex[id(item)] = order
        return
    order = 1
    devs = b.domain.os.boot or ()
    if not devs and not b.domain.os.kernel:
        from qemud.domain.osxml import Boot
        devs = (Boot.model_validate({"@dev": "hd"}),)
    for boot in devs:
        target = None
        if boot.dev == "network":
            target = dev.interface[0] if dev.interface else None
        else:
            want = {"hd": "disk", "cdrom": "cdrom", "fd": "floppy"}[boot.dev]
            target = next((d for d in dev.disk if d.device == want), None)
        if target is not None and id(target) not in b.bootindex:
            b.bootindex[id(target)] = order
            order += 1


def _passthrough(b: Builder) -> None:
    qc = b.domain.qemu_commandline
    if qc is None:
        return
    for a in qc.arg or ():
        b.add(a.value)
    for e in qc.env or ():
        b.env[e.name] = e.value
    if qc.arg or qc.env:
        b.warn("/domain/qemu:commandline", "passes options to QEMU that qemud does not check")


__all__ = ["build_argv", "Command", "HelperSpec", "Prepare", "emulator_for"]
