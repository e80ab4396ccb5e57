"""From a WebDB row to a signer request: tables, subjects and SANs, profiles, validity (pure).

The rows are what CAcert's web application writes (includes/account.php, www/gpg.php) and the
rules are the old client's (CommModule/client.pl); docs/webdb-client.md maps every table,
column, path and key type. A misreading ends in a refusal (a `RowError` here, or the signer's
own), never in a wrong certificate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from signer.client.webdb.config import ValidityConfig
from signer.errors import ClientFailure, SignerError
from signer.pki.openpgp import USER_ID, dearmor, scan_packets
from signer.pki.openpgp_armor import armor
from signer.pki.profiles import short_attribute_name

REVOCATION_SENTINEL = "1970-01-01 10:00:01"  # what the web application writes to ask for one
ISSUER_BY_ROOTCERT = {1: "class1", 2: "class3"}
XMPP_OID = "1.3.6.1.5.5.7.8.5"
GPG_PREFIX = "gpg"
# client.pl: `md` to the old protocol's digest; MD5, SHA-1 and RIPEMD-160 are never signed with
# any more: such rows get SHA-256 (docs/profiles.md).
DIGEST_BY_MD = {"sha256": "sha256", "sha384": "sha384", "sha512": "sha512",
                "md5": "sha256", "sha1": "sha256", "rmd160": "sha256"}  # fmt: skip
TYPE_PROFILES = {8: "ocsp", 9: "timestamp"}  # client.pl: `type` 8 and 9 pick these templates


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
              "codesign, type, warning"),
        Table("domaincerts", "server", False, True, "id, domid, subject, csr_name, rootcert, md, "
              "type, warning"),
        Table("orgemailcerts", "orgclient", True, False, "id, orgid, subject, csr_name, rootcert, "
              "md, codesign, type, warning"),
        Table("orgdomaincerts", "orgserver", True, True, "id, orgid, subject, csr_name, rootcert, "
              "md, type, warning"),
    )
}  # fmt: skip


def crt_name(prefix: str, row_id: int) -> str:
    """Where the web application looks for the certificate, relative to its directory."""
    return f"../crt/{prefix}/{row_id // 1000}/{prefix}-{row_id}.crt"


# --- subjects and SANs ------------------------------------------------------------------------

_DN_SPLIT = re.compile(r"(?<!\\)/(?=\s*[A-Za-z][A-Za-z0-9.]*\s*=)")
_SAN_SPLIT = re.compile(r",\s*(?=(?:DNS|email|IP|IP Address|URI|otherName):)", re.IGNORECASE)
_SPKAC_LINE = re.compile(r"^\s*SPKAC\s*=", re.MULTILINE)
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$")


def attribute(name: str, value: str) -> list[str]:
    """[short name, value]; OpenSSL's long names become short ones, unknown names stay (the
    signer refuses them: a misread item is never dropped silently)."""
    name = name.strip()
    return [short_attribute_name(name) or name, value.strip()]


def split_subject(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """The WebDB's slash-form DN, SANs embedded as `/subjectAltName=DNS:x`, split in two.

    A `/` inside a value (`OU=http://www.CAcert.org`) is kept: only a `/` that starts the next
    `attribute=` splits. Names may be short or OpenSSL's long ones, with spaces around `=` (the
    web application's SSO item is `/emailAddress = <id>`). A wrongly split value yields an
    unknown attribute, which the signer refuses: a misreading ends in a refusal.
    """
    if not text or not text.startswith("/"):
        raise RowError(f"subject {text[:60]!r} is not in /attribute=value form")
    subject: list[list[str]] = []
    sans: list[list[str]] = []
    for item in _DN_SPLIT.split(text[1:]):
        name, found, value = item.partition("=")
        if not found or not name.strip():
            raise RowError(f"subject item {item[:60]!r} is not attribute=value")
        value = value.replace("\\/", "/")
        if name.strip() == "subjectAltName":
            sans += [_san(part) for part in _SAN_SPLIT.split(value) if part.strip()]
        else:
            subject.append(attribute(name, value))
    return subject, sans


def _san(text: str) -> list[str]:
    kind, found, value = text.strip().partition(":")
    kind = kind.strip().lower()
    if not found and _HOST.match(kind):
        return ["dns", text.strip()]  # account.php's renewal writes `subjectAltName=<host>`
    if kind == "othername":
        oid, _, rest = value.partition(";")
        if oid.strip() == XMPP_OID and rest[:5].upper() == "UTF8:":
            return ["xmpp", rest[5:].strip()]
        raise RowError(f"subjectAltName otherName {oid[:40]!r} is not XmppAddr")
    if kind in ("dns", "email", "uri"):
        return [kind, value.strip()]
    if kind in ("ip", "ip address"):
        return ["ip", value.strip()]
    raise RowError(f"unknown subjectAltName type {kind[:20]!r}")


def is_spkac(request: bytes) -> bool:
    """A browser keygen request (keytype NS): `openssl ca -spkac` text."""
    return bool(_SPKAC_LINE.search(request.decode("utf-8", "replace")))


def spkac_subject(request: bytes) -> list[list[str]]:
    """The DN lines of a keygen request file (`0.emailAddress = a@b`, `commonName = ...`,
    `organizationalUnitName = ...`), in order; the SPKAC line itself is not part of it."""
    try:
        text = request.decode("utf-8")
    except UnicodeDecodeError:
        raise RowError("the keygen request file is not UTF-8 text") from None
    subject = []
    for line in text.splitlines():
        name, found, value = line.partition("=")
        name = name.strip()
        if not found or not name or name == "SPKAC":
            continue
        prefix, dot, rest = name.partition(".")
        subject.append(attribute(rest if dot and prefix.isdigit() else name, value))
    return subject


# --- profiles and validity --------------------------------------------------------------------


@dataclass(frozen=True)
class X509Plan:
    """What a signing row asks for, before the signer's limits and the CSR."""

    profile: str
    subject: list[list[str]]
    sans: list[list[str]]
    validity_days: int
    digest: str | None


def profile_for(table: Table, row: dict[str, Any]) -> str:
    """client.pl's template choice (type 8/9, codesign, org, server) and the issuer by rootcert.

    XmppAddr SANs do not choose a profile: the web application puts them into every server
    request, and the server profiles carry them (or leave them out, in the CA/B aligned set).
    """
    kind = TYPE_PROFILES.get(_int(row.get("type")))
    if kind is None:
        if _int(row.get("codesign")) > 0:
            kind = "client-codesign"
        elif table.server:
            kind = "server-org" if table.org else "server"
        else:
            kind = "client-org" if table.org else "client"
    issuer = ISSUER_BY_ROOTCERT.get(_int(row.get("rootcert")))
    if issuer is None:
        raise RowError(f"rootcert {row.get('rootcert')!r} is neither 1 (class 1) nor 2 (class 3)")
    return kind if issuer == "class3" else f"{kind}-class1"


def plan_x509(
    table: Table, row: dict[str, Any], request: bytes, points: int | None, rules: ValidityConfig
) -> X509Plan:
    """The request a row makes. `request` is its CSR file (the DN of a keygen row is there)."""
    text = str(row.get("subject") or "").strip()
    if text:
        subject, sans = split_subject(text)
    elif is_spkac(request):
        subject, sans = spkac_subject(request), []
    else:
        raise RowError("no subject, and the request file is not a keygen request with a DN")
    if table.server:
        sans = _with_cn_hosts(subject, sans)
    else:  # the addresses of the subject are the certificate's e-mail SANs (CPS 3.1.1)
        addresses = [["email", v] for n, v in subject if n == "emailAddress" and "@" in v]
        sans = _unique(addresses + sans)
    digest = DIGEST_BY_MD.get(str(row.get("md") or "").strip().lower())
    days = validity_days(table, row, points, rules)
    return X509Plan(profile_for(table, row), subject, sans, days, digest)


def _with_cn_hosts(subject: list[list[str]], sans: list[list[str]]) -> list[list[str]]:
    """Every CN host name is a DNS SAN too: the web application's newer requests say so
    themselves, its older organisation requests (`/commonName=a/commonName=b`) do not. The
    XmppAddr buildSubject() adds for a wildcard domain (`*.example.org`) is no JID (RFC 6120):
    the DNS wildcard carries that name, the XmppAddr is left out."""
    hosts = [["dns", v] for n, v in subject if n == "CN" and _HOST.match(v)]
    names = [[k, v] for k, v in sans if not (k == "xmpp" and v.startswith("*."))]
    return _unique(hosts + names)


def validity_days(
    table: Table, row: dict[str, Any], points: int | None, rules: ValidityConfig
) -> int:
    """client.pl: organisation server 730, organisation client 365, personal 730 with at least
    50 points of non-deleted assurances, else 180 (all configurable)."""
    if table.org:
        return rules.org_server_days if table.server else rules.org_client_days
    assured = (points or 0) >= rules.assured_points
    return rules.personal_assured_days if assured else rules.personal_days


# --- revocations and OpenPGP ------------------------------------------------------------------


def revoke_arguments(row: dict[str, Any]) -> dict[str, Any]:
    """`revoke_x509` for a row the web application marked with the sentinel (no reason)."""
    issuer = ISSUER_BY_ROOTCERT.get(_int(row.get("rootcert")))
    serial = str(row.get("serial") or "").strip()
    if issuer is None or not re.fullmatch(r"[0-9A-Fa-f]{1,42}", serial):
        raise RowError(f"cannot revoke: rootcert {row.get('rootcert')!r}, serial {serial!r}")
    return {"issuer": issuer, "serial": serial}


def openpgp_uids(key: bytes) -> list[str]:
    """Every user ID of the key file, whole (name and address): www/gpg.php deleted the ones it
    did not accept (revoked, empty, an address or a name not the member's) before it wrote the
    file, and the old signer certified all that were left."""
    try:
        data = dearmor(key)
        packets = scan_packets(data)
    except SignerError as exc:
        raise RowError(f"the OpenPGP key file cannot be read: {exc.message}") from None
    uids = [data[p.body : p.end].decode("utf-8", "replace") for p in packets if p.tag == USER_ID]
    if not uids:
        raise RowError("the OpenPGP key has no user ID to certify")
    return list(dict.fromkeys(uids))


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
