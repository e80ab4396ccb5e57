"""The client's half of `fetch_crl`: keep a local copy of an issuer's CRL fresh over the slow line.

The client says which CRL number it holds. The signer answers `unchanged`, a `delta` (the entries
added and the serials removed since, plus the new CRL's header fields and signature), or the
whole CRL in chunks. A delta is applied here to the CRL held, the exact signed CRL is rebuilt
with the signer's own assembly functions (signer/pki/crl.py) and its signature is checked against
the issuer certificate before it is used; on any mismatch the client asks for the full CRL.

A chunked transfer is pinned to one CRL number and resumable: `CrlRefresher.transfer` keeps what
arrived, so after a broken line the next `refresh` continues at the offset it reached. The
refresher touches no files: `refresh_file` (`signer client fetch-crl`) keeps the copy and an
interrupted transfer on disk, the WebDB client publishes with `webdb.crl_publication`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signer.client.files import write_atomically
from signer.errors import ClientFailure, ErrorCode, SignerError
from signer.pki.crl import (
    SIGNATURE_ALGORITHMS,
    CrlHeader,
    CrlIssuer,
    crl_der,
    parse_crl,
    tbs_der,
)
from signer.pki.der import der_header

log = logging.getLogger(__name__)

Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_RESTARTS = 5  # a transfer starts over when its CRL is gone; give up after this many


@dataclass
class Transfer:
    """A full transfer in progress: pinned to one CRL number, resumable at `len(data)`."""

    crl_number: int
    total_size: int
    sha256: bytes
    data: bytearray

    @classmethod
    def start(cls, answer: dict[str, Any]) -> Transfer:
        if answer.get("offset") != 0:
            raise _bad(f"a transfer must start at offset 0, not {answer.get('offset')!r}")
        return cls(
            int(answer["crl_number"]),
            int(answer["total_size"]),
            bytes(answer["sha256"]),
            bytearray(),
        )

    def add(self, answer: dict[str, Any]) -> None:
        chunk = answer.get("chunk") or b""
        if answer.get("offset") != len(self.data) or len(self.data) + len(chunk) > self.total_size:
            raise _bad(f"chunk at offset {answer.get('offset')!r}, {len(self.data)} was due")
        if not chunk and len(self.data) < self.total_size:
            raise _bad("an empty chunk before the end of the CRL")
        self.data += chunk

    @property
    def done(self) -> bool:
        return len(self.data) >= self.total_size


@dataclass
class Refreshed:
    """The outcome of a refresh: the CRL to keep and what it cost on the line."""

    kind: str  # unchanged, delta or full
    der: bytes
    crl_number: int
    fell_back: bool  # a delta did not verify, so the full CRL was fetched
    received: int  # CRL bytes received: chunks, or added entries plus signature
    calls: int


class BadCrl(ClientFailure):
    """A CRL that failed verification on the client's side (never a wire code)."""

    kind = "bad_crl"


def _bad(message: str) -> BadCrl:
    return BadCrl(message)


def crl_number_of(der: bytes | None) -> int | None:
    """The CRL number of a DER CRL (None if absent, unreadable or without one)."""
    if not der:
        return None
    try:
        return parse_crl(der).crl_number
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def verify_crl(der: bytes, issuer: x509.Certificate, not_older_than: int | None = None) -> int:
    """Check that `der` is a CRL of `issuer` with a valid signature and a CRL number (not below
    `not_older_than`: a published CRL never goes back in time); return that number."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise _bad(f"not a DER CRL: {exc}") from None
    if crl.issuer != issuer.subject:
        raise _bad(f"issued by {crl.issuer.rfc4514_string()}, not by the issuer")
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise _bad("its signature does not verify with the issuer's key")
    number = crl_number_of(der)
    if number is None:
        raise _bad("it has no CRL number")
    if not_older_than is not None and number < not_older_than:
        raise _bad(f"CRL number {number} is older than the published {not_older_than}")
    return number


def held_crl(path: Path, issuer: x509.Certificate) -> bytes | None:
    """The CRL kept at `path` if it is a valid CRL of `issuer`; else None (fetch it whole)."""
    try:
        der = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s (%s): fetching the CRL whole", path, exc.strerror)
        return None
    try:
        verify_crl(der, issuer)
    except BadCrl as exc:
        log.warning("%s is not a valid CRL of its issuer (%s): fetching it whole", path, exc)
        return None
    return der


def apply_delta(have: bytes, issuer: CrlIssuer, answer: dict[str, Any]) -> bytes:
    """The CRL the signer holds, rebuilt from the one held here and a `delta` answer, and
    verified: ValueError if anything does not fit (the caller then asks for the full CRL)."""
    old = parse_crl(have)
    removed = {int(serial, 16) for serial in answer.get("removed") or []}
    entries = [entry for entry in old.entries if entry[0] not in removed]
    if len(entries) != len(old.entries) - len(removed):
        raise ValueError("the delta removes entries the CRL held does not list")
    for entry in answer.get("added") or []:
        tag, start, end = der_header(entry, 0)
        if tag != 0x30 or end != len(entry):
            raise ValueError("an added entry is not one DER SEQUENCE")
        _, serial_start, serial_end = der_header(entry, start)
        entries.append((int.from_bytes(entry[serial_start:serial_end], "big", signed=True), entry))
    entries.sort(key=lambda item: item[0])
    algorithm = SIGNATURE_ALGORITHMS.get(bytes(answer["signature_algorithm"]))
    if algorithm is None:
        raise ValueError("unknown signature algorithm")
    expired = answer.get("expired_certs_on_crl")
    header = CrlHeader(
        int(answer["crl_number"]),
        _seconds(answer["this_update"]),
        _seconds(answer["next_update"]),
        None if expired is None else _seconds(expired),
        algorithm,
    )
    tbs = tbs_der(issuer, header, b"".join(entry for _, entry in entries))
    signature = bytes(answer["signature"])
    if not algorithm.verify(issuer.public_key, signature, algorithm.digest(tbs)):
        raise ValueError("the rebuilt CRL's signature does not verify")
    return crl_der(tbs, algorithm, signature)


def _seconds(moment: datetime) -> int:
    return int(moment.timestamp())


class CrlRefresher:
    """Refreshes one issuer's CRL through `call` (e.g. `SignerClient.call`)."""

    def __init__(
        self,
        call: Call,
        issuer: str,
        certificate: x509.Certificate,
        max_bytes: int = 65536,
        transfer: Transfer | None = None,
    ):
        self._call_signer = call
        self.issuer = issuer
        self.certificate = certificate
        self.crl_issuer = CrlIssuer.from_certificate(certificate)
        self.max_bytes = max_bytes
        self.transfer = transfer  # survives a failed refresh: the next one resumes it
        self.calls = 0
        self.received = 0
        self.progress: Callable[[int, int], None] | None = None  # a full transfer's bytes

    async def _call(self, **args: Any) -> dict[str, Any]:
        self.calls += 1
        answer = await self._call_signer(
            "fetch_crl", {"issuer": self.issuer, "max_bytes": self.max_bytes, **args}
        )
        self.received += len(answer.get("chunk") or b"") + len(answer.get("signature") or b"")
        self.received += sum(len(entry) for entry in answer.get("added") or [])
        return answer

    async def refresh(self, have: bytes | None) -> Refreshed:
        """The issuer's current CRL, fetched as cheaply as the CRL held (`have`) allows."""
        self.calls = self.received = 0
        if self.transfer is not None:
            return await self._finish_transfer(fell_back=False)
        have_number = crl_number_of(have)
        ask = {} if have_number is None else {"have_number": have_number}
        answer = await self._call(**ask)
        if answer["kind"] == "unchanged" and have:
            return self._outcome("unchanged", have, answer["crl_number"], False)
        fell_back = False
        if answer["kind"] == "delta" and have:
            try:
                der = apply_delta(have, self.crl_issuer, answer)
                return self._outcome("delta", der, answer["crl_number"], False)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.warning(
                    "CRL delta for %s did not fit (%s): fetching it whole", self.issuer, exc
                )
                fell_back = True
        if answer["kind"] != "full" or answer.get("offset") != 0:
            answer = await self._call(want="full")
        self.transfer = Transfer.start(answer)
        self.transfer.add(answer)
        return await self._finish_transfer(fell_back)

    async def _finish_transfer(self, fell_back: bool) -> Refreshed:
        """Fetch the rest of `self.transfer`; start over (a bounded number of times) when the
        signer no longer has its CRL or the reassembled bytes do not match their SHA-256."""
        transfer = self.transfer
        assert transfer is not None
        for _ in range(MAX_RESTARTS):
            while not transfer.done:
                answer = await self._call(
                    want="full", crl_number=transfer.crl_number, offset=len(transfer.data)
                )
                if answer["crl_number"] != transfer.crl_number:
                    log.info("CRL %s is gone: starting over", transfer.crl_number)
                    break
                transfer.add(answer)
                if self.progress is not None:
                    self.progress(len(transfer.data), transfer.total_size)
            else:
                der = bytes(transfer.data)
                if hashlib.sha256(der).digest() == transfer.sha256:
                    self.transfer = None
                    verify_crl(der, self.certificate)
                    return self._outcome("full", der, transfer.crl_number, fell_back)
                log.warning("CRL %s does not match its SHA-256: starting over", transfer.crl_number)
                answer = await self._call(want="full")
            self.transfer = transfer = Transfer.start(answer)
            transfer.add(answer)
        self.transfer = None
        raise _bad(f"no intact CRL of {self.issuer} after {MAX_RESTARTS} attempts")

    def _outcome(self, kind: str, der: bytes, number: int, fell_back: bool) -> Refreshed:
        return Refreshed(kind, der, int(number), fell_back, self.received, self.calls)


# --------------------------------------------------------------------------- a local copy on disk


def _load_certificate(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


async def _issuer_certificate(client: Any, issuer: str) -> x509.Certificate:
    """The issuer's certificate as the signer lists it (name, RFC 4514 DN or hex key id)."""
    listed = await client.call("list_issuers")
    wanted = issuer.lower().replace(":", "")
    for item in listed["issuers"]:
        if issuer in (item["name"], item["subject"]) or wanted == bytes(item["key_id"]).hex():
            return x509.load_der_x509_certificate(item["certificate"])
    raise SignerError(ErrorCode.UNKNOWN_ISSUER, f"the signer lists no issuer {issuer!r}")


def _load_state(path: Path, issuer: str) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("issuer") == issuer else {}


def _load_transfer(state: dict[str, Any], part: Path) -> Transfer | None:
    """The interrupted transfer recorded in the state file, with the bytes that arrived."""
    pending = state.get("transfer")
    if not isinstance(pending, dict):
        return None
    try:
        data = bytearray(part.read_bytes())
        transfer = Transfer(
            int(pending["crl_number"]),
            int(pending["total_size"]),
            bytes.fromhex(pending["sha256"]),
            data,
        )
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return transfer if len(data) <= transfer.total_size else None


def _save_state(
    path: Path, part: Path, issuer: str, certificate: bytes, transfer: Transfer | None
) -> None:
    state: dict[str, Any] = {
        "issuer": issuer,
        "certificate": base64.b64encode(certificate).decode(),
        "transfer": None,
    }
    if transfer is not None:
        write_atomically(part, bytes(transfer.data))
        state["transfer"] = {
            "crl_number": transfer.crl_number,
            "total_size": transfer.total_size,
            "sha256": transfer.sha256.hex(),
        }
    else:
        part.unlink(missing_ok=True)
    write_atomically(path, json.dumps(state, indent=1).encode())


async def refresh_file(
    client: Any,
    issuer: str,
    out: Path,
    ca_cert: Path | None = None,
    max_bytes: int = 65536,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Refresh the CRL kept at `out` through a `SignerClient` (`signer client fetch-crl`).

    Next to it, `out.state` (JSON: the issuer, its certificate, an interrupted transfer) and
    `out.part` (the bytes of that transfer) let the next run resume where a broken line stopped.
    """
    state_path = out.with_name(out.name + ".state")
    part_path = out.with_name(out.name + ".part")
    state = _load_state(state_path, issuer)
    if ca_cert is not None:
        certificate = _load_certificate(ca_cert.read_bytes())
    elif state.get("certificate"):
        certificate = x509.load_der_x509_certificate(base64.b64decode(state["certificate"]))
    else:
        certificate = await _issuer_certificate(client, issuer)
    have = held_crl(out, certificate)
    refresher = CrlRefresher(
        client.call, issuer, certificate, max_bytes, _load_transfer(state, part_path)
    )
    refresher.progress = progress
    before = client.link.stats
    try:
        outcome = await refresher.refresh(have)
    finally:
        raw = certificate.public_bytes(serialization.Encoding.DER)
        _save_state(state_path, part_path, issuer, raw, refresher.transfer)
    if outcome.kind != "unchanged":
        write_atomically(out, outcome.der)
    after = client.link.stats
    return {
        "kind": outcome.kind,
        "crl_number": outcome.crl_number,
        "fell_back": outcome.fell_back,
        "size": len(outcome.der),
        "crl_bytes": outcome.received,
        "calls": outcome.calls,
        "bytes_in": after.bytes_in - before.bytes_in,
        "bytes_out": after.bytes_out - before.bytes_out,
        "out": str(out),
    }
