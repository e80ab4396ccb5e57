"""Reporting events that may come by the thousand (broken frames, refused requests) at a bounded
rate: the first ones of a quiet interval at once, everything after them as one summary when
the interval ends.

At 115200 baud garbage arrives about forty times faster than error answers can leave, and a
WARNING line per broken frame buries the log: a flood must cost a few lines and a few answers
per interval, never one per event. Nothing is lost: the summary says how many and of what kind.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

DEFAULT_INTERVAL = 1.0  # seconds

Report = Callable[[Counter[str]], None]


class Coalescer:
    """Counts events by kind; `report` runs at once for the first `burst` events of an interval
    and once at the interval's end for whatever came after them (with the counts by kind)."""

    def __init__(self, report: Report, interval: float = DEFAULT_INTERVAL, burst: int = 1):
        self._report = report
        self.interval = interval
        self.burst = burst
        self._sent = 0  # reports made at once in the current interval
        self._pending: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None
        self.events = 0
        self.reports = 0

    def note(self, kind: str) -> None:
        """One event of `kind`; never blocks, never raises."""
        self.events += 1
        if self._timer is None:
            self._sent = 0
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)
        if self._sent < self.burst:
            self._sent += 1
            self._emit(Counter({kind: 1}))
        else:
            self._pending[kind] += 1

    def _tick(self) -> None:
        """The end of an interval: the summary, and a new interval only if there was one."""
        self._timer = None
        if self._pending:
            pending, self._pending = self._pending, Counter()
            self._sent = self.burst  # the summary counts as this interval's report
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)
            self._emit(pending)

    def _emit(self, counts: Counter[str]) -> None:
        self.reports += 1
        self._report(counts)

    def cancel(self) -> None:
        """Forget what is pending and stop the timer (the owner is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()

    def flush(self) -> None:
        """Report what is pending now (the process is stopping) and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            pending, self._pending = self._pending, Counter()
            self._emit(pending)


def describe(counts: Counter[str]) -> str:
    """`3 bad_crc, 1 bad_frame`: most frequent first."""
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
