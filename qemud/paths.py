"""Where qemud keeps things: defaults for root and for an unprivileged user, and each guest's
runtime files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: QEMU (and the kernel) take unix socket paths of at most this many bytes.
MAX_SOCKET_PATH = 107


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or os.path.expanduser(fallback))


@dataclass(frozen=True)
class Dirs:
    """The daemon's directories."""

    config: Path
    domains: Path
    runtime: Path  # sockets, pid files: gone at reboot
    state: Path  # NVRAM, remembered stops: kept

    @classmethod
    def default(cls) -> Dirs:
        if os.geteuid() == 0:
            return cls(Path("/etc/qemud/qemud.conf"), Path("/etc/qemud/domains"), Path("/run/qemud"),
                       Path("/var/lib/qemud"))
        config = _xdg("XDG_CONFIG_HOME", "~/.config") / "qemud"
        runtime_base = os.environ.get("XDG_RUNTIME_DIR")
        runtime = Path(runtime_base) / "qemud" if runtime_base else _xdg("XDG_STATE_HOME", "~/.local/state") / "qemud" / "run"
        return cls(config / "qemud.conf", config / "domains", runtime,
                   _xdg("XDG_STATE_HOME", "~/.local/state") / "qemud")


@dataclass(frozen=True)
class GuestPaths:
    """The files of one guest. ``run`` is its runtime directory, ``state`` its persistent one."""

    run: Path
    state: Path

    @classmethod
    def for_domain(cls, runtime_dir: Path, state_dir: Path, name: str) -> GuestPaths:
        return cls(run=runtime_dir / "domains" / name, state=state_dir / "domains" / name)

    @property
    def qmp(self) -> Path:
        return self.run / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "qemu.pid"

    @property
    def console_log(self) -> Path:
        return self.run / "console.log"

    def chardev_socket(self, alias: str) -> Path:
        return self.run / f"{alias}.sock"

    @property
    def nvram_dir(self) -> Path:
        return self.state

    def nvram(self, template: str | None) -> Path:
        suffix = "_VARS.qcow2" if template and template.endswith(".qcow2") else "_VARS.fd"
        return self.state / f"nvram{suffix}"
