"""Side effects of starting a guest that the pure translator leaves to its caller."""

from __future__ import annotations

import os
import shutil

from qemud.argv import Command
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
        except OSError as exc:
            raise HostError(f"cannot prepare {step.dest}: {exc.strerror or exc}") from exc
