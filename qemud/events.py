"""What happened, told once: every event is a sentence for a person plus structured fields.

Sinks: readable lines on stderr (``MESSAGE  KEY=value ...``). The journal sink comes with the
journald work; the fields are already the journal's (QEMUD_DOMAIN, QEMUD_EVENT, ...).
"""

from __future__ import annotations

import shlex
import sys
import syslog
import time
from typing import Any, TextIO

# syslog priorities, as journald takes them
ERR, WARNING, NOTICE, INFO, DEBUG = syslog.LOG_ERR, syslog.LOG_WARNING, syslog.LOG_NOTICE, syslog.LOG_INFO, syslog.LOG_DEBUG


class EventLog:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def emit(self, event: str, message: str, priority: int = INFO, **fields: Any) -> None:
        """One event: ``event`` is the QEMUD_EVENT name, fields become QEMUD_<NAME>."""
        parts = [f"QEMUD_EVENT={event}"]
        for k, v in fields.items():
            if v is None:
                continue
            parts.append(f"QEMUD_{k.upper()}={shlex.quote(str(v))}")
        stamp = time.strftime("%H:%M:%S")
        message = message.replace("\n", "\\n")
        try:
            self.stream.write(f"{stamp} {_PRIO.get(priority, '')}{message}  {' '.join(parts)}\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never stop the supervisor


_PRIO = {ERR: "error: ", WARNING: "warning: "}
