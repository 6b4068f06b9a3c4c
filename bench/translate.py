#!/usr/bin/env python3
"""Benchmark: validate + argv per domain over libvirt's test corpus (goal: under 1 ms median).

Each input is parsed from bytes and translated with the probed capabilities of this host's QEMU,
repeated --rounds times; reported are the median and p99 per domain over all inputs (accepted
and rejected alike: a rejection is work too). For comparison: libvirt's domxml-to-native costs
about 2.4 ms per XML inside one virsh process on this kind of machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from pathlib import Path
from xml.parsers import expat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemud.argv import build_argv, emulator_for  # noqa: E402
from qemud.caps import probe  # noqa: E402
from qemud.domain import parse_domain  # noqa: E402
from qemud.errors import DomainError  # noqa: E402
from qemud.paths import GuestPaths  # noqa: E402


def measure(corpus: str, rounds: int = 5) -> dict:
    """validate + argv per domain over the corpus; and the floor: expat parsing the same bytes."""
    files = sorted(glob.glob(os.path.join(corpus, "*.xml")))
    if not files:
        raise FileNotFoundError(f"no XML files in {corpus}")
    data = [(f, Path(f).read_bytes()) for f in files]
    caps = probe("/usr/bin/qemu-system-x86_64")
    paths = GuestPaths(Path("/run/qemud/domains/x"), Path("/var/lib/qemud/domains/x"))
    per_domain: list[float] = []
    floor: list[float] = []
    accepted = 0
    for rnd in range(rounds):
        for f, blob in data:
            t0 = time.perf_counter()
            try:
                d = parse_domain(blob, f)
                if emulator_for(d) != caps.emulator:
                    pass  # same translation; the corpus names i386 binaries too
                build_argv(d, caps, paths)
                ok = True
            except DomainError:
                ok = False
            per_domain.append(time.perf_counter() - t0)
            if rnd == 0 and ok:
                accepted += 1
            t0 = time.perf_counter()
            p = expat.ParserCreate()
            try:
                p.Parse(blob, True)
            except expat.ExpatError:
                pass
            floor.append(time.perf_counter() - t0)
    return {"files": len(files), "accepted": accepted, "rounds": rounds, "per_domain": per_domain,
            "floor": floor}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/libvirt-corpus")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        r = measure(args.corpus, args.rounds)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 1
    per_domain = sorted(r["per_domain"])
    files, accepted = r["files"], r["accepted"]
    med = statistics.median(per_domain) * 1000
    p99 = per_domain[int(len(per_domain) * 0.99)] * 1000
    print(f"inputs: {files} ({accepted} translated, {files - accepted} rejected), rounds: {args.rounds}")
    print(f"validate+argv per domain: median {med:.3f} ms, p99 {p99:.3f} ms, max {per_domain[-1] * 1000:.3f} ms "
          f"(goal: under 1 ms; libvirt domxml-to-native: about 2.4 ms)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
