"""Shared fixtures and options of qemud's test suite.

Options:
  --regen-golden   rewrite tests/data/domains/*.argv.json from the translator instead of
                   comparing against them (review the diff before committing it)
  --record-caps    re-probe /usr/bin/qemu-system-x86_64 into tests/data/caps/qemu-7.2.json
                   before the tests run (see tests/record_caps.py)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qemud.caps import HostCaps
from qemud.paths import GuestPaths
from tests import record_caps
from tests.support.tinyguest import TinyGuest, ensure_guest

DATA = Path(__file__).parent / "data"
DOMAINS = DATA / "domains"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qemud")
    group.addoption("--regen-golden", action="store_true", default=False,
                    help="rewrite the golden argv files (tests/data/domains/*.argv.json)")
    group.addoption("--record-caps", action="store_true", default=False,
                    help="re-record tests/data/caps/qemu-7.2.json from this machine's QEMU first")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--record-caps", default=False):
        record_caps.record()


@pytest.fixture(scope="session")
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden"))


@pytest.fixture(scope="session")
def caps() -> HostCaps:
    """The recorded capabilities of QEMU 7.2 (KVM usable, network 'default' on virbr0)."""
    return record_caps.load()


@pytest.fixture(scope="session")
def guest() -> TinyGuest:
    """The tiny real Linux guest (built once from Debian packages, cached)."""
    return ensure_guest()


def guest_paths(name: str) -> GuestPaths:
    """The fixed paths golden files are generated with."""
    return GuestPaths(run=Path("/run/qemud/domains") / name, state=Path("/var/lib/qemud/domains") / name)


# ---- reading QEMU's option syntaxes back (used to check that values arrive intact) ----------

def _opt_value(s: str, i: int) -> tuple[str, int]:
    """QEMU's get_opt_value(): up to the next single comma; ',,' is a literal comma."""
    out = []
    while i < len(s):
        if s[i] == ",":
            if i + 1 < len(s) and s[i + 1] == ",":
                out.append(",")
                i += 2
                continue
            return "".join(out), i + 1
        out.append(s[i])
        i += 1
    return "".join(out), i


def parse_qemuopts(params: str, implied: str | None = None) -> list[tuple[str, str | None]]:
    """Split a QemuOpts string the way QEMU 7.2's util/qemu-option.c does.

    Returns (key, value) pairs in order; a bare flag (``foo`` without ``=``, which QEMU reads as
    ``foo=on``) comes back as (key, None) so that tests can tell it from a spelled value. Only the
    first item may use the ``implied`` key.
    """
    out: list[tuple[str, str | None]] = []
    i = 0
    first = True
    while i < len(params):
        rest = params[i:]
        n = next((k for k, c in enumerate(rest) if c in "=,"), len(rest))
        if n == len(rest) or rest[n] != "=":
            if first and implied:
                value, i = _opt_value(params, i)
                out.append((implied, value))
            else:
                out.append((rest[:n], None))
                i += n + 1
        else:
            value, j = _opt_value(params, i + n + 1)
            out.append((rest[:n], value))
            i = j
        first = False
    return out


def opts_dict(params: str, implied: str | None = None) -> dict[str, str | None]:
    """:func:`parse_qemuopts` as a dict; a repeated key is an error (QEMU would take the last)."""
    pairs = parse_qemuopts(params, implied)
    keys = [k for k, _ in pairs]
    dup = {k for k in keys if keys.count(k) > 1}
    assert not dup, f"repeated QemuOpts key(s) {sorted(dup)} in {params!r}"
    return dict(pairs)


def options(argv: list[str], name: str) -> list[str]:
    """The values of every ``name`` option (``-device`` -> its arguments, in order)."""
    return [argv[i + 1] for i in range(1, len(argv) - 1) if argv[i] == name]


def json_options(argv: list[str], name: str) -> list[dict]:
    import json
    return [json.loads(v) for v in options(argv, name)]


#: QEMU 7.2 options that take no argument (all others that qemud emits take exactly one)
FLAG_OPTIONS = {"-S", "-no-user-config", "-nodefaults", "-no-shutdown", "-no-reboot"}


def option_names(argv: list[str]) -> list[str]:
    """The option names of an argv, in order, skipping each option's argument."""
    names = []
    i = 1
    while i < len(argv):
        names.append(argv[i])
        i += 1 if argv[i] in FLAG_OPTIONS else 2
    return names
