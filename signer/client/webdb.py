"""The signer client on the WebDB side: poll the web application's database, drive the signer,
write the results back where the web application reads them; fetch CRLs and health.

Why it is built this way (docs/webdb-client.md has the whole story):
- Request ids derive from table and row (`emailcerts:12:sign`), and the signer records writes
  under their id: a crash between sending and writing back never issues twice, and after a
  restart `request_status` collects the earlier outcome for a few bytes instead of a CSR.
- A failing row gets `warning = warning + 1` and never blocks the others; trouble on the signer's
  side (line down, no quorum, HSM away) is not the row's fault and costs it nothing.
- Two lines, one `SignerClient` each: a request that times out on one goes to the other with the
  same id, which is safe because ids are idempotent on the (replicated) repository.
- The database is reached through `Database` (SQLite or MariaDB/MySQL: the dialect differences
  live in `DIALECTS`), the rows through a `RequestSource`, so an event broker can replace polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import Field, ValidationInfo, field_validator, model_validator

from signer.client.crl_refresh import BadCrl, CrlRefresher
from signer.client.library import SignerClient, new_request_id
from signer.config import LinkConfig, Section, check_secret_file
from signer.errors import ClientFailure, ErrorCode, SignerError, Unreachable
from signer.pki.openpgp_armor import armor
from signer.wire.protocol import MAX_CSR, MAX_OPENPGP_KEY

log = logging.getLogger(__name__)

REVOCATION_SENTINEL = "1970-01-01 10:00:01"  # what the web application writes to ask for one
ISSUER_BY_ROOTCERT = {1: "class1", 2: "class3"}
XMPP_OID = "1.3.6.1.5.5.7.8.5"
PAUSE_HOOK_ENV = "SIGNER_WEBDB_PAUSE_AFTER_ANSWER"  # tests: a file to create, then hang
# Not the row's fault: the row is tried again later at no cost to its warning count.
TRANSIENT = {
    ErrorCode.BUSY,
    ErrorCode.NO_QUORUM,
    ErrorCode.NOT_COMMITTED,
    ErrorCode.HSM_UNAVAILABLE,
    ErrorCode.HSM_LOGIN_FAILED,
}
PROFILE_CACHE_S = 3600.0


# --- configuration ---------------------------------------------------------------------------


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
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


class ValidityConfig(Section):
    """The WebDB's validity rules (days); the signer's profile maximum caps them."""

    personal_assured_days: int = Field(default=730, ge=1, le=36500)  # newer rule: 366
    personal_days: int = Field(default=180, ge=1, le=36500)
    assured_points: int = Field(default=50, ge=0)
    org_server_days: int = Field(default=730, ge=1, le=36500)
    org_client_days: int = Field(default=365, ge=1, le=36500)


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
    health_interval: float = Field(default=300.0, gt=0)
    max_clock_skew_s: float = Field(default=60.0, gt=0)
    timezone: str | None = Field(default=None, description="of WebDB datetimes; default local")
    validity: ValidityConfig = Field(default_factory=ValidityConfig)
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


# --- database --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """Everything that differs between SQLite and MariaDB/MySQL, in one place."""

    placeholder: str
    id_column: str
    table_suffix: str

    def sql(self, text: str) -> str:
        """Queries are written with `?`; MySQL drivers want `%s`."""
        return text.replace("?", self.placeholder)


DIALECTS = {
    "sqlite": Dialect("?", "INTEGER PRIMARY KEY AUTOINCREMENT", ""),
    "mysql": Dialect(
        "%s", "INT NOT NULL AUTO_INCREMENT PRIMARY KEY", " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    ),
}


class Database:
    """One connection, used from one worker thread: the drivers block, the event loop must not."""

    def __init__(self, config: DatabaseConfig):
        self.config = config
        self.dialect = DIALECTS[config.driver]
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="webdb")
        self._conn: Any = None

    async def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return await self._run(self._query, sql, tuple(params))

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run one statement (autocommit); returns the number of rows it changed."""
        return await self._run(self._execute, sql, tuple(params))

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        cursor = self._cursor(sql, params)
        rows = cursor.fetchall()
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in rows]

    def _execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return int(self._cursor(sql, params).rowcount)

    def _cursor(self, sql: str, params: tuple[Any, ...]) -> Any:
        conn = self._connection()
        cursor = conn.cursor()
        cursor.execute(self.dialect.sql(sql), params)
        return cursor

    def _connection(self) -> Any:
        if self._conn is not None and self.config.driver == "mysql":
            try:
                self._conn.ping()  # a server restart or wait_timeout since the last query
            except Exception:
                self._close()
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> Any:
        c = self.config
        if c.driver == "sqlite":
            assert c.path is not None
            conn = sqlite3.connect(c.path, isolation_level=None, timeout=c.connect_timeout)
            conn.execute("PRAGMA journal_mode=WAL")
            return conn
        import pymysql

        return pymysql.connect(
            host=c.host or "localhost",
            port=c.port,
            unix_socket=str(c.socket) if c.socket else None,
            user=c.user,
            password=_password(c.password_file),
            database=c.database,
            autocommit=True,
            charset="utf8mb4",
            connect_timeout=int(c.connect_timeout),
        )

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _password(path: Path | None) -> str:
    if path is None:
        return ""
    check_secret_file(path)
    return path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""


def db_time(moment: datetime, zone: tzinfo | None = None) -> str:
    """A WebDB DATETIME: naive, in the database's local time (what NOW() gives)."""
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


# --- the WebDB's tables and rows -------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One X.509 request table of the WebDB and how its rows are read."""

    name: str
    prefix: str  # of the csr/crt file names
    org: bool
    server: bool
    columns: str  # what a signing row needs


X509_TABLES = {
    t.name: t
    for t in (
        Table("emailcerts", "client", False, False, "id, memid, subject, csr_name, rootcert, md, "
              "codesign, warning"),
        Table("domaincerts", "server", False, True, "id, domid, subject, csr_name, rootcert, md, "
              "type, warning"),
        Table("orgemailcerts", "orgclient", True, False, "id, subject, csr_name, rootcert, md, "
              "codesign, warning"),
        Table("orgdomaincerts", "orgserver", True, True, "id, subject, csr_name, rootcert, md, "
              "type, warning"),
    )
}  # fmt: skip
GPG_PREFIX = "gpg"


def crt_name(prefix: str, row_id: int) -> str:
    """Where the web application looks for the certificate, relative to its directory."""
    return f"../crt/{prefix}/{row_id // 1000}/{prefix}-{row_id}.crt"


class RowError(ClientFailure):
    """A row that cannot become a request (unreadable CSR, unknown rootcert, bad subject); never
    a wire code: the row's warning count goes up as for a refusal."""

    kind = "bad_row"


Failure = SignerError | ClientFailure


def failure_name(exc: Failure) -> str:
    """The name a failure is reported under: its wire code, or what the client saw."""
    return exc.code.value if isinstance(exc, SignerError) else exc.kind


def is_transient(exc: Failure) -> bool:
    """Not the row's fault: tried again later at no cost to its warning count."""
    return isinstance(exc, Unreachable) or (isinstance(exc, SignerError) and exc.code in TRANSIENT)


_DN_SPLIT = re.compile(r"(?<!\\)/(?=[A-Za-z][A-Za-z0-9.]*=)")
_SAN_SPLIT = re.compile(r",\s*(?=(?:DNS|email|IP|IP Address|URI|otherName):)", re.IGNORECASE)


def split_subject(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """The WebDB's slash-form DN, SANs embedded as `/subjectAltName=DNS:x`, split in two.

    A `/` inside a value (`OU=http://www.CAcert.org`) is kept: only a `/` that starts the next
    `attribute=` splits. A wrongly split value yields an unknown attribute, which the signer
    refuses: a misreading ends in a refusal, never in a wrong certificate.
    """
    if not text or not text.startswith("/"):
        raise RowError(f"subject {text[:60]!r} is not in /attribute=value form")
    subject: list[list[str]] = []
    sans: list[list[str]] = []
    for item in _DN_SPLIT.split(text[1:]):
        name, found, value = item.partition("=")
        if not found or not name:
            raise RowError(f"subject item {item[:60]!r} is not attribute=value")
        value = value.replace("\\/", "/")
        if name == "subjectAltName":
            sans += [_san(part) for part in _SAN_SPLIT.split(value) if part.strip()]
        else:
            subject.append([name, value])
    return subject, sans


def _san(text: str) -> list[str]:
    kind, _, value = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "othername":
        oid, _, rest = value.partition(";")
        if oid.strip() == XMPP_OID and rest[:5].upper() == "UTF8:":
            return ["xmpp", rest[5:]]
        raise RowError(f"subjectAltName otherName {oid[:40]!r} is not XmppAddr")
    if kind in ("dns", "email", "uri"):
        return [kind, value]
    if kind in ("ip", "ip address"):
        return ["ip", value]
    raise RowError(f"unknown subjectAltName type {kind[:20]!r}")


@dataclass(frozen=True)
class X509Plan:
    """What a signing row asks for, before the signer's limits and the CSR."""

    profile: str
    subject: list[list[str]]
    sans: list[list[str]]
    validity_days: int
    digest: str | None


def profile_for(table: Table, row: dict[str, Any], sans: list[list[str]]) -> str:
    """The (table, type/codesign, rootcert, subject content) → profile mapping of the docs."""
    if table.server:
        if table.org and _int(row.get("type")) == 8:
            base = "ocsp"
        elif any(kind == "xmpp" for kind, _ in sans):
            base = "server-jabber"
        else:
            base = "server-org" if table.org else "server"
    elif _int(row.get("codesign")):
        base = "client-codesign"
    else:
        base = "client-org" if table.org else "client"
    issuer = ISSUER_BY_ROOTCERT.get(_int(row.get("rootcert")))
    if issuer is None:
        raise RowError(f"rootcert {row.get('rootcert')!r} is neither 1 (class 1) nor 2 (class 3)")
    return base if issuer == "class3" else f"{base}-class1"


def plan_x509(
    table: Table, row: dict[str, Any], points: int | None, rules: ValidityConfig
) -> X509Plan:
    subject, sans = split_subject(str(row.get("subject") or ""))
    if not table.server:  # e-mail addresses of the subject are the certificate's SANs too
        sans = _unique([["email", v] for n, v in subject if n == "emailAddress"] + sans)
    profile = profile_for(table, row, sans)
    if profile.split("-class1")[0] == "client":
        # Mailbox-validated S/MIME: a CN must be one of the addresses. A name or the
        # "CAcert WoT User" placeholder is dropped rather than refusing the member's request.
        subject = [[n, v] for n, v in subject if n != "CN" or "@" in v]
    digest = str(row.get("md") or "").strip().lower() or None
    return X509Plan(profile, subject, sans, validity_days(table, row, points, rules), digest)


def validity_days(
    table: Table, row: dict[str, Any], points: int | None, rules: ValidityConfig
) -> int:
    """The WebDB's rule: org server 730, org client 365, personal 730 if assured else 180."""
    if table.org:
        return rules.org_server_days if table.server else rules.org_client_days
    assured = _int(row.get("rootcert")) == 2 or (points or 0) >= rules.assured_points
    return rules.personal_assured_days if assured else rules.personal_days


def _unique(pairs: list[list[str]]) -> list[list[str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for kind, value in pairs:
        if (kind, value.lower()) not in seen:
            seen.add((kind, value.lower()))
            out.append([kind, value])
    return out


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return -1


def armor_openpgp(data: bytes) -> bytes:
    """ASCII armor for the certified key the web application offers (armored input stays)."""
    return data if data.lstrip().startswith(b"-----BEGIN PGP") else armor(data)


# --- request sources -------------------------------------------------------------------------


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
        """The command's arguments; a `SignerError` refuses the job without contacting the
        signer."""
        ...

    async def complete(self, job: Job, result: dict[str, Any]) -> None: ...

    async def fail(self, job: Job, error: SignerError) -> None: ...


class WebdbSource:
    """Polls the WebDB tables; reads CSR files, writes certificate files and the columns."""

    def __init__(self, db: Database, config: WebdbClientConfig):
        self.db = db
        self.config = config
        self.zone = config.zone()
        self.max_days: dict[str, int] = {}  # profile → maximum validity, from list_profiles
        self._watermark: dict[str, int] | None = None
        self._points_failed = False

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
            return self._revoke_args(row)
        if job.command == "sign_openpgp":
            key = self._read(str(row.get("csr") or ""), MAX_OPENPGP_KEY, "OpenPGP key")
            uids = [u for u in re.split(r"[\s,;]+", str(row.get("email") or "")) if u]
            if not uids:
                raise RowError("no e-mail address to certify")
            return {"public_key": key, "uids": uids}
        spec = X509_TABLES[table]
        points = None if spec.org else await self._points(spec, row)
        plan = plan_x509(spec, row, points, self.config.validity)
        args: dict[str, Any] = {
            "profile": plan.profile,
            "csr": self._read(str(row.get("csr_name") or ""), MAX_CSR, "CSR"),
            "subject": plan.subject,
            "validity_days": min(plan.validity_days, self.max_days.get(plan.profile, 36500)),
        }
        if plan.sans:
            args["sans"] = plan.sans
        if plan.digest:
            args["digest"] = plan.digest
        return args

    @staticmethod
    def _revoke_args(row: dict[str, Any]) -> dict[str, Any]:
        issuer = ISSUER_BY_ROOTCERT.get(_int(row.get("rootcert")))
        serial = str(row.get("serial") or "").strip()
        if issuer is None or not re.fullmatch(r"[0-9A-Fa-f]{1,42}", serial):
            raise RowError(f"cannot revoke: rootcert {row.get('rootcert')!r}, serial {serial!r}")
        return {"issuer": issuer, "serial": serial}

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
        """Assurance points of the member (class 3 needs >= 50, the web application checks)."""
        if _int(row.get("rootcert")) == 2 or self._points_failed:
            return None
        if table.name == "emailcerts":
            sql = "SELECT COALESCE(SUM(points), 0) AS p FROM notary WHERE `to` = ?"
            key = row.get("memid")
        else:
            sql = (
                "SELECT COALESCE(SUM(n.points), 0) AS p FROM notary n "
                "JOIN domains d ON n.`to` = d.memid WHERE d.id = ?"
            )
            key = row.get("domid")
        try:
            rows = await self.db.query(sql, (key,))
        except Exception as exc:
            self._points_failed = True
            log.warning("cannot read assurance points (%s): class 1 rows get %d days", exc,
                        self.config.validity.personal_days)  # fmt: skip
            return None
        return int(rows[0]["p"] or 0) if rows else 0

    # -- outcomes -----------------------------------------------------------------------------

    async def complete(self, job: Job, result: dict[str, Any]) -> None:
        table, row_id = job.data["table"], int(job.data["row"]["id"])
        now = db_time(datetime.now(UTC), self.zone)
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

    async def fail(self, job: Job, error: SignerError) -> None:
        table, row_id = job.data["table"], int(job.data["row"]["id"])
        await self.db.execute(f"UPDATE {table} SET warning = warning + 1 WHERE id = ?", (row_id,))


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a temporary file next to `path`, fsync, rename: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- lines to the signers --------------------------------------------------------------------


class SignerLines:
    """One `SignerClient` per serial line; a call that times out on one goes to the other with
    the same request id (the repository records an id once, so it never issues twice)."""

    def __init__(self, clients: list[SignerClient], names: list[str]):
        self.clients = clients
        self.names = names
        self.preferred = 0
        self.failovers = 0

    async def start(self) -> None:
        for client in self.clients:
            await client.start()

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    def _order(self) -> list[int]:
        n = len(self.clients)
        order = [(self.preferred + k) % n for k in range(n)]
        return sorted(order, key=lambda i: not self.clients[i].link.connected)

    async def call(
        self,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        request_id = request_id or new_request_id()
        error: SignerError | None = None
        for index in self._order():
            try:
                result = await self.clients[index].call(
                    command, args, request_id=request_id, timeout=timeout
                )
            except Unreachable as exc:
                if len(self.clients) == 1:
                    raise
                error = exc
                self._switch_from(index, exc)
                continue
            return result
        assert error is not None
        raise error

    def _switch_from(self, index: int, exc: SignerError) -> None:
        self.failovers += 1
        if self.preferred == index:
            self.preferred = (index + 1) % len(self.clients)
            log.warning(
                "line %s: %s; switching to line %s",
                self.names[index],
                exc,
                self.names[self.preferred],
            )


# --- health ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """Something an operator must look at."""

    level: Literal["warning", "error"]
    text: str


def health_alerts(
    line: str, report: dict[str, Any], now: datetime, max_skew_s: float
) -> list[Alert]:
    """What a signer's health report asks of an operator (pure: report and clock in)."""
    level: Literal["warning", "error"] = "error" if report.get("status") == "error" else "warning"
    alerts = [Alert(level, f"signer on line {line}: {text}") for text in report.get("warnings", [])]
    sections = report.get("sections", {})
    signer_time = report.get("time")
    if isinstance(signer_time, datetime):
        skew = (signer_time - now).total_seconds()
        if abs(skew) > max_skew_s:
            alerts.append(
                Alert("warning", f"signer on line {line}: clock differs from ours by {skew:+.0f} s")
            )
    cluster = sections.get("cluster") or {}
    if cluster.get("quorum") is False and not any("quorum" in a.text for a in alerts):
        alerts.append(Alert("error", f"signer on line {line}: the cluster has lost its quorum"))
    for name, ca in (sections.get("cas") or {}).items():
        days = ca.get("days_left") if isinstance(ca, dict) else None
        if isinstance(days, int) and days < 0 and not any(name in a.text for a in alerts):
            alerts.append(Alert("error", f"signer on line {line}: CA {name} has expired"))
    return alerts


# --- CRLs ------------------------------------------------------------------------------------


def _crl_error(message: str) -> BadCrl:
    return BadCrl(message)


def verify_crl(
    der: bytes, issuer: x509.Certificate, have_number: int | None = None
) -> x509.CertificateRevocationList:
    """The CRL, if it is the issuer's, its signature verifies and it does not go back in time."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise _crl_error(f"not a DER CRL: {exc}") from None
    if crl.issuer != issuer.subject:
        raise _crl_error(f"issued by {crl.issuer.rfc4514_string()}, not by the issuer")
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise _crl_error("its signature does not verify with the issuer's key")
    number = crl_number(crl)
    if number is None:
        raise _crl_error("it has no CRL number")
    if have_number is not None and number < have_number:
        raise _crl_error(f"CRL number {number} is older than the published {have_number}")
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


async def publish_crl(refresher: CrlRefresher, path: Path) -> str:
    """Refresh one issuer's CRL with the CRL component's helper (signer/crl_refresh.py: deltas,
    resumable chunked transfers), check it again here and publish it atomically."""
    have = _published(path, refresher.certificate)
    have_number = crl_number(x509.load_der_x509_crl(have)) if have else None
    refreshed = await refresher.refresh(have)
    if refreshed.kind == "unchanged" and have is not None:
        return "unchanged"
    crl = verify_crl(refreshed.der, refresher.certificate, have_number)
    await asyncio.to_thread(write_atomically, path, refreshed.der)
    number = crl_number(crl)
    log.info(
        "published CRL %s of %s (%s, %d entries, %d bytes over the line) at %s",
        number,
        refresher.issuer,
        refreshed.kind,
        len(crl),
        refreshed.received,
        path,
    )
    next_update = crl.next_update_utc
    if next_update is not None and next_update < datetime.now(UTC):
        log.error(
            "operator: the CRL of %s expired at %s (nextUpdate)", refresher.issuer, next_update
        )
    return f"published {number} ({refreshed.kind})"


def _published(path: Path, issuer: x509.Certificate) -> bytes | None:
    """The CRL already published, if it is one we would publish again (else fetch it whole)."""
    try:
        der = path.read_bytes()
        verify_crl(der, issuer)
        return der
    except (OSError, BadCrl):
        return None


# --- the client ------------------------------------------------------------------------------


@dataclass
class PassReport:
    """What one pass over the pending requests did."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # request id → error code
    deferred: dict[str, str] = field(default_factory=dict)  # not the row's fault: next pass
    recovered: list[str] = field(default_factory=list)  # outcomes fetched by request_status


class WebdbClient:
    """Drives the signer from a request source; `run_once` and `run_forever` are the entries."""

    def __init__(
        self,
        config: WebdbClientConfig,
        source: RequestSource | None = None,
        lines: SignerLines | None = None,
    ):
        self.config = config
        self.db: Database | None = None
        if source is None:
            self.db = Database(config.database)
            source = WebdbSource(self.db, config)
        self.source = source
        self.lines = lines or SignerLines(
            [
                SignerClient(
                    line.settings(),
                    max_in_flight=config.max_in_flight,
                    timeout=config.timeout,
                    attempts=config.attempts,
                    name=f"webdb-line{number}",
                )
                for number, line in enumerate(config.lines, start=1)
            ],
            [line.device for line in config.lines],
        )
        self._uncertain: set[str] = set()  # sent, outcome unknown: ask request_status first
        self._profiles_at = 0.0
        self._issuers: dict[str, x509.Certificate] = {}
        self._refreshers: dict[str, CrlRefresher] = {}  # they keep a broken transfer's progress

    async def start(self) -> None:
        await self.lines.start()

    async def close(self) -> None:
        await self.lines.close()
        if self.db is not None:
            await self.db.close()

    async def __aenter__(self) -> WebdbClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- requests -----------------------------------------------------------------------------

    async def process_pending(self) -> PassReport:
        """One poll: every pending job, concurrently (bounded); failures stay with their row."""
        report = PassReport()
        jobs = await self.source.pending()
        if not jobs:
            return report
        try:
            await self._refresh_profiles()
        except (SignerError, Unreachable) as exc:
            if not is_transient(exc):
                raise
            log.warning("signer not reachable (%s): %d requests wait", exc, len(jobs))
            report.deferred = {job.request_id: failure_name(exc) for job in jobs}
            return report
        slots = asyncio.Semaphore(self.config.max_in_flight * len(self.lines.clients))

        async def bounded(job: Job) -> None:
            async with slots:
                await self._process(job, report)

        await asyncio.gather(*(bounded(job) for job in jobs))
        return report

    async def _refresh_profiles(self) -> None:
        if not isinstance(self.source, WebdbSource):
            return
        if self.source.max_days and time.monotonic() - self._profiles_at < PROFILE_CACHE_S:
            return
        answer = await self.lines.call("list_profiles")
        self.source.max_days = {p["name"]: p["max_validity_days"] for p in answer["profiles"]}
        self._profiles_at = time.monotonic()

    async def _process(self, job: Job, report: PassReport) -> None:
        try:
            result = None
            if job.maybe_sent or job.request_id in self._uncertain:
                result = await self._earlier_outcome(job)
                if result is not None:
                    report.recovered.append(job.request_id)
            if result is None:
                args = await self.source.arguments(job)
                self._uncertain.add(job.request_id)
                result = await self.lines.call(job.command, args, request_id=job.request_id)
                await _pause_hook(job)
        except (SignerError, ClientFailure) as exc:
            await self._refused(job, exc, report)
            return
        try:
            await self.source.complete(job, result)
        except Exception as exc:  # the signer recorded it: written back on a later pass
            log.error("%s: done by the signer but not written back: %s", job.label, exc)
            report.deferred[job.request_id] = "write_back"
            return
        self._uncertain.discard(job.request_id)
        report.done.append(job.request_id)
        log.info("%s: done%s", job.label, _summary(result))

    async def _earlier_outcome(self, job: Job) -> dict[str, Any] | None:
        status = await self.lines.call("request_status", {"request_id": job.request_id})
        if status["state"] != "done" or status.get("result") is None:
            return None
        if status.get("command") != job.command:
            raise SignerError(
                ErrorCode.REQUEST_ID_CONFLICT,
                f"request id {job.request_id!r} was used for {status.get('command')}",
            )
        return status["result"]

    async def _refused(self, job: Job, exc: Failure, report: PassReport) -> None:
        if is_transient(exc):
            log.warning("%s: waits for the signer: %s", job.label, exc)
            report.deferred[job.request_id] = failure_name(exc)
            return
        self._uncertain.discard(job.request_id)  # refusals are not recorded by the signer
        if isinstance(exc, SignerError) and exc.code is ErrorCode.VALIDITY_TOO_LONG:
            self._profiles_at = 0.0  # the profile's maximum changed: read it again
        report.failed[job.request_id] = failure_name(exc)
        log.warning("%s: refused: %s", job.label, exc)
        try:
            await self.source.fail(job, exc)
        except Exception as db_exc:
            log.error("%s: cannot record the failure: %s", job.label, db_exc)

    # -- CRLs and health ----------------------------------------------------------------------

    async def refresh_crls(self) -> dict[str, str]:
        """Fetch, verify and publish each configured issuer's CRL; one failure stays its own."""
        outcome: dict[str, str] = {}
        for name, path in self.config.crl.outputs.items():
            try:
                if name not in self._refreshers:
                    issuer = await self._issuer(name)
                    size = self.config.crl.chunk_bytes
                    self._refreshers[name] = CrlRefresher(self.lines.call, name, issuer, size)
                outcome[name] = await publish_crl(self._refreshers[name], path)
            except (SignerError, ClientFailure) as exc:
                outcome[name] = f"failed: {exc}"
                log.error("operator: the CRL of %s was not published: %s", name, exc)
        return outcome

    async def _issuer(self, name: str) -> x509.Certificate:
        if name not in self._issuers:
            answer = await self.lines.call("list_issuers")
            self._issuers = {
                i["name"]: x509.load_der_x509_certificate(i["certificate"])
                for i in answer["issuers"]
            }
        if name not in self._issuers:
            raise SignerError(ErrorCode.UNKNOWN_ISSUER, f"the signer has no issuer {name!r}")
        return self._issuers[name]

    async def check_health(self) -> list[Alert]:
        """Ask every line's signer for its health; log what needs an operator."""
        alerts: list[Alert] = []
        for client, name in zip(self.lines.clients, self.lines.names, strict=True):
            try:
                report = await client.call("health", timeout=min(self.config.timeout, 30.0))
            except (SignerError, Unreachable) as exc:
                alerts.append(Alert("error", f"signer on line {name} is not answering: {exc}"))
                continue
            alerts += health_alerts(name, report, datetime.now(UTC), self.config.max_clock_skew_s)
        for alert in alerts:
            level = logging.ERROR if alert.level == "error" else logging.WARNING
            log.log(level, "operator: %s", alert.text)
        return alerts

    # -- loops --------------------------------------------------------------------------------

    async def run_once(self) -> dict[str, Any]:
        """One pass of everything: requests, CRLs, health (the demo and `--once`)."""
        requests = await self.process_pending()
        crls = await self.refresh_crls()
        alerts = await self.check_health()
        return {"requests": requests, "crls": crls, "alerts": alerts}

    async def run_forever(self, stop: asyncio.Event) -> None:
        c = self.config
        await asyncio.gather(
            self._every(c.poll_interval, self.process_pending, stop),
            self._every(c.crl.interval, self.refresh_crls, stop),
            self._every(c.health_interval, self.check_health, stop),
        )

    @staticmethod
    async def _every(
        interval: float, job: Callable[[], Awaitable[Any]], stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            try:
                await job()
            except Exception:
                log.exception("%s failed; trying again in %.0f s", job.__name__, interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def _summary(result: dict[str, Any]) -> str:
    if "serial" in result:
        return f": serial {result['serial']}"
    if "fingerprint" in result:
        return f": key {result['fingerprint']}"
    return ""


async def _pause_hook(job: Job) -> None:
    """Tests only: hang after the signer's answer, before writing back (to be killed there)."""
    marker = os.environ.get(PAUSE_HOOK_ENV)
    if marker:
        Path(marker).write_text(job.request_id)
        await asyncio.sleep(3600)


# --- the demo's database ---------------------------------------------------------------------

_DATE = "DATETIME NOT NULL DEFAULT '0000-00-00 00:00:00'"
_COLUMNS: dict[str, str] = {
    "serial": "VARCHAR(50) NOT NULL DEFAULT ''",
    "CN": "VARCHAR(255) NOT NULL DEFAULT ''",
    "subject": "TEXT NOT NULL",
    "keytype": "CHAR(2) NOT NULL DEFAULT 'NS'",
    "csr_name": "VARCHAR(255) NOT NULL DEFAULT ''",
    "crt_name": "VARCHAR(255) NOT NULL DEFAULT ''",
    "created": _DATE,
    "modified": _DATE,
    "revoked": _DATE,
    "expire": _DATE,
    "renewed": "INT NOT NULL DEFAULT 0",
    "rootcert": "INT NOT NULL DEFAULT 1",
    "md": "VARCHAR(7) NOT NULL DEFAULT 'sha256'",
    "description": "VARCHAR(100) NOT NULL DEFAULT ''",
    "ou": "VARCHAR(255) NOT NULL DEFAULT ''",
    "email": "VARCHAR(255) NOT NULL DEFAULT ''",
    "csr": "VARCHAR(255) NOT NULL DEFAULT ''",
    "crt": "VARCHAR(255) NOT NULL DEFAULT ''",
    "issued": _DATE,
    "expires": _DATE,
    "keyid": "VARCHAR(16) NOT NULL DEFAULT ''",
    "pkhash": "CHAR(40) NOT NULL DEFAULT ''",
    "certhash": "CHAR(40) NOT NULL DEFAULT ''",
    "domain": "VARCHAR(255) NOT NULL DEFAULT ''",
}
_CERT = "serial CN subject csr_name crt_name created modified revoked expire warning renewed "
_CERT += "rootcert md type pkhash certhash coll_found description"
SCHEMA: dict[str, str] = {  # the columns the WebDB's tables have (docs/webdb-client.md)
    "emailcerts": "memid " + _CERT + " keytype codesign disablelogin",
    "domaincerts": "domid " + _CERT,
    "orgdomaincerts": "orgid " + _CERT + " orgadminid revokeorgadminid",
    "orgemailcerts": "orgid " + _CERT + " orgadminid revokeorgadminid keytype codesign ou",
    "gpg": "memid email level multiple expires csr crt issued expire keyid warning description",
    "notary": "from to points",
    "domains": "memid domain",
}


async def create_schema(db: Database) -> None:
    """The WebDB tables the client reads and writes (and `notary`/`domains` for the points)."""
    for table, columns in SCHEMA.items():
        parts = [f"id {db.dialect.id_column}"]
        parts += [f"`{c}` {_COLUMNS.get(c, 'INT NOT NULL DEFAULT 0')}" for c in columns.split()]
        await db.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(parts)}){db.dialect.table_suffix}"
        )


async def insert_row(db: Database, table: str, values: dict[str, Any]) -> int:
    """Insert one row the way the web application does; returns its id."""
    names = ", ".join(f"`{name}`" for name in values)
    marks = ", ".join("?" for _ in values)
    await db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", tuple(values.values()))
    rows = await db.query(f"SELECT MAX(id) AS id FROM {table}")
    return int(rows[0]["id"])


async def request_revocation(db: Database, table: str, row_id: int) -> None:
    """What the web application does when a member revokes a certificate."""
    await db.execute(f"UPDATE {table} SET revoked = ? WHERE id = ?", (REVOCATION_SENTINEL, row_id))


async def demo_rows(db: Database, base_dir: Path) -> dict[str, int]:
    """Schema and one pending row of each kind, with their CSR files under `base_dir/../csr`.

    Returns {label: row id}. Revocations are asked for with `request_revocation` once a row has
    its certificate; the OpenPGP row needs a key file (see `openpgp_row`).
    """
    await create_schema(db)
    now = db_time(datetime.now(UTC))
    await insert_row(db, "domains", {"memid": 1, "domain": "example.org"})
    await insert_row(db, "notary", {"from": 2, "to": 1, "points": 100})
    rows = {
        "client": ("emailcerts", "/CN=Alice Example/emailAddress=alice@example.org",
                   {"memid": 1, "rootcert": 2, "codesign": 0}, "rsa", False),
        "client-class1-spkac": ("emailcerts", "/CN=CAcert WoT User/emailAddress=bob@example.org",
                                {"memid": 3, "rootcert": 1, "keytype": "NS"}, "rsa", True),
        "codesign": ("emailcerts", "/CN=Alice Example/emailAddress=alice@example.org",
                     {"memid": 1, "rootcert": 2, "codesign": 1}, "ec", False),
        "server": ("domaincerts", "/CN=www.example.org/subjectAltName=DNS:www.example.org"
                   "/subjectAltName=DNS:example.org", {"domid": 1, "rootcert": 2}, "ec", False),
        "jabber": ("domaincerts", "/CN=jabber.example.org/subjectAltName=DNS:jabber.example.org"
                   f"/subjectAltName=otherName:{XMPP_OID};UTF8:jabber.example.org",
                   {"domid": 1, "rootcert": 2}, "ec", False),
        "org-client": ("orgemailcerts", "/CN=Example Org/emailAddress=office@example.org"
                       "/O=Example Org/organizationIdentifier=NTRDE-HRB12345/L=Berlin/C=DE",
                       {"orgid": 1, "rootcert": 2}, "rsa", False),
        "org-server": ("orgdomaincerts", "/CN=shop.example.org/O=Example Org/L=Berlin/C=DE"
                       "/subjectAltName=DNS:shop.example.org", {"orgid": 1, "rootcert": 2},
                       "ec", False),
    }  # fmt: skip
    ids = {}
    for label, (table, subject, extra, kind, spkac) in rows.items():
        row_id = await insert_row(
            db, table, {"subject": subject, "created": now, "md": "sha256", **extra}
        )
        prefix = X509_TABLES[table].prefix
        name = f"../csr/{prefix}/{row_id // 1000}/{prefix}-{row_id}.csr"
        key = (
            rsa.generate_private_key(65537, 2048)
            if kind == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        csr = make_spkac(key) if spkac else make_csr(key)
        write_atomically(base_dir / name, csr)
        await db.execute(f"UPDATE {table} SET csr_name = ? WHERE id = ?", (name, row_id))
        ids[label] = row_id
    return ids


async def openpgp_row(db: Database, base_dir: Path, public_key: bytes, email: str) -> int:
    """A pending `gpg` row for an OpenPGP public key (armored or binary)."""
    row_id = await insert_row(db, "gpg", {"memid": 1, "email": email, "level": 1})
    name = f"../csr/{GPG_PREFIX}/{row_id // 1000}/{GPG_PREFIX}-{row_id}.csr"
    write_atomically(base_dir / name, public_key)
    await db.execute("UPDATE gpg SET csr = ? WHERE id = ?", (name, row_id))
    return row_id


def make_csr(key: Any, common_name: str = "ignored: the WebDB's subject counts") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_spkac(key: Any) -> bytes:
    """`SPKAC=<base64>` as Netscape keygen produced it (openssl spkac, SHA-256)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with tempfile.NamedTemporaryFile(suffix=".pem") as handle:
        handle.write(pem)
        handle.flush()
        out = subprocess.run(
            ["openssl", "spkac", "-key", handle.name, "-challenge", "demo", "-digest", "sha256"],
            capture_output=True,
            check=True,
        )
    return out.stdout


__all__ = [
    "Database",
    "DatabaseConfig",
    "Job",
    "RequestSource",
    "SignerLines",
    "WebdbClient",
    "WebdbClientConfig",
    "WebdbSource",
    "create_schema",
    "demo_rows",
    "health_alerts",
    "openpgp_row",
    "publish_crl",
    "request_revocation",
    "split_subject",
    "verify_crl",
]
