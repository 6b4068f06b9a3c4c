"""Every golden domain, started in real QEMU 7.2 and checked over QMP: name, UUID, memory,
vCPUs, disks and NIC MACs match the XML.

Host resources the cases name (images, bridges, taps, KVM) are swapped for scratch images and
user-mode NICs with the same rewrite the corpus conformance run uses (tools/conformance.py)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from qemud.argv import build_argv
from qemud.caps import probe
from qemud.domain import parse_domain
from qemud.launch import prepare
from qemud.paths import GuestPaths
from tests.support.realize import realize_sync
from tests.support.tinyguest import ensure_guest
from tools.conformance import Guest, Rewriter, _listen, tuner

pytestmark = pytest.mark.qemu

CASES = sorted(Path(__file__).parent.joinpath("data", "domains").glob("*.xml"))


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden_domain_is_realized_in_qemu(case: Path) -> None:
    tiny = ensure_guest()
    with tempfile.TemporaryDirectory(prefix="qr", dir="/tmp") as tmp:
        scratch = Path(tmp)
        rw = Rewriter(scratch, Guest(str(tiny.kernel), str(tiny.initrd)))
        # NICs became user-mode ones, which have a single queue
        text = re.sub(r"""\squeues=['"][0-9]+['"]""", "", rw.run(case.read_text()))
        domain = parse_domain(text, case.name)
        paths = GuestPaths(scratch / "run", scratch / "state")
        caps = probe("/usr/bin/qemu-system-x86_64")
        cmd = build_argv(domain, caps, paths, paused=True)
        prepare(cmd)
        peers = _listen(rw.peers)
        after_start, untune = tuner(cmd, caps, f"test-realize-{case.stem}")
        try:
            result = realize_sync(domain, cmd.argv, cmd.env, cmd.qmp, after_start=after_start)
        finally:
            for s in peers:
                s.close()
            untune()
        assert result.error is None, result.error
        assert result.failed_checks == []
        assert result.ok
