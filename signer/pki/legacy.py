"""The state of the signer CAcert ran before (`openssl ca`), read and written as text.

An `openssl ca` database is a file `index.txt` with one line per certificate, six fields
separated by tabs: status (`V` valid, `R` revoked, `E` marked expired by `-updatedb`), expiry,
revocation (`time[,reason[,argument]]`, empty unless revoked), serial (hex), file name (usually
`unknown`) and subject (openssl's one-line form). `serial` holds the next serial and `crlnumber`
the next CRL number, both in hex. The WebDB's certificate tables give serial, expiry and
revocation time too (`parse_webdb_rows`, from a tab-separated export).

Pure: bytes in, records and problems out (each problem with its line number), and the way back
(`index_line`), so that an export imports again to the same records. docs/migration.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from signer.pki.der import serial_hex

SERIAL_LIMIT = 2**159  # what the repository keeps (RFC 5280: 20 octets, positive)
TIME_LIMIT = 253402300800  # 10000-01-01: past any ASN.1 time

# openssl ca's reason names (compared case-insensitively, as openssl does), and the two RFC 5280
# reasons openssl has no name for, which this signer can record and so must be able to export.
REASONS: dict[str, int] = {
    "unspecified": 0,
    "keyCompromise": 1,
    "CACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
    "privilegeWithdrawn": 9,
    "AACompromise": 10,
}
REASON_NAMES = {code: name for name, code in REASONS.items()}
_REASONS_FOLDED = {name.lower(): code for name, code in REASONS.items()}
KEY_TIME = {"keytime": 1, "cakeytime": 2}  # keyCompromise / cACompromise with invalidityDate
KEY_TIME_NAMES = {1: "keyTime", 2: "CAkeyTime"}
STATUSES = ("V", "R", "E")
_STATUS = {status.encode(): status for status in STATUSES}
UNKNOWN = b"unknown"  # index.txt's file name column, nearly always

# The WebDB: datetimes as MySQL prints them; the two that are not times.
WEBDB_NO_TIME = ("", "NULL", "0000-00-00 00:00:00")
WEBDB_REVOCATION_PENDING = "1970-01-01 10:00:01"  # the web application's "please revoke"
WEBDB_COLUMNS = ("serial", "rootcert", "expire", "revoked")

_HEX = re.compile(r"[0-9A-Fa-f]{1,40}")
_DIGITS = re.compile(r"[0-9]+")
_WEBDB_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)")


class LegacyError(ValueError):
    """A field that cannot be read; the caller adds where it was."""


@dataclass(frozen=True)
class Problem:
    """A bad input line: which file, which line (1-based; 0 for the file as a whole), why."""

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.message}"


class LegacyRecord(NamedTuple):
    """One certificate of the earlier signer, as its database describes it."""

    line: int  # where it was read (0: not read from a file)
    status: str  # "V", "R" or "E"
    serial: int
    not_after: int  # Unix seconds UTC
    revoked_at: int | None = None
    reason: int | None = None  # RFC 5280 code; 0 is an explicit "unspecified"
    invalidity_date: int | None = None
    file: bytes = UNKNOWN
    subject: bytes = b""

    @property
    def revoked(self) -> bool:
        return self.status == "R"


# --------------------------------------------------------------------------- times


def parse_asn1_time(text: str) -> int:
    """`YYMMDDHHMMSSZ` (UTCTime, 1950-2049) or `YYYYMMDDHHMMSSZ` (GeneralizedTime), as openssl
    writes them in index.txt, to Unix seconds. (A million lines: one int() per time, and each
    day's midnight computed once.)"""
    size = len(text)
    if size == 13 and text[12] == "Z" and text[:12].isdigit():
        value = int(text[:12])
        day = value // 1_000_000
        day += 19_000_000 if day >= 500_000 else 20_000_000  # YYMMDD -> YYYYMMDD
    elif size == 15 and text[14] == "Z" and text[:14].isdigit():
        value = int(text[:14])
        day = value // 1_000_000
    else:
        raise LegacyError(f"time {text[:40]!r} is not YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ")
    hour, rest = divmod(value % 1_000_000, 10_000)
    minute, second = divmod(rest, 100)
    midnight = _MIDNIGHTS.get(day)
    if midnight is None:
        midnight = _midnight(day)
        if midnight >= 0:
            _MIDNIGHTS[day] = midnight  # valid days only: a few thousand in any history
    if midnight < 0 or hour > 23 or minute > 59 or second > 59:
        raise LegacyError(f"time {text[:40]!r} is out of range")
    return midnight + 3600 * hour + 60 * minute + second


_MIDNIGHTS: dict[int, int] = {}  # YYYYMMDD -> Unix seconds at 00:00 UTC


def _midnight(day: int) -> int:
    """Negative for a day that does not exist or lies before 1970 (the repository keeps Unix
    seconds from 0): both are out of range."""
    try:
        moment = datetime(day // 10_000, day // 100 % 100, day % 100, tzinfo=UTC)
    except ValueError:
        return -1
    return int(moment.timestamp())


def _timestamp(text: str, *fields: int) -> int:
    """Unix seconds of (year, month, day, hour, minute, second) UTC; LegacyError if no such."""
    year, month, day, hour, minute, second = fields
    try:
        moment = int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())
    except ValueError:
        moment = -1
    if moment < 0:  # no such time, or before 1970 (the repository keeps Unix seconds from 0)
        raise LegacyError(f"time {text[:40]!r} is out of range")
    return moment


def asn1_time(moment: int) -> str:
    """The index.txt form of a time: UTCTime through 2049, GeneralizedTime from 2050 (what
    RFC 5280 certificates carry and openssl copies)."""
    when = datetime.fromtimestamp(moment, UTC)
    if 1950 <= when.year < 2050:
        return when.strftime("%y%m%d%H%M%SZ")
    return when.strftime("%Y%m%d%H%M%SZ")


def generalized_time(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y%m%d%H%M%SZ")


def parse_generalized_time(text: str) -> int:
    if len(text) != 15:
        raise LegacyError(f"time {text[:40]!r} is not YYYYMMDDHHMMSSZ")
    return parse_asn1_time(text)


# --------------------------------------------------------------------------- fields


def parse_serial(text: str) -> int:
    """A serial in hex (any case), 1 to 2**159 - 1."""
    if not _HEX.fullmatch(text):
        raise LegacyError(f"serial {text[:48]!r} is not 1 to 40 hex digits")
    serial = int(text, 16)
    if not 1 <= serial < SERIAL_LIMIT:
        raise LegacyError(f"serial {text} is out of range (1 to 2**159 - 1)")
    return serial


def parse_revocation(text: str) -> tuple[int, int | None, int | None]:
    """index.txt's revocation field: (revoked_at, reason, invalidity_date).

    `time`, `time,reason`, `time,keyTime,<GeneralizedTime>` (keyCompromise with an invalidity
    date) or `time,CAkeyTime,<GeneralizedTime>`. removeFromCRL (delta CRLs only) and
    holdInstruction (an instruction code RFC 5280 no longer has) are refused."""
    revoked, _, rest = text.partition(",")
    if not revoked:
        raise LegacyError("revoked without a revocation time")
    revoked_at = parse_asn1_time(revoked)
    if not rest:
        return revoked_at, None, None
    name, _, argument = rest.partition(",")
    folded = name.lower()
    if folded in KEY_TIME:
        if not argument:
            raise LegacyError(f"{name} without the compromise time")
        return revoked_at, KEY_TIME[folded], parse_generalized_time(argument)
    if folded == "removefromcrl":
        raise LegacyError("removeFromCRL belongs to delta CRLs: mark the certificate V instead")
    if folded == "holdinstruction":
        raise LegacyError("holdInstruction codes are not supported: use certificateHold")
    if argument:
        raise LegacyError(f"reason {name[:40]!r} takes no argument")
    if folded not in _REASONS_FOLDED:
        raise LegacyError(f"unknown revocation reason {name[:40]!r}")
    return revoked_at, _REASONS_FOLDED[folded], None


def revocation_field(revoked_at: int, reason: int | None, invalidity_date: int | None) -> str:
    """The way back of `parse_revocation`. An invalidity date goes with keyCompromise and
    cACompromise only (what openssl can say); with another reason it is left out."""
    text = asn1_time(revoked_at)
    if invalidity_date is not None and reason in KEY_TIME_NAMES:
        return f"{text},{KEY_TIME_NAMES[reason]},{generalized_time(invalidity_date)}"
    if reason is None:
        return text
    return f"{text},{REASON_NAMES[reason]}"


def parse_number_file(data: bytes, what: str) -> int:
    """`serial` or `crlnumber`: one hex number on its first line."""
    text = data.decode("ascii", "replace").strip()
    if not text or not _HEX.fullmatch(text):
        raise LegacyError(f"{what} does not hold one hex number")
    return int(text, 16)


# --------------------------------------------------------------------------- index.txt


def parse_index(data: bytes, source: str = "index.txt") -> tuple[list[LegacyRecord], list[Problem]]:
    """Every record of an index.txt, and every bad line (nothing of a bad line is kept).

    Bad: not six fields, an unknown status, a revocation field on a valid certificate or none on
    a revoked one, a time or serial that cannot be read or is out of range, a serial that
    appears twice (both lines are named)."""
    records: list[LegacyRecord] = []
    problems: list[Problem] = []
    seen: dict[int, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line.strip():
            continue
        try:
            record = _index_record(number, line)
        except LegacyError as exc:
            problems.append(Problem(source, number, str(exc)))
            continue
        first = seen.setdefault(record.serial, number)
        if first != number:
            problems.append(
                Problem(source, number, f"serial {serial_hex(record.serial)} also on line {first}")
            )
            continue
        records.append(record)
    return records, problems


def _index_record(number: int, line: bytes) -> LegacyRecord:
    fields = line.split(b"\t")
    if len(fields) != 6:
        raise LegacyError(f"{len(fields)} tab-separated fields, index.txt lines have 6")
    status_raw, expiry, revocation, serial, file, subject = fields
    status = _STATUS.get(status_raw)
    if status is None:
        raise LegacyError(f"status {status_raw[:8].decode('ascii', 'replace')!r} is not V, R or E")
    not_after = parse_asn1_time(expiry.decode("ascii", "replace"))
    revoked_at = reason = invalidity = None
    if status == "R":
        revoked_at, reason, invalidity = parse_revocation(revocation.decode("ascii", "replace"))
    elif revocation:
        raise LegacyError(f"status {status} but a revocation field")
    return LegacyRecord(
        number,
        status,
        parse_serial(serial.decode("ascii", "replace")),
        not_after,
        revoked_at,
        reason,
        invalidity,
        UNKNOWN if file == UNKNOWN else file,  # one object for the usual value
        subject,
    )


def index_line(record: LegacyRecord) -> bytes:
    """One index.txt line (without its newline): the way back of `parse_index`."""
    revocation = b""
    if record.revoked_at is not None:
        field = revocation_field(record.revoked_at, record.reason, record.invalidity_date)
        revocation = field.encode("ascii")
    return b"\t".join(
        (
            record.status.encode("ascii"),
            asn1_time(record.not_after).encode("ascii"),
            revocation,
            serial_hex(record.serial).encode("ascii"),
            record.file,
            record.subject,
        )
    )


def index_text(records: Iterable[LegacyRecord]) -> bytes:
    return b"".join(index_line(record) + b"\n" for record in records)


# --------------------------------------------------------------------------- the WebDB


@dataclass(frozen=True)
class WebdbRow:
    """A certificate row of the WebDB: its root (`rootcert`, 1 or 2) and what it says."""

    rootcert: int
    record: LegacyRecord


def parse_webdb_rows(
    data: bytes, source: str = "webdb rows"
) -> tuple[list[WebdbRow], list[Problem], int]:
    """Rows of a tab-separated export of the WebDB's certificate tables (`mysql --batch`: a
    header line of column names, then one row per line), their problems, and how many rows were
    skipped because they hold no certificate (empty serial: never issued).

    Columns used: serial, rootcert, expire, revoked; subject and crt_name if present. `revoked`
    is '0000-00-00 00:00:00' (or NULL) for a valid certificate, the web application's sentinel
    for a revocation asked for but not done (imported as valid: the WebDB client revokes it
    after the switch), else the revocation time. Times are taken as UTC."""
    lines = data.split(b"\n")
    header = [name.strip().decode("utf-8", "replace") for name in lines[0].split(b"\t")]
    missing = [name for name in WEBDB_COLUMNS if name not in header]
    if missing:
        return [], [Problem(source, 1, f"no column(s) {', '.join(missing)} in the header")], 0
    rows: list[WebdbRow] = []
    problems: list[Problem] = []
    skipped = 0
    for number, raw in enumerate(lines[1:], start=2):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line.strip():
            continue
        values = line.split(b"\t")
        if len(values) != len(header):
            problems.append(Problem(source, number, f"{len(values)} fields, the header has "
                                    f"{len(header)}"))  # fmt: skip
            continue
        row = dict(zip(header, values, strict=True))
        if not row["serial"].strip() or row["serial"] == b"NULL":
            skipped += 1
            continue
        try:
            rows.append(_webdb_row(number, row))
        except LegacyError as exc:
            problems.append(Problem(source, number, str(exc)))
    return rows, problems, skipped


def _webdb_row(number: int, row: dict[str, bytes]) -> WebdbRow:
    rootcert_text = row["rootcert"].decode("ascii", "replace").strip()
    if not _DIGITS.fullmatch(rootcert_text):
        raise LegacyError(f"rootcert {rootcert_text[:8]!r} is not a number")
    serial = parse_serial(row["serial"].decode("ascii", "replace").strip())
    expire = row["expire"].decode("ascii", "replace").strip()
    if expire in WEBDB_NO_TIME:
        raise LegacyError("a certificate without an expiry")
    revoked = row["revoked"].decode("ascii", "replace").strip()
    revoked_at = None
    if revoked not in WEBDB_NO_TIME and revoked != WEBDB_REVOCATION_PENDING:
        revoked_at = parse_webdb_time(revoked)
    subject = row.get("subject", b"")
    return WebdbRow(
        int(rootcert_text),
        LegacyRecord(
            number,
            "R" if revoked_at is not None else "V",
            serial,
            parse_webdb_time(expire),
            revoked_at,
            subject=b"" if subject == b"NULL" else subject,
        ),
    )


def parse_webdb_time(text: str) -> int:
    match = _WEBDB_TIME.fullmatch(text)
    if match is None:
        raise LegacyError(f"time {text[:40]!r} is not YYYY-MM-DD HH:MM:SS")
    return _timestamp(text, *(int(group) for group in match.groups()))
