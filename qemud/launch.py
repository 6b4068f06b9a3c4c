"""Side effects of starting a guest that the pure translator leaves to its caller."""

from __future__ import annotations

import os
import shutil
import subprocess

from qemud.argv import Command, Prepare
from qemud.errors import HostError


def prepare(cmd: Command) -> None:
    """Create the guest's runtime directory and copy NVRAM templates that have no copy yet.

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
