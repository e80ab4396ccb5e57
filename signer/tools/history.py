"""`signer import` and `signer export`: an earlier CA's history into the repository, and back.

Import reads, per issuer, the state `openssl ca` kept (a directory with `index.txt`, `serial`,
`crlnumber`, the issued certificates in `newcerts/<SERIAL>.pem` and the last CRL as `crl.pem` or
`crl.der`; every file but index.txt optional) and/or a tab-separated export of the WebDB's
certificate rows. The WHOLE input is checked first: every bad line is reported with its line
number and nothing is written. Then every record is decided (its CRL entry encoded, whether the
imported CRL lists it) and the import is sent to the running signer over its control socket
(signer/server/importer.py) as log entries of at most 32 KiB; the repository records the import's
progress with the data, so an interrupted import continues where it stopped when the same command
runs again. Export writes the same layout back from the repository. docs/migration.md.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from signer.config import ConfigError
from signer.pki.der import serial_hex
from signer.pki.legacy import (
    LegacyError,
    LegacyRecord,
    Problem,
    asn1_time,
    index_line,
    parse_index,
    parse_number_file,
    parse_webdb_rows,
)
from signer.pki.revocation import encode_crl_entry
from signer.server.config import SignerConfig
from storage import (
    MAX_IMPORT_ENTRY_BYTES,
    BeginImport,
    FinishImport,
    ImportedCertificate,
    ImportX509,
    encode,
)
from storage.commands import MAX_FILE_BYTES, MAX_SUBJECT_BYTES

Progress = Callable[[str], None]

DEFAULT_ROOTCERTS = {1: "class1", 2: "class3"}  # the WebDB's rootcert -> issuer name
FUTURE_TOLERANCE = 300  # seconds a revocation time may lie ahead of this host's clock
FIRST_IMPORTED_CRL = 1  # without crlnumber or a CRL: as if the ceremony's CRL 1 were the last
RECORD_OVERHEAD = 80  # msgpack bytes of a record besides its variable fields (at most 73)
CRL_ENTRY_BOUND = 96  # the largest CRL entry: serial, time, reason, invalidity date
ENTRY_OVERHEAD = 200  # an import_x509 entry besides its records (at most ~170)
POOL_THRESHOLD = 2000  # certificate files checked in worker processes beyond this
POOL_CHUNK = 1000
TRANSIENT = frozenset({"not_committed", "no_quorum", "busy", "clock_behind"})
RETRIES = 5  # a batch refused for a transient reason: the import continues by itself
RETRY_SECONDS = 2.0
INDEX = "index.txt"
CERTS_DIR = "newcerts"
CRL_FILES = ("crl.pem", "crl.der")


class BadHistory(Exception):
    """The input has bad lines: nothing was imported. `problems` names each."""

    def __init__(self, problems: list[Problem]):
        super().__init__(f"{len(problems)} problem(s) in the input; nothing was imported")
        self.problems = problems


@dataclass(frozen=True)
class IssuerCa:
    """An issuer as the signer is configured with it."""

    name: str
    certificate: x509.Certificate

    @property
    def key_id(self) -> bytes:
        return x509.SubjectKeyIdentifier.from_public_key(self.certificate.public_key()).digest


def issuer_cas(config: SignerConfig) -> dict[str, IssuerCa]:
    """The issuers of the signer's configuration, their certificates read."""
    issuers = {}
    for name, issuer in config.issuers.items():
        try:
            certificate = x509.load_pem_x509_certificate(issuer.certificate.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"issuer {name}: cannot read {issuer.certificate}: {exc}") from None
        issuers[name] = IssuerCa(name, certificate)
    if not issuers:
        raise ConfigError("the signer's configuration has no issuers")
    return issuers


# --------------------------------------------------------------------------- the plan


@dataclass
class IssuerPlan:
    """One issuer's import, decided: its records in serial order and how they are batched."""

    issuer: IssuerCa
    import_id: str
    records: list[ImportedCertificate]
    crl_number: int  # the earlier CA's last CRL number
    crl_time: int  # thisUpdate of the CRL the import stands for
    crl_time_from: str
    removed_before: int | None
    source: str
    bounds: list[int]  # batch n holds records[bounds[n-1]:bounds[n]]
    counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    old_crl_serials: set[int] | None = None

    @property
    def batches(self) -> int:
        return len(self.bounds) - 1

    def begin(self, started_at: int, after: int | None = None) -> BeginImport:
        """The command that starts the import; `after`: the signer's last CRL number, which the
        imported one must pass (a new signer published an empty CRL 2 at its first start)."""
        return BeginImport(
            import_id=self.import_id,
            issuer=self.issuer.key_id,
            batches=self.batches,
            certificates=len(self.records),
            revoked=self.counts["revoked"],
            listed=self.counts["listed"],
            crl_number=self.crl_number if after is None else max(self.crl_number, after + 1),
            crl_time=self.crl_time,
            removed_before=self.removed_before,
            started_at=started_at,
            source=self.source,
        )

    def batch(self, number: int) -> ImportX509:
        chunk = self.records[self.bounds[number - 1] : self.bounds[number]]
        return ImportX509(self.import_id, self.issuer.key_id, number, tuple(chunk))

    def finish(self) -> FinishImport:
        return FinishImport(self.import_id, self.issuer.key_id)

    def listed_serials(self) -> set[int]:
        return {record.serial for record in self.records if record.listed}

    def summary(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer.name,
            "import_id": self.import_id,
            **self.counts,
            "batches": self.batches,
            "crl_number": self.crl_number,
            "next_crl_number": self.crl_number + 1,
            "crl_time": asn1_time(self.crl_time),
            "crl_time_from": self.crl_time_from,
            "first_serial": serial_hex(self.records[0].serial) if self.records else None,
            "last_serial": serial_hex(self.records[-1].serial) if self.records else None,
            "source": self.source,
            "warnings": self.warnings,
        }


@dataclass
class _Input:
    """What was read for one issuer, before deciding."""

    records: dict[int, LegacyRecord] = field(default_factory=dict)
    index: str = INDEX  # the file records come from, unless `elsewhere` names another
    elsewhere: dict[int, str] = field(default_factory=dict)  # serial -> file (WebDB rows)
    certificates: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)
    next_serial: int | None = None
    crl_number_file: int | None = None
    old_crl: x509.CertificateRevocationList | None = None
    digest: Any = field(default_factory=lambda: hashlib.sha256(b"cacert-signer import v1\0"))
    sources: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def plan_imports(
    issuers: dict[str, IssuerCa],
    histories: dict[str, Path],
    webdb_rows: Path | None = None,
    rootcerts: dict[int, str] | None = None,
    grace_days: float = 0,
    now: int | None = None,
    progress: Progress = lambda _line: None,
) -> list[IssuerPlan]:
    """Read and check everything, decide every record; raises BadHistory with every problem
    found (nothing is sent to the signer then)."""
    collecting = gc.isenabled()
    gc.disable()  # millions of small tuples and no cycles: the collector would only rescan them
    try:
        return _plan(issuers, histories, webdb_rows, rootcerts, grace_days, now, progress)
    finally:
        if collecting:
            gc.enable()


def _plan(
    issuers: dict[str, IssuerCa],
    histories: dict[str, Path],
    webdb_rows: Path | None,
    rootcerts: dict[int, str] | None,
    grace_days: float,
    now: int | None,
    progress: Progress,
) -> list[IssuerPlan]:
    now = int(time.time()) if now is None else now
    problems: list[Problem] = []
    inputs: dict[str, _Input] = {}
    for name, directory in histories.items():
        if name not in issuers:
            problems.append(Problem(str(directory), 0, f"no configured issuer {name!r}"))
            continue
        inputs[name] = _Input()
        problems += _read_openssl(issuers[name], directory, inputs[name], progress)
    if webdb_rows is not None:
        problems += _read_webdb(issuers, webdb_rows, rootcerts or DEFAULT_ROOTCERTS, inputs)
    for read in inputs.values():
        problems += _check_ranges(read, now)
    if problems:
        raise BadHistory(sorted(problems, key=lambda p: (p.source, p.line)))
    plans = []
    for name, read in inputs.items():
        if read.records:
            plans.append(_decide(issuers[name], read, grace_days, now))
            progress(f"{name}: {len(read.records):,} certificates decided")
    return plans


# --------------------------------------------------------------------------- reading


def _read_openssl(
    issuer: IssuerCa, directory: Path, read: _Input, progress: Progress
) -> list[Problem]:
    problems: list[Problem] = []
    index = directory / INDEX
    try:
        data = index.read_bytes()
    except OSError as exc:
        return [Problem(str(index), 0, f"cannot read: {exc.strerror}")]
    started = time.perf_counter()
    records, bad = parse_index(data, str(index))
    problems += bad
    read.digest.update(b"index\0" + data)
    read.sources.append(
        f"{index} ({len(records):,} records, sha256 {hashlib.sha256(data).hexdigest()[:16]})"
    )
    read.index = str(index)
    for record in records:
        read.records[record.serial] = record

    progress(
        f"{issuer.name}: {index}: {len(records):,} records ({time.perf_counter() - started:.1f} s)"
    )
    for name, attribute in (("serial", "next_serial"), ("crlnumber", "crl_number_file")):
        path = directory / name
        if path.exists():
            try:
                raw = path.read_bytes()
                setattr(read, attribute, parse_number_file(raw, name))
                read.digest.update(name.encode() + b"\0" + raw)
            except (OSError, LegacyError) as exc:
                problems.append(Problem(str(path), 1, str(exc)))
    if read.next_serial is not None and records:
        highest = max(read.records)
        if read.next_serial <= highest:
            problems.append(
                Problem(
                    str(directory / "serial"),
                    1,
                    f"next serial {serial_hex(read.next_serial)} "
                    f"is not above the highest in index.txt ({serial_hex(highest)})",
                )
            )
    problems += _read_old_crl(issuer, directory, read)
    problems += _read_certificates(issuer, directory / CERTS_DIR, read, progress)
    return problems


def _read_old_crl(issuer: IssuerCa, directory: Path, read: _Input) -> list[Problem]:
    for name in CRL_FILES:
        path = directory / name
        if not path.exists():
            continue
        try:
            data = path.read_bytes()
            crl = (
                x509.load_pem_x509_crl(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data)
            )
        except (OSError, ValueError) as exc:
            return [Problem(str(path), 0, f"not a CRL ({exc})")]
        if crl.issuer != issuer.certificate.subject or not crl.is_signature_valid(
            issuer.certificate.public_key()  # type: ignore[arg-type]
        ):
            return [Problem(str(path), 0, f"not a CRL signed by {issuer.name}")]
        read.old_crl = crl
        read.digest.update(b"crl\0" + data)
        return []
    return []


def _read_certificates(
    issuer: IssuerCa, directory: Path, read: _Input, progress: Progress
) -> list[Problem]:
    """Each `newcerts/<SERIAL>.pem` of a record: parsed, its serial, issuer signature and expiry
    checked (in worker processes when there are many)."""
    if not directory.is_dir():
        return []
    files: list[tuple[int, str]] = []
    extra = 0
    for entry in os.scandir(directory):
        stem, _, suffix = entry.name.rpartition(".")
        try:
            serial = int(stem, 16)
        except ValueError:
            serial = -1
        if suffix.lower() in ("pem", "der", "crt") and serial in read.records:
            files.append((serial, entry.path))
        else:
            extra += 1
    if extra:
        read.warnings.append(f"{extra} file(s) in {directory} name no certificate of index.txt")
    files.sort()
    started = time.perf_counter()
    pem = issuer.certificate.public_bytes(Encoding.PEM)
    if len(files) < POOL_THRESHOLD:
        results = check_certificate_files(pem, files)
    else:
        chunks = [files[i : i + POOL_CHUNK] for i in range(0, len(files), POOL_CHUNK)]
        with ProcessPoolExecutor() as pool:
            results = [
                r
                for part in pool.map(check_certificate_files, [pem] * len(chunks), chunks)
                for r in part
            ]
    problems = []
    for serial, not_before, not_after, der, error in results:
        where = _where(read, serial)
        if error is not None:
            problems.append(_at(where, f"certificate {serial_hex(serial)}: {error}"))
            continue
        assert not_before is not None and not_after is not None and der is not None
        if not_after != read.records[serial].not_after:
            said = asn1_time(read.records[serial].not_after)
            message = f"index.txt says expiry {said}, the certificate {asn1_time(not_after)}"
            problems.append(_at(where, message))
            continue
        read.certificates[serial] = (not_before, not_after, der)
        read.digest.update(serial.to_bytes(20, "big") + hashlib.sha256(der).digest())
    progress(
        f"{issuer.name}: {len(read.certificates):,} certificate files checked "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return problems


def check_certificate_files(
    issuer_pem: bytes, files: list[tuple[int, str]]
) -> list[tuple[int, int | None, int | None, bytes | None, str | None]]:
    """(serial, not_before, not_after, der, error) per file; runs in worker processes."""
    issuer = x509.load_pem_x509_certificate(issuer_pem)
    out: list[tuple[int, int | None, int | None, bytes | None, str | None]] = []
    for serial, path in files:
        try:
            data = Path(path).read_bytes()
            cert = (
                x509.load_pem_x509_certificate(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(data)
            )
        except (OSError, ValueError) as exc:
            out.append((serial, None, None, None, f"{path}: not a certificate ({exc})"))
            continue
        if cert.serial_number != serial:
            out.append(
                (serial, None, None, None, f"{path} holds serial {serial_hex(cert.serial_number)}")
            )
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):
            out.append((serial, None, None, None, f"{path} is not signed by the issuer"))
            continue
        out.append(
            (
                serial,
                int(cert.not_valid_before_utc.timestamp()),
                int(cert.not_valid_after_utc.timestamp()),
                cert.public_bytes(Encoding.DER),
                None,
            )
        )
    return out


def _read_webdb(
    issuers: dict[str, IssuerCa], path: Path, rootcerts: dict[int, str], inputs: dict[str, _Input]
) -> list[Problem]:
    """WebDB rows join each issuer's records: a serial index.txt has is only cross-checked (the
    earlier CA's database wins), any other is added."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [Problem(str(path), 0, f"cannot read: {exc.strerror}")]
    rows, problems, skipped = parse_webdb_rows(data, str(path))
    seen: dict[tuple[str, int], int] = {}
    disagree: dict[str, int] = {}
    for row in rows:
        name = rootcerts.get(row.rootcert)
        if name is None or name not in issuers:
            problems.append(
                Problem(
                    str(path),
                    row.record.line,
                    f"rootcert {row.rootcert} names no configured issuer",
                )
            )
            continue
        read = inputs.setdefault(name, _Input())
        serial = row.record.serial
        first = seen.setdefault((name, serial), row.record.line)
        if first != row.record.line:
            problems.append(
                Problem(
                    str(path), row.record.line, f"serial {serial_hex(serial)} also on line {first}"
                )
            )
            continue
        known = read.records.get(serial)
        if known is not None and serial not in read.elsewhere:
            if known.revoked != row.record.revoked:
                disagree[name] = disagree.get(name, 0) + 1
            continue
        read.records[serial] = row.record
        read.elsewhere[serial] = str(path)
        read.counts["from_webdb"] = read.counts.get("from_webdb", 0) + 1
    for name, read in inputs.items():
        if name in disagree:
            read.warnings.append(
                f"{disagree[name]} WebDB row(s) disagree with index.txt on "
                "revocation: index.txt was taken"
            )
        if read.counts.get("from_webdb"):
            read.digest.update(b"webdb\0" + data)
            read.sources.append(f"{path} ({read.counts['from_webdb']:,} rows not in index.txt)")
    if skipped:
        for read in inputs.values():
            read.counts["webdb_rows_without_serial"] = skipped
    return problems


def _check_ranges(read: _Input, now: int) -> list[Problem]:
    """Dates out of range (a revocation or compromise time in the future, a revocation before
    the certificate's notBefore) and records too large for one log entry."""
    problems = []
    for serial, record in read.records.items():
        known = read.certificates.get(serial)
        size = len(record.subject) + len(record.file) + (0 if known is None else len(known[2]))
        if (
            len(record.subject) > MAX_SUBJECT_BYTES
            or len(record.file) > MAX_FILE_BYTES
            or ENTRY_OVERHEAD + RECORD_OVERHEAD + CRL_ENTRY_BOUND + size > MAX_IMPORT_ENTRY_BYTES
        ):
            message = f"certificate {serial_hex(serial)} is too large to import ({size} bytes)"
            problems.append(_at(_where(read, serial), message))
            continue
        late = now + FUTURE_TOLERANCE
        messages = []
        if record.revoked_at is not None and record.revoked_at > late:
            messages.append(f"revocation time {asn1_time(record.revoked_at)} lies in the future")
        if record.invalidity_date is not None and record.invalidity_date > late:
            when = asn1_time(record.invalidity_date)
            messages.append(f"compromise time {when} lies in the future")
        if known is not None and record.revoked_at is not None and record.revoked_at < known[0]:
            messages.append(
                f"revoked at {asn1_time(record.revoked_at)}, before the certificate's "
                f"notBefore {asn1_time(known[0])}"
            )
        problems += [_at(_where(read, serial), message) for message in messages]
    return problems


def _where(read: _Input, serial: int) -> tuple[str, int]:
    """(file, line) a record was read from."""
    return read.elsewhere.get(serial, read.index), read.records[serial].line


def _at(where: tuple[str, int], message: str) -> Problem:
    return Problem(where[0], where[1], message)


# --------------------------------------------------------------------------- deciding


def _decide(issuer: IssuerCa, read: _Input, grace_days: float, now: int) -> IssuerPlan:
    """Every record's CRL entry and membership of the imported CRL, its number and time."""
    crl_number, crl_time, crl_time_from = _imported_crl(read, now)
    cut = crl_time - int(grace_days * 86400)
    records: list[ImportedCertificate] = []
    counts = {
        "certificates": 0,
        "valid": 0,
        "revoked": 0,
        "marked_expired": 0,
        "listed": 0,
        "with_certificate": 0,
        **read.counts,
    }
    removed_before: int | None = None
    for serial in sorted(read.records):
        record = read.records[serial]
        known = read.certificates.get(serial)
        crl_entry = None
        listed = False
        if record.revoked_at is not None:
            reason = record.reason or None  # unspecified (0) is kept, not encoded (RFC 5280)
            crl_entry = encode_crl_entry(serial, record.revoked_at, reason, record.invalidity_date)
            listed = record.not_after >= cut
            if not listed:
                removed_before = max(removed_before or 0, record.not_after + 1)
        records.append(
            ImportedCertificate(
                serial=serial,
                not_before=None if known is None else known[0],
                not_after=record.not_after,
                subject=record.subject,
                file=record.file,
                status=record.status,
                revoked_at=record.revoked_at,
                reason=record.reason,
                invalidity_date=record.invalidity_date,
                crl_entry=crl_entry,
                listed=listed,
                der=None if known is None else known[2],
            )
        )
        counts["certificates"] += 1
        counts["revoked" if record.revoked else "valid"] += 1
        counts["marked_expired"] += record.status == "E"
        counts["listed"] += listed
        counts["with_certificate"] += known is not None
    read.digest.update(f"\0{issuer.key_id.hex()} {grace_days} {crl_number} {crl_time}".encode())
    warnings = list(read.warnings)
    old_serials = None
    if read.old_crl is not None:
        old_serials = {entry.serial_number for entry in read.old_crl}
        revoked = {r.serial for r in records if r.revoked_at is not None}
        if old_serials != revoked:
            warnings.append(
                f"the earlier CA's last CRL lists {len(old_serials - revoked)} serial(s) index.txt "
                f"does not revoke, and misses {len(revoked - old_serials)} it revokes"
            )
    if any(r.serial >= 1 << 127 for r in records):
        warnings.append(
            "serials at or above 2**127 share the range of new random serials: "
            "each new one is checked against them"
        )
    return IssuerPlan(
        issuer=issuer,
        import_id=read.digest.hexdigest()[:32],
        records=records,
        crl_number=crl_number,
        crl_time=crl_time,
        crl_time_from=crl_time_from,
        removed_before=removed_before,
        source="; ".join(read.sources)[:1000] or "(none)",
        bounds=batch_bounds(records),
        counts=counts,
        warnings=warnings,
        old_crl_serials=old_serials,
    )


def _imported_crl(read: _Input, now: int) -> tuple[int, int, str]:
    """(number, thisUpdate, where the time comes from) of the CRL the import stands for.

    Its time is the cut for RFC 5280 retention: an entry whose certificate expired before it
    has been on a CRL issued after it expired and may go. The earlier CA's last CRL gives it;
    else the last revocation (the earlier CA made a CRL at each, so one exists that late);
    else the import's time."""
    crl = read.old_crl
    number = None
    if read.crl_number_file is not None:
        number = read.crl_number_file - 1  # crlnumber holds the NEXT number
    elif crl is not None:
        number = _crl_number(crl)
    if number is None or number < 0:
        number = FIRST_IMPORTED_CRL
    if crl is not None:
        crl_number = _crl_number(crl)
        if crl_number is not None and crl_number != number:
            read.warnings.append(
                f"crlnumber says the last CRL was {number}, the CRL file is {crl_number}"
            )
        return number, int(crl.last_update_utc.timestamp()), "the earlier CA's last CRL"
    revoked = [r.revoked_at for r in read.records.values() if r.revoked_at is not None]
    if revoked:
        return number, max(revoked), "the last revocation"
    return number, now, "the import"


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return None


def batch_bounds(
    records: list[ImportedCertificate], limit: int = MAX_IMPORT_ENTRY_BYTES
) -> list[int]:
    """Cut the records into batches whose entries stay under `limit` bytes (a bound computed
    from the fields' sizes, so nothing is encoded twice)."""
    bounds = [0]
    size = ENTRY_OVERHEAD
    for i, record in enumerate(records):
        bound = (
            RECORD_OVERHEAD
            + len(record.subject)
            + len(record.file)
            + len(record.crl_entry or b"")
            + len(record.der or b"")
        )
        if size + bound > limit and i > bounds[-1]:
            bounds.append(i)
            size = ENTRY_OVERHEAD
        size += bound
    if len(records) > bounds[-1]:
        bounds.append(len(records))
    return bounds


# --------------------------------------------------------------------------- sending


class ControlFailed(Exception):
    """The signer refused a step (its error code and message)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlUnreachable(Exception):
    """The signer's control socket does not answer."""


class Meter:
    """Records per second and the time left: one line rewritten on a terminal, a line every
    `every` seconds otherwise (a log)."""

    def __init__(
        self, label: str, total: int, done: int = 0, out: TextIO | None = None, every: float = 10.0
    ):
        self.label, self.total, self.start_done = label, total, done
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.every = 0.2 if self.tty else every
        self.started = self.shown = time.monotonic()
        self.done = done

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self.shown < self.every:
            return
        self.shown = now
        rate = (done - self.start_done) / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if rate > 0 else 0
        text = (
            f"{self.label}: {done:,} of {self.total:,} certificates "
            f"({100 * done / max(self.total, 1):.0f} %), {rate:,.0f}/s, ETA {_clock(left)}"
        )
        if self.tty:
            print(f"\r{text}\033[K", end="", file=self.out, flush=True)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> float:
        """Show the last figures; the records per second over the whole run."""
        self.update(self.done, force=True)
        if self.tty:
            print(file=self.out, flush=True)
        return (self.done - self.start_done) / max(time.monotonic() - self.started, 1e-9)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def control_call(path: Path, request: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """One request to the signer's control socket; its result, or ControlFailed."""
    from signer.server.control import call

    try:
        answer = call(path, request, timeout=timeout)
    except (OSError, ValueError) as exc:
        raise ControlUnreachable(f"cannot reach the signer on {path}: {exc}") from None
    if not answer.get("ok"):
        error = answer.get("error") or {}
        raise ControlFailed(str(error.get("code")), str(error.get("message")))
    result: dict[str, Any] = answer["result"]
    return result


def _commit(path: Path, command: BeginImport | FinishImport) -> dict[str, Any]:
    entry = base64.b64encode(encode(command)).decode()
    return control_call(path, {"cmd": "import_commit", "entry": entry})


def run_import(
    plan: IssuerPlan,
    path: Path,
    progress: Progress = print,
    out: TextIO | None = None,
    now: int | None = None,
) -> dict[str, Any]:
    """Send one issuer's import to the running signer: begin (or find the import begun by an
    earlier run of the same input and continue after its last batch), the batches, finish."""
    name = plan.issuer.name
    status = control_call(path, {"cmd": "import_status"})["issuers"].get(name)
    if status is None:
        raise ControlFailed("unknown_issuer", f"the signer has no issuer {name!r}")
    state = status["import"]
    if state is not None and state["import_id"] != plan.import_id:
        raise ControlFailed(
            "import_conflict",
            f"{name} holds another import ({state['import_id']}, "
            f"{'finished' if state['finished_index'] else 'not finished'}): this input differs "
            "from the one imported; an issuer's history is imported once",
        )
    if state is not None and state["finished_index"] is not None:
        progress(f"{name}: import {plan.import_id} was finished before: nothing to do")
        return {
            "issuer": name,
            "import_id": plan.import_id,
            "already_finished": True,
            "crl_due": bool(status["crl_imported"]),  # its first CRL is not made yet
        }
    if state is None:
        started_at = int(time.time()) if now is None else now
        begin = plan.begin(started_at, after=status["crl_number"])
        if begin.crl_number != plan.crl_number:
            progress(
                f"{name}: the signer's CRL {status['crl_number']} is above the earlier CA's last "
                f"({plan.crl_number}): the imported CRL takes number {begin.crl_number}"
            )
        _commit(path, begin)
        applied, done = 0, 0
        progress(
            f"{name}: import {plan.import_id} begun: {len(plan.records):,} certificates "
            f"in {plan.batches:,} batches"
        )
    else:
        applied, done = state["applied_batches"], state["applied_certificates"]
        progress(
            f"{name}: import {plan.import_id} continues after batch {applied:,} "
            f"({done:,} certificates in)"
        )
    meter = Meter(name, len(plan.records), done, out)
    started = time.monotonic()
    for attempt in range(1, RETRIES + 1):
        if applied >= plan.batches:
            break
        try:
            _stream(plan, path, applied + 1, meter)
            break
        except ControlFailed as exc:  # the pair lost its leader for a moment, say
            if exc.code not in TRANSIENT or attempt == RETRIES:
                raise
            progress(f"{name}: {exc.code}: {exc.message}; continuing in {RETRY_SECONDS} s")
            time.sleep(RETRY_SECONDS)
            now_state = control_call(path, {"cmd": "import_status"})["issuers"][name]["import"]
            applied = now_state["applied_batches"]
    rate = meter.close()
    finished = _commit(path, plan.finish())
    seconds = time.monotonic() - started
    progress(
        f"{name}: import finished: {len(plan.records):,} certificates, "
        f"{plan.counts['revoked']:,} revoked, {plan.counts['listed']:,} on the next CRL "
        f"({seconds:.1f} s, {rate:,.0f} certificates/s)"
    )
    return {
        "issuer": name,
        "import_id": plan.import_id,
        "already_finished": False,
        "seconds": round(seconds, 3),
        "records_per_s": round(rate, 1),
        "finished_index": finished.get("index"),
        "crl_due": True,
    }


def _stream(plan: IssuerPlan, path: Path, first: int, meter: Meter) -> None:
    """The batches from `first` on one connection: a thread sends, this one reads the answers
    (in order); the first refusal stops both."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ControlUnreachable(f"cannot reach the signer on {path}: {exc}") from None
    stop = threading.Event()

    def send() -> None:
        try:
            sock.sendall(b'{"cmd": "import_batches"}\n')
            for number in range(first, plan.batches + 1):
                if stop.is_set():
                    break
                entry = base64.b64encode(encode(plan.batch(number))).decode()
                sock.sendall(b'{"entry": "' + entry.encode() + b'"}\n')
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reader sees the connection end and says why

    sender = threading.Thread(target=send, name="import-sender", daemon=True)
    sender.start()
    reader = sock.makefile("rb")
    try:
        for number in range(first, plan.batches + 1):
            try:
                line = reader.readline()
            except OSError as exc:
                raise ControlUnreachable(f"the signer went away at batch {number}: {exc}") from None
            if not line:
                raise ControlUnreachable(f"the signer closed the import at batch {number}")
            answer = json.loads(line)
            if not answer.get("ok"):
                error = answer.get("error") or {}
                raise ControlFailed(
                    str(error.get("code")), f"batch {number}: {error.get('message')}"
                )
            meter.update(answer["result"]["applied_certificates"])
    finally:
        stop.set()
        reader.close()
        sock.close()
        sender.join(timeout=10)


def publish_first_crl(plan: IssuerPlan, path: Path) -> dict[str, Any]:
    """Ask the signer for the issuer's first CRL after the import now, and compare its serials
    with what the import decided (and the earlier CA's last CRL, when there was one)."""
    answer = control_call(path, {"cmd": "publish_crl", "issuer": plan.issuer.name, "der": True})
    crl = x509.load_der_x509_crl(base64.b64decode(answer.pop("der")))
    serials = {entry.serial_number for entry in crl}
    expected = plan.listed_serials()
    answer["listed_as_decided"] = serials >= expected
    answer["new_since_import"] = len(serials - expected)
    if plan.old_crl_serials is not None:
        answer["earlier_crl_entries"] = len(plan.old_crl_serials)
        answer["left_for_expiry"] = len(plan.old_crl_serials - serials)
    return answer


# --------------------------------------------------------------------------- export

SHORT_NAMES = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "emailAddress": "emailAddress",
    "domainComponent": "DC",
    "serialNumber": "serialNumber",
    "givenName": "GN",
    "surname": "SN",
    "title": "title",
    "organizationIdentifier": "organizationIdentifier",
}


def oneline(name: x509.Name) -> bytes:
    """A DN as openssl ca writes it in index.txt (`/C=DE/O=.../CN=...`, non-ASCII as \\xXX)."""
    parts = []
    for attribute in name:
        key = SHORT_NAMES.get(attribute.oid._name, attribute.oid.dotted_string)
        value = attribute.value if isinstance(attribute.value, str) else attribute.value.hex()
        text = "".join(
            c if 32 <= ord(c) < 127 else "".join(f"\\x{b:02X}" for b in c.encode()) for c in value
        )
        parts.append(f"/{key}={text}")
    return "".join(parts).encode("ascii")


def export_history(
    repository: Any, issuers: dict[str, IssuerCa], out: Path, progress: Progress = print
) -> dict[str, Any]:
    """Each issuer's certificates as an openssl ca directory under `out/<issuer>`: index.txt,
    index.txt.attr, serial, crlnumber, newcerts/<SERIAL>.pem and the last CRL (crl.der) if the
    signer made one. Refuses to write into a directory that is not empty."""
    summary: dict[str, Any] = {}
    for name, issuer in issuers.items():
        directory = out / name
        if directory.exists() and any(directory.iterdir()):
            raise ControlFailed("not_empty", f"{directory} is not empty: refusing to overwrite")
        (directory / CERTS_DIR).mkdir(parents=True, exist_ok=True)
        count = with_der = revoked = 0
        highest = 0
        started = time.perf_counter()
        with open(directory / INDEX, "wb") as index:
            for record in repository.iter_certificates(issuer.key_id):
                index.write(index_line(legacy_record(record)) + b"\n")
                if record.der is not None:
                    pem = x509.load_der_x509_certificate(record.der).public_bytes(Encoding.PEM)
                    (directory / CERTS_DIR / f"{serial_hex(record.serial)}.pem").write_bytes(pem)
                    with_der += 1
                count += 1
                revoked += record.revocation is not None
                highest = max(highest, record.serial)
        (directory / "index.txt.attr").write_text("unique_subject = no\n")
        (directory / "serial").write_text(serial_hex(highest + 1) + "\n")
        last = repository.last_crl_history(issuer.key_id)
        if last is not None:
            (directory / "crlnumber").write_text(serial_hex(last["crl_number"] + 1) + "\n")
            der = _last_crl_der(repository, issuer, last["crl_number"])
            if der is not None:
                (directory / "crl.der").write_bytes(der)
        summary[name] = {
            "directory": str(directory),
            "certificates": count,
            "revoked": revoked,
            "certificate_files": with_der,
            "crl_number": None if last is None else last["crl_number"],
        }
        progress(
            f"{name}: {count:,} certificates ({revoked:,} revoked, {with_der:,} files) to "
            f"{directory} ({time.perf_counter() - started:.1f} s)"
        )
    return summary


def _last_crl_der(repository: Any, issuer: IssuerCa, number: int) -> bytes | None:
    """The issuer's last CRL as this signer published it (rebuilt from its history; kept
    whole by repositories before schema 3); None for an imported one."""
    from signer.pki.crl import CrlIssuer
    from signer.server.crl import rebuild_crl

    latest = repository.latest_crl(issuer.key_id)
    if latest is not None and latest["crl_number"] == number and latest["der"]:
        return bytes(latest["der"])
    crl_issuer = CrlIssuer.from_certificate(issuer.certificate)
    return rebuild_crl(repository, crl_issuer, issuer.key_id, number)


def legacy_record(record: Any) -> LegacyRecord:
    """A repository certificate (`CertificateRecord`) as an index.txt record."""
    revocation = record.revocation
    if revocation is not None:
        status = "R"
    else:
        status = record.status if record.status in ("V", "E") else "V"
    subject = record.subject
    if subject is None:
        subject = (
            b""
            if record.der is None
            else oneline(x509.load_der_x509_certificate(record.der).subject)
        )
    return LegacyRecord(
        line=0,
        status=status,
        serial=record.serial,
        not_after=record.not_after,
        revoked_at=None if revocation is None else revocation.revoked_at,
        reason=None if revocation is None else revocation.reason,
        invalidity_date=None if revocation is None else revocation.invalidity_date,
        file=record.file if record.file is not None else b"unknown",
        subject=subject,
    )
