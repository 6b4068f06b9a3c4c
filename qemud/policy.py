"""The restart policy: when a dead QEMU is started again. Pure: time comes in as numbers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    #: always: whenever QEMU ends unasked; on-failure: same, but a guest poweroff is never
    #: restarted (on_poweroff decides that anyway); never: a dead QEMU stays crashed.
    mode: str = "always"
    max_retries: int = 5  # failed starts in a row before `failed`
    backoff: float = 1.0  # first delay after the immediate restart
    max_backoff: float = 60.0
    reset_after: float = 60.0  # a guest that ran this long starts counting afresh


@dataclass
class Backoff:
    """Counts failed starts in a row and says what to do after each death.

    ``died(now, started_at)`` returns the delay before the next start, or None for "give up"
    (-> failed). The first restart is immediate, then ``backoff`` doubling up to ``max_backoff``;
    a run longer than ``reset_after`` resets the count.
    """

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    failures: int = 0

    def died(self, now: float, started_at: float | None) -> float | None:
        if self.policy.mode == "never":
            return None
        if started_at is not None and now - started_at >= self.policy.reset_after:
            self.failures = 0
        self.failures += 1
        if self.failures >= self.policy.max_retries:
            return None
        if self.failures == 1:
            return 0.0
        return min(self.policy.backoff * 2 ** (self.failures - 2), self.policy.max_backoff)

    def reset(self) -> None:
        self.failures = 0
