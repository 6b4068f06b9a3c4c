"""The libvirt domain XML, as pydantic models (one module per element family).

``load_domain(path)`` and ``parse_domain(text)`` are the entry points; both raise
:class:`qemud.errors.DomainError` and nothing else for any input.
"""

import os
import re
import uuid as uuidlib
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from qemud.domain.base import (Element, Many, Opaque, UInt, YesNo, attr, child, ignored,
                               problems_from, text, walk_ignored)
from qemud.domain.clock import Clock
from qemud.domain.cpu import Cpu, Vcpu, Vcpus
from qemud.domain.devices import Devices
from qemud.domain.features import Features
from qemud.domain.iothreads import DefaultIoThread, IoThreadIds
from qemud.domain.memory import DomainMemory, MemoryBacking, NumaTune
from qemud.domain.metadata import Metadata
from qemud.domain.osxml import Os
from qemud.domain.seclabel import Seclabel, check_labels
from qemud.domain.sysinfo import LaunchSecurity, Sysinfo
from qemud.domain.tune import BlkioTune, CpuTune, MemTune
from qemud.domain.units import Size
from qemud.errors import DomainError, Problem
from qemud.xmlload import element_lines, parse_xml, read_domain_bytes

#: Namespace of the UUIDs qemud derives for domains that have none (uuid5 of the name).
UUID_NAMESPACE = uuidlib.UUID("6f1c7d3e-9a55-4f55-b6c2-0d8f6ad3c0de")

MAX_NAME_LENGTH = 200

_OTHER_TYPES = {
    "kqemu": "the kqemu accelerator was removed from QEMU in 0.12",
    "qvm86": "the qvm86 accelerator no longer exists",
    "xen": "this is a Xen guest; qemud runs QEMU guests",
    "lxc": "this is a container; qemud runs QEMU guests",
    "openvz": "this is a container; qemud runs QEMU guests",
    "uml": "User Mode Linux is not QEMU",
    "vbox": "this is a VirtualBox guest; qemud runs QEMU guests",
    "vmware": "this is a VMware guest; qemud runs QEMU guests",
    "hyperv": "this is a Hyper-V guest; qemud runs QEMU guests",
    "bhyve": "this is a bhyve guest; qemud runs QEMU guests",
    "vz": "this is a Virtuozzo guest; qemud runs QEMU guests",
    "parallels": "this is a Parallels guest; qemud runs QEMU guests",
    "phyp": "this is a PowerVM guest; qemud runs QEMU guests",
    "test": "libvirt's test driver type has no QEMU behind it",
    "hvf": "Hypervisor.framework exists on macOS only",
}


class Action(Element):
    value: Literal["destroy", "restart", "preserve", "rename-restart", "coredump-destroy",
                   "coredump-restart"] = text(...)


class MaxMemory(Size):
    slots: UInt | None = attr()


class Suspend(Element):
    enabled: YesNo = attr(...)


class Pm(Element):
    suspend_to_mem: Suspend | None = child("suspend-to-mem")
    suspend_to_disk: Suspend | None = child("suspend-to-disk")


class GenId(Element):
    value: str | None = text()


class QemuArg(Element):
    value: str = attr(...)


class QemuEnv(Element):
    name: str = attr(...)
    value: str = attr("")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"'{v}' is not an environment variable name")
        return v


class QemuCommandline(Element):
    arg: Many[QemuArg] = child("qemu:arg", ())
    env: Many[QemuEnv] = child("qemu:env", ())


class Domain(Element):
    type: str = attr(...)
    id: int | None = attr()  # the running id in `virsh dumpxml` output; meaningless here
    name: str
    uuid: str | None = None
    genid: GenId | None = None
    title: str | None = None
    description: str | None = None
    metadata: Metadata | None = None
    memory: DomainMemory
    currentMemory: Size | None = None
    maxMemory: MaxMemory | None = None
    memoryBacking: MemoryBacking | None = None
    vcpu: Vcpu | None = None
    vcpu_states: Vcpus | None = child("vcpus")  # per-vCPU online/hotplug state
    iothreads: UInt | None = None
    iothreadids: IoThreadIds | None = None
    defaultiothread: DefaultIoThread | None = None
    os: Os
    features: Features | None = None
    cpu: Cpu | None = None
    clock: Clock | None = None
    on_poweroff: Action | None = None
    on_reboot: Action | None = None
    on_crash: Action | None = None
    on_lockfailure: Opaque | None = ignored("qemud uses no lock manager")
    idmap: Opaque | None = ignored("user namespace ID maps are for containers (libvirt's LXC driver); a QEMU guest has none")
    pm: Pm | None = None
    # not an instance (that built every device model at import) nor Devices() (that built them at
    # the first parse of a domain without <devices>): no validation needed for "no devices"
    devices: Devices = Field(default_factory=Devices.model_construct)
    sysinfo: Many[Sysinfo]
    launchSecurity: LaunchSecurity | None = None
    seclabel: Many[Seclabel] = ignored("qemud applies no SELinux/AppArmor labels of its own; qemud's own isolation applies (README: security)")

    _seclabels = field_validator("seclabel")(classmethod(lambda cls, v: check_labels(v)))
    resource: Opaque | None = ignored("qemud does not place guests in libvirt's cgroup partitions")
    memtune: MemTune | None = None
    blkiotune: BlkioTune | None = None
    cputune: CpuTune | None = None
    numatune: NumaTune | None = None
    qemu_commandline: QemuCommandline | None = child("qemu:commandline")

    @model_validator(mode="before")
    @classmethod
    def _memory_from_cells(cls, data: Any) -> Any:
        """libvirt: without <memory>, the guest has the sum of its NUMA cells."""
        if not isinstance(data, dict) or "memory" in data:
            return data
        total = _cells_kib(data)
        if total:
            data = {**data, "memory": {"@unit": "KiB", "#text": str(total)}}
        return data

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v in ("qemu", "kvm"):
            return v
        why = _OTHER_TYPES.get(v, "qemud knows only qemu (TCG emulation) and kvm")
        raise ValueError(f"domain type '{v}' is not supported: {why}; use type='qemu' or type='kvm'")

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> Any:
        if v is None or v == "":
            raise ValueError("a domain name may not be empty")
        if not isinstance(v, str):
            raise ValueError("must be text")
        if not v:
            raise ValueError("a domain name may not be empty")
        if "/" in v:
            raise ValueError(f"{v!r}: a domain name may not contain '/' (it becomes file names)")
        if v.startswith("."):
            raise ValueError(f"{v!r}: a domain name may not start with '.' (it becomes file names)")
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError(f"{v!r}: a domain name may not contain control characters or newlines")
        if len(v.encode()) > MAX_NAME_LENGTH:
            raise ValueError(f"a domain name may have at most {MAX_NAME_LENGTH} bytes, this one has {len(v.encode())}")
        return v

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        if v is None:
            return None
        hexdigits = v.replace("-", "").strip()
        if not re.fullmatch(r"[0-9a-fA-F]{32}", hexdigits):
            raise ValueError(f"'{v}' is not a UUID like 4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
        return str(uuidlib.UUID(hexdigits))

    @property
    def uuid_value(self) -> str:
        """The UUID: as given, or derived from the name (stable: the file is never rewritten)."""
        return self.uuid or str(uuidlib.uuid5(UUID_NAMESPACE, self.name))

    @property
    def vcpus(self) -> int:
        return self.vcpu.count if self.vcpu else 1

    @property
    def iothread_ids(self) -> list[int]:
        """The guest's I/O thread ids in libvirt's order: those of <iothreadids> as listed, then
        the lowest unused ids until there are <iothreads> of them (virDomainIOThreadDefPostParse)."""
        ids = [t.id for t in (self.iothreadids.iothread if self.iothreadids else ())]
        n = max(self.iothreads or 0, len(ids))
        nxt = 1
        while len(ids) < n:
            if nxt not in ids:
                ids.append(nxt)
            nxt += 1
        return ids

    @property
    def vcpus_online(self) -> int:
        if self.vcpu and self.vcpu.current is not None:
            return self.vcpu.current
        if self.vcpu_states is not None:  # libvirt: the enabled ones of <vcpus>
            return sum(1 for v in self.vcpu_states.vcpu if v.enabled)
        return self.vcpus

    @property
    def kvm(self) -> bool:
        return self.type == "kvm"


def _cells_kib(data: dict[str, Any]) -> int | None:
    """The KiB of the raw (not yet validated) <cpu><numa><cell>s, or None when there are none or
    one cannot be read (validation then reports it)."""
    from qemud.domain.units import unit_bytes
    try:
        cells = data["cpu"]["numa"]["cell"]
        cells = cells if isinstance(cells, list) else [cells]
        total = 0
        for c in cells:
            scale = unit_bytes(c.get("@unit", "KiB")) or 0
            total += -(-int(str(c["@memory"]).strip()) * scale // 1024)
        return total or None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def parse_domain(data: bytes | str, file: str | None = None) -> Domain:
    """Parse domain XML text. Raises DomainError (naming ``file``) for every problem found."""
    try:
        doc = parse_xml(data)
        return _from_dict(doc, data)
    except DomainError as exc:
        raise exc.with_file(file, _lines_or_none(exc, data)) from None


def load_domain(path: str | os.PathLike[str]) -> Domain:
    """Read, parse and validate a domain file."""
    name = os.fspath(path)
    try:
        data = read_domain_bytes(name)
    except DomainError as exc:
        raise exc.with_file(name) from None
    return parse_domain(data, name)


def _lines_or_none(exc: DomainError, data: bytes | str) -> dict[str, int] | None:
    if all(p.line is not None or not p.path for p in exc.problems):
        return None
    return element_lines(data)


def _from_dict(doc: dict[str, Any], data: bytes | str) -> Domain:
    root = next(iter(doc))
    if root != "domain" or len(doc) != 1:
        raise DomainError.at(f"/{root}", f"the root element is <{root}>; a domain file holds <domain>")
    body = doc["domain"]
    if not isinstance(body, dict):
        body = {} if body is None else {"#text": body}
    try:
        return Domain.model_validate(body)
    except ValidationError as exc:
        raise DomainError(problems_from(exc)) from None
    except RecursionError:
        raise DomainError.at("/domain", "elements are nested too deeply") from None


def ignored_warnings(domain: Domain) -> list[Problem]:
    """Warnings for every element set in the file that qemud accepts without acting on it."""
    return [Problem(path, f"ignored: {why}", "warning") for path, why in walk_ignored(domain, "/domain")]


__all__ = ["Domain", "parse_domain", "load_domain", "ignored_warnings", "UUID_NAMESPACE"]
