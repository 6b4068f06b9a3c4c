"""qemuctl: the administrator's command line.

``validate`` and ``argv`` work on files and need no daemon. Exit codes: 0 success, 1 failure,
2 usage error. No input ever produces a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qemuctl",
        description="Control qemud and check libvirt domain XML files against it.",
        epilog="Exit status: 0 success, 1 failure, 2 usage error.")
    p.add_argument("--state-dir", metavar="DIR", type=Path,
                   help="the daemon's state directory (default: /run/qemud and /var/lib/qemud as root, "
                        "$XDG_RUNTIME_DIR/qemud and ~/.local/state/qemud otherwise)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    v = sub.add_parser("validate", help="check domain XML files: what qemud accepts, and why not",
                       description="Check each FILE as qemud would read it, including what this host's "
                                   "QEMU can run. Prints one line per problem: FILE[:LINE]: PATH: MESSAGE.")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("-q", "--quiet", action="store_true", help="print errors only, no warnings or OK lines")
    a = sub.add_parser("argv", help="print the QEMU command line qemud would run for a domain",
                       description="Print the QEMU command line for FILE. Run as printed, it starts the "
                                   "guest with its QMP socket in the state directory (the guest's runtime "
                                   "directory and NVRAM copy are created).")
    a.add_argument("file", metavar="FILE")
    a.add_argument("--json", action="store_true", help="print a JSON list of strings")
    return p


def _caps_for(domain):  # type: ignore[no-untyped-def]
    from qemud.argv import emulator_for
    from qemud.caps import probe
    from qemud.config import host_networks
    return probe(emulator_for(domain)).with_networks(host_networks())


def _paths(args: argparse.Namespace, name: str):  # type: ignore[no-untyped-def]
    from qemud.paths import Dirs, GuestPaths
    if args.state_dir is not None:
        base = args.state_dir.absolute()
        return GuestPaths.for_domain(base, base, name)
    d = Dirs.default()
    return GuestPaths.for_domain(d.runtime, d.state, name)


def _check(args: argparse.Namespace, file: str):  # type: ignore[no-untyped-def]
    """(command or None, problems) for one file."""
    from qemud.argv import build_argv
    from qemud.domain import load_domain
    from qemud.errors import DomainError, HostError, Problem
    try:
        domain = load_domain(file)
    except DomainError as exc:
        return None, exc.problems
    try:
        caps = _caps_for(domain)
        cmd = build_argv(domain, caps, _paths(args, domain.name))
    except DomainError as exc:
        from qemud.xmlload import element_lines, read_domain_bytes
        try:
            lines = element_lines(read_domain_bytes(file))
        except DomainError:
            lines = None
        return None, exc.with_file(file, lines).problems
    except HostError as exc:
        return None, [Problem("", str(exc), file=file)]
    return cmd, [w.with_file(file) for w in cmd.warnings]


def cmd_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for file in args.files:
        cmd, problems = _check(args, file)
        for p in problems:
            if p.severity == "error" or not args.quiet:
                print(p.format(), file=sys.stdout)
        if cmd is None:
            status = EXIT_FAIL
        elif not args.quiet:
            print(f"{file}: OK")
    return status


def cmd_argv(args: argparse.Namespace) -> int:
    cmd, problems = _check(args, args.file)
    for p in problems:
        print(p.format(), file=sys.stderr)
    if cmd is None:
        return EXIT_FAIL
    from qemud.errors import HostError
    from qemud.launch import prepare
    try:
        prepare(cmd)
    except HostError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(cmd.argv))
    else:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(cmd.env.items()))
        print((env + " " if env else "") + shlex.join(cmd.argv))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "argv":
            return cmd_argv(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except Exception as exc:  # noqa: BLE001 - the promise is: never a traceback
        print(f"qemuctl: internal error: {type(exc).__name__}: {exc} (please report this)", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
