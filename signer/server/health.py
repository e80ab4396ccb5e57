"""Health: one report of what an operator must know about a signer, section by section.

Each component contributes a section (link, HSM, CA certificates, repository, cluster) through
a provider; the report's status is the worst of the sections', with a warning line for each thing
that needs an operator. A provider that fails makes its own section an error, never the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from signer import __version__
from signer.clock import utcnow
from signer.wire.protocol import HealthResult

log = logging.getLogger(__name__)


@dataclass
class Section:
    data: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


Provider = Callable[[], Awaitable[Section]]


class Health:
    def __init__(self, clock: Callable[[], datetime] = utcnow):
        self._clock = clock
        self._started = time.monotonic()
        self._providers: dict[str, Provider] = {}

    def add(self, name: str, provider: Provider) -> None:
        self._providers[name] = provider

    async def report(self) -> HealthResult:
        sections: dict[str, Any] = {}
        warnings: list[str] = []
        errors: list[str] = []
        for name, provider in self._providers.items():
            section = await self._collect(name, provider)
            sections[name] = section.data
            warnings += [f"{name}: {text}" for text in section.warnings]
            errors += [f"{name}: {text}" for text in section.errors]
        status = "error" if errors else "warning" if warnings else "ok"
        return HealthResult(
            version=__version__,
            time=self._clock(),
            uptime_s=round(time.monotonic() - self._started, 3),
            status=status,
            warnings=errors + warnings,
            sections=sections,
        )

    @staticmethod
    async def _collect(name: str, provider: Provider) -> Section:
        try:
            return await provider()
        except Exception as exc:
            log.exception("health section %s failed", name)
            return Section({"error": f"{type(exc).__name__}: {exc}"}, errors=[str(exc) or name])
