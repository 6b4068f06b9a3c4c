"""qemud's own error types.

Every problem a user can cause (a bad file, an element qemud cannot realize, a host that lacks
what a guest needs) is reported as a :class:`Problem`: the file, an XPath-like location inside it,
a sentence, and a line number where one is known.  Code that handles user input raises
:class:`DomainError` (a list of problems) and nothing else; anything else escaping is a bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about a domain definition."""

    path: str  # XPath-like: /domain/devices/disk[2]/target/@bus ("" when about the whole file)
    message: str
    severity: Severity = "error"
    file: str | None = None
    line: int | None = None

    def format(self) -> str:
        """The one-line form used by ``qemuctl validate`` and the journal."""
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        loc = f" {self.path}:" if self.path else ""
        tag = "warning: " if self.severity == "warning" else ""
        return f"{where}:{loc} {tag}{self.message}"

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


class HostError(QemudError):
    """The host cannot do what was asked (QEMU missing, probing failed, ...)."""
