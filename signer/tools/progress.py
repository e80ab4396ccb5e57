"""Progress of a long operation (backup, import, a full CRL transfer): a bar on a terminal, a
line every few seconds otherwise (a log file, the journal, a pipe).

One callable, `progress(done, total)`, so the parts that do the work (storage, the client
library) take a plain callback and never import this module. Without an output stream the lines
go to the log (a service's journal).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger("signer.progress")

BAR_WIDTH = 30
LINE_EVERY_S = 10.0  # a line this often when the output is not a terminal
BAR_EVERY_S = 0.2  # a terminal is redrawn at most this often


class Progress:
    """`progress(done, total)` as often as the worker likes; `finish()` once at the end.

    `out=None`: the lines go to the log at INFO (a service). Otherwise a terminal gets a bar
    redrawn in place and anything else a line every `every` seconds.
    """

    def __init__(
        self,
        what: str,
        unit: str = "",
        out: TextIO | None = sys.stderr,
        every: float = LINE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what = what
        self.unit = unit
        self.out = out
        self.bar = bool(out is not None and out.isatty())
        self.every = BAR_EVERY_S if self.bar else every
        self.clock = clock
        self.started = clock()
        self._shown_at: float | None = None
        self.done = 0
        self.total: int | None = None

    def __call__(self, done: int, total: int | None = None) -> None:
        now = self.clock()
        if done < self.done:  # the same Progress reused for the next operation
            self.started, self._shown_at = now, None
        self.done, self.total = done, total if total is not None else self.total
        if self._shown_at is None or now - self._shown_at >= self.every:
            self._shown_at = now
            self._show(final=False)

    def finish(self, text: str = "done") -> None:
        """The last line (also when nothing was shown yet: a line says the operation ran)."""
        self._show(final=True, text=text)

    def _show(self, final: bool, text: str = "") -> None:
        line = self.describe(text if final else "")
        if self.out is None:
            log.info("%s", line)
        elif self.bar:
            end = "\n" if final else ""
            self.out.write(f"\r\x1b[2K{line}{end}")
            self.out.flush()
        else:
            print(line, file=self.out, flush=True)

    def describe(self, text: str = "") -> str:
        """`what: [bar] 45% 450 of 1,000 unit, 12 s` (the bar on a terminal only)."""
        elapsed = self.clock() - self.started
        parts = [f"{self.what}:"]
        if self.total:
            share = min(self.done / self.total, 1.0)
            if self.bar:
                filled = round(share * BAR_WIDTH)
                parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
            parts.append(f"{share:.0%} {amount(self.done, self.unit)} of "
                         f"{amount(self.total, self.unit)},")  # fmt: skip
        else:
            parts.append(f"{amount(self.done, self.unit)},")
        parts.append(f"{elapsed:.0f} s")
        if text:
            parts.append(text)
        return " ".join(parts)


def amount(value: int, unit: str) -> str:
    """Bytes as MiB/GiB, anything else as a grouped number and its unit."""
    if unit == "bytes":
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= size:
                return f"{value / size:.1f} {name}"
        return f"{value} bytes"
    return f"{value:,} {unit}".rstrip()
