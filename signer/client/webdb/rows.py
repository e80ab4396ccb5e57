"""From a WebDB row to a signer request: tables, subjects and SANs, profiles, validity (pure).

A misreading ends in a refusal (a `RowError` here, or the signer's own), never in a wrong
certificate; docs/webdb-client.md has the rules and their reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from signer.client.webdb.config import ValidityConfig
from signer.errors import ClientFailure
from signer.pki.openpgp_armor import armor

REVOCATION_SENTINEL = "1970-01-01 10:00:01"  # what the web application writes to ask for one
ISSUER_BY_ROOTCERT = {1: "class1", 2: "class3"}
XMPP_OID = "1.3.6.1.5.5.7.8.5"
GPG_PREFIX = "gpg"


class RowError(ClientFailure):
    """A row that cannot become a request (unreadable CSR, unknown rootcert, bad subject); never
    a wire code: the row's warning count goes up as for a refusal."""

    kind = "bad_row"


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


def crt_name(prefix: str, row_id: int) -> str:
    """Where the web application looks for the certificate, relative to its directory."""
    return f"../crt/{prefix}/{row_id // 1000}/{prefix}-{row_id}.crt"


# --- subjects and SANs ------------------------------------------------------------------------

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


# --- profiles and validity --------------------------------------------------------------------


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
    assured = is_class3(row) or (points or 0) >= rules.assured_points
    return rules.personal_assured_days if assured else rules.personal_days


def is_class3(row: dict[str, Any]) -> bool:
    """A class 3 row: the web application offers it only to assured members."""
    return _int(row.get("rootcert")) == 2


# --- revocations and OpenPGP ------------------------------------------------------------------


def revoke_arguments(row: dict[str, Any]) -> dict[str, Any]:
    """`revoke_x509` for a row the web application marked with the sentinel (no reason)."""
    issuer = ISSUER_BY_ROOTCERT.get(_int(row.get("rootcert")))
    serial = str(row.get("serial") or "").strip()
    if issuer is None or not re.fullmatch(r"[0-9A-Fa-f]{1,42}", serial):
        raise RowError(f"cannot revoke: rootcert {row.get('rootcert')!r}, serial {serial!r}")
    return {"issuer": issuer, "serial": serial}


def openpgp_uids(row: dict[str, Any]) -> list[str]:
    """The addresses to certify: the `email` column, split at commas, semicolons or spaces."""
    uids = [u for u in re.split(r"[\s,;]+", str(row.get("email") or "")) if u]
    if not uids:
        raise RowError("no e-mail address to certify")
    return uids


def armor_openpgp(data: bytes) -> bytes:
    """ASCII armor for the certified key the web application offers (armored input stays)."""
    return data if data.lstrip().startswith(b"-----BEGIN PGP") else armor(data)


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
