"""After the signer's repository was restored from an older copy: put back what the WebDB
recorded as done since (`signer webdb-client --reconcile`, docs/webdb-client.md, Reconcile).

The WebDB is the other record of every outcome: a row with a certificate file was signed, a
row with a revocation time was revoked. For each such row (changed since `since`, or all) the
signer is asked `request_status` under the row's request id (`<table>:<id>:sign|revoke`):

- a revocation the signer does not know is sent again, with the row's revocation time;
- an issuance it does not know is recorded from the row's certificate file (`record_x509`):
  re-issuing would make a second certificate for one request;
- an OpenPGP certification it does not know is only reported (the key file holds it; signing
  again would make another signature);
- the CRL number each published CRL file carries is compared with the signer's: a restored
  signer must number its next CRLs above it (storage/restore.py raises its floor).

Issuances go first, so that a certificate issued and revoked after the copy is recorded before
its revocation is sent. Nothing here writes to the WebDB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signer.client.webdb.config import WebdbClientConfig
from signer.client.webdb.database import Database, db_time
from signer.client.webdb.failover import SignerLines
from signer.client.webdb.rows import REVOCATION_SENTINEL, X509_TABLES, RowError, revoke_arguments
from signer.errors import ClientFailure, SignerError

log = logging.getLogger(__name__)

PROGRESS_EVERY = 200  # rows between progress lines


@dataclass
class ReconcileReport:
    """What reconcile found and did; `ok` when nothing is left missing."""

    since: str | None
    dry_run: bool
    checked: dict[str, int] = field(default_factory=lambda: {"sign": 0, "revoke": 0, "gpg": 0})
    present: int = 0
    recorded: list[str] = field(default_factory=list)  # issuances recorded again
    revoked: list[str] = field(default_factory=list)  # revocations sent again
    missing: list[str] = field(default_factory=list)  # found missing, left (dry run, OpenPGP)
    in_progress: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why
    crls: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def requests_ok(self) -> bool:
        """Every outcome the WebDB recorded is the signer's (again)."""
        return not (self.failed or self.in_progress) and (self.dry_run or not self.missing)

    @property
    def ok(self) -> bool:
        """And no published CRL is newer than the signer's (run again after its next CRL)."""
        return self.requests_ok and all(crl.get("ok", True) for crl in self.crls.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "requests_ok": self.requests_ok, "ok": self.ok}


class Reconciler:
    def __init__(
        self,
        db: Database,
        lines: SignerLines,
        config: WebdbClientConfig,
        progress: Callable[[str], None] = lambda _line: None,
    ):
        self.db, self.lines, self.config = db, lines, config
        self.zone = config.zone()
        self.progress = progress
        self._seen = 0

    async def run(self, since: datetime | None, dry_run: bool = False) -> ReconcileReport:
        report = ReconcileReport(None if since is None else since.isoformat(), dry_run)
        after = None if since is None else db_time(since, self.zone)
        for table in X509_TABLES:
            for row in await self._rows(table, "crt_name != ''", "modified", after):
                await self._issuance(table, row, report)
        for table in X509_TABLES:
            condition = f"revoked > '{REVOCATION_SENTINEL}'"
            for row in await self._rows(table, condition, "revoked", after):
                await self._revocation(table, row, report)
        for row in await self._rows("gpg", "crt != ''", "issued", after, "id"):
            await self._certification(row, report)
        await self._crl_numbers(report)
        self.progress(
            f"reconcile: {sum(report.checked.values())} rows checked, {report.present} present, "
            f"{len(report.recorded)} recorded, {len(report.revoked)} revoked again, "
            f"{len(report.missing)} missing, {len(report.failed)} failed"
        )
        return report

    async def _rows(
        self, table: str, condition: str, column: str, after: str | None, columns: str = ""
    ) -> list[dict[str, Any]]:
        columns = columns or "id, crt_name, serial, rootcert, revoked"
        sql = f"SELECT {columns} FROM {table} WHERE {condition}"
        params: tuple[Any, ...] = ()
        if after is not None:
            sql += f" AND {column} >= ?"
            params = (after,)
        return await self.db.query(sql + " ORDER BY id", params)

    async def _status(self, request_id: str, kind: str, report: ReconcileReport) -> str:
        report.checked[kind] += 1
        self._seen += 1
        if self._seen % PROGRESS_EVERY == 0:
            self.progress(f"reconcile: {self._seen} rows checked")
        answer = await self.lines.call("request_status", {"request_id": request_id})
        state = str(answer["state"])
        if state == "done":
            report.present += 1
        elif state == "in_progress":
            report.in_progress.append(request_id)
        return state

    async def _issuance(self, table: str, row: dict[str, Any], report: ReconcileReport) -> None:
        request_id = f"{table}:{int(row['id'])}:sign"
        try:
            if await self._status(request_id, "sign", report) != "unknown":
                return
            if report.dry_run:
                report.missing.append(request_id)
                return
            der = self._certificate(str(row["crt_name"]))
            await self.lines.call("record_x509", {"certificate": der}, request_id=request_id)
            report.recorded.append(request_id)
            log.warning("%s: recorded again from %s", request_id, row["crt_name"])
        except (SignerError, ClientFailure) as exc:
            report.failed[request_id] = str(exc)

    async def _revocation(self, table: str, row: dict[str, Any], report: ReconcileReport) -> None:
        request_id = f"{table}:{int(row['id'])}:revoke"
        try:
            if await self._status(request_id, "revoke", report) != "unknown":
                return
            if report.dry_run:
                report.missing.append(request_id)
                return
            args = {**revoke_arguments(row), "revoked_at": _utc(row["revoked"], self.zone)}
            await self.lines.call("revoke_x509", args, request_id=request_id)
            report.revoked.append(request_id)
            log.warning("%s: revoked again (revoked at %s)", request_id, row["revoked"])
        except (SignerError, ClientFailure) as exc:
            report.failed[request_id] = str(exc)

    async def _certification(self, row: dict[str, Any], report: ReconcileReport) -> None:
        request_id = f"gpg:{int(row['id'])}:sign"
        try:
            if await self._status(request_id, "gpg", report) == "unknown":
                report.missing.append(request_id)  # not signed again: the WebDB has it
        except (SignerError, ClientFailure) as exc:
            report.failed[request_id] = str(exc)

    def _certificate(self, name: str) -> bytes:
        path = Path(name) if Path(name).is_absolute() else self.config.base_dir / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RowError(f"cannot read certificate {name}: {exc.strerror}") from None
        try:
            if b"-----BEGIN" in data:
                certificate = x509.load_pem_x509_certificate(data)
            else:
                certificate = x509.load_der_x509_certificate(data)
        except ValueError:
            raise RowError(f"{name} is not a certificate") from None
        return certificate.public_bytes(serialization.Encoding.DER)

    async def _crl_numbers(self, report: ReconcileReport) -> None:
        """The number of each published CRL file against the signer's current one."""
        for name, path in self.config.crl.outputs.items():
            published = _crl_number(path)
            if published is None:
                continue
            try:
                answer = await self.lines.call(
                    "fetch_crl", {"issuer": name, "have_number": published, "max_bytes": 1024}
                )
            except (SignerError, ClientFailure) as exc:
                report.crls[name] = {"published": published, "error": str(exc), "ok": False}
                continue
            current = int(answer["crl_number"])
            entry: dict[str, Any] = {"published": published, "signer": current, "ok": True}
            if current < published:
                entry["ok"] = False
                entry["note"] = (
                    f"the signer's CRL {current} is older than the published {published}: its "
                    f"next must be numbered above {published} (docs/operations.md, Restore)"
                )
            report.crls[name] = entry


def _utc(value: Any, zone: tzinfo | None) -> datetime:
    """A WebDB time (a datetime, or text from SQLite) in the WebDB's zone, as UTC."""
    if isinstance(value, datetime):
        moment = value
    else:
        moment = datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone or UTC)
    return moment.astimezone(UTC)


def _crl_number(path: Path) -> int | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        crl = (
            x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        )
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except (ValueError, x509.ExtensionNotFound):
        return None
