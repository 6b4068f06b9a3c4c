"""A bounded chaos run against the real qemud and real QEMU (TCG, the tiny test guest).

N guests (default 10), for M minutes (default 10): random ``kill -9`` of QEMUs and of the
daemon, daemon restarts (SIGTERM and start again), random edits, removals and re-additions of
domain files. Checked all along:

* never two live QEMU processes for one domain (a scan of /proc; a zombie has ended);
* no domain file is modified by anyone but this script (sha256 of each file, as written);

and after each settle period (no more chaos, the daemon up, a deadline to get there):

* each file's guest is in the state its policy says (autostart yes: running, no: stopped), with
  exactly one QEMU, the one the daemon reports, running the file's current definition;
* no QEMU without a domain file, none for a guest that should be stopped.

It prints the counts and exits 1 on any violation. Everything it starts it ends, also on Ctrl-C
or a failure (the test helper's Daemon.close kills the daemon and every QEMU under its directory).

    python tools/chaos.py [--guests 10] [--minutes 10] [--seed N] [--settle-every 60]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemud.cli.client import Client, NotRunning, Refused, socket_path  # noqa: E402
from tests.support.daemon import Daemon, domain_xml  # noqa: E402
from tests.support.tinyguest import ensure_guest  # noqa: E402

MEMORY = (96, 128)  # MiB; an edit switches between them, so the new definition is visible in argv
#: restart policy of the chaos guests: QEMUs are killed far more often than any real policy
#: would forgive, and the point is to check that the daemon keeps them running, not to reach failed
RESTART = {"policy": "always", "max-retries": 1000000, "backoff": 1, "max-backoff": 2}
SHUTDOWN_TIMEOUT = 5  # a guest killed while booting has no acpid yet: the stop must not take 120 s


class Chaos:
    def __init__(self, guests: int, seconds: float, seed: int, settle_every: float, settle_timeout: float) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.seconds = seconds
        self.settle_every = settle_every
        self.settle_timeout = settle_timeout
        self.tiny = ensure_guest()
        self.d = Daemon()
        self.names = [f"c{i:02d}" for i in range(guests)]
        # every fourth guest is not autostarted: its policy says stopped, whatever happens
        self.autostart = {n: (i % 4 != 3) for i, n in enumerate(self.names)}
        self.memory = {n: MEMORY[0] for n in self.names}
        self.present: set[str] = set()
        self.sha: dict[str, str] = {}  # file name -> sha256 of what this script wrote
        self.counts: Counter[str] = Counter()
        self.violations: list[str] = []
        self._seen_dups: set[tuple[str, tuple[int, ...]]] = set()
        self.daemon_down_until: float | None = None  # a killed daemon is started again then
        self._done = threading.Event()

    # ---- files -------------------------------------------------------------------------------
    def xml(self, name: str) -> str:
        i = self.names.index(name)
        return domain_xml(self.tiny, name, uuid=f"c4a05000-0000-4000-8000-{i:012x}", memory_mib=self.memory[name],
                          autostart=self.autostart[name], restart=RESTART, shutdown_timeout=SHUTDOWN_TIMEOUT,
                          description=f"chaos guest {name}")

    def write(self, name: str, in_place: bool = False) -> None:
        text = self.xml(name)
        self.sha[f"{name}.xml"] = hashlib.sha256(text.encode()).hexdigest()
        if in_place:  # an editor that truncates and writes
            with open(self.d.path(f"{name}.xml"), "w") as fh:
                fh.write(text)
        else:
            self.d.drop(f"{name}.xml", text)
        self.present.add(name)

    def remove(self, name: str) -> None:
        self.d.remove(f"{name}.xml")
        self.present.discard(name)
        self.sha.pop(f"{name}.xml", None)

    # ---- processes ---------------------------------------------------------------------------
    def qemus(self) -> dict[str, list[int]]:
        """Live QEMU processes per domain name (by the -pidfile under this run's directory)."""
        out: dict[str, list[int]] = {}
        prefix = str(self.d.state / "domains") + "/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
                if not argv or b"qemu-system" not in argv[0]:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    st = fh.read()
            except OSError:
                continue
            if st[st.rindex(b")") + 2:st.rindex(b")") + 3] in (b"Z", b"X"):
                continue  # ended; PID 1 reaps it when it gets to it
            args = [a.decode(errors="replace") for a in argv]
            for i, a in enumerate(args[:-1]):
                if a == "-pidfile" and args[i + 1].startswith(prefix):
                    name = args[i + 1][len(prefix):].split("/")[0]
                    out.setdefault(name, []).append(int(entry))
        return out

    def cmdline(self, pid: int) -> list[str]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return [a.decode(errors="replace") for a in fh.read().split(b"\0")]
        except OSError:
            return []

    def guests(self) -> list[dict[str, Any]] | None:
        try:
            c = Client(socket_path(str(self.d.state), None), timeout=30)
        except (NotRunning, Refused, OSError):
            return None
        try:
            res = c.call("list")
            return res if isinstance(res, list) else None
        except (Refused, OSError, ValueError):
            return None
        finally:
            c.close()

    # ---- checks ------------------------------------------------------------------------------
    def violation(self, what: str) -> None:
        self.violations.append(what)
        print(f"VIOLATION {time.strftime('%H:%M:%S')}: {what}", flush=True)

    def check_duplicates(self) -> None:
        for name, pids in self.qemus().items():
            if len(pids) > 1:
                key = (name, tuple(sorted(pids)))
                if key not in self._seen_dups:
                    self._seen_dups.add(key)
                    self.violation(f"{len(pids)} QEMU processes for {name}: {sorted(pids)}")
        self.counts["process scans"] += 1

    def watch_duplicates(self) -> None:
        """A thread: the /proc scan several times a second, so a short-lived second QEMU is seen."""
        while not self._done.wait(0.2):
            try:
                self.check_duplicates()
            except Exception as exc:  # noqa: BLE001 - a broken check is a failed run
                self.violation(f"the duplicate check failed: {type(exc).__name__}: {exc}")
                return

    def check_always(self) -> None:
        self.check_duplicates()
        for f in sorted(os.listdir(self.d.domains)):
            want = self.sha.get(f)
            try:
                got = hashlib.sha256((self.d.domains / f).read_bytes()).hexdigest()
            except OSError:
                got = None
            if want is None or got != want:
                self.violation(f"domain file {f} is not what this script wrote (sha256 {got}, expected {want})")
                if got is not None:
                    self.sha[f] = got  # reported once
        self.counts["checks"] += 1

    def settled(self) -> list[str]:
        """What is not (yet) as the files say; [] once everything is."""
        problems: list[str] = []
        guests = self.guests()
        if guests is None:
            return ["the daemon does not answer"]
        by_name = {g["name"]: g for g in guests}
        qemus = self.qemus()
        for name in self.names:
            g = by_name.get(name)
            live = qemus.get(name, [])
            if name not in self.present:
                if g is not None:
                    problems.append(f"{name}: file removed but the daemon still lists it ({g['state']})")
                if live:
                    problems.append(f"{name}: file removed but QEMU {live} runs")
                continue
            if g is None:
                problems.append(f"{name}: file present but not listed")
                continue
            if self.autostart[name]:
                if g["state"] != "running":
                    problems.append(f"{name}: {g['state']} ({g.get('cause')}), its policy says running")
                elif live != [g["pid"]]:
                    problems.append(f"{name}: the daemon says pid {g['pid']}, QEMUs running: {live}")
                elif f"size={self.memory[name]}M" not in self.cmdline(live[0]):
                    problems.append(f"{name}: QEMU {live[0]} does not run the file's definition "
                                    f"({self.memory[name]} MiB)")
            else:
                if g["state"] != "stopped" or live:
                    problems.append(f"{name}: {g['state']} with QEMUs {live}; autostart is off: stopped")
        for name, live in qemus.items():
            if name not in self.names:
                problems.append(f"QEMU {live} for unknown domain {name}")
        return problems

    def settle(self) -> None:
        """No chaos until everything is as the files say (or the deadline says it is not)."""
        if not self.d.running:
            self.start_daemon()
        started = time.monotonic()
        deadline = started + self.settle_timeout
        problems: list[str] = []
        while time.monotonic() < deadline:
            self.check_always()
            problems = self.settled()
            if not problems:
                # and it stays so for a moment (no late restart or stray QEMU)
                time.sleep(2)
                self.check_always()
                problems = self.settled()
                if not problems:
                    break
            time.sleep(1)
        self.counts["settles"] += 1
        took = time.monotonic() - started
        if problems:
            for p in problems:
                self.violation(f"not settled after {took:.0f} s: {p}")
        else:
            print(f"{time.strftime('%H:%M:%S')} settled in {took:.1f} s: "
                  f"{sum(1 for n in self.present if self.autostart[n])} running, {dict(self.counts)}", flush=True)

    # ---- chaos -------------------------------------------------------------------------------
    def start_daemon(self) -> None:
        self.d.start(timeout=180)
        self.daemon_down_until = None

    def act(self) -> None:
        r = self.rng
        if self.daemon_down_until is not None and time.monotonic() >= self.daemon_down_until:
            self.start_daemon()  # after a kill -9 (counted there)
            return
        choice = r.choices(["kill-qemu", "kill-daemon", "restart-daemon", "edit", "remove", "readd"],
                           weights=[8, 1.5, 1, 3, 1.5, 2])[0]
        if choice == "kill-qemu":
            live = [p for pids in self.qemus().values() for p in pids]
            if live:
                try:
                    os.kill(r.choice(live), signal.SIGKILL)
                    self.counts["QEMU kills"] += 1
                except ProcessLookupError:
                    pass
        elif choice == "kill-daemon" and self.d.running:
            self.d.kill9()
            self.counts["daemon kills"] += 1
            self.daemon_down_until = time.monotonic() + r.uniform(0, 4)
        elif choice == "restart-daemon" and self.d.running:
            self.d.stop(timeout=60)
            self.start_daemon()
            self.counts["daemon restarts"] += 1
        elif choice == "edit" and self.present:
            name = r.choice(sorted(self.present))
            self.memory[name] = MEMORY[1] if self.memory[name] == MEMORY[0] else MEMORY[0]
            self.write(name, in_place=r.random() < 0.5)
            self.counts["edits"] += 1
        elif choice == "remove" and len(self.present) > len(self.names) // 2:
            self.remove(r.choice(sorted(self.present)))
            self.counts["removals"] += 1
        elif choice == "readd":
            gone = sorted(set(self.names) - self.present)
            if gone:
                self.write(r.choice(gone))
                self.counts["re-additions"] += 1

    def run(self) -> int:
        print(f"chaos: {len(self.names)} guests, {self.seconds / 60:g} min, seed {self.seed}, "
              f"directory {self.d.base}", flush=True)
        self.start_daemon()
        threading.Thread(target=self.watch_duplicates, daemon=True, name="duplicates").start()
        for name in self.names:
            self.write(name)
        self.settle()
        end = time.monotonic() + self.seconds
        next_settle = time.monotonic() + self.settle_every
        while time.monotonic() < end:
            self.act()
            self.check_always()
            if time.monotonic() >= next_settle:
                self.settle()
                next_settle = time.monotonic() + self.settle_every
            else:
                time.sleep(self.rng.uniform(0.3, 2.0))
        self.settle()
        return 0

    def report(self) -> None:
        c = self.counts
        print("chaos results:")
        for k in ("QEMU kills", "daemon kills", "daemon restarts", "edits", "removals", "re-additions",
                  "settles", "checks", "process scans"):  # daemon restarts: SIGTERM and start (a kill is followed by a start too)
            print(f"  {k:16} {c[k]}")
        print(f"  {'violations':16} {len(self.violations)}")
        for v in self.violations:
            print(f"    {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guests", type=int, default=10)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--settle-every", type=float, default=60.0, metavar="S",
                   help="seconds of chaos between two settle periods")
    p.add_argument("--settle-timeout", type=float, default=240.0, metavar="S",
                   help="how long a settle may take before what is not as the files say is a violation")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    chaos = Chaos(args.guests, args.minutes * 60, seed, args.settle_every, args.settle_timeout)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminate)
    rc = 1
    try:
        rc = chaos.run()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        chaos.violations.append("interrupted before the end")
    except Exception as exc:  # noqa: BLE001 - reported as a failure, after cleaning up
        chaos.violation(f"chaos run failed: {type(exc).__name__}: {exc}")
        try:
            print(chaos.d.tail(80))
        except Exception:  # noqa: BLE001
            pass
    finally:
        chaos._done.set()
        if chaos.violations:
            log = Path(f"/tmp/chaos-{seed}.log")
            log.write_text(chaos.d.log_text())
            print(f"the daemon's log: {log}")
        leftover = chaos.d.close()
        chaos.report()
        if leftover:
            print(f"  (cleanup ended {len(leftover)} QEMU(s) still running: {leftover})")
    return 1 if chaos.violations or rc else 0


if __name__ == "__main__":
    sys.exit(main())
