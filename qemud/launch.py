"""Side effects of starting a guest that the pure translator leaves to its caller."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from qemud import runas as runas_mod
from qemud.argv import Command, Prepare
from qemud.errors import HostError
from qemud.paths import GuestPaths
from qemud.runas import RunAs

#: the folder of a guest's runtime directory that holds its transient disks' overlays
TRANSIENT_DIR = "transient"


def prepare(cmd: Command, runas: RunAs | None = None) -> None:
    """Create the guest's runtime directory, copy NVRAM templates that have no copy yet, copy the
    secrets QEMU reads, make transient disks' overlays and a TPM's state.

    With ``runas`` (qemud is root; QEMU runs as that user, qemud.runas) what QEMU writes or reads
    is handed to that user, and what root does in a directory QEMU can write to never follows a
    symlink. An existing NVRAM file is never overwritten: it holds the guest's firmware variables.
    """
    for step in cmd.prepare:
        try:
            if step.kind == "rundir":
                runas_mod.guest_dir(step.dest, runas)
                runas_mod.passage(step.dest.parent, runas)
            elif step.kind == "dir":
                step.dest.mkdir(parents=True, exist_ok=True, mode=0o700)
            elif step.kind == "qemudir":
                runas_mod.qemu_dir(step.dest, runas)
                runas_mod.passage(step.dest.parent, runas)
            elif step.kind == "copy":
                _parent(step.dest, runas)
                if not step.dest.exists():
                    if step.source is None or not step.source.is_file():
                        raise HostError(f"NVRAM template {step.source} does not exist")
                    runas_mod.write_file(step.dest, step.source.read_bytes(), runas)
                else:
                    runas_mod.give(step.dest, runas)  # kept from a run as root: QEMU's user takes it over
            elif step.kind == "secret":
                from qemud.secrets import check_secret_file
                source = step.source or step.dest
                why = check_secret_file(source, step.element or "secret")
                if why:
                    raise HostError(why)
                if source != step.dest:
                    runas_mod.write_file(step.dest, source.read_bytes(), runas, mode=0o400)
            elif step.kind == "overlay":
                _overlay(step.dest, step.source, step.fmt or "raw", step.helper or "qemu-img", step.element, runas)
            elif step.kind == "write":
                _parent(step.dest, runas)
                runas_mod.write_file(step.dest, (step.content or "").encode(), runas)
            elif step.kind == "run":
                _run(step, runas)
        except OSError as exc:
            raise HostError(f"cannot prepare {step.dest}: {exc.strerror or exc}") from exc


def forget_secrets(cmd: Command) -> None:
    """Remove the copies of secrets QEMU and its helpers have read by now (they read them once,
    at their start): a secret rests in the runtime directory only while a guest starts."""
    for step in cmd.prepare:
        if step.kind == "secret" and step.source is not None and step.source != step.dest:
            try:
                os.unlink(step.dest)
            except OSError:
                pass


def _parent(dest: Path, runas: RunAs | None) -> None:
    """The directory of a file qemud makes for QEMU: created (root's, 0700) and passable by QEMU's
    user."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    runas_mod.passage(dest.parent, runas)


def _overlay(dest: Path, base: Path | None, fmt: str, helper: str, element: str,
             runas: RunAs | None = None) -> None:
    """A fresh qcow2 overlay over ``base`` (a transient disk): any left from an earlier run is
    discarded first, as the guest's writes of that run were meant to vanish."""
    if base is None or not base.exists():
        raise HostError(f"{element}: the image {base} does not exist")
    runas_mod.guest_dir(dest.parent, runas, 0o750)  # not a symlink QEMU planted; QEMU may enter
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
    runas_mod.give(dest, runas)


def discard(paths: GuestPaths) -> None:
    """After QEMU ended: drop what lived only for that run (transient disks' overlays)."""
    shutil.rmtree(paths.run / TRANSIENT_DIR, ignore_errors=True)


#: how long a preparing program (swtpm_setup) may take
RUN_TIMEOUT = 60.0


def _run(step: Prepare, runas: RunAs | None = None) -> None:
    """A program that makes ``step.dest`` once (swtpm_setup: a TPM's state): skipped when it is
    there, so what the guest keeps (its TPM's keys) is never made anew. It runs as QEMU's user."""
    if step.dest.exists() or not step.argv:
        return
    argv = step.argv if runas is None else [*runas.argv_prefix(), *step.argv]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{step.argv[0]} did not finish within {RUN_TIMEOUT:g} s") from exc
    if r.returncode != 0 or not step.dest.exists():
        out = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
        raise HostError(f"{step.argv[0]} failed (status {r.returncode}) making {step.dest}"
                        + (f": {out[-1]}" if out else ""))
