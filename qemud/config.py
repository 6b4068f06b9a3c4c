"""qemud.conf (TOML) and host facts read from configuration."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
import xml.etree.ElementTree as ET
from pathlib import Path

from qemud.errors import QemudError

LIBVIRT_NETWORKS = Path("/etc/libvirt/qemu/networks")


def host_networks(config: Path | None = None) -> dict[str, str]:
    """libvirt network name -> host bridge: from libvirt's own network definitions when present
    (so `<source network='default'/>` keeps working after a move from libvirt), then from the
    ``[networks]`` table of qemud.conf, which wins."""
    nets: dict[str, str] = {}
    try:
        files = sorted(LIBVIRT_NETWORKS.glob("*.xml"))
    except OSError:
        files = []
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except (ET.ParseError, OSError):
            continue
        name = root.findtext("name")
        bridge = root.find("bridge")
        if name and bridge is not None and bridge.get("name"):
            nets[name] = bridge.get("name", "")
    if config is None:
        from qemud.paths import Dirs
        config = Dirs.default().config
    try:
        with open(config, "rb") as fh:
            data = tomllib.load(fh)
        for k, v in (data.get("networks") or {}).items():
            if isinstance(v, str):
                nets[str(k)] = v
    except (OSError, tomllib.TOMLDecodeError):
        pass
    return nets


#: libvirt's default_tls_x509_cert_dir (qemu.conf), used where a section names no directory
DEFAULT_TLS_DIR = "/etc/pki/qemu"
#: services with a TLS section in qemud.conf (libvirt's qemu.conf spice_tls, vnc_tls, chardev_tls)
TLS_SECTIONS = ("spice", "vnc", "chardev")


def tls_dirs(data: dict, path: Path) -> dict[str, str]:
    """service -> x509 certificate dir for the [spice]/[vnc]/[chardev] sections with tls = true
    (libvirt's spice_tls + spice_tls_x509_cert_dir, ...). The dir holds ca-cert.pem,
    server-cert.pem and server-key.pem (and client-*.pem for chardevs that connect)."""
    out: dict[str, str] = {}
    for sec in TLS_SECTIONS:
        table = data.get(sec) or {}
        if not isinstance(table, dict):
            raise QemudError(f"{path}: [{sec}] must be a table")
        unknown = set(table) - {"tls", "tls_x509_cert_dir"}
        if unknown:
            raise QemudError(f"{path}: unknown key(s) in [{sec}]: {', '.join(sorted(unknown))}")
        tls, d = table.get("tls", False), table.get("tls_x509_cert_dir", DEFAULT_TLS_DIR)
        if not isinstance(tls, bool):
            raise QemudError(f"{path}: [{sec}] tls = {tls!r} is not true or false")
        if not isinstance(d, str) or not d.startswith("/"):
            raise QemudError(f"{path}: [{sec}] tls_x509_cert_dir = {d!r} is not an absolute path")
        if tls:
            out[sec] = d
    return out


@dataclass(frozen=True)
class Config:
    """qemud.conf; every key and its default is in the shipped etc/qemud/qemud.conf."""

    domains_dir: Path | None = None
    shutdown_timeout: float = 120.0
    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    reset_after: float = 60.0
    debounce: float = 0.2
    control_group: str | None = None
    networks: dict[str, str] = field(default_factory=dict)
    #: TLS enabled for spice / vnc / chardev -> x509 certificate dir (passed on in HostCaps)
    tls_dirs: dict[str, str] = field(default_factory=dict)
    #: where secrets are kept, one file per secret (qemud.secrets); None: the default
    secrets_dir: Path | None = None
    #: x509 certificates for TLS network disks (ca-cert.pem, client-cert.pem, client-key.pem)
    tls_x509_dir: Path | None = None
    #: [qemu] user / group: who QEMU runs as when qemud is root (qemud.runas); None: the default
    qemu_user: str | None = None
    qemu_group: str | None = None


_KEYS = {"domains_dir": (str,), "shutdown_timeout": (int, float), "max_retries": (int,), "backoff": (int, float),
         "max_backoff": (int, float), "reset_after": (int, float), "debounce": (int, float),
         "group": (str,)}


def load_config(path: Path, explicit: bool = False) -> Config:
    """Read qemud.conf. A missing default file is fine (defaults); a missing file named on the
    command line, bad TOML or an unknown key is an error naming the file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if explicit:
            raise QemudError(f"{path}: no such configuration file") from None
        return Config(networks=host_networks(path))
    except OSError as exc:
        raise QemudError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise QemudError(f"{path}: not valid TOML: {exc}") from None
    daemon = dict(data.get("daemon", {}))
    restart = data.get("restart", {})
    control = data.get("control", {})
    storage_kw = _storage_keys(path, daemon, data)
    qemu_kw = _qemu_keys(path, data)
    flat = {**{k: v for k, v in daemon.items()}, **{k: v for k, v in restart.items()},
            **{k: v for k, v in control.items()}}
    unknown = set(flat) - set(_KEYS)
    unknown |= set(data) - {"daemon", "restart", "networks", "control", "secrets", "tls", "qemu", *TLS_SECTIONS}
    if unknown:
        raise QemudError(f"{path}: unknown key(s): {', '.join(sorted(unknown))}")
    kw: dict[str, object] = {}
    for k, v in flat.items():
        if not isinstance(v, _KEYS[k]) or isinstance(v, bool):
            raise QemudError(f"{path}: {k} = {v!r} is not a {' or '.join(t.__name__ for t in _KEYS[k])}")
        kw["control_group" if k == "group" else k] = Path(v) if k == "domains_dir" else v
    return Config(networks=host_networks(path), tls_dirs=tls_dirs(data, path), **storage_kw, **qemu_kw,  # type: ignore[arg-type]
                  **kw)


def _qemu_keys(path: Path, data: dict[str, object]) -> dict[str, str]:
    """``[qemu] user`` and ``group``: names (or numeric ids) of who QEMU runs as."""
    table = data.get("qemu", {})
    if not isinstance(table, dict):
        raise QemudError(f"{path}: [qemu] must be a table")
    extra = set(table) - {"user", "group"}
    if extra:
        raise QemudError(f"{path}: unknown key(s) in [qemu]: {', '.join(sorted(extra))}")
    out: dict[str, str] = {}
    for key in ("user", "group"):
        v = table.get(key)
        if v is None:
            continue
        if not isinstance(v, str) or not v.strip():
            raise QemudError(f"{path}: [qemu] {key} = {v!r} is not a user or group name")
        out[f"qemu_{key}"] = v.strip()
    return out


def _storage_keys(path: Path, daemon: dict[str, object], data: dict[str, object]) -> dict[str, Path]:
    """``[secrets] dir`` (or ``[daemon] secrets_dir``) and ``[tls] x509_dir``: absolute paths.
    Taken out of ``daemon`` so the generic key check does not see them."""
    out: dict[str, Path] = {}
    secrets = data.get("secrets", {})
    tls = data.get("tls", {})
    for table, name in ((secrets, "[secrets]"), (tls, "[tls]")):
        if not isinstance(table, dict):
            raise QemudError(f"{path}: {name} must be a table")
    extra = (set(secrets) - {"dir"}) | (set(tls) - {"x509_dir"})  # type: ignore[arg-type]
    if extra:
        raise QemudError(f"{path}: unknown key(s): {', '.join(sorted(extra))}")
    for key, value in (("secrets_dir", daemon.pop("secrets_dir", None)), ("secrets_dir", secrets.get("dir")),  # type: ignore[union-attr]
                       ("tls_x509_dir", tls.get("x509_dir"))):  # type: ignore[union-attr]
        if value is None:
            continue
        if not isinstance(value, str) or not value.startswith("/"):
            raise QemudError(f"{path}: {key.replace('_x509', ' x509')} = {value!r} is not an absolute path")
        out[key] = Path(value)
    return out


def with_storage_config(caps, config: Config):  # type: ignore[no-untyped-def]
    """``caps`` with the secrets and TLS directories of qemud.conf in its host facts."""
    from dataclasses import replace
    host = caps.host
    if config.secrets_dir is not None:
        host = replace(host, secrets_dir=str(config.secrets_dir))
    if config.tls_x509_dir is not None:
        host = replace(host, tls_x509_dir=str(config.tls_x509_dir))
    return caps if host is caps.host else replace(caps, host=host)


__all__ = ["host_networks", "load_config", "Config", "with_storage_config"]
