"""qemud's own error types.

Every problem a user can cause (a bad file, an element qemud cannot realize, a host that lacks
what a guest needs) is reported as a :class:`Problem`: the file, an XPath-like location inside it,
a sentence, and a line number where one is known.  Code that handles user input raises
:class:`DomainError` (a list of problems) and nothing else; anything else escaping is a bug.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

Severity = Literal["error", "warning"]

#: what may not appear raw in a one-line message: C0/C1 controls (a newline would start a forged
#: log line), DEL, the Unicode line separators, and lone surrogates (a file name that is not
#: UTF-8, read with surrogateescape, cannot be written to a UTF-8 stream or the journal)
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if "\ud800" <= c <= "\udfff":  # surrogateescape's stand-in for the byte 0x80..0xff
        return f"\\x{ord(c) & 0xff:02x}"
    return c.encode("unicode_escape").decode("ascii")


def printable(text: str) -> str:
    """``text`` on one line, whatever it holds: unprintable characters as Python escapes
    (a byte of a file name that is not UTF-8 as \\xNN)."""
    return _UNPRINTABLE.sub(_escape, text)


def utf8_safe(text: str) -> str:
    """``text`` encodable as UTF-8 (lone surrogates as \\xNN), other characters kept as they are."""
    return _SURROGATE.sub(_escape, text)


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about a domain definition."""

    path: str  # XPath-like: /domain/devices/disk[2]/target/@bus ("" when about the whole file)
    message: str
    severity: Severity = "error"
    file: str | None = None
    line: int | None = None

    def format(self) -> str:
        """The one-line form used by ``qemuctl validate`` and the journal (file names and values
        quoted from the file are made printable: a newline in them must not start a new line)."""
        where = printable(self.file) if self.file else "<input>"
        if self.line is not None:
            where += f":{self.line}"
        loc = f" {self.path}:" if self.path else ""
        tag = "warning: " if self.severity == "warning" else ""
        return f"{where}:{printable(loc)} {tag}{printable(self.message)}"

    def with_file(self, file: str | None, line: int | None = None) -> Problem:
        return replace(self, file=file if self.file is None else self.file,
                       line=line if self.line is None else self.line)


class QemudError(Exception):
    """Base of every error qemud raises on purpose."""


@dataclass
class DomainError(QemudError):
    """A domain definition cannot be accepted (or realized on this host)."""

    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(p.format() for p in self.problems)

    @classmethod
    def at(cls, path: str, message: str) -> DomainError:
        return cls([Problem(path, message)])

    def with_file(self, file: str | None, lines: dict[str, int] | None = None) -> DomainError:
        def line_of(path: str) -> int | None:
            if not lines:
                return None
            # the element itself, or the nearest enclosing element that has a known line
            p = path.replace("[1]", "")
            while p:
                if p in lines:
                    return lines[p]
                p = p.rsplit("/", 1)[0]
            return None

        return DomainError([p.with_file(file, line_of(p.path)) for p in self.problems])


#: problems logged for one file at most: a file with 40,000 bad devices must not flood the journal
MAX_REPORTED = 20


def report_lines(error: DomainError, limit: int = MAX_REPORTED) -> list[str]:
    """The one-line forms of ``error``'s problems to log: the first ``limit``, then how many more."""
    problems = error.problems
    lines = [p.format() for p in problems[:limit]]
    if len(problems) > limit:
        first = problems[0]
        where = printable(first.file) if first.file else "<input>"
        lines.append(f"{where}: {len(problems) - limit} more problems (qemuctl validate lists them all)")
    return lines


class HostError(QemudError):
    """The host cannot do what was asked (QEMU missing, probing failed, ...)."""
