"""What every health report must look like on the line (docs/protocol.md, `health`)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

# Keys that hold a point in time somewhere in a health report's sections.
TIME_KEYS = frozenset({"time", "since", "not_after", "this_update", "next_update", "created", "at"})
_ISO = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


def times_that_are_not_timestamps(report: Any, path: str = "") -> list[str]:
    """Where a health report carries a time as text or as a number instead of a msgpack
    Timestamp (which the client decodes to an aware datetime)."""
    found: list[str] = []
    if isinstance(report, dict):
        for key, value in report.items():
            where = f"{path}.{key}" if path else str(key)
            if key in TIME_KEYS and value is not None and not isinstance(value, datetime):
                found.append(f"{where} = {value!r}")
            found += times_that_are_not_timestamps(value, where)
    elif isinstance(report, list):
        for index, value in enumerate(report):
            found += times_that_are_not_timestamps(value, f"{path}[{index}]")
    elif isinstance(report, str) and _ISO.match(report):
        found.append(f"{path} = {report!r}")
    elif isinstance(report, datetime) and report.tzinfo is None:
        found.append(f"{path}: a naive datetime")
    return found
