"""The web application's database for the demo, the tests and the benches: CAcert's real tables
(the ones the WebDB client reads and writes, with every column they have in production) and
rows inserted exactly the way the PHP pages insert them, CSR files included. Not production: the
WebDB client never creates tables or rows.

The schema is CAcert's published DDL (cacert-devel, scripts/db_migrations/version0.sh to
version6.sh: version 0's tables, `description` and `notary.deleted` from version 1, `ou` from
version 2, InnoDB from version 5), for the tables the client touches. MariaDB loads it as it is;
for SQLite it is translated (no KEYs, no ENGINE, and the implicit values MySQL's non-strict
`sql_mode` gives a NOT NULL column that an INSERT leaves out: '' for text, 0 for numbers, the
zero date for DATETIME). Production ran non-strict: the PHP leaves such columns out (`subject`
of keygen rows, `coll_found` of every certificate row) and writes `type=''` into a tinyint.

The inserts follow includes/account.php (X.509 requests), www/gpg.php (OpenPGP) and the pages
that delete and revoke; docs/webdb-client.md lists the shapes.
"""

from __future__ import annotations

import base64
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
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

_TAIL = ") ENGINE=InnoDB DEFAULT CHARSET=latin1;"  # version5.sh moved every table to InnoDB

# The tables the WebDB client touches, with all their columns, in the DDL's order (ALTERs of the
# later versions append at the end).
MYSQL_SCHEMA = f"""\
CREATE TABLE `emailcerts` (
  `id`           int(11)                               NOT NULL AUTO_INCREMENT,
  `memid`        int(11)                               NOT NULL DEFAULT 0,
  `serial`       varchar(50)                           NOT NULL DEFAULT '',
  `CN`           varchar(255)                          NOT NULL DEFAULT '',
  `subject`      text                                  NOT NULL,
  `keytype`      char(2)                               NOT NULL DEFAULT 'NS',
  `codesign`     tinyint(1)                            NOT NULL DEFAULT 0,
  `csr_name`     varchar(255)                          NOT NULL DEFAULT '',
  `crt_name`     varchar(255)                          NOT NULL DEFAULT '',
  `created`      datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `modified`     datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `revoked`      datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `expire`       datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `warning`      tinyint(1)                            NOT NULL DEFAULT 0,
  `renewed`      tinyint(1)                            NOT NULL DEFAULT 0,
  `rootcert`     int(2)                                NOT NULL DEFAULT 1,
  `md`           enum('md5','sha1','sha256','sha512')  NOT NULL DEFAULT 'sha512',
  `type`         tinyint(4)                                     DEFAULT NULL,
  `disablelogin` int(1)                                NOT NULL DEFAULT 0,
  `pkhash`       char(40)                                       DEFAULT NULL,
  `certhash`     char(40)                                       DEFAULT NULL,
  `coll_found`   tinyint(1)                            NOT NULL,
  `description`  varchar(100)                          NOT NULL DEFAULT '',
  PRIMARY KEY (`id`),
  KEY `revoked` (`revoked`),
  KEY `memid` (`memid`),
  KEY `serial` (`serial`),
  KEY `emailcrt` (`crt_name`)
{_TAIL}

CREATE TABLE `domaincerts` (
  `id`           int(11)                               NOT NULL AUTO_INCREMENT,
  `domid`        int(11)                               NOT NULL DEFAULT 0,
  `serial`       varchar(50)                           NOT NULL DEFAULT '',
  `CN`           varchar(255)                          NOT NULL DEFAULT '',
  `subject`      text                                  NOT NULL,
  `csr_name`     varchar(255)                          NOT NULL DEFAULT '',
  `crt_name`     varchar(255)                          NOT NULL DEFAULT '',
  `created`      datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `modified`     datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `revoked`      datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `expire`       datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `warning`      tinyint(1)                            NOT NULL DEFAULT 0,
  `renewed`      tinyint(1)                            NOT NULL DEFAULT 0,
  `rootcert`     int(2)                                NOT NULL DEFAULT 1,
  `md`           enum('md5','sha1','sha256','sha512')  NOT NULL DEFAULT 'sha512',
  `type`         tinyint(4)                                     DEFAULT NULL,
  `pkhash`       char(40)                                       DEFAULT NULL,
  `certhash`     char(40)                                       DEFAULT NULL,
  `coll_found`   tinyint(1)                            NOT NULL,
  `description`  varchar(100)                          NOT NULL DEFAULT '',
  PRIMARY KEY (`id`),
  KEY `revoked` (`revoked`),
  KEY `domid` (`domid`),
  KEY `serial` (`serial`),
  KEY `domaincrt` (`crt_name`)
{_TAIL}

CREATE TABLE `orgemailcerts` (
  `id`           int(11)                               NOT NULL AUTO_INCREMENT,
  `orgid`        int(11)                               NOT NULL DEFAULT 0,
  `serial`       varchar(50)                           NOT NULL DEFAULT '',
  `CN`           varchar(255)                          NOT NULL DEFAULT '',
  `subject`      text                                  NOT NULL,
  `keytype`      char(2)                               NOT NULL DEFAULT 'NS',
  `csr_name`     varchar(255)                          NOT NULL DEFAULT '',
  `crt_name`     varchar(255)                          NOT NULL DEFAULT '',
  `created`      datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `modified`     datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `revoked`      datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `expire`       datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `renewed`      tinyint(1)                            NOT NULL DEFAULT 0,
  `rootcert`     int(2)                                NOT NULL DEFAULT 1,
  `md`           enum('md5','sha1','sha256','sha512')  NOT NULL DEFAULT 'sha512',
  `type`         tinyint(4)                                     DEFAULT NULL,
  `codesign`     tinyint(1)                            NOT NULL DEFAULT 0,
  `warning`      tinyint(1)                            NOT NULL DEFAULT 0,
  `pkhash`       char(40)                                       DEFAULT NULL,
  `certhash`     char(40)                                       DEFAULT NULL,
  `coll_found`   tinyint(1)                            NOT NULL,
  `description`  varchar(100)                          NOT NULL DEFAULT '',
  `ou`           varchar(50)                           NOT NULL DEFAULT '',
  PRIMARY KEY (`id`)
{_TAIL}

CREATE TABLE `orgdomaincerts` (
  `id`           int(11)                               NOT NULL AUTO_INCREMENT,
  `orgid`        int(11)                               NOT NULL DEFAULT 0,
  `subject`      text                                  NOT NULL,
  `serial`       varchar(50)                           NOT NULL DEFAULT '',
  `CN`           varchar(255)                          NOT NULL DEFAULT '',
  `csr_name`     varchar(255)                          NOT NULL DEFAULT '',
  `crt_name`     varchar(255)                          NOT NULL DEFAULT '',
  `created`      datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `modified`     datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `revoked`      datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `expire`       datetime                              NOT NULL DEFAULT '0000-00-00 00:00:00',
  `renewed`      tinyint(1)                            NOT NULL DEFAULT 0,
  `rootcert`     int(2)                                NOT NULL DEFAULT 1,
  `md`           enum('md5','sha1','sha256','sha512')  NOT NULL DEFAULT 'sha512',
  `type`         tinyint(4)                                     DEFAULT NULL,
  `warning`      tinyint(1)                            NOT NULL DEFAULT 0,
  `pkhash`       char(40)                                       DEFAULT NULL,
  `certhash`     char(40)                                       DEFAULT NULL,
  `coll_found`   tinyint(1)                            NOT NULL,
  `description`  varchar(100)                          NOT NULL DEFAULT '',
  PRIMARY KEY (`id`)
{_TAIL}

CREATE TABLE `gpg` (
  `id`           int(11)      NOT NULL AUTO_INCREMENT,
  `memid`        int(11)      NOT NULL DEFAULT 0,
  `email`        varchar(255) NOT NULL DEFAULT '',
  `level`        int(1)       NOT NULL DEFAULT 0,
  `multiple`     tinyint(1)   NOT NULL DEFAULT 0,
  `expires`      tinyint(1)   NOT NULL DEFAULT 0,
  `csr`          varchar(255) NOT NULL DEFAULT '',
  `crt`          varchar(255) NOT NULL DEFAULT '',
  `issued`       datetime     NOT NULL DEFAULT '0000-00-00 00:00:00',
  `expire`       datetime     NOT NULL DEFAULT '0000-00-00 00:00:00',
  `keyid`        char(18)              DEFAULT NULL,
  `warning`      tinyint(1)   NOT NULL DEFAULT 0,
  `description`  varchar(100) NOT NULL DEFAULT '',
  PRIMARY KEY (`id`)
{_TAIL}

CREATE TABLE `notary` (
  `id`           int(11)      NOT NULL AUTO_INCREMENT,
  `from`         int(11)      NOT NULL DEFAULT 0,
  `to`           int(11)      NOT NULL DEFAULT 0,
  `awarded`      int(3)       NOT NULL DEFAULT 0,
  `points`       int(3)       NOT NULL DEFAULT 0,
  `method`       enum('Face to Face Meeting','Trusted Third Parties','Thawte Points Transfer',
                 'Administrative Increase','CT Magazine - Germany','Temporary Increase','Unknown',
                 'TOPUP','TTP-Assisted') NOT NULL DEFAULT 'Face to Face Meeting',
  `location`     varchar(255) NOT NULL DEFAULT '',
  `date`         varchar(255) NOT NULL DEFAULT '',
  `when`         datetime     NOT NULL DEFAULT '0000-00-00 00:00:00',
  `expire`       datetime     NOT NULL DEFAULT '0000-00-00 00:00:00',
  `sponsor`      int(11)      NOT NULL DEFAULT 0,
  `deleted`      datetime     NOT NULL DEFAULT '0000-00-00 00:00:00',
  PRIMARY KEY (`id`),
  KEY `to` (`to`)
{_TAIL}

CREATE TABLE `domains` (
  `id`           int(11)      NOT NULL AUTO_INCREMENT,
  `memid`        int(11)      NOT NULL DEFAULT 0,
  `domain`       varchar(255) NOT NULL DEFAULT '',
  `created`      datetime     NOT NULL DEFAULT '0000-00-00 00:00:00',
  `modified`     datetime     NOT NULL DEFAULT '0000-00-00 00:00:00',
  `deleted`      datetime     NOT NULL DEFAULT '0000-00-00 00:00:00',
  `hash`         varchar(50)  NOT NULL DEFAULT '',
  `attempts`     int(1)       NOT NULL DEFAULT 0,
  PRIMARY KEY (`id`),
  KEY `memid` (`memid`)
{_TAIL}
"""

TABLES = ("emailcerts", "domaincerts", "orgemailcerts", "orgdomaincerts", "gpg", "notary",
          "domains")  # fmt: skip
_COLUMN = re.compile(r"^\s*`(\w+)`\s+(\w+)(\([^)]*\))?(.*?),?$")


def sqlite_schema(mysql: str = MYSQL_SCHEMA) -> list[str]:
    """The DDL for SQLite: no KEYs or ENGINE, AUTO_INCREMENT ids, and each NOT NULL column
    without a default gets the value MySQL's non-strict mode gives an INSERT that leaves it out."""
    statements = []
    for block in mysql.split("CREATE TABLE ")[1:]:
        lines: list[str] = []
        for line in block.strip().splitlines():  # a long enum continues on the next lines
            if line.startswith(" ") and not line.lstrip().startswith(("`", "PRIMARY", "KEY")):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        name = lines[0].split("`")[1]
        columns = []
        for line in lines[1:]:
            found = _COLUMN.match(line)
            if found is None:
                continue
            column, kind, _, rest = found.groups()
            if "AUTO_INCREMENT" in rest:
                columns.append(f"`{column}` INTEGER PRIMARY KEY AUTOINCREMENT")
                continue
            sql_type = (
                "TEXT" if kind in ("enum", "text", "varchar", "char", "datetime") else ("INTEGER")
            )
            if "NOT NULL" in rest and "DEFAULT" not in rest:
                implicit = {"INTEGER": "0", "TEXT": "''"}[sql_type]
                rest = f"NOT NULL DEFAULT {implicit}"
            columns.append(f"`{column}` {sql_type} {rest.strip()}")
        statements.append(f"CREATE TABLE IF NOT EXISTS `{name}` ({', '.join(columns)})")
    return statements


async def create_schema(db: Database) -> None:
    """CAcert's tables that the WebDB client reads and writes (and `notary`, `domains`)."""
    if db.config.driver == "sqlite":
        for statement in sqlite_schema():
            await db.execute(statement)
        return
    for statement in MYSQL_SCHEMA.split(";"):
        if statement.strip():
            await db.execute(statement.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))


async def insert_row(db: Database, table: str, values: dict[str, Any]) -> int:
    """`insert into <table> set a=..., b=...` as the PHP writes it (MySQL's own form; the column
    list form on SQLite); columns left out get their default. Returns the new id."""
    names = list(values)
    if db.config.driver == "mysql":
        assignments = ", ".join(f"`{name}` = ?" for name in names)
        sql = f"INSERT INTO `{table}` SET {assignments}"
    else:
        columns = ", ".join(f"`{name}`" for name in names)
        sql = f"INSERT INTO `{table}` ({columns}) VALUES ({', '.join('?' for _ in names)})"
    await db.execute(sql, tuple(values.values()))
    rows = await db.query(f"SELECT MAX(id) AS id FROM `{table}`")
    return int(rows[0]["id"])


async def request_revocation(db: Database, table: str, row_id: int) -> None:
    """What the web application does when a member revokes a certificate."""
    await db.execute(f"UPDATE {table} SET revoked = ? WHERE id = ?", (REVOCATION_SENTINEL, row_id))


# --- the web application's requests -----------------------------------------------------------


@dataclass(frozen=True)
class Organisation:
    """An `orginfo` row: what Organisation Assurance verified (the web application's names)."""

    O: str  # noqa: E741 (the column's name)
    L: str = ""
    ST: str = ""
    C: str = ""


def build_subject(domains: Sequence[str], xmpp: bool = True) -> str:
    """account.php's buildSubject(): CN for the first domain, and for every domain a DNS SAN
    and (by default) an XmppAddr SAN."""
    subject = f"/CN={domains[0]}" if domains else ""
    for domain in domains:
        subject += f"/subjectAltName=DNS:{domain}"
        if xmpp:
            subject += f"/subjectAltName=otherName:{XMPP_OID};UTF8:{domain}"
    return subject


def org_names(org: Organisation, ou: str = "") -> str:
    """The organisation's part of an org subject, in account.php's long names and order."""
    parts = [("organizationalUnitName", ou), ("organizationName", org.O), ("localityName", org.L),
             ("stateOrProvinceName", org.ST), ("countryName", org.C)]  # fmt: skip
    return "".join(f"/{name}={value}" for name, value in parts if value)


@dataclass
class WebApplication:
    """What CAcert's PHP pages do to the database and the request files, one method a page.

    `key`: the member's key for the CSR or SPKAC (a fresh RSA-2048 key by default). Every
    request method returns the new row's id; its request file is written where
    generatecertpath() puts it, and `csr_name` set afterwards, as the PHP does.
    """

    db: Database
    base_dir: Path
    now: str = field(default_factory=lambda: db_time(utcnow()))

    async def assurance(self, to: int, points: int, deleted: bool = False) -> int:
        """An assurance (wot.php), or one an admin later deleted (`deleted` set to its time)."""
        values = {"from": 99, "to": to, "awarded": points, "points": points,
                  "method": "Face to Face Meeting", "location": "Berlin", "date": "2026-01-01",
                  "when": self.now}  # fmt: skip
        row_id = await insert_row(self.db, "notary", values)
        if deleted:
            await self.db.execute("UPDATE notary SET deleted = ? WHERE id = ?", (self.now, row_id))
        return row_id

    async def domain(self, memid: int, name: str) -> int:
        """A verified domain of a member (account.php id=8, then verify.php clears `hash`)."""
        return await insert_row(
            self.db, "domains", {"domain": name, "memid": memid, "created": self.now, "hash": ""}
        )

    async def client_certificate(
        self,
        memid: int,
        emails: Sequence[str],
        name: str = "CAcert WoT User",
        keytype: str = "MS",
        rootcert: int = 1,
        codesign: int = 0,
        md: str | None = None,
        key: PrivateKey | None = None,
    ) -> int:
        """account.php oldid=4: a personal client certificate; keytype MS or VI is a pasted
        CSR with the subject in the row, NS a browser keygen request with the DN in its file."""
        values: dict[str, Any] = {"CN": emails[0] if emails else "", "keytype": keytype,
                                  "memid": memid, "created": self.now}  # fmt: skip
        if keytype == "NS":
            request = spkac_request([*(f"emailAddress = {e}" for e in emails),
                                     f"commonName = {name}"], key)  # fmt: skip
        else:
            values["subject"] = f"/CN={name}" + "".join(f"/emailAddress={e}" for e in emails)
            request = make_csr(key or new_key(), "a name the web application does not use")
        values.update(codesign=codesign, disablelogin=1, rootcert=rootcert)
        return await self._request("emailcerts", values, md, request)

    async def server_certificate(
        self,
        domid: int,
        domains: Sequence[str],
        rootcert: int = 1,
        md: str | None = None,
        key: PrivateKey | None = None,
    ) -> int:
        """account.php oldid=11: a server certificate for the member's verified domains."""
        values = {"CN": domains[0], "domid": domid, "created": self.now,
                  "subject": build_subject(domains), "rootcert": rootcert}  # fmt: skip
        csr = make_csr(key or new_key(), domains[0], list(domains))
        return await self._request("domaincerts", values, md, csr, column="CSR_name")

    async def org_client_certificate(
        self,
        orgid: int,
        org: Organisation,
        emails: Sequence[str],
        name: str = "",
        ou: str = "",
        keytype: str = "MS",
        rootcert: int = 1,
        codesign: int = 0,
        md: str | None = None,
        key: PrivateKey | None = None,
    ) -> int:
        """account.php oldid=17: an organisation's client certificate, long attribute names."""
        values: dict[str, Any] = {"CN": emails[0], "keytype": keytype, "orgid": orgid,
                                  "created": self.now}  # fmt: skip
        names = org_names(org, ou)
        if keytype == "NS":
            lines = [f"emailAddress = {e}" for e in emails]
            lines += [f"commonName = {name}"] if name else []
            lines += [item.replace("=", " = ", 1) for item in names.split("/")[1:]]
            request = spkac_request(lines, key)
        else:
            subject = f"/CN={name}" if name else ""
            values["subject"] = subject + "".join(f"/emailAddress={e}" for e in emails) + names
            request = make_csr(key or new_key(), "a name the web application does not use")
        values.update(codesign=codesign, rootcert=rootcert)
        return await self._request("orgemailcerts", values, md, request)

    async def org_server_certificate(
        self,
        orgid: int,
        org: Organisation,
        domains: Sequence[str],
        ou: str = "",
        rootcert: int = 1,
        ocsp: bool = False,
        xmpp: bool = True,
        md: str | None = None,
        key: PrivateKey | None = None,
    ) -> int:
        """account.php oldid=21: an organisation's server certificate. `xmpp` (the default): the
        names as buildSubject() writes them; False: the older shape, one `commonName=` per CN
        of the CSR and its SANs as one comma-separated `subjectAltName=DNS:a,DNS:b`."""
        if xmpp:
            subject = org_names(org, ou) + build_subject(domains)
        else:
            sans = ",".join(f"DNS:{d}" for d in domains)
            subject = org_names(org, ou) + f"/commonName={domains[0]}/subjectAltName={sans}"
        values = {"CN": domains[0], "orgid": orgid, "created": self.now, "subject": subject,
                  "rootcert": rootcert, "type": "8" if ocsp else ""}  # fmt: skip
        csr = make_csr(key or new_key(), domains[0], list(domains))
        return await self._request("orgdomaincerts", values, md, csr, column="CSR_name")

    async def openpgp_key(self, memid: int, key: bytes, email: str, keyid: str = "") -> int:
        """www/gpg.php: `email` is the last accepted address; the file keeps the accepted UIDs."""
        values = {"memid": memid, "email": email, "level": 1, "expires": 0, "multiple": 0,
                  "keyid": keyid}  # fmt: skip
        row_id = await insert_row(self.db, "gpg", values)
        name = csr_path(GPG_PREFIX, row_id)
        write_atomically(self.base_dir / name, key)
        await self.db.execute("UPDATE gpg SET csr = ? WHERE id = ?", (name, row_id))
        return row_id

    async def _request(
        self, table: str, values: dict[str, Any], md: str | None, request: bytes,
        column: str = "csr_name",
    ) -> int:  # fmt: skip
        if md is not None:  # newer pages let the member choose; older ones left the default
            values["md"] = md
        row_id = await insert_row(self.db, table, values)
        name = csr_path(X509_TABLES[table].prefix, row_id)
        write_atomically(self.base_dir / name, request)
        await self.db.execute(f"UPDATE {table} SET `{column}` = ? WHERE id = ?", (name, row_id))
        return row_id


def csr_path(prefix: str, row_id: int) -> str:
    """generatecertpath("csr", prefix, id), relative to the web application's directory."""
    return f"../csr/{prefix}/{row_id // 1000}/{prefix}-{row_id}.csr"


# --- the demo's rows --------------------------------------------------------------------------


async def demo_rows(db: Database, base_dir: Path) -> dict[str, int]:
    """Schema and one pending row of each kind members ask for, as the web application writes
    them, with their request files under `base_dir/../csr`. Returns {label: row id}.

    Member 1 is assured (100 points) and owns example.org; member 3 has only a deleted
    assurance (class 1, 180 days) and owns example.net. Revocations are asked for with
    `request_revocation` once a row has its certificate; OpenPGP rows with
    `WebApplication.openpgp_key`.
    """
    await create_schema(db)
    web = WebApplication(db, base_dir)
    await web.assurance(1, 100)
    await web.assurance(3, 100, deleted=True)
    domid = await web.domain(1, "example.org")
    unassured = await web.domain(3, "example.net")
    org = Organisation("Example e.V.", "Berlin", "Berlin", "DE")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    return {
        "client": await web.client_certificate(
            1, ["alice@example.org", "alice@example.net"], "Alice Example", rootcert=2
        ),
        "client-keygen": await web.client_certificate(3, ["bob@example.org"], keytype="NS"),
        "codesign": await web.client_certificate(
            1, ["alice@example.org"], "Alice Example", rootcert=2, codesign=1, key=ec_key
        ),
        "server": await web.server_certificate(
            domid, ["www.example.org", "example.org"], rootcert=2, key=ec_key
        ),
        "server-class1": await web.server_certificate(unassured, ["*.example.net"], rootcert=1),
        "org-client": await web.org_client_certificate(
            1, org, ["office@example.org"], "Example Office", "IT", rootcert=2
        ),
        "org-server": await web.org_server_certificate(
            1, org, ["shop.example.org"], "Web", rootcert=2, key=ec_key
        ),
    }


async def openpgp_row(db: Database, base_dir: Path, public_key: bytes, email: str) -> int:
    """A pending `gpg` row for an OpenPGP public key (armored or binary), as www/gpg.php."""
    return await WebApplication(db, base_dir).openpgp_key(1, public_key, email)


# --- keys, CSRs and keygen requests -----------------------------------------------------------


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def make_csr(
    key: PrivateKey,
    common_name: str = "ignored: the WebDB's subject counts",
    dns: Sequence[str] = (),
) -> bytes:
    """A PEM PKCS#10 request as `openssl req -out` leaves it (its names do not count: the row's
    `subject` does, as the web application built it from them)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if dns:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
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


def spkac_request(dn_lines: Sequence[str], key: PrivateKey | None = None) -> bytes:
    """The keygen request file account.php writes: numbered e-mail lines (`0.emailAddress =
    a@b`), the other DN lines, and `SPKAC = <base64>` last, without a final newline."""
    lines, count = [], 0
    for line in dn_lines:
        if line.startswith("emailAddress"):
            line, count = f"{count}.{line}", count + 1
        lines.append(line)
    blob = make_spkac(key or new_key()).decode().split("=", 1)[1].strip()
    base64.b64decode(blob, validate=True)
    return ("\n".join(lines) + f"\nSPKAC = {blob}").encode()
