"""Side effects of starting a guest that the pure translator leaves to its caller."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from qemud.argv import Command, Prepare
from qemud.errors import HostError
from qemud.paths import GuestPaths

#: the folder of a guest's runtime directory that holds its transient disks' overlays
TRANSIENT_DIR = "transient"


def prepare(cmd: Command) -> None:
    """Create the guest's runtime directory, copy NVRAM templates that have no copy yet, check
    that secret files are there and make transient disks' overlays.

    An existing NVRAM file is never overwritten: it holds the guest's firmware variables.
    """
    for step in cmd.prepare:
        try:
            if step.kind == "dir":
                step.dest.mkdir(parents=True, exist_ok=True, mode=0o700)
            elif step.kind == "copy":
                if step.dest.exists():
                    continue
                if step.source is None or not step.source.is_file():
                    raise HostError(f"NVRAM template {step.source} does not exist")
                step.dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = step.dest.with_name(f".{step.dest.name}.tmp{os.getpid()}")
                shutil.copyfile(step.source, tmp)
                os.chmod(tmp, 0o600)
                os.replace(tmp, step.dest)
            elif step.kind == "secret":
                from qemud.secrets import check_secret_file
                why = check_secret_file(step.dest, step.element or "secret")
                if why:
                    raise HostError(why)
            elif step.kind == "overlay":
                _overlay(step.dest, step.source, step.fmt or "raw", step.helper or "qemu-img", step.element)
            elif step.kind == "write":
                step.dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = step.dest.with_name(f".{step.dest.name}.tmp{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(step.content or "")
                os.replace(tmp, step.dest)
            elif step.kind == "run":
                _run(step)
        except OSError as exc:
            raise HostError(f"cannot prepare {step.dest}: {exc.strerror or exc}") from exc


def _overlay(dest: Path, base: Path | None, fmt: str, helper: str, element: str) -> None:
    """A fresh qcow2 overlay over ``base`` (a transient disk): any left from an earlier run is
    discarded first, as the guest's writes of that run were meant to vanish."""
    if base is None or not base.exists():
        raise HostError(f"{element}: the image {base} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if dest.exists():
        # a QEMU still writing to it (the guest runs, and this is `qemuctl argv` or a second
        # start): leave it alone; QEMU's image lock tells
        r = subprocess.run([helper, "info", str(dest)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        if "lock" in r.stderr:
            raise HostError(f"{element}: the overlay {dest} is in use by a running QEMU; it is not replaced")
    dest.unlink(missing_ok=True)
    r = subprocess.run([helper, "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base.resolve()), str(dest)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise HostError(f"{element}: cannot create the overlay {dest}: {r.stderr.strip()}")
    os.chmod(dest, 0o600)


def discard(paths: GuestPaths) -> None:
    """After QEMU ended: drop what lived only for that run (transient disks' overlays)."""
    shutil.rmtree(paths.run / TRANSIENT_DIR, ignore_errors=True)


#: how long a preparing program (swtpm_setup) may take
RUN_TIMEOUT = 60.0


def _run(step: Prepare) -> None:
    """A program that makes ``step.dest`` once (swtpm_setup: a TPM's state): skipped when it is
    there, so what the guest keeps (its TPM's keys) is never made anew."""
    if step.dest.exists() or not step.argv:
        return
    try:
        r = subprocess.run(step.argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{step.argv[0]} did not finish within {RUN_TIMEOUT:g} s") from exc
    if r.returncode != 0 or not step.dest.exists():
        out = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
        raise HostError(f"{step.argv[0]} failed (status {r.returncode}) making {step.dest}"
                        + (f": {out[-1]}" if out else ""))
