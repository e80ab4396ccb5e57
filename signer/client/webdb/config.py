"""`signer webdb-client --config`: the WebDB client's configuration (docs/webdb-client.md)."""

from __future__ import annotations

from datetime import tzinfo
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import Field, ValidationInfo, field_validator, model_validator

from signer.config import LinkConfig, Section


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths are relative to the configuration file's directory."""
    base = (info.context or {}).get("base_dir")
    if value is None or value.is_absolute() or base is None:
        return value
    return Path(base) / value


class DatabaseConfig(Section):
    """The WebDB database: `sqlite` (a file) or `mysql` (MariaDB/MySQL, host:port or socket)."""

    driver: Literal["sqlite", "mysql"] = "sqlite"
    path: Path | None = Field(default=None, description="sqlite: the database file")
    host: str | None = None
    port: int = Field(default=3306, ge=1, le=65535)
    socket: Path | None = None
    user: str | None = None
    password_file: Path | None = Field(default=None, description="mode 0600, first line")
    database: str | None = None
    connect_timeout: float = Field(default=10.0, gt=0, le=300)

    _paths = field_validator("path", "socket", "password_file")(_resolve)

    @model_validator(mode="after")
    def _complete(self) -> DatabaseConfig:
        if self.driver == "sqlite" and self.path is None:
            raise ValueError("driver sqlite needs `path`")
        if self.driver == "mysql" and (not self.database or not (self.host or self.socket)):
            raise ValueError("driver mysql needs `database` and `host` or `socket`")
        return self


class CrlConfig(Section):
    """Where each issuer's CRL is published (DER), and how often it is fetched."""

    interval: float = Field(default=3600.0, gt=0, description="seconds between refreshes")
    chunk_bytes: int = Field(default=16384, ge=1024, le=1024 * 1024)
    outputs: dict[str, Path] = Field(
        default_factory=lambda: {
            "class1": Path("revoke.crl"),
            "class3": Path("class3-revoke.crl"),
        }
    )

    @field_validator("outputs")
    @classmethod
    def _resolve_outputs(cls, value: dict[str, Path], info: ValidationInfo) -> dict[str, Path]:
        return {name: _resolve(path, info) or path for name, path in value.items()}


class AuditConfig(Section):
    """The audit log kept on the web side (docs/audit.md §6)."""

    directory: Path = Field(description="where audit.log and audit-head.json are kept")
    certificate: Path = Field(description="the audit key's certificate (the ceremony's audit.crt)")
    interval: float = Field(default=300.0, gt=0, description="seconds between syncs")
    sign_after: float | None = Field(
        default=3600.0,
        gt=0,
        description="ask a new signed head when records wait unsigned "
        "and the last head is older than this (seconds); null: only the heads of CRLs",
    )

    _paths = field_validator("directory", "certificate")(_resolve)


class ValidityConfig(Section):
    """The WebDB's validity rules (days); the signer's profile maximum caps them."""

    personal_assured_days: int = Field(default=730, ge=1, le=36500)  # newer rule: 366
    personal_days: int = Field(default=180, ge=1, le=36500)
    assured_points: int = Field(default=50, ge=0)
    org_server_days: int = Field(default=730, ge=1, le=36500)
    org_client_days: int = Field(default=365, ge=1, le=36500)


class Limit(Section):
    """A warning and a critical threshold; which side is bad depends on the metric."""

    warning: float
    critical: float


def _limit(warning: float, critical: float) -> Limit:
    return Field(default_factory=lambda: Limit(warning=warning, critical=critical))


class MonitoringConfig(Section):
    """The metrics file written each poll and the thresholds `signer check` applies to it
    (defaults: docs/operations.md, Monitoring). Below: `ca_days`, `crl_margin_hours`;
    above: the rest."""

    metrics_file: Path | None = Field(default=None, description="Prometheus text file (.prom)")
    max_age_s: float = Field(default=300.0, gt=0, description="older: the client is not running")
    ca_days: Limit = _limit(90, 30)
    crl_margin_hours: Limit = _limit(48, 12)
    hsm_signature_s: Limit = _limit(2.0, 10.0)
    replication_lag_entries: Limit = _limit(1000, 100000)
    clock_offset_s: Limit = _limit(1.0, 2.0)
    line_errors: Limit = _limit(10, 1000)
    line_error_window_s: float = Field(default=3600.0, gt=0)
    pending_age_s: Limit = _limit(900, 3600)
    failed_rows: Limit = _limit(1, 20)
    health_age_s: Limit = _limit(900, 3600)

    _paths = field_validator("metrics_file")(_resolve)


class WebdbClientConfig(Section):
    """`signer webdb-client --config`: the WebDB side's daemon."""

    database: DatabaseConfig
    base_dir: Path = Field(description="the web application's directory; ../csr, ../crt hang off")
    lines: list[LinkConfig] = Field(min_length=1, max_length=2)
    timeout: float = Field(default=30.0, gt=0, description="seconds per call and line")
    attempts: int = Field(default=3, ge=1, le=20)
    max_in_flight: int = Field(default=8, ge=1, le=256)
    poll_interval: float = Field(default=5.0, gt=0)
    batch: int = Field(default=200, ge=1, le=100000, description="rows per table and poll")
    max_warnings: int = Field(default=3, ge=1, le=1000)
    crl: CrlConfig = Field(default_factory=CrlConfig)
    audit: AuditConfig | None = None
    health_interval: float = Field(default=300.0, gt=0)
    max_clock_skew_s: float = Field(default=60.0, gt=0)
    timezone: str | None = Field(default=None, description="of WebDB datetimes; default local")
    validity: ValidityConfig = Field(default_factory=ValidityConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _paths = field_validator("base_dir")(_resolve)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except Exception:
                raise ValueError(f"unknown time zone {value!r}") from None
        return value

    def zone(self) -> tzinfo | None:
        return ZoneInfo(self.timezone) if self.timezone else None
