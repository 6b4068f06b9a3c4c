"""qemud.conf (TOML) and host facts read from configuration."""

from __future__ import annotations

import os
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

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


__all__ = ["host_networks", "os"]
