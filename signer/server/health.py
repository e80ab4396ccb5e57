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
from datetime import UTC, datetime
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


def timestamp(value: Any) -> Any:
    """A time as health reports it: a datetime (a msgpack Timestamp on the line), from Unix
    seconds or an ISO 8601 string; None and anything else pass unchanged."""
    if isinstance(value, bool) or value is None or isinstance(value, datetime):
        return value
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return value


def with_timestamps(data: dict[str, Any], *paths: str) -> dict[str, Any]:
    """`data` with the values at dotted `paths` made timestamps (`*` matches every key)."""
    for path in paths:
        _convert(data, path.split("."))
    return data


def _convert(node: Any, parts: list[str]) -> None:
    if not isinstance(node, dict) or not parts:
        return
    head, rest = parts[0], parts[1:]
    keys = list(node) if head == "*" else [head] if head in node else []
    for key in keys:
        if rest:
            _convert(node[key], rest)
        else:
            node[key] = timestamp(node[key])


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
