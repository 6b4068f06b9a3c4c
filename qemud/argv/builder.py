"""The state one translation carries: the argv so far, the PCI space, ids, problems."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemud.argv.pci import PciPlan
from qemud.argv.qemuopts import js
from qemud.caps import HostCaps, Machine
from qemud.domain import Domain
from qemud.domain.devices.address import Address, Alias
from qemud.errors import Problem
from qemud.paths import GuestPaths

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}\Z")


@dataclass
class Prepare:
    """A file the launcher must create before QEMU starts (never by the pure translator)."""

    #: "rundir" (the guest's runtime directory) | "dir" | "qemudir" (a directory QEMU's user owns) |
    #: "copy" | "write" | "run" | "secret" (copy the secret's file ``source`` to ``dest`` for QEMU) |
    #: "overlay" (qemu-img create)
    kind: str
    dest: Path
    source: Path | None = None
    content: str | None = None  # "write": the file's text (mode 0600, rewritten at every start)
    #: "run": a program that creates ``dest`` (e.g. swtpm_setup making a TPM's state); run only
    #: while ``dest`` does not exist, so what it made is never made again; run as QEMU's user
    argv: list[str] | None = None
    fmt: str | None = None  # overlay: the backing image's format
    helper: str | None = None  # overlay: the qemu-img to run
    element: str = ""  # secret, overlay: the XML element the file is for (named in errors)


@dataclass(frozen=True)
class HelperSpec:
    """A process the guest needs beside QEMU (swtpm, virtiofsd), as data: the launcher runs it.

    qemud binds ``socket`` and listens on it before the helper starts, then hands the listening
    socket to the helper as an inherited fd: every ``{fd}`` in ``argv`` stands for its number.
    So the socket exists (and QEMU may connect) as soon as the helper is spawned, with no wait
    for the helper to create it.
    """

    name: str  # unique within the guest ("swtpm-tpm0", "virtiofsd-fs0"); names its log
    argv: list[str]
    socket: Path  # where QEMU connects (its ready path)
    log: Path  # the helper's stdout/stderr
    #: runs as root when qemud does (virtiofsd serves files of every owner; passt drops to nobody
    #: itself); other helpers run as QEMU's unprivileged user (qemud.runas)
    privileged: bool = False


@dataclass
class Builder:
    domain: Domain
    caps: HostCaps
    paths: GuestPaths
    machine: Machine
    q35: bool
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    prepare: list[Prepare] = field(default_factory=list)
    helpers: list[HelperSpec] = field(default_factory=list)
    pci_plan: PciPlan = field(init=False)  # every PCI device's place (qemud.argv.pci)
    ids: set[str] = field(default_factory=set)
    bootindex: dict[int, int] = field(default_factory=dict)  # id(device model) -> bootindex
    usb_bus: str | None = None  # id of the first USB bus ("usb.0"), None if no USB
    audiodev: str | None = None
    counters: dict[str, int] = field(default_factory=dict)
    console_log: Path | None = None
    secure_boot: bool = False  # the file holding the guest console's output
    usb_slots: dict[int, tuple[str, str]] = field(default_factory=dict)  # USB index -> (bus, slot)
    throttle_groups: dict[str, dict[str, int]] = field(default_factory=dict)  # id -> limits
    cpu_model: str = "qemu64"  # the -cpu model, for hot-pluggable vCPU devices (<model>-x86_64-cpu)
    #: QEMU ids and node names -> the XML element they come from (to name it in QEMU's errors)
    elements: dict[str, str] = field(default_factory=dict)
    #: QMP commands for the paused QEMU before its vCPUs run (settings QEMU takes no option for)
    qmp_setup: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pci_plan = PciPlan(self.q35, buses={0: 'pcie-root' if self.q35 else 'pci-root'})

    # ---- output -------------------------------------------------------------------------
    def add(self, *args: str) -> None:
        self.args.extend(args)

    def device(self, props: dict[str, Any]) -> None:
        self.args += ["-device", js(props)]

    def obj(self, props: dict[str, Any]) -> None:
        self.args += ["-object", js(props)]

    # ---- problems -----------------------------------------------------------------------
    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(path, message, "warning"))

    def has_device(self, driver: str, path: str, what: str) -> bool:
        if driver in self.caps.devices:
            return True
        self.error(path, f"{what} needs QEMU's {driver} device, which {self.caps.emulator} does not have")
        return False

    # ---- identities -----------------------------------------------------------------------
    def next(self, kind: str) -> int:
        n = self.counters.get(kind, 0)
        self.counters[kind] = n + 1
        return n

    def alias(self, alias: Alias | None, default: str, path: str) -> str:
        """The device id: the file's <alias> when it is a valid QEMU id, else ``default``."""
        name = alias.name if alias is not None else default
        if not _ID.match(name):
            if alias is not None:
                self.error(f"{path}/alias/@name", f"'{name}' is not a valid device alias (a letter, then letters, digits, '-', '_', '.')")
            name = default
        if name in self.ids:
            if alias is not None:
                self.error(f"{path}/alias/@name", f"alias '{name}' is used by two devices")
                return name
            i = 1
            while f"{default}-{i}" in self.ids:
                i += 1
            name = f"{default}-{i}"
        self.ids.add(name)
        self.elements[name] = path
        return name

    def socket_path(self, p: Path, path: str) -> str:
        """A unix socket qemud names itself: it must fit the 107 bytes a socket path can have."""
        from qemud.paths import MAX_SOCKET_PATH
        if len(str(p).encode()) > MAX_SOCKET_PATH:
            self.error(path, f"the socket path {p} is longer than the {MAX_SOCKET_PATH} bytes a unix socket "
                       "can have; use a shorter domain name or runtime directory")
        return str(p)

    # ---- PCI ------------------------------------------------------------------------------
    def pci_props(self, address: Address | None, path: str, what: str, key: str | None = None) -> dict[str, Any]:
        """bus/addr for a PCI device: the place libvirt's rules give it (explicit or assigned,
        see qemud.argv.pci), looked up by ``key`` (default: the device's XML path)."""
        if address is not None and address.type != "pci":
            self.error(f"{path}/address/@type", f"a {what} sits on PCI; address type '{address.type}' cannot place it")
            return {}
        got = self.pci_plan.props(key or path)
        if got is None and self.pci_plan.problems:
            return {}  # the placement failed; its problems are reported already
        if got is None:
            # a device the plan does not list: the first free slot
            fb = self.pci_plan.fallback(key or path)
            if isinstance(fb, str):
                self.error(path, fb)
                return {}
            return fb
        return got
