"""Where requests come from and where their outcomes go: `RequestSource`, and `WebdbSource`, which
polls the WebDB tables, reads the CSR files and writes certificate files and columns back.

The client's loop knows only `Job`s and this protocol, so an event broker can replace polling
(docs/webdb-client.md, "The request source").
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signer.client.files import write_atomically
from signer.client.webdb.config import WebdbClientConfig
from signer.client.webdb.database import Database, db_time
from signer.client.webdb.metrics import RowStats
from signer.client.webdb.rows import (
    GPG_PREFIX,
    REVOCATION_SENTINEL,
    X509_TABLES,
    RowError,
    Table,
    armor_openpgp,
    crt_name,
    openpgp_uids,
    plan_x509,
    revoke_arguments,
)
from signer.clock import utcnow
from signer.errors import ClientFailure, SignerError
from signer.wire.protocol import MAX_CSR, MAX_OPENPGP_KEY

log = logging.getLogger(__name__)

# A notary row that is not deleted: `deleted` keeps the zero date (MySQL also compares it
# with 0, as the PHP does; SQLite keeps the text).
_ZERO = "0000-00-00 00:00:00"
_LIVE = "({0}deleted = 0 OR {0}deleted = '0000-00-00 00:00:00')"

Failure = SignerError | ClientFailure  # a refusal by the signer, or what the client saw itself


@dataclass(frozen=True)
class Job:
    """One request to make: its id (idempotent), command, and the source's own data."""

    request_id: str
    command: str
    label: str
    maybe_sent: bool  # an earlier process may have sent it: ask request_status first
    data: dict[str, Any] = field(compare=False, repr=False)


class RequestSource(Protocol):
    """Where requests come from and where outcomes go: the WebDB today, a broker later."""

    async def pending(self) -> list[Job]: ...

    async def arguments(self, job: Job) -> dict[str, Any]:
        """The command's arguments; a `Failure` refuses the job without contacting the signer."""
        ...

    async def complete(self, job: Job, result: dict[str, Any]) -> None: ...

    async def fail(self, job: Job, error: Failure) -> None: ...


class WebdbSource:
    """Polls the WebDB tables; reads CSR files, writes certificate files and the columns."""

    def __init__(self, db: Database, config: WebdbClientConfig):
        self.db = db
        self.config = config
        self.zone = config.zone()
        # profile → maximum validity, from list_profiles: the profiles the line may use
        self.max_days: dict[str, int] = {}
        self._watermark: dict[str, int] | None = None
        self._points_failed = False
        self._first_seen: dict[tuple[str, str], tuple[int, float]] = {}  # oldest id, when seen

    async def start(self) -> None:
        """Rows up to today's highest id may have been sent by an earlier process."""
        marks = {}
        for table in [*X509_TABLES, "gpg"]:
            rows = await self.db.query(f"SELECT MAX(id) AS m FROM {table}")
            marks[table] = int(rows[0]["m"] or 0) if rows else 0
        self._watermark = marks

    async def pending(self) -> list[Job]:
        if self._watermark is None:
            await self.start()
        limit, warn = self.config.batch, self.config.max_warnings
        jobs: list[Job] = []
        for table in X509_TABLES.values():
            rows = await self.db.query(
                f"SELECT {table.columns} FROM {table.name} WHERE crt_name = '' AND "
                f"csr_name != '' AND warning < ? ORDER BY id LIMIT {limit}",
                (warn,),
            )
            jobs += [self._job(table.name, "sign_x509", "sign", row) for row in rows]
            rows = await self.db.query(
                f"SELECT id, serial, rootcert, warning FROM {table.name} WHERE revoked = ? "
                f"AND warning < ? ORDER BY id LIMIT {limit}",
                (REVOCATION_SENTINEL, warn),
            )
            jobs += [self._job(table.name, "revoke_x509", "revoke", row, True) for row in rows]
        rows = await self.db.query(
            "SELECT id, memid, email, csr, warning FROM gpg WHERE crt = '' AND csr != '' "
            f"AND warning < ? ORDER BY id LIMIT {limit}",
            (warn,),
        )
        jobs += [self._job("gpg", "sign_openpgp", "sign", row) for row in rows]
        return jobs

    def _job(
        self, table: str, command: str, kind: str, row: dict[str, Any], sent: bool = False
    ) -> Job:
        row_id = int(row["id"])
        maybe = sent or row_id <= (self._watermark or {}).get(table, 0)
        data = {"table": table, "row": row}
        return Job(f"{table}:{row_id}:{kind}", command, f"{table} {row_id} ({kind})", maybe, data)

    # -- arguments ----------------------------------------------------------------------------

    async def arguments(self, job: Job) -> dict[str, Any]:
        table, row = job.data["table"], job.data["row"]
        if job.command == "revoke_x509":
            return revoke_arguments(row)
        if job.command == "sign_openpgp":
            key = self._read(str(row.get("csr") or ""), MAX_OPENPGP_KEY, "OpenPGP key")
            return {"public_key": key, "uids": openpgp_uids(key)}
        spec = X509_TABLES[table]
        csr = self._read(str(row.get("csr_name") or ""), MAX_CSR, "CSR")
        points = None if spec.org else await self._points(spec, row)
        plan = plan_x509(spec, row, csr, points, self.config.validity)
        if self.max_days and plan.profile not in self.max_days:
            raise RowError(
                f"profile {plan.profile} is not offered over the line (an OCSP or time-stamping "
                "certificate is issued by an operator at the signer)"
            )
        args: dict[str, Any] = {
            "profile": plan.profile,
            "csr": csr,
            "subject": plan.subject,
            "validity_days": min(plan.validity_days, self.max_days.get(plan.profile, 36500)),
        }
        if plan.sans:
            args["sans"] = plan.sans
        if plan.digest:
            args["digest"] = plan.digest
        return args

    def _read(self, name: str, limit: int, what: str) -> bytes:
        if not name:
            raise RowError(f"no {what} file named")
        path = self._path(name)
        try:
            with path.open("rb") as handle:
                data = handle.read(limit + 1)
        except OSError as exc:
            raise RowError(f"cannot read {what} {name}: {exc.strerror}") from None
        if not data.strip():
            raise RowError(f"{what} {name} is empty")
        if len(data) > limit:
            raise RowError(f"{what} {name} is larger than {limit} bytes")
        return data

    def _path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self.config.base_dir / path

    async def _points(self, table: Table, row: dict[str, Any]) -> int | None:
        """The member's assurance points as client.pl counts them: deleted assurances do not
        count (`deleted` is the zero date until an assurance is deleted)."""
        if self._points_failed:
            return None
        if table.name == "emailcerts":
            live = _LIVE.format("")
            sql = f"SELECT COALESCE(SUM(points), 0) AS p FROM notary WHERE `to` = ? AND {live}"
            key = row.get("memid")
        else:
            sql = (
                "SELECT COALESCE(SUM(n.points), 0) AS p FROM notary n "
                f"JOIN domains d ON n.`to` = d.memid WHERE d.id = ? AND {_LIVE.format('n.')}"
            )
            key = row.get("domid")
        try:
            rows = await self.db.query(sql, (key,))
        except Exception as exc:
            self._points_failed = True
            log.warning("cannot read assurance points (%s): personal rows get %d days", exc,
                        self.config.validity.personal_days)  # fmt: skip
            return None
        return int(rows[0]["p"] or 0) if rows else 0

    # -- monitoring ---------------------------------------------------------------------------

    async def row_stats(self, now: float) -> list[RowStats]:
        """Per table and kind: rows waiting, the age of the oldest, rows given up. The age is
        the row's `created` where the table has one, else since this client first saw it."""
        warn = self.config.max_warnings
        stats = []
        for name, kind, where, params, created in self._pending_kinds():
            oldest_created = f"MIN(CASE WHEN warning < ? AND created != '{_ZERO}' THEN created END)"
            [row] = await self.db.query(
                "SELECT SUM(CASE WHEN warning < ? THEN 1 ELSE 0 END) AS pending, "
                "SUM(CASE WHEN warning >= ? THEN 1 ELSE 0 END) AS failed, "
                f"MIN(CASE WHEN warning < ? THEN id END) AS first, "
                f"{oldest_created if created else 'NULL'} AS oldest FROM {name} WHERE {where}",
                (warn, warn, warn, *((warn,) if created else ()), *params),
            )
            age = self._age(name, kind, row.get("first"), row.get("oldest"), now)
            pending, failed = int(row["pending"] or 0), int(row["failed"] or 0)
            stats.append(RowStats(name, kind, pending, age, failed))
        return stats

    def _pending_kinds(self) -> list[tuple[str, str, str, tuple[Any, ...], bool]]:
        """(table, kind, condition, its parameters, has `created`) of every kind of request."""
        kinds: list[tuple[str, str, str, tuple[Any, ...], bool]] = []
        for table in X509_TABLES:
            kinds.append((table, "sign", "crt_name = '' AND csr_name != ''", (), True))
            kinds.append((table, "revoke", "revoked = ?", (REVOCATION_SENTINEL,), False))
        kinds.append(("gpg", "sign", "crt = '' AND csr != ''", (), False))
        return kinds

    def _age(self, table: str, kind: str, first: Any, created: Any, now: float) -> float | None:
        if first is None:
            self._first_seen.pop((table, kind), None)
            return None
        if created is not None:
            moment = _db_timestamp(created, self.zone)
            if moment is not None:
                return max(0.0, now - moment)
        seen = self._first_seen.get((table, kind))
        if seen is None or seen[0] != int(first):
            seen = self._first_seen[(table, kind)] = (int(first), now)
        return now - seen[1]

    # -- outcomes -----------------------------------------------------------------------------

    async def complete(self, job: Job, result: dict[str, Any]) -> None:
        """The file first, then the row: the web application never sees a name without its file."""
        table, row_id = job.data["table"], int(job.data["row"]["id"])
        now = db_time(utcnow(), self.zone)
        if job.command == "revoke_x509":
            await self.db.execute(f"UPDATE {table} SET revoked = ? WHERE id = ?", (now, row_id))
        elif job.command == "sign_openpgp":
            name = crt_name(GPG_PREFIX, row_id)
            await asyncio.to_thread(
                write_atomically, self._path(name), armor_openpgp(result["public_key"])
            )
            expire = db_time(result["expires"], self.zone)
            await self.db.execute(
                "UPDATE gpg SET crt = ?, issued = ?, expire = ? WHERE id = ?",
                (name, now, expire, row_id),
            )
        else:
            name = crt_name(X509_TABLES[table].prefix, row_id)
            pem = x509.load_der_x509_certificate(result["certificate"]).public_bytes(
                serialization.Encoding.PEM
            )
            await asyncio.to_thread(write_atomically, self._path(name), pem)
            await self.db.execute(
                f"UPDATE {table} SET crt_name = ?, serial = ?, expire = ?, modified = ? "
                "WHERE id = ?",
                (name, result["serial"], db_time(result["not_after"], self.zone), now, row_id),
            )

    async def fail(self, job: Job, error: Failure) -> None:
        table, row_id = job.data["table"], int(job.data["row"]["id"])
        await self.db.execute(f"UPDATE {table} SET warning = warning + 1 WHERE id = ?", (row_id,))


def _db_timestamp(value: Any, zone: tzinfo | None) -> float | None:
    """A WebDB DATETIME (text from SQLite, datetime from MariaDB) in the database's zone."""
    if isinstance(value, str):
        try:
            value = datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return (value.replace(tzinfo=zone) if zone else value.astimezone()).timestamp()
