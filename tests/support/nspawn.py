"""A throwaway systemd machine for end-to-end tests: this host's own Debian, booted by
``systemd-nspawn`` with a real systemd as PID 1, on an overlay that forgets everything.

How it is isolated (the point: a systemd booted on this machine's real / would mount a tmpfs on
its /tmp, clean /var/tmp, start services, ...; it must never see anything but a copy):

* a *holder* process (``unshare --mount --propagation private -- sleep``) owns a private mount
  namespace; every mount below is made in it (``nsenter -t HOLDER -m``), none propagates to the
  host, and all of them vanish when the holder dies;
* in it: a tmpfs on ``BASE`` (a directory in a fresh host temporary directory), and on
  ``BASE/root`` an overlay with ``lowerdir=/`` and its upper and work directories on that tmpfs:
  the container sees this host's files and every write lands in the tmpfs;
* an overlay does not show the mounts below its lowerdir (an overlay of / shows what the root
  file system holds, not what is mounted on it), so directories the container needs that may
  live on another mount are mounted in again: ``overlay_dirs`` as overlays of their own (writable,
  the writes forgotten: the checkout, where ``pip install .`` builds in the tree) and ``ro_binds``
  as read-only bind mounts (the tiny guest's kernel and initrd);
* in the overlay: a fresh ``/etc/machine-id`` and every unit this host enables, plus a list of
  units that would fail or wait in a container (networking, gettys, timers, ssh, cron, ...),
  masked; systemd-journald and the rest of the base system run as usual;
* :meth:`Container.prove_isolation` writes a file through the overlay and checks that neither the
  host's / nor the host's view of ``BASE`` shows it, and that the holder's mount namespace is not
  this process's; :meth:`Container.boot` refuses to run before that proof passed;
* ``systemd-nspawn -D BASE/root --register=no --keep-unit --private-network --link-journal=no
  -b`` runs in the holder's namespace, with its own pid, IPC, UTS, cgroup and network namespaces;
  on a host whose PID 1 is not systemd (CI machines) it is first moved into a cgroup of its own
  (removed at the end), with ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` so the container gets cgroup
  v2 also on a hybrid host; where PID 1 is systemd, nspawn runs without ``--keep-unit`` and asks
  it for a scope instead (that branch is not exercised on the CI machines).

Commands run inside with ``nsenter -t PID1 -m -u -i -n -p -C`` (PID1: the container's init, the
child of nspawn, seen from the host); :meth:`Container.run` with ``host_network=True`` leaves out
``-n``, for ``make install``, whose ``pip install`` needs the package index that the container's
private network cannot reach.

:meth:`Container.close` always tears everything down: a clean ``systemctl poweroff``, else SIGKILL
of the container's init and of nspawn; the holder killed (its mounts go with it); the cgroup
removed; then it checks that no process of the container's pid namespace is left and that no
mount of ``BASE`` is visible on the host, and raises if one is (:meth:`Container.leftovers` lists
what is left). Should the test process itself be killed, nspawn gets SIGTERM and the holder
SIGKILL (``PR_SET_PDEATHSIG``): the container powers off and the mounts go; only an empty cgroup
and the temporary directory stay, and the cgroup is removed by a later run.

Paths under /tmp, /run, /dev, /proc and /sys cannot be shown to the container (nspawn and the
container's systemd mount their own file systems there): keep the checkout and the tiny guest's
cache (``QEMUD_TEST_CACHE``) elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Container", "ContainerError", "missing_prerequisites", "mount_point"]

NSPAWN = "systemd-nspawn"

#: Units that must not start in the container (besides every unit this host enables): they would
#: fail or wait there (no network, no ttys, no hardware) and slow the boot down.
MASKED_UNITS: tuple[str, ...] = (
    "networking.service", "ifupdown-pre.service", "ifup@.service",
    "systemd-networkd.service", "systemd-networkd.socket", "systemd-networkd-wait-online.service",
    "NetworkManager.service", "NetworkManager-wait-online.service", "systemd-resolved.service",
    "systemd-timesyncd.service", "getty@.service", "serial-getty@.service", "console-getty.service",
    "container-getty@.service", "getty-static.service", "ssh.service", "ssh.socket", "cron.service",
    "anacron.service", "anacron.timer", "rsyslog.service", "unattended-upgrades.service",
    "apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service", "apt-daily-upgrade.service",
    "man-db.timer", "dpkg-db-backup.timer", "e2scrub_all.timer", "e2scrub_reap.service",
    "fstrim.timer", "logrotate.timer", "systemd-pstore.service", "postgresql.service",
    "docker.service", "containerd.service", "libvirtd.service", "virtlogd.service",
)

#: Environment variables never passed to commands run inside (they belong to this process).
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID",
             "LISTEN_FDNAMES", "INVOCATION_ID", "JOURNAL_STREAM", "VIRTUAL_ENV", "PYTHONHOME",
             "PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKE_TERMOUT", "MAKE_TERMERR",
             "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER")

#: What nspawn (or the container's systemd) mounts its own file systems on.
_COVERED = tuple(Path(p) for p in ("/tmp", "/run", "/dev", "/proc", "/sys"))

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@-]*$")  # no comma, colon or space (overlay options)

# Run in the holder's mount namespace: the tmpfs, the overlays, the binds. "$@": BASE, then
# "o:DIR" (an overlay of its own) and "b:DIR" (a read-only bind) items.
_SETUP = r"""
set -eu
B=$1; shift
mount -t tmpfs -o mode=0755 qemud-nspawn "$B"
mkdir "$B/upper" "$B/work" "$B/root"
mount -t overlay qemud-nspawn -o "lowerdir=/,upperdir=$B/upper,workdir=$B/work" "$B/root"
i=0
for item in "$@"; do
    kind=${item%%:*}; dir=${item#*:}
    mkdir -p "$B/root$dir"
    if [ "$kind" = o ]; then
        i=$((i + 1))
        mkdir "$B/ov$i" "$B/ov$i/upper" "$B/ov$i/work"
        mount -t overlay qemud-nspawn -o "lowerdir=$dir,upperdir=$B/ov$i/upper,workdir=$B/ov$i/work" "$B/root$dir"
    else
        mount --bind "$dir" "$B/root$dir"
        mount -o remount,bind,ro "$B/root$dir"
    fi
done
# nspawn keeps per-machine state here; a tmpfs keeps it out of the host's /run
mkdir -p /run/systemd/nspawn
mount -t tmpfs -o mode=0755 qemud-nspawn /run/systemd/nspawn
"""

# Run in the holder's namespace on the overlay root R (before booting): machine id and masks.
_PREPARE = r"""
set -eu
R=$1; shift
rm -f "$R/etc/machine-id"
printf '%s\n' "$MACHINE_ID" > "$R/etc/machine-id"
mkdir -p "$R/etc/systemd/system"
for link in "$R"/etc/systemd/system/*.wants/* "$R"/etc/systemd/system/*.requires/*; do
    [ -e "$link" ] || [ -L "$link" ] || continue
    name=${link##*/}
    case "$name" in qemud*) continue ;; esac
    ln -sfn /dev/null "$R/etc/systemd/system/$name"
done
for name in "$@"; do ln -sfn /dev/null "$R/etc/systemd/system/$name"; done
"""


class ContainerError(AssertionError):
    """The container could not be set up, driven or torn down (the message says what and shows
    the relevant output)."""


def missing_prerequisites() -> list[str]:
    """What this machine lacks to boot a container (empty when everything is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (mount namespaces, overlayfs and systemd-nspawn need it)")
    for tool in (NSPAWN, "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            pkg = " (Debian package systemd-container; `make deps` installs it)" if tool == NSPAWN else ""
            missing.append(f"the command {tool}{pkg}")
    if not Path("/lib/systemd/systemd").exists():
        missing.append("/lib/systemd/systemd (Debian package systemd)")
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            subprocess.run(["modprobe", "overlay"], capture_output=True, check=False, timeout=30)
            if "overlay" not in Path("/proc/filesystems").read_text():
                missing.append("overlayfs in the kernel")
    except (OSError, subprocess.SubprocessError):
        missing.append("overlayfs in the kernel (/proc/filesystems unreadable)")
    return missing


def mount_point(path: os.PathLike[str] | str) -> Path:
    """The mount point of the host mount holding ``path`` (``/`` when it is on the root file
    system, which the overlay shows; anything else must be mounted into the container)."""
    p = Path(path).resolve()
    best = Path("/")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = Path(line.split()[4].replace("\\040", " "))
        if (mp == p or mp in p.parents) and len(mp.parts) > len(best.parts):
            best = mp
    return best


def _die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec_fn: the child gets ``sig`` when this process dies (PR_SET_PDEATHSIG survives
    exec), so a killed test run leaves no container behind."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def _ns_inode(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _tail(text: str | bytes, lines: int = 40) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def _cgroup_mounts() -> list[tuple[Path, str]]:
    """(mount point, type) of every cgroup hierarchy mounted on this host."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype in ("cgroup", "cgroup2"):
            mp = left.split()[4].replace("\\040", " ")
            out.append((Path(mp), fstype))
    return out


def _unified_cgroup_base() -> Path:
    """The cgroup v2 directory this process is in (pure v2 or hybrid hosts)."""
    own = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = line[3:]
    for mp, fstype in _cgroup_mounts():
        if fstype == "cgroup2":
            return mp / own.lstrip("/")
    raise ContainerError("this host has no cgroup v2 hierarchy mounted (neither /sys/fs/cgroup nor "
                         "/sys/fs/cgroup/unified); the container's systemd needs one")


class Container:
    """A booted throwaway systemd machine. Use as a context manager::

        with Container(overlay_dirs=[checkout], ro_binds=[guest_dir]) as c:
            c.prove_isolation()
            c.boot()
            c.run(["make", "-C", str(checkout), "install"], host_network=True)
            c.systemctl("start", "qemud")
    """

    def __init__(self, *, overlay_dirs: Iterable[os.PathLike[str] | str] = (),
                 ro_binds: Iterable[os.PathLike[str] | str] = (),
                 masked_units: Sequence[str] = MASKED_UNITS) -> None:
        self.overlay_dirs = [Path(p).resolve() for p in overlay_dirs]
        self.ro_binds = [Path(p).resolve() for p in ro_binds]
        self.masked_units = list(masked_units)
        for p in [*self.overlay_dirs, *self.ro_binds]:
            if not _SAFE_PATH.match(str(p)) or p == Path("/"):
                raise ContainerError(f"{p}: cannot be mounted into the container (an overlay option "
                                     "cannot hold ',', ':' or spaces; / is the overlay itself)")
            hidden = [q for q in _COVERED if p == q or q in p.parents]
            if hidden:
                raise ContainerError(f"{p}: would be hidden in the container (nspawn mounts its own "
                                     f"{hidden[0]}); move it elsewhere (e.g. QEMUD_TEST_CACHE, the checkout)")
            if not p.is_dir():
                raise ContainerError(f"{p}: not a directory")
        self.name = f"qemud-e2e-{uuid.uuid4().hex[:10]}"
        self.machine_id = uuid.uuid4().hex
        self.tmp: Path | None = None  # host directory: BASE (a mount point, in the namespace only), logs
        self.base: Path | None = None
        self.root: Path | None = None
        self.holder: subprocess.Popen[bytes] | None = None
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.nspawn_log: Path | None = None
        self.pid1: int | None = None
        self.pidns: str | None = None
        self.cgroups: list[Path] = []
        self.isolated = False
        self.boot_seconds: float | None = None
        self.env = self.environment()

    # ---- set up ---------------------------------------------------------------------------
    def __enter__(self) -> Container:
        try:
            self.setup()
        except BaseException:
            self.close(check=False)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # a failure of the test wins over one of the teardown; a clean test gets the teardown's
        self.close(check=exc_type is None)

    @staticmethod
    def environment() -> dict[str, str]:
        """The environment of commands run inside: this process's, less what belongs to it."""
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        if sys.prefix != sys.base_prefix:  # this test's venv must not shadow the admin's python3
            venv_bin = str(Path(sys.executable).parent)
            env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p and p != venv_bin)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(SYSTEMD_PAGER="", SYSTEMD_COLORS="0", SYSTEMD_LOG_COLOR="0", LC_ALL="C.UTF-8",
                   TERM="dumb")
        return env

    def setup(self) -> None:
        """The private mount namespace, the overlay root and its preparation (no boot yet)."""
        missing = missing_prerequisites()
        if missing:
            raise ContainerError("cannot boot a systemd container here; missing: " + "; ".join(missing))
        self.tmp = Path(tempfile.mkdtemp(prefix="qemud-nspawn-"))
        self.base = self.tmp / "mnt"
        self.base.mkdir()
        self.root = self.base / "root"
        self.nspawn_log = self.tmp / "nspawn.log"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             "echo ready; exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_die_with_parent(signal.SIGKILL))
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().decode().strip()
        if line != "ready":
            err = self.holder.stderr.read().decode(errors="replace") if self.holder.stderr else ""
            raise ContainerError(f"unshare --mount failed: {line!r} {err.strip()}")
        self._check_holder()
        items = [f"o:{p}" for p in self.overlay_dirs] + [f"b:{p}" for p in self.ro_binds]
        self._in_ns(["sh", "-c", _SETUP, "setup", str(self.base), *items], "mounting the overlay root")
        self._in_ns(["sh", "-c", _PREPARE, "prepare", str(self.root), *self.masked_units],
                    "preparing the overlay root", env={**self.env, "MACHINE_ID": self.machine_id})

    def _check_holder(self) -> None:
        """The holder lives and its mount namespace is not ours: the one guard every mount relies on."""
        if self.holder is None or self.holder.poll() is not None:
            raise ContainerError("the mount namespace holder is gone")
        if _ns_inode(self.holder.pid, "mnt") == _ns_inode("self", "mnt"):
            raise ContainerError("the holder shares this process's mount namespace; refusing to mount")

    def _in_ns(self, argv: list[str], what: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``argv`` in the holder's mount namespace (on the host side of the container)."""
        self._check_holder()
        assert self.holder is not None
        r = subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "--", *argv], capture_output=True,
                           text=True, timeout=timeout, env=env or self.env, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise ContainerError(f"{what} failed (status {r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def prove_isolation(self) -> str:
        """Write a file through the overlay root and show that the host sees it nowhere; check that
        the root is an overlay whose upper directory is on a tmpfs of the private namespace.
        Returns a one-line account of what was checked."""
        assert self.root is not None and self.base is not None and self.holder is not None
        probe = f"qemud-isolation-probe-{uuid.uuid4().hex}"
        self._in_ns(["sh", "-c", f'echo {probe} > "$1/tmp/{probe}" && echo {probe} > "$1/{probe}"',
                     "probe", str(self.root)], "writing the isolation probe")
        seen = self._in_ns(["cat", f"{self.root}/tmp/{probe}"], "reading the isolation probe back").stdout
        if seen.strip() != probe:
            raise ContainerError(f"the isolation probe reads back as {seen!r}")
        leaks = [p for p in (Path("/tmp") / probe, Path("/") / probe, self.root / "tmp" / probe,
                             self.root / probe) if p.exists()]
        if leaks:
            raise ContainerError(f"NOT ISOLATED: the probe written into the overlay is visible on the host "
                                 f"as {', '.join(map(str, leaks))}; refusing to boot")
        mounts = self._in_ns(["findmnt", "-n", "-o", "TARGET,FSTYPE,OPTIONS", "--raw"],
                             "listing the namespace's mounts").stdout
        table = {parts[0]: parts[1:] for parts in (ln.split(" ") for ln in mounts.splitlines()) if len(parts) >= 3}
        root_mount = table.get(str(self.root))
        base_mount = table.get(str(self.base))
        if (root_mount is None or root_mount[0] != "overlay" or f"upperdir={self.base}/upper" not in root_mount[1]
                or base_mount is None or base_mount[0] != "tmpfs"):
            raise ContainerError(f"NOT ISOLATED: {self.root} is {root_mount}, {self.base} is {base_mount} "
                                 "(expected an overlay with its upper directory on a tmpfs); refusing to boot")
        host_mounts = Path("/proc/self/mountinfo").read_text()
        if str(self.base) in host_mounts:
            raise ContainerError(f"NOT ISOLATED: {self.base} is mounted in the host's namespace; refusing to boot")
        self.isolated = True
        return (f"probe {probe} written through the overlay: readable inside, absent from the host's /, /tmp "
                f"and {self.root}; root is an overlay (upper on a tmpfs) in mount namespace "
                f"{_ns_inode(self.holder.pid, 'mnt')} (the tests' is {_ns_inode('self', 'mnt')})")

    # ---- boot -----------------------------------------------------------------------------
    def boot(self, timeout: float = 60.0) -> str:
        """Boot systemd; return once ``systemctl is-system-running --wait`` says running or
        degraded (the state is returned)."""
        if not self.isolated:
            raise ContainerError("refusing to boot before prove_isolation() passed")
        assert self.holder is not None and self.root is not None and self.nspawn_log is not None
        self._check_holder()
        t0 = time.monotonic()
        systemd_host = Path("/run/systemd/system").is_dir()  # PID 1 is systemd: it does the cgroups
        argv = [NSPAWN, "-D", str(self.root), "--register=no", "--private-network", "--link-journal=no",
                f"--machine={self.name}", "--hostname=qemud-e2e", "-b"]
        script = 'exec "$@"'
        env = dict(self.env)
        if not systemd_host:
            _remove_stale_cgroups()
            cg = _unified_cgroup_base() / self.name
            try:
                cg.mkdir()
            except OSError as exc:
                raise ContainerError(f"creating the container's cgroup {cg}: {exc}") from exc
            self.cgroups.append(cg)
            argv.insert(-1, "--keep-unit")
            script = 'echo $$ > "$CGROUP_PROCS" && exec "$@"'
            env.update(CGROUP_PROCS=str(cg / "cgroup.procs"), SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        with open(self.nspawn_log, "wb") as log:
            self.nspawn = subprocess.Popen(
                ["nsenter", "-t", str(self.holder.pid), "-m", "--", "sh", "-c", script, "nspawn", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGTERM))  # nspawn powers the container off on SIGTERM
        # its child, in a pid namespace of its own, is the container's systemd
        deadline = time.monotonic() + 30
        while self.pid1 is None:
            if self.nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with status {self.nspawn.returncode}:\n"
                                     f"{self.nspawn_output()}")
            if time.monotonic() > deadline:
                raise ContainerError(f"systemd-nspawn started no init within 30 s:\n{self.nspawn_output()}")
            for kid in _children(self.nspawn.pid):
                try:
                    if (_ns_inode(kid, "pid") != _ns_inode("self", "pid")
                            and Path(f"/proc/{kid}/comm").read_text().strip() == "systemd"):
                        self.pid1, self.pidns = kid, _ns_inode(kid, "pid")
                except OSError:
                    continue
            time.sleep(0.02)
        state = ""
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ContainerError(f"the container's systemd did not finish booting within {timeout:.0f} s "
                                     f"(last state {state!r}):\n{self._boot_diagnostics()}")
            try:
                r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
                state = r.stdout.strip()
            except subprocess.TimeoutExpired:
                continue
            if state in ("running", "degraded"):
                break
            # "offline": systemctl cannot reach systemd yet (it is still starting up)
            if state in ("maintenance", "stopping") or self.nspawn.poll() is not None:
                raise ContainerError(f"the container's systemd is {state!r}:\n{self._boot_diagnostics()}")
            time.sleep(0.1)  # before systemd listens, systemctl fails at once
        self.boot_seconds = time.monotonic() - t0
        return state

    def _boot_diagnostics(self) -> str:
        parts = [f"nspawn output:\n{self.nspawn_output()}"]
        if self.pid1 is not None:
            for argv in (["systemctl", "--failed", "--no-legend"], ["systemctl", "list-jobs", "--no-legend"]):
                try:
                    r = self.run(argv, check=False, timeout=10)
                    parts.append(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}")
                except (subprocess.SubprocessError, ContainerError):
                    pass
        return "\n".join(parts)

    def nspawn_output(self, lines: int = 40) -> str:
        try:
            return _tail(self.nspawn_log.read_bytes(), lines) if self.nspawn_log else ""
        except OSError:
            return ""

    # ---- driving --------------------------------------------------------------------------
    def command(self, argv: Sequence[str], *, host_network: bool = False) -> list[str]:
        """``argv`` as run inside the container by :meth:`run`."""
        if self.pid1 is None:
            raise ContainerError("the container is not booted")
        ns = ["-m", "-u", "-i", "-p", "-C"] if host_network else ["-m", "-u", "-i", "-n", "-p", "-C"]
        return ["nsenter", "-t", str(self.pid1), *ns, "--", *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, input: str | None = None,
            host_network: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (its namespaces and root, as root). ``check``: a
        non-zero status raises :class:`ContainerError` with the output. ``host_network``: in the
        host's network namespace (for the package index)."""
        r = subprocess.run(self.command(argv, host_network=host_network), capture_output=True, text=True,
                           timeout=timeout, input=input, env=self.env,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise ContainerError(f"in the container: {shlex.join(argv)} exited with status {r.returncode}:\n"
                                 f"{_tail(r.stdout)}\n{_tail(r.stderr)}")
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p PROP... UNIT`` as a dict."""
        r = self.systemctl("show", *(f"--property={p}" for p in props), unit)
        return dict(line.partition("=")[::2] for line in r.stdout.splitlines() if "=" in line)

    def is_active(self, unit: str) -> str:
        return self.systemctl("is-active", unit, check=False).stdout.strip()

    def wait_active(self, unit: str, want: str = "active", timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.is_active(unit)
            if state == want:
                return state
            if time.monotonic() > deadline:
                raise ContainerError(f"{unit} is {state!r}, not {want!r}, after {timeout} s:\n"
                                     + self.systemctl("status", unit, check=False).stdout)
            time.sleep(0.1)

    def journal(self, *matches: str, args: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The entries of this boot matching ``matches`` (``FIELD=value``, ``-u UNIT``, ...) as
        dicts (``journalctl -o json``); binary field values become text."""
        r = self.run(["journalctl", "--no-pager", "-b", "-o", "json", *args, *matches], check=False)
        if r.returncode not in (0, 1):
            raise ContainerError(f"journalctl failed: {r.stderr}")
        entries = []
        for line in r.stdout.splitlines():
            if not line.strip():
                continue
            e = json.loads(line)
            for k, v in e.items():
                if isinstance(v, list) and all(isinstance(x, int) for x in v):
                    e[k] = bytes(v).decode(errors="replace")
            entries.append(e)
        return entries

    def wait_journal(self, *matches: str, where: Callable[[dict[str, Any]], bool] | None = None,
                     timeout: float = 30, what: str = "") -> list[dict[str, Any]]:
        """The matching entries (``where``: a further filter), once there is at least one."""
        deadline = time.monotonic() + timeout
        while True:
            entries = [e for e in self.journal(*matches) if where is None or where(e)]
            if entries:
                return entries
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"no journal entry {what or ' '.join(matches)} within {timeout} s; the journal's last lines:\n"
                    + self.run(["journalctl", "--no-pager", "-b", "-n", "40", "-o", "short-monotonic"],
                               check=False).stdout)
            time.sleep(0.1)

    def write_file(self, path: str, text: str) -> None:
        """Write ``path`` inside the container the way an editor saves: a dotfile next to it,
        renamed into place."""
        tmp = str(Path(path).with_name(f".{Path(path).name}.tmp"))
        self.run(["sh", "-c", 'cat > "$1" && mv -f "$1" "$2"', "write", tmp, path], input=text)

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def pid_alive(self, pid: int) -> bool:
        """Whether ``pid`` (in the container's pid namespace) exists and is not a zombie."""
        r = self.run(["cat", f"/proc/{pid}/stat"], check=False)
        if r.returncode != 0:
            return False
        return r.stdout.rpartition(")")[2].split()[0] not in ("Z", "X")

    def host_processes(self) -> list[int]:
        """Host pids of every process left in the container's pid namespace."""
        if self.pidns is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if _ns_inode(entry, "pid") == self.pidns:
                        pids.append(int(entry))
                except OSError:
                    continue
        return pids

    # ---- teardown -------------------------------------------------------------------------
    def close(self, check: bool = True) -> None:
        """Power off (or kill) the container, drop the namespace, remove the cgroup; with
        ``check``, raise if anything is left."""
        problems: list[str] = []
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.pid1 is not None:
                try:
                    self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=15)
                except (subprocess.SubprocessError, ContainerError, OSError):
                    pass
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append("the container did not power off within 30 s; killed")
                for pid in ([self.pid1] if self.pid1 else []) + [self.nspawn.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    self.nspawn.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    problems.append(f"systemd-nspawn (pid {self.nspawn.pid}) survived SIGKILL")
        left: list[int] = []
        deadline = time.monotonic() + 10
        while self.pidns is not None:
            left = self.host_processes()
            if not left or time.monotonic() > deadline:
                break
            for pid in left:  # nothing of the container outlives it
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if left:
            problems.append(f"processes of the container's pid namespace still run: {left}")
        if self.holder is not None:
            if self.holder.poll() is None:
                os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait()
            for f in (self.holder.stdout, self.holder.stderr):
                if f is not None:
                    f.close()
        for cg in self.cgroups:
            problems += _remove_cgroup(cg.name)
        if self.base is not None and str(self.base) in Path("/proc/self/mountinfo").read_text():
            problems.append(f"{self.base} is mounted in the host's namespace")
        elif self.tmp is not None:
            # BASE was a mount point in the (now gone) namespace only: on the host it is empty
            try:
                if self.base is not None and self.base.exists():
                    self.base.rmdir()
                shutil.rmtree(self.tmp)
            except OSError as exc:
                problems.append(f"removing {self.tmp}: {exc}")
        self.pid1 = None
        if problems:
            if check:
                raise ContainerError("tearing the container down: " + "; ".join(problems))
            print("tearing the container down: " + "; ".join(problems), file=sys.stderr)

    def leftovers(self) -> list[str]:
        """After :meth:`close`: what is left of the container on the host (empty: nothing)."""
        out = []
        if self.host_processes():
            out.append(f"processes of the container's pid namespace: {self.host_processes()}")
        for proc in (self.holder, self.nspawn):
            if proc is not None and proc.poll() is None:
                out.append(f"{proc.args[0]} pid {proc.pid} still runs")
        for cg in self.cgroups:
            out += [f"cgroup {mp}/.../{cg.name}" for mp, _ in _cgroup_mounts() if list(mp.glob(f"**/{cg.name}"))]
        mountinfo = Path("/proc/self/mountinfo").read_text()
        if self.tmp is not None:
            if str(self.tmp) in mountinfo:
                out.append(f"a mount under {self.tmp} in the host's namespace")
            if self.tmp.exists():
                out.append(f"the directory {self.tmp}")
        return out

    def diagnostics(self) -> str:
        """What to show when a step failed: qemud's units and the journal's end."""
        if self.pid1 is None or self.nspawn is None or self.nspawn.poll() is not None:
            return f"(the container is down) nspawn output:\n{self.nspawn_output()}"
        out = []
        for argv in (["systemctl", "--no-pager", "status", "qemud", "qemud-guests"],
                     ["journalctl", "--no-pager", "-b", "-n", "60", "-o", "short-monotonic"]):
            try:
                r = self.run(argv, check=False, timeout=20)
                out.append(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}")
            except (subprocess.SubprocessError, ContainerError) as exc:
                out.append(f"$ {' '.join(argv)}: {exc}")
        return "\n".join(out)


def _remove_cgroup(name: str, timeout: float = 10) -> list[str]:
    """Remove the cgroup ``name`` (nspawn's payload/supervisor children too) from every hierarchy:
    nspawn mirrors it from the unified hierarchy into the name=systemd one on hybrid hosts."""
    own = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = line[3:]
    problems = []
    for mp, _ in _cgroup_mounts():
        top = mp / own.lstrip("/") / name
        if not top.is_dir():
            continue
        deadline = time.monotonic() + timeout
        while top.exists():
            try:
                dirs = [Path(d) for d, _, _ in os.walk(top)]
                for d in sorted(dirs, key=lambda p: -len(p.parts)):
                    d.rmdir()
            except OSError as exc:
                if time.monotonic() > deadline:
                    problems.append(f"cgroup {top} could not be removed: {exc}")
                    break
                time.sleep(0.1)
    return problems


def _remove_stale_cgroups(min_age: float = 600) -> None:
    """Remove the empty cgroups of earlier runs that were killed before their teardown (older than
    ``min_age`` seconds: a concurrent run's cgroup is never touched; a cgroup with processes cannot
    be removed anyway)."""
    base = _unified_cgroup_base()
    try:
        stale = [d for d in base.glob("qemud-e2e-*") if d.is_dir() and time.time() - d.stat().st_mtime > min_age]
    except OSError:
        return
    for d in stale:
        _remove_cgroup(d.name, timeout=0)
