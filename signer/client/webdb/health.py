"""What a signer's health report asks of an operator, as alerts (pure: report and clock in)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

Level = Literal["warning", "error"]


@dataclass(frozen=True)
class Alert:
    """Something an operator must look at, about the signer on one line."""

    level: Level
    text: str
    line: str
    unanswered: bool = False  # the signer gave no health report at all


def unanswered(line: str, exc: Exception) -> Alert:
    """The signer on `line` did not report its health (out of reach, or it refused)."""
    return Alert("error", f"signer on line {line} is not answering: {exc}", line, True)


def health_alerts(
    line: str, report: dict[str, Any], now: datetime, max_skew_s: float
) -> list[Alert]:
    """Every warning line of the report, a clock too far off, and what the sections show that
    the report's own lines do not already say (a lost quorum, an expired CA)."""
    level: Level = "error" if report.get("status") == "error" else "warning"
    warnings = [str(text) for text in report.get("warnings", [])]
    alerts = [Alert(level, f"signer on line {line}: {text}", line) for text in warnings]
    sections = report.get("sections", {})
    signer_time = report.get("time")
    if isinstance(signer_time, datetime):
        skew = (signer_time - now).total_seconds()
        if abs(skew) > max_skew_s:
            text = f"signer on line {line}: clock differs from ours by {skew:+.0f} s"
            alerts.append(Alert("warning", text, line))
    cluster = sections.get("cluster") or {}
    if cluster.get("quorum") is False and not _reported(warnings, "cluster"):
        text = f"signer on line {line}: the cluster has lost its quorum"
        alerts.append(Alert("error", text, line))
    for name, ca in (sections.get("cas") or {}).items():
        days = ca.get("days_left") if isinstance(ca, dict) else None
        if isinstance(days, int) and days < 0 and not _reported(warnings, "cas", name):
            alerts.append(Alert("error", f"signer on line {line}: CA {name} has expired", line))
    return alerts


def _reported(warnings: list[str], *where: str) -> bool:
    """Whether the report has a line about that section (and item): each line starts with its
    section, `cas: class3: ...` (docs/protocol.md, `health`)."""
    prefix = "".join(f"{part}: " for part in where)
    return any(text.startswith(prefix) for text in warnings)
