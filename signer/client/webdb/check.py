"""`signer check`: the metrics file judged against the thresholds, as a Nagios/Icinga plugin.

The WebDB client writes what it saw each poll (signer/client/webdb/metrics.py); this reads that
file (it never touches the serial lines, which the client holds) and answers in the plugin
form: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, one status line, performance data after
`|`. Pure but for reading the file: text, thresholds and clock in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from signer.client.webdb.config import Limit, MonitoringConfig
from signer.client.webdb.metrics import PREFIX

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATUS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class CheckResult:
    status: int = OK
    problems: list[tuple[int, str]] = field(default_factory=list)
    perfdata: list[str] = field(default_factory=list)
    summary: str = ""

    def add(self, level: int, text: str) -> None:
        self.problems.append((level, text))
        self.status = max(self.status, level)

    def line(self) -> str:
        """`SIGNER CRITICAL - worst first; ... | perfdata` (one line, as plugins print)."""
        worst = sorted(self.problems, key=lambda p: -p[0])
        text = "; ".join(t for _, t in worst) if worst else self.summary
        perf = " ".join(self.perfdata)
        return f"SIGNER {STATUS[self.status]} - {text}" + (f" | {perf}" if perf else "")


def check_file(path: Path | None, limits: MonitoringConfig, now: float) -> CheckResult:
    """The file's verdict; no file configured is UNKNOWN, none written is CRITICAL."""
    result = CheckResult()
    if path is None:
        result.add(UNKNOWN, "monitoring.metrics_file is not set in the configuration")
        return result
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        result.add(CRITICAL, f"no metrics file {path}: the WebDB client is not running")
        return result
    except OSError as exc:
        result.add(UNKNOWN, f"cannot read {path}: {exc.strerror}")
        return result
    try:
        samples = parse(text)
    except ValueError as exc:
        result.add(UNKNOWN, f"{path}: not Prometheus text format: {exc}")
        return result
    return evaluate(samples, limits, now)


def parse(text: str) -> Samples:
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix(PREFIX + "_")
            samples[name].append((dict(sample.labels), float(sample.value)))
    return samples


def evaluate(samples: Samples, limits: MonitoringConfig, now: float) -> CheckResult:
    result = CheckResult()
    written = samples.get("written_timestamp_seconds")
    if not written:
        result.add(UNKNOWN, "the metrics file has no write time: not the WebDB client's")
        return result
    age = now - written[0][1]
    if age > limits.max_age_s:
        result.add(CRITICAL, f"metrics written {age:.0f} s ago: is the WebDB client running?")
    _signers(samples, limits, result)
    _crls(samples, limits, result)
    _replication(samples, limits, result)
    _webdb(samples, limits, result)
    answering = sum(1 for _, v in samples.get("up", []) if v == 1)
    margins = [v for _, v in samples.get("crl_next_update_margin_seconds", [])]
    result.summary = (
        f"{answering} of {len(samples.get('up', []))} signer(s) answering, "
        + (f"CRLs valid for {min(margins) / 3600:.0f} h more, " if margins else "")
        + f"{_total(samples, 'webdb_pending_rows'):.0f} row(s) waiting"
    )
    return result


def _signers(samples: Samples, limits: MonitoringConfig, result: CheckResult) -> None:
    for labels, value in samples.get("up", []):
        if value != 1:
            result.add(CRITICAL, f"the signer on line {labels['line']} is not answering")
    for labels, value in samples.get("health_status", []):
        if value >= 1:
            level = CRITICAL if value >= 2 else WARNING
            word = "errors" if value >= 2 else "warnings"
            result.add(level, f"the signer on line {labels['line']} reports {word} (health)")
    for labels, value in samples.get("health_age_seconds", []):
        _above(
            result,
            limits.health_age_s,
            value,
            f"health of line {labels['line']} is {value:.0f} s old",
        )
    for labels, value in samples.get("line_errors_recent", []):
        _above(
            result,
            limits.line_errors,
            value,
            f"{value:.0f} line error(s) on {labels['line']} recently",
        )
    for labels, value in samples.get("hsm_up", []):
        if value != 1:
            result.add(CRITICAL, f"the HSM of the signer on line {labels['line']} is not usable")
    for labels, value in samples.get("hsm_signature_seconds", []):
        _above(
            result,
            limits.hsm_signature_s,
            value,
            f"HSM key {labels['key']} on line {labels['line']} takes {value:.2f} s to sign",
        )
    days: dict[str, float] = {}
    for labels, value in samples.get("ca_days_left", []):
        days[labels["ca"]] = min(value, days.get(labels["ca"], value))
    for ca, value in sorted(days.items()):
        _below(result, limits.ca_days, value, f"CA certificate {ca} expires in {value:.0f} days")
        result.perfdata.append(_perf(f"ca_days_left_{ca}", value, limits.ca_days, below=True))
    latency = [v for _, v in samples.get("hsm_signature_seconds", [])]
    if latency:
        result.perfdata.append(_perf("hsm_signature_s", max(latency), limits.hsm_signature_s))
    errors = _total(samples, "line_errors_recent")
    result.perfdata.append(_perf("line_errors", errors, limits.line_errors))


def _crls(samples: Samples, limits: MonitoringConfig, result: CheckResult) -> None:
    for labels, value in samples.get("crl_published", []):
        if value != 1:
            result.add(CRITICAL, f"no valid CRL of {labels['issuer']} is published")
    for labels, value in samples.get("crl_next_update_margin_seconds", []):
        hours = value / 3600
        issuer = labels["issuer"]
        text = (
            f"the CRL of {issuer} expired {-hours:.1f} h ago"
            if hours < 0
            else f"the CRL of {issuer} reaches its nextUpdate in {hours:.1f} h"
        )
        _below(result, limits.crl_margin_hours, hours, text)
        perf = _perf(f"crl_margin_hours_{issuer}", hours, limits.crl_margin_hours, below=True)
        result.perfdata.append(perf)


def _replication(samples: Samples, limits: MonitoringConfig, result: CheckResult) -> None:
    for labels, value in samples.get("replication_quorum", []):
        if value != 1:
            result.add(CRITICAL, f"the signer on line {labels['line']} has no quorum")
    for labels, value in samples.get("replication_role", []):
        if value == 1 and labels["role"] in ("fenced", "stopped"):
            result.add(CRITICAL, f"the signer on line {labels['line']} is {labels['role']}")
    lags = samples.get("replication_lag_entries", [])
    for labels, value in lags:
        _above(
            result,
            limits.replication_lag_entries,
            value,
            f"peer {labels['peer']} is {value:.0f} entries behind",
        )
    offsets = samples.get("replication_clock_offset_seconds", [])
    for labels, value in offsets:
        _above(
            result,
            limits.clock_offset_s,
            abs(value),
            f"the clock of peer {labels['peer']} differs by {value:+.2f} s",
        )
    if lags:
        worst = max(v for _, v in lags)
        result.perfdata.append(_perf("replication_lag", worst, limits.replication_lag_entries))
    if offsets:
        worst = max(abs(v) for _, v in offsets)
        result.perfdata.append(_perf("clock_offset_s", worst, limits.clock_offset_s))


def _webdb(samples: Samples, limits: MonitoringConfig, result: CheckResult) -> None:
    for _, value in samples.get("webdb_up", []):
        if value != 1:
            result.add(CRITICAL, "the WebDB cannot be read (see the client's log)")
    ages = samples.get("webdb_oldest_pending_seconds", [])
    oldest = max((v for _, v in ages), default=0.0)
    if oldest:
        where = max(ages, key=lambda item: item[1])[0]
        _above(
            result,
            limits.pending_age_s,
            oldest,
            f"a {where['table']} row ({where['kind']}) waits for {oldest:.0f} s",
        )
    failed = _total(samples, "webdb_failed_rows")
    _above(
        result,
        limits.failed_rows,
        failed,
        f"{failed:.0f} WebDB row(s) given up (warning >= max_warnings)",
    )
    result.perfdata += [
        _perf("pending_rows", _total(samples, "webdb_pending_rows")),
        _perf("oldest_pending_s", oldest, limits.pending_age_s),
        _perf("failed_rows", failed, limits.failed_rows),
    ]


def _total(samples: Samples, name: str) -> float:
    return sum(value for _, value in samples.get(name, []))


def _judge(limit: Limit, bad: Callable[[float], bool]) -> int:
    return CRITICAL if bad(limit.critical) else WARNING if bad(limit.warning) else OK


def _above(result: CheckResult, limit: Limit, value: float, text: str) -> None:
    level = _judge(limit, lambda threshold: value >= threshold)
    if level:
        result.add(level, text)


def _below(result: CheckResult, limit: Limit, value: float, text: str) -> None:
    level = _judge(limit, lambda threshold: value < threshold)
    if level:
        result.add(level, text)


def _perf(label: str, value: float, limit: Limit | None = None, below: bool = False) -> str:
    """`'label'=value;warn;crit` (Nagios ranges: `N:` alerts below N, `N` above it)."""
    text = f"'{label}'={value:g}"
    if limit is not None:
        suffix = ":" if below else ""
        text += f";{limit.warning:g}{suffix};{limit.critical:g}{suffix}"
    return text
