"""The WebDB client's view of the signers and the WebDB as Prometheus metrics, written atomically
to a file after every poll (node_exporter's textfile collector reads it; `signer check` too).

The signers are offline: what monitoring knows of them is what this client saw over the lines
(their health reports, the line's errors), what it published (the CRL files relying parties
fetch) and what waits in the WebDB. `Observations` gathers that; `registry` turns it into
metrics (pure: observations and clock in). Names and meanings: docs/operations.md, Monitoring.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

log = logging.getLogger(__name__)

PREFIX = "cacert_signer"
HEALTH_STATUS = {"ok": 0, "warning": 1, "error": 2}
ROLES = ("leader", "follower", "electing", "fenced", "stopped")


@dataclass
class LineView:
    """What the client knows of the signer on one line."""

    name: str
    report: dict[str, Any] | None = None  # the last health report it answered
    report_at: float | None = None  # Unix time of that report
    answered: bool = False  # the last health request was answered
    error: str | None = None  # why it was not
    client_errors: int = 0  # broken frames received and timeouts, since the client started
    recent_errors: int = 0  # line errors (both ends) within the configured window


@dataclass(frozen=True)
class RowStats:
    """Pending rows of one WebDB table and kind (`sign`, `revoke`)."""

    table: str
    kind: str
    pending: int
    oldest_s: float | None  # age of the oldest pending row
    failed: int  # rows given up: warning >= max_warnings


@dataclass(frozen=True)
class PublishedCrl:
    """A CRL file the client publishes, as relying parties see it."""

    issuer: str
    crl_number: int | None
    next_update: float | None  # Unix time; None: no readable CRL there


@dataclass
class Observations:
    lines: list[LineView] = field(default_factory=list)
    rows: list[RowStats] = field(default_factory=list)
    crls: list[PublishedCrl] = field(default_factory=list)
    webdb_up: bool | None = None  # the row statistics could be read (None: not a WebDB)


def registry(seen: Observations, now: float) -> CollectorRegistry:
    """Every metric of docs/operations.md (Monitoring), from what was observed."""
    reg = CollectorRegistry()
    gauges = _Gauges(reg)
    gauges.set("written_timestamp_seconds", "when the WebDB client wrote this file", now)
    for line in seen.lines:
        _line(gauges, line, now)
    for crl in seen.crls:
        labels = {"issuer": crl.issuer}
        gauges.set(
            "crl_published",
            "1 if a readable CRL file is published",
            0 if crl.crl_number is None else 1,
            labels,
        )
        if crl.next_update is not None:
            gauges.set(
                "crl_next_update_margin_seconds",
                "seconds until the published CRL's nextUpdate (negative: expired)",
                crl.next_update - now,
                labels,
            )
        if crl.crl_number is not None:
            gauges.set("crl_number", "number of the published CRL", crl.crl_number, labels)
    if seen.webdb_up is not None:
        gauges.set("webdb_up", "1 if the WebDB's rows could be read", 1 if seen.webdb_up else 0)
    for rows in seen.rows:
        labels = {"table": rows.table, "kind": rows.kind}
        gauges.set("webdb_pending_rows", "WebDB rows waiting for the signer", rows.pending, labels)
        gauges.set(
            "webdb_oldest_pending_seconds",
            "age of the oldest waiting row",
            rows.oldest_s or 0,
            labels,
        )
        gauges.set(
            "webdb_failed_rows", "rows given up (warning >= max_warnings)", rows.failed, labels
        )
    return reg


def write(path: Path, seen: Observations, now: float) -> None:
    """Atomically (a temporary file renamed over it): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry(seen, now))


def _line(gauges: _Gauges, line: LineView, now: float) -> None:
    labels = {"line": line.name}
    gauges.set(
        "up",
        "1 if the signer on the line answered its last health request",
        1 if line.answered else 0,
        labels,
    )
    gauges.set(
        "line_errors_client_total",
        "broken frames and timeouts the client saw",
        line.client_errors,
        labels,
    )
    gauges.set(
        "line_errors_recent",
        "line errors (both ends) within the window",
        line.recent_errors,
        labels,
    )
    report = line.report
    if report is None or line.report_at is None:
        return
    gauges.set("health_age_seconds", "age of the last health report", now - line.report_at, labels)
    gauges.set(
        "health_status",
        "0 ok, 1 warning, 2 error",
        HEALTH_STATUS.get(str(report.get("status")), 2),
        labels,
    )
    sections = report.get("sections") or {}
    link = sections.get("link") or {}
    if isinstance(link.get("broken_frames"), int):
        gauges.set(
            "line_errors_signer_total",
            "broken frames the signer saw",
            link["broken_frames"],
            labels,
        )
    for name, ca in _items(sections.get("cas")):
        if isinstance(ca.get("days_left"), int):
            gauges.set(
                "ca_days_left",
                "days until the CA certificate expires",
                ca["days_left"],
                {**labels, "ca": name},
            )
    _hsm(gauges, sections.get("hsm"), labels)
    _cluster(gauges, sections.get("cluster"), labels)


def _hsm(gauges: _Gauges, hsm: Any, labels: dict[str, str]) -> None:
    if not isinstance(hsm, dict):
        return
    keys = [key for key in hsm.get("keys") or [] if isinstance(key, dict)]
    healthy = bool(hsm.get("token_present") and hsm.get("logged_in"))
    healthy = healthy and all(key.get("test_signature_ok") for key in keys)
    gauges.set(
        "hsm_up",
        "1 if the token is present, logged in and every test signature passed",
        1 if healthy else 0,
        labels,
    )
    for key in keys:
        if isinstance(key.get("latency_ms"), int | float):
            gauges.set(
                "hsm_signature_seconds",
                "the test signature's time",
                key["latency_ms"] / 1000,
                {**labels, "key": str(key.get("label"))},
            )


def _cluster(gauges: _Gauges, cluster: Any, labels: dict[str, str]) -> None:
    if not isinstance(cluster, dict):
        return
    role = str(cluster.get("role"))
    for name in sorted({*ROLES, role}):
        gauges.set(
            "replication_role",
            "1 for the signer's current role",
            1 if name == role else 0,
            {**labels, "role": name},
        )
    if isinstance(cluster.get("quorum"), bool):
        gauges.set(
            "replication_quorum",
            "1 if the signer can commit",
            1 if cluster["quorum"] else 0,
            labels,
        )
    for peer, facts in _items(cluster.get("peers")):
        peer_labels = {**labels, "peer": peer}
        if isinstance(facts.get("lag"), int):
            gauges.set(
                "replication_lag_entries",
                "entries the peer is behind (seen by the leader)",
                facts["lag"],
                peer_labels,
            )
        offset = facts.get("clock_offset_s")
        if isinstance(offset, int | float) and math.isfinite(offset):
            gauges.set(
                "replication_clock_offset_seconds",
                "the peer's clock minus this signer's",
                offset,
                peer_labels,
            )


def _items(value: Any) -> Iterable[tuple[str, dict[str, Any]]]:
    """A section's map of named items (cas, peers), or its list of them (`peers` by address)."""
    if isinstance(value, dict):
        return [(str(k), v) for k, v in value.items() if isinstance(v, dict)]
    if isinstance(value, list):
        named = [
            (str(v.get("address") or v.get("id") or i), v)
            for i, v in enumerate(value)
            if isinstance(v, dict)
        ]
        return named
    return []


class _Gauges:
    """Gauges created on first use, each with the label names it is first set with."""

    def __init__(self, reg: CollectorRegistry):
        self.reg = reg
        self.made: dict[str, Gauge] = {}

    def set(self, name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> None:
        labels = labels or {}
        gauge = self.made.get(name)
        if gauge is None:
            gauge = Gauge(f"{PREFIX}_{name}", doc, sorted(labels), registry=self.reg)
            self.made[name] = gauge
        (gauge.labels(**labels) if labels else gauge).set(value)


class Monitor:
    """What the client keeps between polls for the metrics: each line's last health report and
    its error counts over the window, the published CRLs (read again only when they change)."""

    def __init__(self, lines: list[str], window_s: float, clock: Callable[[], float] = time.time):
        self.views = {name: LineView(name) for name in lines}
        self.window_s = window_s
        self.clock = clock
        self._errors: dict[str, deque[tuple[float, int]]] = {name: deque() for name in lines}
        self._crls: dict[Path, tuple[tuple[int, int], PublishedCrl]] = {}

    def health(self, line: str, report: dict[str, Any] | None, error: str | None = None) -> None:
        """The outcome of a health request on `line` (a report, or why there is none)."""
        view = self.views[line]
        view.answered, view.error = report is not None, error
        if report is not None:
            view.report, view.report_at = report, self.clock()

    def lines(self, client_errors: dict[str, int]) -> list[LineView]:
        """The views, with the client's error counters and the errors within the window."""
        now = self.clock()
        for name, view in self.views.items():
            view.client_errors = client_errors.get(name, 0)
            link = ((view.report or {}).get("sections") or {}).get("link") or {}
            signer = link.get("broken_frames")
            signer = signer if isinstance(signer, int) else 0
            history = self._errors[name]
            history.append((now, view.client_errors + signer))
            while len(history) > 1 and history[1][0] <= now - self.window_s:
                history.popleft()
            view.recent_errors = max(0, history[-1][1] - history[0][1])
        return list(self.views.values())

    def published(self, outputs: dict[str, Path]) -> list[PublishedCrl]:
        return [self._published(issuer, path) for issuer, path in outputs.items()]

    def _published(self, issuer: str, path: Path) -> PublishedCrl:
        try:
            stat = path.stat()
        except OSError:
            return PublishedCrl(issuer, None, None)
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._crls.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            crl = x509.load_der_x509_crl(path.read_bytes())
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            next_update = crl.next_update_utc
            found = PublishedCrl(
                issuer, int(number), None if next_update is None else next_update.timestamp()
            )
        except (OSError, ValueError, x509.ExtensionNotFound) as exc:
            log.warning("published CRL %s cannot be read: %s", path, exc)
            found = PublishedCrl(issuer, None, None)
        self._crls[path] = (key, found)
        return found
