"""The unprivileged user QEMU runs as, and root's careful handling of the files it shares with it.

When qemud runs as root, QEMU (and the helpers that need no privilege: swtpm, passt, dbus-daemon)
runs as ``[qemu] user`` of qemud.conf, by default the ``qemud`` system user that the package's
sysusers.d entry creates (a member of ``kvm``). Never as root: a guest that escapes into its
QEMU gets that user, not the host. An unprivileged qemud runs QEMU as itself; nothing here
applies then (:func:`resolve` gives None).

What that user may touch, as libvirt's DAC driver arranges it for its ``qemu`` user:

* the guest's runtime directory (``/run/qemud/domains/NAME``) is root's, group the QEMU user's
  group, mode ``01770``: QEMU creates its pid file and its sockets there; the sticky bit keeps it
  from renaming or removing what root put there (the record, the QMP socket, the logs);
* files qemud makes for the guest (NVRAM copies, transient overlays, secret copies, a TPM's
  state) are handed to that user;
* files the domain XML names (images, kernels, ISOs, firmware) are the administrator's: qemud
  does not change their owner (libvirt's ``dynamic_ownership`` does; qemud never changes files it
  does not own). QEMU's "Permission denied" is reported naming the element, with what to run.

Root reads and writes in a directory that a QEMU can write to, so every such operation here
refuses to follow symlinks and checks file types: a compromised QEMU that plants a symlink
(``qemu.log`` -> ``/etc/shadow``) or a FIFO gets an error, never root's hand.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from qemud.errors import HostError, QemudError

SETPRIV = "/usr/bin/setpriv"
#: the system user the package's sysusers.d entry creates for QEMU
DEFAULT_USER = "qemud"
#: a guest's runtime directory: root's, QEMU's group may create entries (sticky: not remove root's)
GUEST_RUN_MODE = 0o1770


@dataclass(frozen=True)
class RunAs:
    """Who QEMU runs as: user and group ids and the user's supplementary groups (``kvm``)."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def describe(self) -> str:
        return f"user {self.user} (uid {self.uid})"

    def argv_prefix(self) -> list[str]:
        """What runs a command as this user: util-linux's setpriv (Debian: essential) sets the
        ids and groups and execs the command in the same pid (so its command line, start time and
        pidfd are the command's). A caller's Popen can then vfork; Popen(user=...) must fork,
        copying the daemon's page tables: 5.7 ms against 1.6 ms per QEMU start."""
        groups = f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups"
        return [SETPRIV, f"--reuid={self.uid}", f"--regid={self.gid}", groups, "--"]


def resolve(user: str | None, group: str | None) -> RunAs | None:
    """The user QEMU runs as, from qemud.conf's ``[qemu] user``/``group``; None when qemud is not
    root (QEMU then runs as qemud's own user). Raises QemudError for a user that does not exist
    or is root."""
    if os.geteuid() != 0:
        return None
    name = user or DEFAULT_USER
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        hint = (" (the package's sysusers.d entry creates it: systemd-sysusers qemud.conf, or "
                "`make deps` in a checkout)" if name == DEFAULT_USER else "")
        raise QemudError(f"[qemu] user '{name}' does not exist{hint}; QEMU runs as that user, never "
                         "as root") from None
    if pw.pw_uid == 0:
        raise QemudError(f"[qemu] user '{name}' is root: QEMU never runs as root; name an "
                         "unprivileged user (the default is 'qemud')")
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise QemudError(f"[qemu] group '{group}' does not exist") from None
        if gid == 0:
            raise QemudError(f"[qemu] group '{group}' is root's group: QEMU never runs with it")
    groups = tuple(g for g in os.getgrouplist(pw.pw_name, gid) if g != 0)
    return RunAs(pw.pw_name, pw.pw_uid, gid, groups)


def memlock_ceiling() -> int | None:
    """The most memory an unprivileged QEMU started by qemud can lock: qemud raises the child's
    RLIMIT_MEMLOCK up to its own hard limit, or beyond with CAP_SYS_RESOURCE. None: unlimited."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    if hard == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as fh:
            eff = int(next(ln for ln in fh if ln.startswith("CapEff:")).split()[1], 16)
    except (OSError, StopIteration, ValueError):
        return hard
    CAP_SYS_RESOURCE = 24
    return None if eff >> CAP_SYS_RESOURCE & 1 else hard


# ---- root's operations in directories a QEMU can write ------------------------------------------

def guest_dir(path: Path, runas: RunAs | None, mode: int = GUEST_RUN_MODE) -> None:
    """Make (or take back) a guest's runtime directory: root's, the QEMU user's group, ``mode``.
    Its parents must let QEMU through (search only)."""
    _real_dir(path, 0o700)
    if runas is None:
        return
    os.chmod(path, mode)  # first the mode, then the owner: never chmod what QEMU could swap
    os.chown(path, 0, runas.gid, follow_symlinks=False)


def passage(path: Path, runas: RunAs | None) -> None:
    """Let the QEMU user search (not list) a directory on the way to its guest directories."""
    if runas is None:
        return
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o001:
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o111)


def unreachable(path: Path, runas: RunAs | None) -> str | None:
    """Why QEMU's user cannot reach ``path`` (a directory above it it may not search), or None.
    A directory with an ACL is taken as passable (the kernel decides; QEMU's error would tell)."""
    if runas is None:
        return None
    for d in [*reversed(path.absolute().parents), path.absolute()]:
        try:
            st = d.stat()
        except OSError:
            return None  # not there yet: qemud makes it, passable
        if st.st_uid == runas.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in runas.groups or st.st_gid == runas.gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok and not _has_acl(d) and d != path.absolute():
            return (f"QEMU runs as {runas.describe()}, which cannot reach {path}: {d} is mode "
                    f"{stat.S_IMODE(st.st_mode):04o}; choose a directory it can reach, or let it through "
                    f"with `setfacl -m u:{runas.user}:x {d}`")
    return None


def _has_acl(path: Path) -> bool:
    try:
        return "system.posix_acl_access" in os.listxattr(path)
    except OSError:
        return False


def qemu_dir(path: Path, runas: RunAs | None, mode: int = 0o700) -> None:
    """A directory the QEMU user owns (a TPM's state, which swtpm writes), its contents too: a
    state made while QEMU ran as root is handed over. Symlinks are neither followed nor chowned
    through."""
    _real_dir(path, mode)
    if runas is None:
        return
    for top, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(top, name), runas.uid, runas.gid, follow_symlinks=False)
    os.chmod(path, mode)
    os.chown(path, runas.uid, runas.gid, follow_symlinks=False)


def _real_dir(path: Path, mode: int) -> None:
    """``path`` as a real directory (created when missing, parents root's 0700): a symlink or
    another file in its place is an error, not something to follow."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            pass
        st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise HostError(f"{path} is not a directory (a symlink or a file is in its place); "
                        "remove it and start the guest again")


def give(path: Path, runas: RunAs | None, mode: int = 0o600, create: bool = False) -> None:
    """Hand a file qemud made for the guest (an NVRAM copy, an overlay, a secret's copy, a
    helper's log: created when ``create``) to the QEMU user. Opened without following symlinks,
    so only that very file changes owner."""
    fd = open_regular(path, os.O_RDONLY | (os.O_CREAT if create else 0), mode)
    try:
        os.fchmod(fd, mode)
        if runas is not None:
            os.fchown(fd, runas.uid, runas.gid)
    finally:
        os.close(fd)


def open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that neither follows a symlink nor blocks on a FIFO, and refuses anything but
    a regular file: what root uses in a directory a QEMU can write to."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        if not flags & (os.O_WRONLY | os.O_RDWR):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_new(path: Path, mode: int = 0o600) -> int:
    """A new file at ``path`` for root to write (a temporary name before an atomic rename):
    whatever is there (a planted symlink) is removed first, then the file is created exclusively."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_file(path: Path, data: bytes, runas: RunAs | None = None, mode: int = 0o600) -> None:
    """Write ``path`` atomically (a new temporary file renamed over it), owned by the QEMU user
    when ``runas`` is given."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = create_new(tmp, mode)
    try:
        os.write(fd, data)
        if runas is not None:
            os.fchown(fd, runas.uid, runas.gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def permission_hint(message: str, runas: RunAs | None) -> str:
    """QEMU's "Permission denied" (or "Operation not permitted") with what to do, when QEMU runs
    as another user than qemud."""
    if runas is None or not any(s in message for s in ("Permission denied", "Operation not permitted")):
        return message
    return (f"{message} (QEMU runs as {runas.describe()}: give it access to the file, e.g. "
            f"`setfacl -m u:{runas.user}:rw FILE` (r for a read-only one), plus search access "
            f"(`setfacl -m u:{runas.user}:x DIR`) on each directory above it, or `chown {runas.user}` it)")


__all__ = ["DEFAULT_USER", "RunAs", "resolve", "unreachable", "guest_dir", "passage", "qemu_dir", "give", "open_regular",
           "create_new", "write_file", "permission_hint"]
