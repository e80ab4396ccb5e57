"""The WebDB client end to end: WebDB rows (SQLite and a real MariaDB) → client → emulated line →
signer (ceremony CA on SoftHSM2) → certificate files and columns, checked with openssl."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pgpy
import pytest
import yaml
from ceremony_ca import make_ceremony_ca
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from signer.client.crl_refresh import BadCrl, CrlRefresher
from signer.client.webdb import (
    REVOCATION_SENTINEL,
    X509_TABLES,
    Database,
    RowError,
    ValidityConfig,
    WebdbClient,
    WebdbClientConfig,
    db_time,
    health_alerts,
    plan_x509,
    profile_for,
    publish_crl,
    split_subject,
)
from signer.client.webdb.rows import spkac_subject
from signer.config import ConfigError, load
from signer.link.serial_link import LinkSettings
from signer.pki.audit import decode_record, iter_frames
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.line_emulator import LineEmulator
from signer.tools.webdb_fixture import (
    Organisation,
    WebApplication,
    create_schema,
    csr_path,
    demo_rows,
    insert_row,
    make_csr,
    request_revocation,
    spkac_request,
)

ROOT = Path(__file__).resolve().parent.parent
FAST = 921600


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(softhsm_token_factory, tmp_path_factory):
    """The ceremony on a fresh SoftHSM2 token: RSA keys like CAcert's (class 1 and class 3; an
    EC class 3 would sign with its curve's digest only, and the rows ask for SHA-512)."""
    token = softhsm_token_factory()
    base = tmp_path_factory.mktemp("ca")
    make_ceremony_ca(token, base, class3_kind="rsa-2048", openpgp_kind="ec-p256")
    return base, token


def signer_config(
    ca, device: Path, directory: Path, baud: int, profiles: str = "cacert"
) -> SignerConfig:
    base, token = ca
    text = {
        "link": {"device": str(device), "baudrate": baud, "reopen_interval": 0.1},
        "repository": {"path": str(directory / "repo")},
        "hsm": {"module": token.store.module, "token_label": token.label,
                "pin_file": str(token.pin_file)},
        "profiles": profiles,
        "issuers": {
            "class1": {"certificate": str(base / "ca" / "class1.crt"), "key": "root"},
            "class3": {"certificate": str(base / "ca" / "class3.crt"), "key": "class3"},
        },
        "openpgp": {"ca_file": str(base / "ca" / "openpgp-ca.yaml")},
        "audit": {"key": "audit", "certificate": str(base / "ca" / "audit.crt"),
                  "refusal_interval_seconds": 0.2},
    }  # fmt: skip
    path = directory / "signer.yaml"
    path.write_text(yaml.safe_dump(text))
    return load(path, SignerConfig)


class Signer:
    """An in-process signer with one or two lines, each an emulated cable."""

    def __init__(self, ca, directory: Path, baud: int, lines: int = 1, profiles: str = "cacert"):
        self.cables = [LineEmulator(directory / f"line{i}", baud=baud) for i in range(lines)]
        for cable in self.cables:
            cable.start()
        config = signer_config(ca, self.cables[0].end_a, directory, baud, profiles)
        self.server = SignerServer(config)
        for i, cable in enumerate(self.cables[1:], start=2):
            settings = LinkSettings(device=str(cable.end_a), baudrate=baud, reopen_interval=0.1)
            self.server.add_line(settings, f"signer-line{i}")
        self.baud = baud

    @property
    def repository(self) -> Any:
        return self.server.ca.repository

    def lines(self) -> list[dict[str, Any]]:
        return [
            {"device": str(c.end_b), "baudrate": self.baud, "reopen_interval": 0.1}
            for c in self.cables
        ]

    async def __aenter__(self) -> Signer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
        for cable in self.cables:
            cable.close()


def client_config(
    tmp: Path, database: dict[str, Any], lines: list[dict[str, Any]], **extra: Any
) -> WebdbClientConfig:
    """Written as YAML and loaded like `signer webdb-client --config` does."""
    text = {
        "database": database,
        "base_dir": "www",
        "lines": lines,
        "timeout": 20,
        "crl": {"outputs": {"class1": "crl/revoke.crl", "class3": "crl/class3-revoke.crl"}},
        **extra,
    }
    path = tmp / "webdb-client.yaml"
    path.write_text(yaml.safe_dump(text))
    (tmp / "www").mkdir(exist_ok=True)
    return load(path, WebdbClientConfig)


def sqlite_db(tmp: Path) -> dict[str, Any]:
    return {"driver": "sqlite", "path": str(tmp / "webdb.sqlite")}


async def row(db: Database, table: str, row_id: int) -> dict[str, Any]:
    [found] = await db.query(f"SELECT * FROM {table} WHERE id = ?", (row_id,))
    return found


def openssl_verify(ca, pem: Path, class3: bool) -> subprocess.CompletedProcess[str]:
    base, _ = ca
    chain = ["-untrusted", str(base / "ca" / "class3.crt")] if class3 else []
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(base / "ca" / "class1.crt"), *chain, str(pem)],
        capture_output=True,
        text=True,
    )


def even_hex(number: int) -> str:
    digits = f"{number:X}"
    return digits if len(digits) % 2 == 0 else "0" + digits


def openpgp_key(uids: list[str]) -> bytes:
    """A member's key with these user IDs (`Name <address>`), as gpg.php keeps it: armored."""
    key = pgpy.PGPKey.new(pgpy.constants.PubKeyAlgorithm.RSAEncryptOrSign, 2048)
    for text in uids:
        name, _, address = text.partition(" <")
        key.add_uid(
            pgpy.PGPUID.new(name, email=address.rstrip(">")),
            usage={pgpy.constants.KeyFlags.Sign},
            hashes=[pgpy.constants.HashAlgorithm.SHA256],
        )
    return str(key.pubkey).encode()


# --- the pure parts --------------------------------------------------------------------------


def test_subjects_as_the_web_application_writes_them():
    subject, sans = split_subject(
        "/CN=jabber.example.org/OU=http://www.CAcert.org/O=A\\/B"
        "/subjectAltName=DNS:jabber.example.org"
        "/subjectAltName=otherName:1.3.6.1.5.5.7.8.5;UTF8:jabber.example.org"
    )
    assert subject == [["CN", "jabber.example.org"], ["OU", "http://www.CAcert.org"], ["O", "A/B"]]
    assert sans == [["dns", "jabber.example.org"], ["xmpp", "jabber.example.org"]]
    assert split_subject("/CN=a.org/subjectAltName=DNS:a.org, DNS:b.org")[1] == [
        ["dns", "a.org"],
        ["dns", "b.org"],
    ]
    # account.php's organisation names (long), its older org server shape (commonName, SANs in
    # one comma list), its renewal's bare SAN and the SSO item's spaces.
    org = split_subject(
        "/organizationalUnitName=IT/organizationName=Example e.V./localityName=Berlin"
        "/stateOrProvinceName=Berlin/countryName=DE/commonName=a.example.org"
        "/subjectAltName=DNS:a.example.org,DNS:b.example.org/subjectAltName=c.example.org"
        "/emailAddress = 0123"
    )
    assert org == (
        [["OU", "IT"], ["O", "Example e.V."], ["L", "Berlin"], ["ST", "Berlin"], ["C", "DE"],
         ["CN", "a.example.org"], ["emailAddress", "0123"]],
        [["dns", "a.example.org"], ["dns", "b.example.org"], ["dns", "c.example.org"]],
    )  # fmt: skip
    for bad in ("CN=x", "/CN", "/CN=x/subjectAltName=X400:y", "/subjectAltName=otherName:1;UTF8:x"):
        with pytest.raises(RowError):
            split_subject(bad)
    keygen = spkac_request(
        [
            "emailAddress = a@example.org",
            "emailAddress = b@example.org",
            "commonName = CAcert WoT User",
            "organizationalUnitName = IT",
        ]
    )
    assert keygen.startswith(b"0.emailAddress = a@example.org\n1.emailAddress = b@")
    assert spkac_subject(keygen) == [["emailAddress", "a@example.org"],
                                     ["emailAddress", "b@example.org"],
                                     ["CN", "CAcert WoT User"], ["OU", "IT"]]  # fmt: skip


def test_rows_to_requests():
    t = X509_TABLES
    cases = [  # client.pl's template choice; XmppAddr chooses nothing
        (t["emailcerts"], {"rootcert": 2, "codesign": 0}, "client"),
        (t["emailcerts"], {"rootcert": 1, "codesign": 1}, "client-codesign-class1"),
        (t["domaincerts"], {"rootcert": 2, "type": None}, "server"),
        (t["domaincerts"], {"rootcert": 1, "type": 0}, "server-class1"),
        (t["orgdomaincerts"], {"rootcert": 2, "type": 8}, "ocsp"),
        (t["orgdomaincerts"], {"rootcert": 2, "type": ""}, "server-org"),  # type='' on SQLite
        (t["orgemailcerts"], {"rootcert": 1}, "client-org-class1"),
        (t["orgemailcerts"], {"rootcert": 2, "codesign": 1}, "client-codesign"),
        (t["emailcerts"], {"rootcert": 2, "type": 9}, "timestamp"),
    ]
    for table, fields, profile in cases:
        assert profile_for(table, fields) == profile
    with pytest.raises(RowError):
        profile_for(t["emailcerts"], {"rootcert": 3})

    rules = ValidityConfig()
    personal = {"subject": "/CN=Bob Example/emailAddress=bob@example.org", "rootcert": 2,
                "md": "sha512"}  # fmt: skip
    plan = plan_x509(t["emailcerts"], personal, b"-", 10, rules)
    assert plan.validity_days == 180 and plan.digest == "sha512"  # points, not the rootcert
    assert plan.subject == [["CN", "Bob Example"], ["emailAddress", "bob@example.org"]]
    assert plan.sans == [["email", "bob@example.org"]]
    assert plan_x509(t["emailcerts"], personal, b"-", 50, rules).validity_days == 730
    sha1 = {**personal, "md": "sha1"}  # the signer never signs with SHA-1: SHA-256 instead
    assert plan_x509(t["emailcerts"], sha1, b"-", 50, rules).digest == "sha256"
    assert plan_x509(t["emailcerts"], {**personal, "md": ""}, b"-", 50, rules).digest is None
    keygen = {"subject": "", "rootcert": 1, "md": "sha512"}
    request = spkac_request(["emailAddress = bob@example.org", "commonName = CAcert WoT User"])
    plan = plan_x509(t["emailcerts"], keygen, request, None, rules)
    assert plan.subject == [["emailAddress", "bob@example.org"], ["CN", "CAcert WoT User"]]
    assert plan.sans == [["email", "bob@example.org"]] and plan.validity_days == 180
    with pytest.raises(RowError):
        plan_x509(t["emailcerts"], keygen, b"-----BEGIN CERTIFICATE REQUEST-----", None, rules)
    old_org = {"subject": "/organizationName=A/commonName=a.org/commonName=b.org/subjectAltName="
               "DNS:b.org", "rootcert": 2}  # fmt: skip
    plan = plan_x509(t["orgdomaincerts"], old_org, b"-", None, rules)
    assert plan.sans == [["dns", "a.org"], ["dns", "b.org"]]  # every CN host is a DNS SAN
    assert plan.validity_days == 730
    assert plan_x509(t["orgemailcerts"], old_org, b"-", None, rules).validity_days == 365


def test_health_alerts():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    healthy = {"status": "ok", "time": now, "warnings": [], "sections": {}}
    assert health_alerts("A", healthy, now, 60) == []
    sick = {
        "status": "error",
        "time": now + timedelta(seconds=300),
        "warnings": ["hsm: token not present", "cas: class3: CA certificate expires in 20 days"],
        "sections": {"cluster": {"quorum": False}, "cas": {"class1": {"days_left": -1}}},
    }
    texts = [a.text for a in health_alerts("A", sick, now, 60)]
    assert any("token not present" in t for t in texts)
    assert any("expires in 20 days" in t for t in texts)
    assert any("+300 s" in t for t in texts)
    assert any("lost its quorum" in t for t in texts)
    assert any("class1 has expired" in t for t in texts)
    assert {(a.line, a.unanswered) for a in health_alerts("A", sick, now, 60)} == {("A", False)}
    said = {  # what the signer's own lines (each starts with its section) say is not repeated
        **sick,
        "time": now,
        "warnings": ["cluster: no quorum: nothing can be issued or revoked",
                     "cas: class1: CA certificate expired on 2025-12-31"],
    }  # fmt: skip
    assert [a.text for a in health_alerts("A", said, now, 60)] == [
        "signer on line A: cluster: no quorum: nothing can be issued or revoked",
        "signer on line A: cas: class1: CA certificate expired on 2025-12-31",
    ]
    other = {**said, "warnings": ["hsm: token not present", "cas: class10: expires in 9 days"]}
    texts = [a.text for a in health_alerts("A", other, now, 60)]
    assert texts[2:] == [
        "signer on line A: the cluster has lost its quorum",
        "signer on line A: CA class1 has expired",
    ]


def test_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"webdb-client.yaml: colour: unknown key"):
        client_config(tmp_path, sqlite_db(tmp_path), [{"device": "/dev/null"}], colour="blue")
    with pytest.raises(ConfigError, match=r"database: .*needs `database`"):
        client_config(tmp_path, {"driver": "mysql", "host": "127.0.0.1"}, [{"device": "x"}])
    with pytest.raises(ConfigError, match=r"lines: "):
        client_config(tmp_path, sqlite_db(tmp_path), [{"device": "x"}] * 3)
    shipped = load(ROOT / "config" / "webdb-client.yaml", WebdbClientConfig)
    assert shipped.database.driver == "mysql" and len(shipped.lines) == 2
    config = client_config(tmp_path, sqlite_db(tmp_path), [{"device": "x"}])
    assert config.base_dir == tmp_path / "www" and config.crl.outputs["class1"].is_absolute()
    bad = subprocess.run(
        [sys.executable, "-m", "signer", "webdb-client", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "cannot read" in bad.stderr


async def test_a_pass_without_a_signer_names_the_lines_that_did_not_answer(tmp_path):
    """What `webdb-client --once` exits 3 on: a typed field, not the alerts' wording."""
    device = tmp_path / "no-such-line"
    lines = [{"device": str(device), "reopen_interval": 0.1}]
    config = client_config(tmp_path, sqlite_db(tmp_path), lines, timeout=0.5, attempts=1)
    async with WebdbClient(config) as client:
        await create_schema(client.db)
        await insert_row(client.db, "domaincerts", {"subject": "/CN=a.org", "csr_name": "a.csr"})
        report = await client.run_once()
        assert (await row(client.db, "domaincerts", 1))["warning"] == 0  # not the row's fault
    assert report.unanswered_lines == [str(device)]
    assert report.requests.deferred == {"domaincerts:1:sign": "link_down"}
    assert [a.level for a in report.alerts] == ["error"]
    assert all(text.startswith("failed: link_down") for text in report.crls.values())


# --- end to end ------------------------------------------------------------------------------


E = ExtendedKeyUsageOID
MS_EFS = x509.ObjectIdentifier("1.3.6.1.4.1.311.10.3.4")
EKU = {  # docs/profiles.md, the cacert set
    "client": [E.EMAIL_PROTECTION, E.CLIENT_AUTH, MS_EFS],
    "client-org": [E.EMAIL_PROTECTION, E.CLIENT_AUTH, MS_EFS],
    "client-codesign": [E.EMAIL_PROTECTION, E.CLIENT_AUTH, E.CODE_SIGNING,
                        x509.ObjectIdentifier("1.3.6.1.4.1.311.2.1.21"),
                        x509.ObjectIdentifier("1.3.6.1.4.1.311.2.1.22"), MS_EFS],
    "server": [E.CLIENT_AUTH, E.SERVER_AUTH],
    "server-org": [E.CLIENT_AUTH, E.SERVER_AUTH],
}  # fmt: skip
CRL_URL = {"class1": "http://crl.cacert.org/revoke.crl",
           "class3": "http://crl.cacert.org/class3-revoke.crl"}  # fmt: skip
ORG = Organisation("Example e.V.", "Berlin", "Berlin", "DE")
ORG_NAMES = [("C", "DE"), ("ST", "Berlin"), ("L", "Berlin"), ("O", "Example e.V.")]


@dataclass(frozen=True)
class Expect:
    """What a row must become: the profile table's fields (docs/profiles.md)."""

    table: str
    profile: str
    days: int
    subject: list[tuple[str, str]]  # in the certificate's order
    sans: list[tuple[str, str]]
    digest: str = "sha512"  # the DDL's default for `md`


async def real_rows(web: WebApplication) -> dict[str, tuple[int, Expect]]:
    """Every variant of issue 16, inserted as the PHP inserts it. Members: 1 assured (100
    points), 2 unassured, 3 with only a deleted assurance; domains example.org (1), example.net
    (2)."""
    await web.assurance(1, 60)
    await web.assurance(1, 40)
    await web.assurance(3, 100, deleted=True)
    org_dom, net_dom = await web.domain(1, "example.org"), await web.domain(2, "example.net")
    p256 = ec.generate_private_key(ec.SECP256R1())
    wot = [("CN", "CAcert WoT User")]
    rows = {
        "ms-wot-class1": (
            await web.client_certificate(1, ["a@example.org"], keytype="MS", rootcert=1),
            Expect("emailcerts", "client-class1", 730, [*wot, ("emailAddress", "a@example.org")],
                   [("email", "a@example.org")]),
        ),
        "vi-name-two-addresses-class3": (
            await web.client_certificate(1, ["a@example.org", "a@example.net"], "Alice Example",
                                         keytype="VI", rootcert=2, md="sha256", key=p256),
            Expect("emailcerts", "client", 730,
                   [("CN", "Alice Example"), ("emailAddress", "a@example.org"),
                    ("emailAddress", "a@example.net")],
                   [("email", "a@example.org"), ("email", "a@example.net")], "sha256"),
        ),
        "ns-keygen-deleted-assurance": (
            await web.client_certificate(3, ["c@example.org", "c2@example.org"], keytype="NS"),
            Expect("emailcerts", "client-class1", 180,
                   [*wot, ("emailAddress", "c@example.org"), ("emailAddress", "c2@example.org")],
                   [("email", "c@example.org"), ("email", "c2@example.org")]),
        ),
        "codesign-md5": (
            await web.client_certificate(1, ["a@example.org"], "Alice Example", rootcert=2,
                                         codesign=1, md="md5"),
            Expect("emailcerts", "client-codesign", 730,
                   [("CN", "Alice Example"), ("emailAddress", "a@example.org")],
                   [("email", "a@example.org")], "sha256"),
        ),
        "server-two-domains-xmpp": (
            await web.server_certificate(org_dom, ["www.example.org", "example.org"], rootcert=2,
                                         md="sha1", key=p256),
            Expect("domaincerts", "server", 730, [("CN", "www.example.org")],
                   [("dns", "www.example.org"), ("xmpp", "www.example.org"),
                    ("dns", "example.org"), ("xmpp", "example.org")], "sha256"),
        ),
        "server-unassured-class1": (
            await web.server_certificate(net_dom, ["*.example.net"], rootcert=1),
            Expect("domaincerts", "server-class1", 180, [("CN", "*.example.net")],
                   [("dns", "*.example.net")]),  # no XmppAddr for a wildcard
        ),
        "org-client-ms": (
            await web.org_client_certificate(1, ORG, ["office@example.org", "it@example.org"],
                                             "Example Office", "IT", rootcert=2),
            Expect("orgemailcerts", "client-org", 365,
                   [*ORG_NAMES, ("OU", "IT"), ("CN", "Example Office"),
                    ("emailAddress", "office@example.org"), ("emailAddress", "it@example.org")],
                   [("email", "office@example.org"), ("email", "it@example.org")]),
        ),
        "org-client-ns-keygen": (
            await web.org_client_certificate(1, ORG, ["office@example.org"], ou="Sales",
                                             keytype="NS", rootcert=1, md="sha512"),
            Expect("orgemailcerts", "client-org-class1", 365,
                   [*ORG_NAMES, ("OU", "Sales"), ("emailAddress", "office@example.org")],
                   [("email", "office@example.org")]),
        ),
        "org-codesign": (
            await web.org_client_certificate(1, ORG, ["dev@example.org"], "Example Dev",
                                             rootcert=2, codesign=1),
            Expect("orgemailcerts", "client-codesign", 365,
                   [*ORG_NAMES, ("CN", "Example Dev"), ("emailAddress", "dev@example.org")],
                   [("email", "dev@example.org")]),
        ),
        "org-server-buildsubject": (
            await web.org_server_certificate(1, ORG, ["shop.example.org", "example.org"], "Web",
                                             rootcert=2, key=p256),
            Expect("orgdomaincerts", "server-org", 730,
                   [*ORG_NAMES, ("OU", "Web"), ("CN", "shop.example.org")],
                   [("dns", "shop.example.org"), ("xmpp", "shop.example.org"),
                    ("dns", "example.org"), ("xmpp", "example.org")]),
        ),
        "org-server-older-shape": (
            await web.org_server_certificate(1, ORG, ["api.example.org", "www.example.org"],
                                             rootcert=1, xmpp=False),
            Expect("orgdomaincerts", "server-org-class1", 730,
                   [*ORG_NAMES, ("CN", "api.example.org")],
                   [("dns", "api.example.org"), ("dns", "www.example.org")]),
        ),
    }  # fmt: skip
    return rows


@pytest.fixture(params=["sqlite", "mariadb"])
def database(request, tmp_path) -> dict[str, Any]:
    if request.param == "sqlite":
        return sqlite_db(tmp_path)
    server = request.getfixturevalue("mariadb")
    name = f"webdb_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"
    server.create_database(name)
    return {"driver": "mysql", "socket": str(server.socket), "user": "root", "database": name}


async def test_every_real_row_variant_is_served(ca, tmp_path, database):
    """Issue 16: the rows CAcert's web application writes (its schema, its INSERTs, non-strict
    MariaDB and SQLite), served end to end, read back the way its pages read them."""
    async with Signer(ca, tmp_path, FAST) as signer:
        config = client_config(tmp_path, database, signer.lines())
        async with WebdbClient(config) as client:
            db = client.db
            assert db is not None
            await create_schema(db)
            web = WebApplication(db, config.base_dir)
            rows = await real_rows(web)
            gpg_one = await web.openpgp_key(1, openpgp_key(["Alice Example <a@example.org>"]),
                                            "a@example.org")  # fmt: skip
            two = ["Alice Example <a@example.org>", "Alice Example <a@example.net>"]
            gpg_two = await web.openpgp_key(1, openpgp_key(two), "a@example.net")
            refused = await refused_rows(web, config.base_dir)
            await check_as_written(db, rows)
            passed = await client.process_pending()
            assert not passed.deferred, passed.deferred
            for label, (row_id, expect) in rows.items():
                await check_served(ca, db, config, signer, label, row_id, expect)
            await check_openpgp(db, config, gpg_one, signer, passed, two[:1])
            await check_openpgp(db, config, gpg_two, signer, passed, two)
            codes = {label: passed.failed.get(f"{table}:{i}:sign") for label, (table, i, _)
                     in refused.items()}  # fmt: skip
            assert codes == {label: code for label, (_, _, code) in refused.items()}
            for _ in range(3):  # refusals are never retried past 3 warnings
                await client.process_pending()
            for table, row_id, _ in refused.values():
                assert (await row(db, table, row_id))["warning"] == 3
            assert await client.source.pending() == []
            assert signer.repository.counts()["certificates"] == len(rows)

            revoke = ["ms-wot-class1", "server-two-domains-xmpp", "org-client-ms"]
            for label in revoke:
                row_id, expect = rows[label]
                await request_revocation(db, expect.table, row_id)
                assert await page_status(db, expect.table, row_id) == "Revoked"  # pending
            revoked = await client.process_pending()
            assert sorted(revoked.done) == sorted(
                f"{rows[label][1].table}:{rows[label][0]}:revoke" for label in revoke
            )
            for label in revoke:
                row_id, expect = rows[label]
                fields = await row(db, expect.table, row_id)
                assert str(fields["revoked"]) not in (REVOCATION_SENTINEL, "0000-00-00 00:00:00")
                assert await page_status(db, expect.table, row_id) == "Revoked"
                name = "class1" if expect.profile.endswith("-class1") else "class3"
                issuer = signer.server.ca.issuers[name].key_id
                record = signer.repository.get_certificate(issuer, int(fields["serial"], 16))
                assert record["revocation"] is not None
            assert not (await client.process_pending()).done  # nothing is pending any more
            await check_crls(ca, client, config, {"server": rows[revoke[1]][0]}, signer)
            everything = await client.run_once()  # requests, CRLs, health: the demo's pass
            assert everything.requests.done == [] and everything.alerts == []
            assert everything.crls == {"class1": "unchanged", "class3": "unchanged"}
            assert everything.unanswered_lines == []


async def test_the_modern_set_serves_what_the_ca_b_rules_allow(ca, tmp_path):
    """The CA/B aligned set on the same rows: the names the BRs forbid are left out (XmppAddr,
    an organisation server's OU, a member's name as an S/MIME CN), TLS validity is capped by
    the BR schedule, and the organisation client row is refused: the web application has no
    organizationIdentifier (docs/profiles.md)."""
    async with Signer(ca, tmp_path, FAST, profiles="modern") as signer:
        config = client_config(tmp_path, sqlite_db(tmp_path), signer.lines())
        async with WebdbClient(config) as client:
            ids = await demo_rows(client.db, config.base_dir)
            report = await client.process_pending()
            assert report.failed == {f"orgemailcerts:{ids['org-client']}:sign": "bad_subject"}
            assert len(report.done) == len(ids) - 1
            certs = {}
            for label, table in (("client", "emailcerts"), ("server", "domaincerts"),
                                 ("org-server", "orgdomaincerts")):  # fmt: skip
                name = (await row(client.db, table, ids[label]))["crt_name"]
                pem = (config.base_dir / name).read_bytes()
                certs[label] = x509.load_pem_x509_certificate(pem)
            assert certs["client"].subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
            for label in ("server", "org-server"):
                cert = certs[label]
                sans = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
                assert all(isinstance(n, x509.DNSName) for n in sans.value)
                assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=199)
            org_subject = certs["org-server"].subject
            assert org_subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME) == []
            assert signer.repository.counts()["certificates"] == len(ids) - 1


async def check_as_written(db: Database, rows: dict[str, tuple[int, Expect]]) -> None:
    """What non-strict MySQL made of the PHP's INSERTs, and SQLite the same: a keygen row has an
    empty subject, `coll_found` is 0, an organisation server row's `type=''` is 0 (MySQL) or ''
    (SQLite), `md` has the column's default."""
    if db.config.driver == "mysql":
        [mode] = await db.query("SELECT @@SESSION.sql_mode AS m")
        assert "STRICT" not in mode["m"]
    keygen = await row(db, "emailcerts", rows["ns-keygen-deleted-assurance"][0])
    assert keygen["subject"] == "" and keygen["coll_found"] == 0 and keygen["keytype"] == "NS"
    assert keygen["md"] == "sha512"
    org = await row(db, "orgdomaincerts", rows["org-server-buildsubject"][0])
    assert org["type"] in (0, "") and org["coll_found"] == 0


async def refused_rows(web: WebApplication, base: Path) -> dict[str, tuple[str, int, str]]:
    """Rows the web application can write that are not valid: label -> (table, id, code)."""
    garbage = await web.client_certificate(1, ["a@example.org"], rootcert=2)
    (base / csr_path("client", garbage)).write_bytes(
        b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
    )
    missing = await web.client_certificate(1, ["a@example.org"], rootcert=2)
    (base / csr_path("client", missing)).unlink()
    weak = await web.client_certificate(1, ["a@example.org"], rootcert=2, key=rsa_1024())
    underscore = await web.server_certificate(1, ["_dmarc.example.org"], rootcert=2)
    ocsp = await web.org_server_certificate(1, ORG, ["ocsp.example.org"], rootcert=2, ocsp=True)
    return {
        "garbage-csr": ("emailcerts", garbage, "bad_csr"),
        "missing-csr": ("emailcerts", missing, "bad_row"),
        "weak-key": ("emailcerts", weak, "weak_key"),
        "underscore-name": ("domaincerts", underscore, "bad_san"),
        "ocsp-type-8": ("orgdomaincerts", ocsp, "bad_row"),  # operator only: not offered
    }


def rsa_1024() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(65537, 1024)


async def page_status(db: Database, table: str, row_id: int) -> str:
    """pages/account/5.php's status (the same logic on 12, 18 and 22): from UNIX_TIMESTAMP of
    `expire` and `revoked`, as the page selects them (on SQLite the same arithmetic here)."""
    if db.config.driver == "mysql":
        [found] = await db.query(
            f"SELECT UNIX_TIMESTAMP(`expire`) - UNIX_TIMESTAMP() AS timeleft, "
            f"UNIX_TIMESTAMP(`expire`) AS expired, UNIX_TIMESTAMP(`revoked`) AS revoked "
            f"FROM `{table}` WHERE id = ?",
            (row_id,),
        )
        keys = ("timeleft", "expired", "revoked")
        timeleft, expired, revoked = (int(found[k] or 0) for k in keys)
    else:
        fields = await row(db, table, row_id)
        expired, revoked = (_unix(str(fields[k])) for k in ("expire", "revoked"))
        timeleft = expired - int(datetime.now(UTC).timestamp())
    verified = "Valid" if timeleft > 0 else "Expired" if timeleft < 0 else ""
    if expired == 0:
        verified = "Pending"
    if revoked > 0:
        verified = "Revoked"
    return verified


def _unix(text: str) -> int:
    if text.startswith("0000-00-00"):
        return 0
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S").astimezone().timestamp())


async def check_served(ca, db: Database, config, signer: Signer, label: str, row_id: int,
                       expect: Expect) -> None:  # fmt: skip
    """As the pages read it: `crt_name` (the file), `serial` (what `openssl x509 -serial`
    prints), `expire` (notAfter), the status; and the certificate against the profile table."""
    fields = await row(db, expect.table, row_id)
    prefix = X509_TABLES[expect.table].prefix
    assert fields["crt_name"] == f"../crt/{prefix}/{row_id // 1000}/{prefix}-{row_id}.crt", label
    assert fields["warning"] == 0, label
    path = config.base_dir / fields["crt_name"]
    class3 = not expect.profile.endswith("-class1")
    check = openssl_verify(ca, path, class3)
    assert check.returncode == 0, f"{label}: {check.stdout}{check.stderr}"
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(path)],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert serial.strip() == f"serial={fields['serial']}", label
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    assert str(fields["expire"]) == db_time(cert.not_valid_after_utc), label
    assert str(fields["modified"]) != "0000-00-00 00:00:00"
    assert await page_status(db, expect.table, row_id) == "Valid", label
    length = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(length - timedelta(days=expect.days)) <= timedelta(minutes=2), label
    names = {NameOID.COUNTRY_NAME: "C", NameOID.STATE_OR_PROVINCE_NAME: "ST",
             NameOID.LOCALITY_NAME: "L", NameOID.ORGANIZATION_NAME: "O",
             NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", NameOID.COMMON_NAME: "CN",
             NameOID.EMAIL_ADDRESS: "emailAddress"}  # fmt: skip
    assert [(names[a.oid], a.value) for a in cert.subject] == expect.subject, label
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    kinds: dict[type, str] = {x509.DNSName: "dns", x509.RFC822Name: "email", x509.OtherName: "xmpp"}
    issued = [(kinds[type(n)], n.value if not isinstance(n, x509.OtherName)
               else n.value[2:].decode()) for n in san]  # fmt: skip
    assert issued == expect.sans, label
    base = expect.profile.removesuffix("-class1")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == EKU[base], label
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == expect.digest, label
    issuer = "class3" if class3 else "class1"
    crldp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [dp.full_name[0].value for dp in crldp if dp.full_name] == [CRL_URL[issuer]], label
    policies = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    assert [p.policy_identifier.dotted_string for p in policies] == ["1.3.6.1.4.1.18506.4.4"]
    record = signer.repository.get_certificate(
        signer.server.ca.issuers[issuer].key_id, cert.serial_number
    )
    assert record["profile"] == expect.profile, label


async def check_crls(ca, client: WebdbClient, config, ids: dict[str, int], signer) -> None:
    """The signer's own CRLs (signer/crl.py), fetched whole, then as a delta; verified and
    published where the web server serves them."""
    first = await client.refresh_crls()
    assert all(text.startswith("published") for text in first.values()), first
    newer = await signer.server.crl.publish("class3")  # as its scheduler does after revocations
    assert (await client.refresh_crls())["class3"] == f"published {newer.number} (delta)"
    base, _ = ca
    path = config.crl.outputs["class3"]
    check = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(path), "-noout", "-text",
         "-CAfile", str(base / "ca" / "class3.crt")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert "verify OK" in check.stdout + check.stderr, check.stderr
    serial = (await row(client.db, "domaincerts", ids["server"]))["serial"]
    assert f"Serial Number: {serial}" in check.stdout
    assert (await client.refresh_crls()) == {"class1": "unchanged", "class3": "unchanged"}


async def check_openpgp(
    db: Database, config, gpg_id: int, signer: Signer, passed, uids: list[str]
) -> None:
    """Every user ID the web application left in the key is certified by the CA (gpg says)."""
    fields = await row(db, "gpg", gpg_id)
    assert f"gpg:{gpg_id}:sign" in passed.done, passed
    assert fields["crt"] == f"../crt/gpg/0/gpg-{gpg_id}.crt" and fields["warning"] == 0
    service = signer.server.openpgp
    ca_key = await service.hsm.run(service.certifier.export_ca_public_key)
    home = config.base_dir.parent / f"gnupg-{gpg_id}"
    home.mkdir(mode=0o700)
    (home / "ca.gpg").write_bytes(ca_key)
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        for key in (home / "ca.gpg", config.base_dir / fields["crt"]):
            subprocess.run(["gpg", "--batch", "--import", str(key)], env=env, check=True,
                           capture_output=True)  # fmt: skip
        sigs = subprocess.run(
            ["gpg", "--batch", "--with-colons", "--check-sigs", uids[0].split("<")[1][:-1]],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
    finally:  # gpg started an agent for this home: end it (only ours, by its home).
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
    ca_id = service.certifier.ca_fingerprint().hex().upper()[-16:]
    certified, current = [], None
    for line in sigs.stdout.splitlines():
        parts = line.split(":")
        if parts[0] == "uid":
            current = parts[9]
        elif line.startswith("sig:!:") and parts[4] == ca_id:
            certified.append(current)
    assert sorted(certified) == sorted(uids), sigs.stdout + sigs.stderr  # gpg orders them
    assert str(fields["expire"]) > str(fields["issued"]) > "0000-00-00 00:00:00"


# --- CRLs ------------------------------------------------------------------------------------


def serve_crls(signer: Signer, wrong_key_for: set[str]) -> list[tuple[str, int]]:
    """`fetch_crl` as docs/protocol.md specifies it (full answers in chunks, `unchanged`), from
    the repository and the HSM keys; `wrong_key_for` issuers sign with the other issuer's key, a
    CRL the client must refuse. 60 made-up entries make it span several 1 KiB chunks.
    Returns the (issuer, offset) of every answer."""
    ca = signer.server.ca
    served: list[tuple[str, int]] = []
    made: dict[tuple[str, int], bytes] = {}  # one CRL per number, like the signer records it

    def build(name: str, number: int) -> bytes:
        issuer = ca.issuers[name]
        label = ca.issuers["class1" if name == "class3" else "class3"].key_label
        key = ca.hsm.key(label if name in wrong_key_for else issuer.key_label)
        now = datetime.now(UTC).replace(microsecond=0)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.certificate.subject)
            .last_update(now)
            .next_update(now + timedelta(days=7))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for entry in ca.repository.iter_revoked(issuer.key_id):
            revoked = x509.RevokedCertificateBuilder().serial_number(entry.serial)
            revoked = revoked.revocation_date(datetime.fromtimestamp(entry.revoked_at, UTC))
            builder = builder.add_revoked_certificate(revoked.build())
        for serial in range(1, 61):
            revoked = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
            builder = builder.add_revoked_certificate(revoked.build())
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    async def fetch_crl(args, _ctx):
        number = ca.repository.revocation_seq(ca.issuers[args.issuer].key_id) + 1
        served.append((args.issuer, args.offset))
        if args.have_number == number and args.want == "auto":
            now = datetime.now(UTC)
            return {"kind": "unchanged", "crl_number": number, "this_update": now,
                    "next_update": now}  # fmt: skip
        if (args.issuer, number) not in made:
            made[args.issuer, number] = await ca.hsm.run(build, args.issuer, number)
        der = made[args.issuer, number]
        crl = x509.load_der_x509_crl(der)
        return {
            "kind": "full",
            "crl_number": number,
            "this_update": crl.last_update_utc,
            "next_update": crl.next_update_utc,
            "total_size": len(der),
            "offset": args.offset,
            "chunk": der[args.offset : args.offset + args.max_bytes],
            "sha256": hashlib.sha256(der).digest(),
        }

    signer.server.handlers["fetch_crl"] = fetch_crl  # also over signer/crl.py's: a bad CRL
    return served


async def test_crls_are_verified_then_published_atomically(ca, tmp_path):
    async with Signer(ca, tmp_path, FAST) as signer:
        served = serve_crls(signer, wrong_key_for={"class1"})
        config = client_config(tmp_path, sqlite_db(tmp_path), signer.lines())
        config = config.model_copy(
            update={"crl": config.crl.model_copy(update={"chunk_bytes": 1024})}
        )
        async with WebdbClient(config) as client:
            ids = await demo_rows(client.db, config.base_dir)
            await client.process_pending()
            await request_revocation(client.db, "domaincerts", ids["server"])
            assert (await client.process_pending()).done
            old = config.crl.outputs["class1"]
            old.parent.mkdir(parents=True, exist_ok=True)
            old.write_bytes(b"the CRL published before")
            outcome = await client.refresh_crls()
            assert outcome["class1"].startswith("failed: bad_crl")  # signed with the wrong key
            assert old.read_bytes() == b"the CRL published before"  # not replaced
            assert outcome["class3"] == "published 2 (full)"
            published = config.crl.outputs["class3"]
            offsets = [offset for issuer, offset in served if issuer == "class3"]
            assert offsets == list(range(0, published.stat().st_size, 1024))  # chunk by chunk
            base, _ = ca
            check = subprocess.run(
                ["openssl", "crl", "-inform", "DER", "-in", str(published), "-noout", "-text",
                 "-CAfile", str(base / "ca" / "class3.crt")],
                capture_output=True, text=True,
            )  # fmt: skip
            assert "verify OK" in check.stderr + check.stdout, check.stderr
            serial = (await row(client.db, "domaincerts", ids["server"]))["serial"]
            assert f"Serial Number: {serial}" in check.stdout
            assert [p.name for p in published.parent.iterdir() if p.name.endswith(".tmp")] == []
            again = await client.refresh_crls()
            assert again["class3"] == "unchanged"
            class1 = x509.load_pem_x509_certificate((base / "ca" / "class1.crt").read_bytes())
            with pytest.raises(BadCrl):  # class 3's CRL is not class 1's
                await publish_crl(CrlRefresher(client.lines.call, "class3", class1), tmp_path / "x")
            assert not (tmp_path / "x").exists()


# --- failures --------------------------------------------------------------------------------


async def test_poisonous_rows_get_warnings_and_the_rest_is_served(ca, tmp_path):
    async with Signer(ca, tmp_path, FAST) as signer:
        config = client_config(tmp_path, sqlite_db(tmp_path), signer.lines())
        async with WebdbClient(config) as client:
            db = client.db
            await create_schema(db)
            csr = config.base_dir / "req.csr"
            csr.write_bytes(make_csr(ec.generate_private_key(ec.SECP256R1())))
            garbage = config.base_dir / "garbage.csr"
            garbage.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n")
            server = "/CN=a.example.org/subjectAltName=DNS:a.example.org"
            bad = {
                "missing-csr": {"subject": server, "csr_name": "../csr/none.csr"},
                "garbage-csr": {"subject": server, "csr_name": str(garbage)},
                "refused-by-profile": {"subject": server + "/O=Not Allowed", "csr_name": "req.csr"},
                "bad-rootcert": {"subject": server, "csr_name": "req.csr", "rootcert": 7},
            }
            bad_ids = {}
            for label, values in bad.items():
                bad_ids[label] = await insert_row(db, "domaincerts", {"rootcert": 2, **values})
            good = [
                await insert_row(db, "domaincerts",
                                 {"subject": server, "csr_name": "req.csr", "rootcert": 2,
                                  "md": md})
                for md in ("sha256", "md5")  # MD5: never signed with; SHA-256 instead
            ]  # fmt: skip
            first = await client.process_pending()
            assert sorted(first.done) == sorted(f"domaincerts:{i}:sign" for i in good)
            codes = {label: first.failed[f"domaincerts:{i}:sign"] for label, i in bad_ids.items()}
            assert codes == {
                "missing-csr": "bad_row",
                "garbage-csr": "bad_csr",
                "refused-by-profile": "forbidden_subject_attribute",
                "bad-rootcert": "bad_row",
            }
            for i in bad_ids.values():
                assert (await row(db, "domaincerts", i))["warning"] == 1
            for _ in range(3):
                await client.process_pending()
            for i in bad_ids.values():
                assert (await row(db, "domaincerts", i))["warning"] == 3  # then no longer picked
            assert await client.source.pending() == []
            assert signer.repository.counts()["certificates"] == 2
            md5 = await row(db, "domaincerts", good[1])
            cert = x509.load_pem_x509_certificate((config.base_dir / md5["crt_name"]).read_bytes())
            assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


async def test_killed_between_answer_and_write_back_issues_once(ca, tmp_path):
    async with Signer(ca, tmp_path, FAST) as signer:
        config = client_config(tmp_path, sqlite_db(tmp_path), signer.lines())
        db = Database(config.database)
        try:
            await create_schema(db)
            (config.base_dir / "req.csr").write_bytes(
                make_csr(ec.generate_private_key(ec.SECP256R1()))
            )
            row_id = await insert_row(db, "domaincerts", {
                "subject": "/CN=a.example.org/subjectAltName=DNS:a.example.org",
                "csr_name": "req.csr", "rootcert": 2})  # fmt: skip
        finally:
            await db.close()
        marker = tmp_path / "answered"
        process = subprocess.Popen(  # the client's pass, hanging between answer and write-back
            [sys.executable, str(ROOT / "tests" / "webdb_client_paused.py"),
             "--config", str(tmp_path / "webdb-client.yaml"), "--marker", str(marker)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(60):
                while not marker.exists():
                    assert process.poll() is None, process.stderr.read().decode()
                    await asyncio.sleep(0.05)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        assert marker.read_text() == f"domaincerts:{row_id}:sign"
        assert signer.repository.counts()["certificates"] == 1  # the signer issued it ...
        async with WebdbClient(config) as client:
            assert (await row(client.db, "domaincerts", row_id))["crt_name"] == ""  # ... unwritten
            requests = signer.server.protocol.stats.requests
            report = await client.process_pending()
            assert report.recovered == [f"domaincerts:{row_id}:sign"]
            assert report.done == [f"domaincerts:{row_id}:sign"]
            fields = await row(client.db, "domaincerts", row_id)
        assert signer.repository.counts()["certificates"] == 1  # and only once
        cert = x509.load_pem_x509_certificate((config.base_dir / fields["crt_name"]).read_bytes())
        recorded = signer.repository.get_request(f"domaincerts:{row_id}:sign").result
        assert cert.serial_number == recorded.serial == int(fields["serial"], 16)
        # list_profiles and request_status only: the CSR did not travel again
        assert signer.server.protocol.stats.requests - requests == 2


async def test_failover_to_the_other_line_while_requests_are_in_flight(ca, tmp_path):
    async with Signer(ca, tmp_path, 115200, lines=2) as signer:
        config = client_config(tmp_path, sqlite_db(tmp_path), signer.lines(), timeout=3, attempts=1)
        async with WebdbClient(config) as client:
            db = client.db
            await create_schema(db)
            (config.base_dir / "req.csr").write_bytes(
                make_csr(ec.generate_private_key(ec.SECP256R1()))
            )
            ids = [
                await insert_row(db, "domaincerts", {
                    "subject": f"/CN=h{i}.example.org/subjectAltName=DNS:h{i}.example.org",
                    "csr_name": "req.csr", "rootcert": 2})
                for i in range(8)
            ]  # fmt: skip
            first_line = signer.server.protocol.stats
            running = asyncio.create_task(client.process_pending())
            async with asyncio.timeout(30):
                while first_line.requests < 3:  # list_profiles and sign requests arrived
                    await asyncio.sleep(0.01)
            signer.cables[0].stall(120)  # line 1 stops answering with requests in flight
            report = await asyncio.wait_for(running, 60)
            assert sorted(report.done) == sorted(f"domaincerts:{i}:sign" for i in ids)
            assert client.lines.failovers >= 1
            assert signer.server.lines[0][1].stats.requests >= 1  # line 2 carried the rest
            assert signer.repository.counts()["certificates"] == len(ids)
            for i in ids:
                assert (await row(db, "domaincerts", i))["crt_name"]
            alerts = await client.check_health()
            assert [a.level for a in alerts] == ["error"]
            assert (
                "not answering" in alerts[0].text and str(signer.cables[0].end_b) in alerts[0].text
            )
            assert alerts[0].unanswered and alerts[0].line == str(signer.cables[0].end_b)


def test_what_waits_and_what_counts_against_a_row() -> None:
    """Refusals that are not the row's fault wait at no cost to its warning count."""
    from signer.client.webdb.client import is_transient
    from signer.errors import ErrorCode, LinkDown, SignerError

    for code in (ErrorCode.BUSY, ErrorCode.NO_QUORUM, ErrorCode.IMPORT_CONFLICT):
        assert is_transient(SignerError(code, "wait"))
    assert is_transient(LinkDown("unplugged"))
    for code in (ErrorCode.BAD_CSR, ErrorCode.WEAK_KEY, ErrorCode.LINT_FAILED):
        assert not is_transient(SignerError(code, "the row's fault"))
    assert not is_transient(RowError("no CSR file"))


async def test_the_audit_log_is_kept_on_the_web_side_and_a_rewrite_is_an_alert(ca, tmp_path):
    """run_once follows the signer's audit log (asking for a signed head when records wait);
    a copy changed on the web side is an operator alert that stays (docs/audit.md §6)."""
    base, _ = ca
    audit = {"directory": str(tmp_path / "audit"), "certificate": str(base / "ca" / "audit.crt"),
             "sign_after": 0.001}  # fmt: skip
    async with Signer(ca, tmp_path, FAST) as signer:
        config = client_config(tmp_path, sqlite_db(tmp_path), signer.lines(), audit=audit)
        async with WebdbClient(config) as client:
            await demo_rows(client.db, config.base_dir)
            first = await client.run_once()
            assert first.alerts == [] and client.audit is not None
            held = client.audit.frontier.size
            assert held > 0 and client.audit.head is not None
            records = [decode_record(r) for r in iter_frames((tmp_path / "audit" / "audit.log")
                       .read_bytes()) if isinstance(r, bytes)]  # fmt: skip
            assert sum(r["event"] == "issue_x509" for r in records) == len(first.requests.done)
        path = tmp_path / "audit" / "audit.log"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x01  # a byte of the copy changed on the web side
        path.write_bytes(bytes(data))
        async with WebdbClient(config) as client:
            report = await client.run_once()
            [alert] = [a for a in report.alerts if a.line == "audit"]
            assert alert.level == "error" and "changed" in alert.text
            assert client.audit_alert in await client.check_health()  # it stays
