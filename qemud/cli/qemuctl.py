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

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


COMMANDS = ("list", "status", "start", "shutdown", "destroy", "restart", "reset", "pause", "resume",
            "console", "top", "logs", "validate", "argv")


def _command_of(argv: list[str]) -> str | None:
    """The command word of ``argv`` as argparse will find it, or None when unsure (help, a
    misspelt command, ``--``): the first word that is not an option or a global option's value.
    Both global options take a value; argparse also accepts their unambiguous prefixes."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--" or a in ("-h", "--help"):
            return None
        if a.startswith("--s") and "=" not in a:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a if a in COMMANDS else None
    return None


class _Skipped:
    """Stands for a sub-parser :func:`_parser` does not build: takes any call, does nothing."""

    def __getattr__(self, _name: str):  # type: ignore[no-untyped-def]
        return lambda *a, **kw: self


_SKIPPED = _Skipped()


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    """qemuctl's parser; with ``only``, just the global options and that one command.  Building
    all fourteen sub-parsers costs about 4 ms, a tenth of what `qemuctl list` may take in all."""
    p = argparse.ArgumentParser(
        prog="qemuctl",
        description="Control qemud and check libvirt domain XML files against it.",
        epilog="Exit status: 0 success, 1 failure, 2 usage error.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state-dir", metavar="DIR",
                       help="the daemon's state directory, as given to qemud --state-dir (default: /run/qemud "
                            "and /var/lib/qemud as root, $XDG_RUNTIME_DIR/qemud and ~/.local/state/qemud otherwise)")
    where.add_argument("--socket", metavar="PATH", help="the control socket (default: qemud.sock in the runtime directory)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, **kw: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, **kw) if only in (None, name) else _SKIPPED  # type: ignore[return-value]

    ls = add("list", help="every guest at a glance", description="Every guest: name, state, pid, "
             "uptime, restarts, CPU %% and memory.")
    ls.add_argument("--json", action="store_true", help="a JSON list of objects (name, uuid, state, pid, restarts, file, ...)")
    st = add("status", help="everything about one guest")
    st.add_argument("name", metavar="NAME")
    st.add_argument("--json", action="store_true", help="a JSON object")
    for cmd, text in (("start", "start a guest (clears a stop asked for before)"),
                      ("shutdown", "shut a guest down through ACPI; it stays stopped until started"),
                      ("destroy", "end a guest's QEMU at once; it stays stopped until started"),
                      ("restart", "shut a guest down gracefully and start it again"),
                      ("reset", "reset a guest (the reset button)"),
                      ("pause", "pause a guest's vCPUs"), ("resume", "resume a paused guest")):
        c = add(cmd, help=text, description=text[0].upper() + text[1:] + ".")
        names = c.add_mutually_exclusive_group(required=True)
        names.add_argument("name", metavar="NAME", nargs="?")
        names.add_argument("--all", action="store_true", help="every guest")
        if cmd == "shutdown":
            c.add_argument("--timeout", type=float, metavar="S",
                           help="seconds the guest has to power off before QEMU is ended (default: its own)")
        c.add_argument("--json", action="store_true", help="print the resulting status as JSON")
    con = add("console", help="attach to a guest's serial console (Ctrl-] detaches)")
    con.add_argument("name", metavar="NAME")
    top = add("top", help="live CPU and memory of every guest, like virt-top")
    top.add_argument("-d", "--delay", type=float, default=1.0, metavar="S", help="seconds between refreshes")
    top.add_argument("-n", "--iterations", type=int, default=0, metavar="N", help="stop after N refreshes")
    lg = add("logs", help="a guest's journal (journalctl QEMUD_DOMAIN=NAME)")
    lg.add_argument("name", metavar="NAME")
    lg.add_argument("-f", "--follow", action="store_true", help="keep following")
    v = add("validate", help="check domain XML files: what qemud accepts, and why not",
            description="Check each FILE as qemud would read it, including what this host's "
                        "QEMU can run. Prints one line per problem: FILE[:LINE]: PATH: MESSAGE.")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("-q", "--quiet", action="store_true", help="print errors only, no warnings or OK lines")
    a = add("argv", help="print the QEMU command line qemud would run for a domain",
            description="Print the QEMU command line for FILE. Run as printed, it starts the "
                        "guest with its QMP socket in the state directory (the guest's runtime "
                        "directory and NVRAM copy are created).")
    a.add_argument("file", metavar="FILE")
    a.add_argument("--json", action="store_true", help="print a JSON list of strings")
    return p


def _caps_for(domain):  # type: ignore[no-untyped-def]
    from qemud.argv import emulator_for
    from qemud.caps import probe
    from qemud.config import Config, host_networks, load_config, with_storage_config
    from qemud.errors import QemudError
    from qemud.paths import Dirs
    caps = probe(emulator_for(domain)).with_networks(host_networks())
    try:  # the secrets and TLS directories of qemud.conf, as the daemon would use them
        config = load_config(Dirs.default().config)
    except QemudError:
        config = Config()
    return with_storage_config(caps, config).with_tls(config.tls_dirs)


def _paths(args: argparse.Namespace, name: str):  # type: ignore[no-untyped-def]
    from pathlib import Path

    from qemud.paths import Dirs, GuestPaths
    if args.state_dir is not None:
        base = Path(args.state_dir).absolute()
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
    for h in cmd.helpers:  # QEMU alone is not the guest: say what runs beside it
        print(f"# helper {h.name}, started first with {{fd}} a socket listening at {h.socket}: "
              f"{shlex.join(h.argv)}", file=sys.stderr)
    if args.json:
        print(json.dumps(cmd.argv))
    else:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(cmd.env.items()))
        print((env + " " if env else "") + shlex.join(cmd.argv))
    return EXIT_OK


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _fmt_uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h:02d}:{m:02d}:{s:02d}" if h or d else f"{m:02d}:{s:02d}")


def _table(guests: list[dict]) -> str:  # type: ignore[type-arg]
    rows = [("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CPU%", "MEMORY")]
    for g in guests:
        cpu = g.get("cpu_percent")
        rows.append((g["name"], g["state"], str(g["pid"]) if g["pid"] else "-", _fmt_uptime(g.get("uptime")),
                     str(g["restarts"]), f"{cpu:.1f}" if cpu is not None else "-", _fmt_bytes(g.get("rss"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from qemud.cli.client import Client, socket_path
    return Client(socket_path(str(args.state_dir) if args.state_dir else None, args.socket))


def cmd_list(args: argparse.Namespace) -> int:
    c = _client(args)
    guests = c.call("list")
    c.close()
    print(json.dumps(guests) if args.json else _table(guests))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    c = _client(args)
    g = c.call("status", name=args.name)
    c.close()
    if args.json:
        print(json.dumps(g))
        return EXIT_OK
    pol = g.get("restart_policy") or {}
    lines = [("Name", g["name"]), ("UUID", g["uuid"]), ("State", f"{g['state']} ({g.get('cause', '')})"),
             ("File", g["file"]), ("PID", g["pid"] or "-"), ("Uptime", _fmt_uptime(g.get("uptime"))),
             ("Restarts", g["restarts"]),
             ("Restart policy", f"{pol.get('policy')}, {pol.get('max_retries')} failed starts, backoff "
                                f"{pol.get('backoff'):g}-{pol.get('max_backoff'):g} s" if pol else "-"),
             ("Next start in", f"{g['next_delay']:g} s" if g.get("next_delay") else "-"),
             ("Shutdown timeout", f"{g.get('shutdown_timeout'):g} s"),
             ("Last exit", g.get("last_exit") or "-"),
             ("CPU", f"{g['cpu_percent']:.1f} %" if g.get("cpu_percent") is not None else "-"),
             ("Memory (RSS)", _fmt_bytes(g.get("rss"))),
             ("Disk I/O", f"read {_fmt_bytes(g['io']['read_bytes'])}, written {_fmt_bytes(g['io']['write_bytes'])}"
              if g.get("io") else "-"),
             ("Network I/O", f"received {_fmt_bytes(g['net']['rx_bytes'])}, sent {_fmt_bytes(g['net']['tx_bytes'])}"
              if g.get("net") else "- (user-mode networking has no host device to count)"),
             ("QMP socket", g.get("qmp"))]
    for k, v in lines:
        print(f"{k + ':':18} {v}")
    if g.get("stderr"):
        print("QEMU's last stderr lines:")
        for line in g["stderr"]:
            print(f"  {line}")
    return EXIT_OK


def cmd_guest(args: argparse.Namespace) -> int:
    c = _client(args)
    extra = {"timeout": args.timeout} if getattr(args, "timeout", None) is not None else {}
    if args.all:
        res = c.call(args.command, all=True, **extra)
    else:
        res = {args.name: c.call(args.command, name=args.name, **extra)}
    c.close()
    status = EXIT_OK
    for name, g in res.items():
        if "error" in g:
            print(f"{name}: {g['error']}", file=sys.stderr)
            status = EXIT_FAIL
            continue
        want = {"start": ("running", "paused"), "restart": ("running", "paused"), "shutdown": ("stopped",),
                "destroy": ("stopped",), "pause": ("paused",), "resume": ("running",),
                "reset": ("running",)}[args.command]
        ok = g["state"] in want
        if args.json:
            print(json.dumps(g))
        else:
            print(f"{name}: {g['state']}" + (f" ({g.get('cause')})" if g.get("cause") else ""),
                  file=sys.stdout if ok else sys.stderr)
        if not ok:
            status = EXIT_FAIL
    return status


def cmd_console(args: argparse.Namespace) -> int:
    import os as _os
    import select
    import termios
    import tty
    c = _client(args)
    c.sock.settimeout(None)
    c.send({"v": 1, "cmd": "console", "name": args.name})
    reply = c.read_reply()
    if not reply.get("ok"):
        print(f"qemuctl: {reply.get('error')}", file=sys.stderr)
        return EXIT_FAIL
    stdin = sys.stdin.fileno()
    is_tty = _os.isatty(stdin)
    if is_tty:
        print(f"Connected to {args.name}'s console (escape: Ctrl-])", file=sys.stderr)
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    out = sys.stdout.buffer
    if c.buf:
        out.write(c.buf)
        out.flush()
    stdin_open = True
    try:
        while True:
            fds = [c.sock] + ([stdin] if stdin_open else [])
            ready, _, _ = select.select(fds, [], [], None if stdin_open else 0.5)
            if not ready:
                return EXIT_OK  # stdin ended and the guest had nothing more to say
            if c.sock in ready:
                data = c.sock.recv(65536)
                if not data:
                    return EXIT_OK
                out.write(data)
                out.flush()
            if stdin in ready:
                data = _os.read(stdin, 4096)
                if not data:
                    stdin_open = False
                    continue
                if b"\x1d" in data:  # Ctrl-]
                    data = data.split(b"\x1d")[0]
                    if data:
                        c.sock.sendall(data)
                    return EXIT_OK
                c.sock.sendall(data)
    finally:
        if is_tty:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            print("", file=sys.stderr)
        c.close()


def cmd_top(args: argparse.Namespace) -> int:
    import time as _time
    c = _client(args)
    n = 0
    try:
        while True:
            guests = c.call("list")
            head = f"qemud: {len(guests)} guest(s)   {_time.strftime('%H:%M:%S')}"
            screen = head + "\n\n" + _table(sorted(guests, key=lambda g: -(g.get("cpu_percent") or 0)))
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            print(screen, flush=True)
            n += 1
            if args.iterations and n >= args.iterations:
                return EXIT_OK
            _time.sleep(args.delay)
    finally:
        c.close()


def cmd_logs(args: argparse.Namespace) -> int:
    import os as _os
    argv = ["journalctl", "--no-pager", f"QEMUD_DOMAIN={args.name}"] + (["-f"] if args.follow else [])
    try:
        _os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"qemuctl: cannot run journalctl: {exc.strerror}", file=sys.stderr)
    return EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = _parser(_command_of(argv)).parse_args(argv)
    from qemud.cli.client import NotRunning, Refused
    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "argv":
            return cmd_argv(args)
        if args.command == "list":
            return cmd_list(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command in ("start", "shutdown", "destroy", "restart", "reset", "pause", "resume"):
            return cmd_guest(args)
        if args.command == "console":
            return cmd_console(args)
        if args.command == "top":
            return cmd_top(args)
        if args.command == "logs":
            return cmd_logs(args)
    except (NotRunning, Refused) as exc:
        print(f"qemuctl: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except TimeoutError:
        print("qemuctl: qemud did not answer in time", file=sys.stderr)
        return EXIT_FAIL
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
