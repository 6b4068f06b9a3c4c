"""Spelling values for QEMU's command line so that nothing from a domain file can inject an option.

Two syntaxes: JSON (``-device``, ``-blockdev``, ``-object``, ``-netdev``, ``-audiodev`` in QEMU 7.2),
where json.dumps escapes everything; and QemuOpts ``key=value,key=value`` for the rest, where a
comma inside a value is written as two commas.  Every QemuOpts value goes through :func:`opts`,
which always spells the key (never an implied first key, which would let ``a=b`` in a value pick
its own key).
"""

from __future__ import annotations

import json
from typing import Any


def escape(value: str) -> str:
    """Escape a QemuOpts value: ``,`` becomes ``,,``."""
    return value.replace(",", ",,")


def opts(*pairs: tuple[str, Any] | None, **kw: Any) -> str:
    """``key=value,...`` with every value escaped; None values are left out; bools as on/off.

    Positional pairs keep their order before keyword ones (QEMU does not care; readers do)."""
    items: list[tuple[str, Any]] = [p for p in pairs if p is not None]
    items += list(kw.items())
    parts = []
    for key, value in items:
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key}={escape(str(value))}")
    return ",".join(parts)


def js(obj: dict[str, Any]) -> str:
    """A JSON option value: compact, None values left out."""
    return json.dumps({k: v for k, v in obj.items() if v is not None}, separators=(",", ":"),
                      ensure_ascii=False)
