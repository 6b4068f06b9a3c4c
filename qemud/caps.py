"""What a QEMU binary can do, probed once per binary and cached on disk.

The probe starts the binary with ``-machine none`` and asks over QMP: version, machine types (and
their aliases), accelerators, device and object types, CPU models, chardev backends.  The result
is a plain frozen value; the translator reads it and nothing else about the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemud.errors import HostError
from qemud.host import HostFacts, read_host

#: bumped whenever the probe learns something new, so caches made by an older probe are redone
CAPS_FORMAT = 2


@dataclass(frozen=True)
class Machine:
    name: str
    alias: str | None = None
    is_default: bool = False
    cpu_max: int = 1
    deprecated: bool = False
    default_ram_id: str | None = None


@dataclass(frozen=True)
class HostCaps:
    """Capabilities of one QEMU binary on this host (plus the host facts argv depends on)."""

    emulator: str
    version: tuple[int, int, int]
    machines: dict[str, Machine]
    devices: frozenset[str]
    objects: frozenset[str]
    cpu_models: frozenset[str]
    chardevs: frozenset[str]
    kvm: bool  # /dev/kvm usable by this user and QEMU's KVM accelerator built in
    kvm_reason: str = ""  # why KVM is not usable
    #: libvirt network name -> host bridge (from qemud.conf and libvirt's network files)
    networks: dict[str, str] = field(default_factory=dict)
    bridge_helper: str = "/usr/lib/qemu/qemu-bridge-helper"
    #: QEMU firmware descriptors (docs/interop/firmware.json), by priority
    firmware: tuple[dict[str, Any], ...] = ()
    #: facts about the host beyond the binary (qemud.host), read at every probe
    host: HostFacts = field(default_factory=HostFacts)
    #: TLS enabled in qemud.conf, by service ("spice", "vnc", "chardev") -> x509 certificate dir
    tls_dirs: dict[str, str] = field(default_factory=dict)
    #: the properties of QEMU's ``max`` x86 CPU type: every CPU feature name this QEMU knows
    #: (all x86 models share one property set; ``max`` adds host-cache-info).  Empty when not
    #: probed (an old recording): then feature names are not checked.
    cpu_props: frozenset[str] = frozenset()

    def machine(self, name: str) -> Machine | None:
        """A machine type by name or alias ('pc' -> pc-i440fx-7.2)."""
        if name in self.machines:
            return self.machines[name]
        for m in self.machines.values():
            if m.alias == name:
                return m
        return None

    @property
    def default_machine(self) -> Machine:
        for m in self.machines.values():
            if m.is_default:
                return m
        return self.machines["pc"] if "pc" in self.machines else next(iter(self.machines.values()))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = CAPS_FORMAT
        for k in ("devices", "objects", "cpu_models", "chardevs", "cpu_props"):
            d[k] = sorted(d[k])
        d["firmware"] = list(self.firmware)
        d["host"] = self.host.to_json()
        d["version"] = list(self.version)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HostCaps:
        return cls(
            emulator=d["emulator"], version=tuple(d["version"]),  # type: ignore[arg-type]
            machines={k: Machine(**v) for k, v in d["machines"].items()},
            devices=frozenset(d["devices"]), objects=frozenset(d["objects"]),
            cpu_models=frozenset(d["cpu_models"]), chardevs=frozenset(d["chardevs"]),
            kvm=d["kvm"], kvm_reason=d.get("kvm_reason", ""), networks=dict(d.get("networks", {})),
            bridge_helper=d.get("bridge_helper", "/usr/lib/qemu/qemu-bridge-helper"),
            firmware=tuple(d.get("firmware", ())), host=HostFacts.from_json(d.get("host", {})),
            cpu_props=frozenset(d.get("cpu_props", ())),
            tls_dirs=dict(d.get("tls_dirs", {})))

    def with_networks(self, networks: dict[str, str]) -> HostCaps:
        from dataclasses import replace
        return replace(self, networks=dict(networks))

    def with_tls(self, tls_dirs: dict[str, str]) -> HostCaps:
        """These caps with qemud.conf's TLS settings (Config.tls_dirs)."""
        from dataclasses import replace
        return replace(self, tls_dirs=dict(tls_dirs))


FIRMWARE_DIRS = ("/usr/share/qemu/firmware", "/etc/qemu/firmware")


def firmware_descriptors() -> tuple[dict[str, Any], ...]:
    """QEMU's firmware descriptors, ordered by file name (the priority); a file in
    /etc/qemu/firmware overrides one of the same name in /usr/share, an empty one disables it."""
    files: dict[str, str] = {}
    for d in FIRMWARE_DIRS:
        try:
            for name in os.listdir(d):
                if name.endswith(".json"):
                    files[name] = os.path.join(d, name)
        except OSError:
            continue
    out = []
    for name in sorted(files):
        try:
            with open(files[name]) as fh:
                text = fh.read()
            if text.strip():
                desc = json.loads(text)
                if isinstance(desc, dict):
                    out.append({**desc, "_file": files[name]})
        except (OSError, ValueError):
            continue
    return tuple(out)


def kvm_usable() -> tuple[bool, str]:
    """Whether this process could give QEMU KVM: /dev/kvm present and openable read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, "/dev/kvm does not exist (no KVM in this kernel, or virtualization is off in the firmware)"
    except PermissionError:
        return False, "/dev/kvm is not accessible to this user (add it to the kvm group)"
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    return True, ""


def default_cache_dir() -> Path:
    if os.environ.get("QEMUD_CACHE_DIR"):
        return Path(os.environ["QEMUD_CACHE_DIR"]) / "caps"
    if os.geteuid() == 0:
        return Path("/var/cache/qemud/caps")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "qemud" / "caps"


def _cache_key(emulator: str) -> str:
    st = os.stat(emulator)
    return f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def probe(emulator: str, cache_dir: Path | None = None, timeout: float = 30.0) -> HostCaps:
    """The capabilities of ``emulator``, from the cache when the binary has not changed."""
    path = os.path.realpath(emulator)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise HostError(f"QEMU binary {emulator} does not exist or is not executable "
                        "(install qemu-system-x86, or fix <emulator>)")
    cache_dir = cache_dir or default_cache_dir()
    key = _cache_key(path)
    cache_file = cache_dir / (path.strip("/").replace("/", "_") + ".json")
    try:
        data = json.loads(cache_file.read_text())
        if data.get("format") == CAPS_FORMAT and data.get("key") == key:
            caps = HostCaps.from_json(data)
            ok, why = kvm_usable()  # host facts are not cached: /dev/kvm and firmware come and go
            from dataclasses import replace
            return replace(_with_kvm(caps, ok and caps.kvm, why if not ok else caps.kvm_reason),
                           firmware=firmware_descriptors(), host=read_host())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    caps = asyncio.run(_probe(emulator, timeout))
    from dataclasses import replace
    caps = replace(caps, firmware=firmware_descriptors(), host=read_host())
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**caps.to_json(), "key": key}))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # an unwritable cache only costs a probe next time
    return caps


def _with_kvm(caps: HostCaps, kvm: bool, reason: str) -> HostCaps:
    from dataclasses import replace
    return replace(caps, kvm=kvm, kvm_reason=reason)


async def _probe(emulator: str, timeout: float) -> HostCaps:
    from qemud.qmp import Qmp, QmpError

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [emulator, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
            "-S", "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, pass_fds=(theirs.fileno(),))
    except OSError as exc:
        raise HostError(f"cannot run {emulator}: {exc.strerror}") from exc
    theirs.close()
    qmp = Qmp("probe")
    try:
        await qmp.connect(ours, timeout)
        version = await qmp.execute("query-version", timeout=timeout)
        machines = await qmp.execute("query-machines", timeout=timeout)
        devices = await qmp.execute("qom-list-types", {"implements": "device", "abstract": False}, timeout)
        objects = await qmp.execute("qom-list-types", {"implements": "user-creatable", "abstract": False}, timeout)
        cpus = await qmp.execute("query-cpu-definitions", timeout=timeout)
        chardevs = await qmp.execute("query-chardev-backends", timeout=timeout)
        kvm_info = await qmp.execute("query-kvm", timeout=timeout)
        max_type = next((c.get("typename") for c in cpus if c.get("name") == "max" and c.get("typename")), None)
        cpu_props: list[dict[str, Any]] = []
        if max_type:
            cpu_props = await qmp.execute("qom-list-properties", {"typename": max_type}, timeout)
        try:
            await qmp.execute("quit", timeout=timeout)
        except QmpError:
            pass
    except QmpError as exc:
        proc.kill()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        raise HostError(f"probing {emulator} failed: {exc}" + (f": {err}" if err else "")) from exc
    finally:
        await qmp.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    q = version["qemu"]
    ms: dict[str, Machine] = {}
    for m in machines:
        ms[m["name"]] = Machine(name=m["name"], alias=m.get("alias"), is_default=bool(m.get("is-default")),
                                cpu_max=int(m.get("cpu-max", 1)), deprecated=bool(m.get("deprecated")),
                                default_ram_id=m.get("default-ram-id"))
    ok, why = kvm_usable()
    if ok and not kvm_info.get("present"):
        ok, why = False, f"{emulator} has no KVM support built in"
    return HostCaps(emulator=emulator, version=(q["major"], q["minor"], q["micro"]), machines=ms,
                    devices=frozenset(d["name"] for d in devices),
                    objects=frozenset(d["name"] for d in objects),
                    cpu_models=frozenset(c["name"] for c in cpus),
                    chardevs=frozenset(c["name"] for c in chardevs), kvm=ok, kvm_reason=why,
                    cpu_props=frozenset(p["name"] for p in cpu_props))
