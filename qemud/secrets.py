"""Secrets (LUKS passphrases, iSCSI passwords, Ceph keys) without libvirt's secret driver.

libvirt keeps secrets in its daemon (``virsh secret-define`` / ``secret-set-value``) and passes
them to QEMU encrypted with a per-guest master key.  qemud keeps each secret in a file of a
root-only directory (default ``/etc/qemud/secrets/``; ``[secrets] dir`` in qemud.conf) and lets
QEMU read the file itself (``-object secret,file=...,format=raw``): the value never passes through
qemud, its argv or its logs.

A ``<secret>`` reference names its file:

* ``uuid='0a81f5b2-...'``  ->  ``DIR/0a81f5b2-...`` (the UUID in lower case);
* ``usage='/storage/disk1'`` -> ``DIR/`` + the usage percent-encoded into one file name
  (``%2Fstorage%2Fdisk1``), so any usage string (paths, spaces) maps to exactly one file.

The file holds the secret's value as is (a passphrase, or a Ceph key in its base64 text form).
This module is pure: it names files; the launcher checks they exist (:func:`check_secret_file`).
"""

from __future__ import annotations

import os
import stat
import uuid as uuidlib
from pathlib import Path
from urllib.parse import quote

ROOT_SECRETS_DIR = Path("/etc/qemud/secrets")


def default_secrets_dir() -> Path:
    """/etc/qemud/secrets for root, ~/.config/qemud/secrets for a user's qemud."""
    if os.geteuid() == 0:
        return ROOT_SECRETS_DIR
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "qemud" / "secrets"


def secret_file_name(uuid: str | None, usage: str | None) -> str | None:
    """The file name for a secret reference, or None when it names neither (or a bad UUID)."""
    if uuid:
        try:
            return str(uuidlib.UUID(uuid.strip()))
        except ValueError:
            return None
    if usage:
        name = quote(usage, safe="")
        if name in (".", ".."):
            name = name.replace(".", "%2E")
        return name
    return None


def usage_file_name(usage: str) -> str:
    """``secret_file_name`` for a usage name (for tools that create the files)."""
    return secret_file_name(None, usage) or ""


def check_secret_file(path: Path, element: str) -> str | None:
    """Why ``path`` cannot serve as the secret of ``element``, or None when it can.

    The file must exist, be a regular file and be readable by its owner only: a secret others
    can read is no secret (the same rule ssh applies to private keys)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (f"{element}: the secret file {path} does not exist; create it (mode 0600) holding "
                "the secret's value")
    except OSError as exc:
        return f"{element}: cannot read the secret file {path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{element}: the secret file {path} is not a regular file"
    try:
        dst = os.stat(path.parent)
    except OSError as exc:
        return f"{element}: cannot read the secrets directory {path.parent}: {exc.strerror}"
    if dst.st_mode & 0o022:
        return (f"{element}: the secrets directory {path.parent} can be written by other users "
                f"(mode {stat.S_IMODE(dst.st_mode):04o}), who could swap the secret; chmod 700 it")
    if st.st_mode & 0o077:
        return (f"{element}: the secret file {path} can be read or written by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    return None


__all__ = ["default_secrets_dir", "secret_file_name", "usage_file_name", "check_secret_file",
           "ROOT_SECRETS_DIR"]
