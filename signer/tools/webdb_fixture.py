"""A WebDB for the demo, the tests and the benches: the tables the WebDB client reads and
writes, pending rows of each kind with their CSR files, and what the web application does when a
member asks for a revocation. Not production: the WebDB client never creates tables or rows."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes as PrivateKey,
)
from cryptography.x509.oid import NameOID

from signer.client.files import write_atomically
from signer.client.webdb.database import Database, db_time
from signer.client.webdb.rows import GPG_PREFIX, REVOCATION_SENTINEL, X509_TABLES, XMPP_OID
from signer.clock import utcnow

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
    now = db_time(utcnow())
    await insert_row(db, "domains", {"memid": 1, "domain": "example.org"})
    await insert_row(db, "notary", {"from": 2, "to": 1, "points": 100})
    rows: dict[str, tuple[str, str, dict[str, Any], str, bool]] = {
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


def make_csr(key: PrivateKey, common_name: str = "ignored: the WebDB's subject counts") -> bytes:
    """A PEM PKCS#10 request (its subject does not count: the row's `subject` does)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_spkac(key: PrivateKey) -> bytes:
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
