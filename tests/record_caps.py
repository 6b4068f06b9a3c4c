"""Record this machine's QEMU capabilities for the golden tests (no QEMU is run by the tests).

    python -m tests.record_caps            # rewrites tests/data/caps/qemu-7.2.json
    pytest --record-caps ...               # the same, before the session's tests run

The recorded file is ``HostCaps.to_json()`` of a fresh probe, with the host facts fixed so golden
argv does not depend on the machine that recorded it: KVM usable (type='kvm' cases translate),
and one libvirt network, ``default`` on bridge ``virbr0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

CAPS_FILE = Path(__file__).parent / "data" / "caps" / "qemu-7.2.json"
EMULATOR = "/usr/bin/qemu-system-x86_64"
NETWORKS = {"default": "virbr0"}


def record(emulator: str = EMULATOR, out: Path = CAPS_FILE) -> Path:
    from qemud.caps import probe

    with tempfile.TemporaryDirectory() as cache:  # never a cached answer: probe for real
        caps = probe(emulator, cache_dir=Path(cache))
    caps = dataclasses.replace(caps, kvm=True, kvm_reason="", networks=dict(NETWORKS))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(caps.to_json(), indent=1, sort_keys=True) + "\n")
    return out


def load():  # type: ignore[no-untyped-def]
    """The recorded HostCaps."""
    from qemud.caps import HostCaps

    return HostCaps.from_json(json.loads(CAPS_FILE.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--emulator", default=EMULATOR)
    p.add_argument("--out", type=Path, default=CAPS_FILE)
    a = p.parse_args()
    print(record(a.emulator, a.out))


if __name__ == "__main__":
    main()
