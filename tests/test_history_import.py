"""Taking over from the signer CAcert runs today (docs/migration.md): its keys go into the HSM by
the ceremony's import mode, its `openssl ca` history into the running signer by `signer import`.
Checked against the real thing: the history is made by `openssl ca`, the first CRL after the
import is compared with `openssl ca -gencrl` over the same index.txt, the WebDB client revokes an
old-system certificate as the web application asks it to, new certificates verify against the
old CA certificates, and an export imports again to the same records."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from legacy_ca import LegacyCa, make_legacy_ca

from signer.client.library import SignerClient
from signer.client.webdb import REVOCATION_SENTINEL, WebdbClient, WebdbClientConfig, db_time
from signer.clock import utcnow
from signer.config import load
from signer.link.serial_link import LinkSettings
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.history import (
    BadHistory,
    IssuerCa,
    control_call,
    export_history,
    plan_imports,
)
from signer.tools.line_emulator import LineEmulator
from signer.tools.webdb_fixture import create_schema, insert_row, request_revocation
from storage import Repository

ROOT = Path(__file__).resolve().parent.parent
BAUD = 921600

pytestmark = pytest.mark.timeout(240)


# --- the earlier CA and its keys in the HSM --------------------------------------------------


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> LegacyCa:
    return make_legacy_ca(tmp_path_factory.mktemp("old"))


@pytest.fixture(scope="module")
def migrated(legacy: LegacyCa, softhsm_token_factory: Any, tmp_path_factory: Any) -> tuple:
    """The ceremony in import mode: the old keys into a fresh token, the old certificates kept."""
    from legacy_ca import ROOT_PASSPHRASE

    from signer.tools.ceremony import run_ceremony

    token = softhsm_token_factory()
    base = tmp_path_factory.mktemp("new")
    (base / "root.pass").write_text(ROOT_PASSPHRASE + "\n")
    ceremony = {
        "hsm": {"module": token.store.module, "token_label": token.label,
                "pin_file": str(token.pin_file)},
        "output_dir": "ca",
        "keys": [
            {"label": "root", "kind": "rsa-2048", "import_from": str(legacy.keys / "root.key"),
             "passphrase_file": "root.pass"},
            {"label": "class3", "kind": "ec-p256", "import_from": str(legacy.keys / "class3.key")},
        ],
        "certificates": [
            {"name": "class1", "key": "root", "existing": str(legacy.keys / "root.crt")},
            {"name": "class3", "key": "class3", "issuer": "class1",
             "existing": str(legacy.keys / "class3.crt")},
        ],
    }  # fmt: skip
    (base / "ceremony.yaml").write_text(yaml.safe_dump(ceremony))
    run_ceremony(base / "ceremony.yaml", progress=lambda _: None)
    return base, token


def signer_yaml(migrated: tuple, directory: Path, device: Path, **extra: Any) -> Path:
    base, token = migrated
    text = {
        "link": {"device": str(device), "baudrate": BAUD, "reopen_interval": 0.1},
        "repository": {"path": str(directory / "repo")},
        "hsm": {"module": token.store.module, "token_label": token.label,
                "pin_file": str(token.pin_file)},
        "profiles": "cacert",
        "issuers": {
            "class1": {"certificate": str(base / "ca" / "class1.crt"), "key": "root"},
            "class3": {"certificate": str(base / "ca" / "class3.crt"), "key": "class3"},
        },
        **extra,
    }  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "signer.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


def issuers(migrated: tuple) -> dict[str, IssuerCa]:
    base, _ = migrated
    return {
        name: IssuerCa(
            name, x509.load_pem_x509_certificate((base / "ca" / f"{name}.crt").read_bytes())
        )
        for name in ("class1", "class3")
    }


async def signer_cli(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "signer", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def crl_serials(der: bytes) -> set[int]:
    return {entry.serial_number for entry in x509.load_der_x509_crl(der)}


def openssl_gencrl(legacy: LegacyCa, issuer: str, tmp: Path) -> x509.CertificateRevocationList:
    """`openssl ca -gencrl` over a copy of the issuer's state (its crlnumber is not spent)."""
    copy = tmp / f"ossl-{issuer}"
    shutil.copytree(legacy.directory(issuer), copy)
    config = (copy / "openssl.cnf").read_text().replace(str(legacy.directory(issuer)), str(copy))
    (copy / "openssl.cnf").write_text(config)
    out = copy / "gencrl.pem"
    subprocess.run(
        ["openssl", "ca", "-gencrl", "-batch", "-config", str(copy / "openssl.cnf"), "-passin",
         "pass:an old root passphrase", "-out", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return x509.load_pem_x509_crl(out.read_bytes())


def csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    request = (
        x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER)


# --- the switch, end to end -------------------------------------------------------------------


async def test_the_switch_from_the_old_signer(legacy: LegacyCa, migrated: tuple, tmp_path: Path):
    with LineEmulator(tmp_path / "line", baud=None) as line:
        config_path = signer_yaml(migrated, tmp_path / "signer", line.end_a)
        config = load(config_path, SignerConfig)
        server = SignerServer(config)
        await server.start()
        client = SignerClient(LinkSettings(device=str(line.end_b), baudrate=BAUD,
                                           reopen_interval=0.1), timeout=20)  # fmt: skip
        await client.start()
        try:
            await _switch(legacy, migrated, tmp_path, config_path, config, server, client, line)
        finally:
            await client.close()
            await server.stop()


async def _switch(legacy, migrated, tmp, config_path, config, server, client, line) -> None:
    socket = config.control_path()
    assert socket.stat().st_mode & 0o777 == 0o600
    histories = ["--history", f"class1={legacy.directory('class1')}",
                 "--history", f"class3={legacy.directory('class3')}"]  # fmt: skip
    # bad input: reported line by line, nothing written
    broken = tmp / "broken"
    shutil.copytree(legacy.directory("class3"), broken)
    lines = (broken / "index.txt").read_text().splitlines()
    (broken / "index.txt").write_text("\n".join([*lines, lines[0], "V\tnot a time"]) + "\n")
    bad = await signer_cli("import", "--config", str(config_path), "--history", f"class3={broken}")
    assert bad.returncode == 1, bad.stderr
    assert f"{broken}/index.txt:15: serial 2A00 also on line 1" in bad.stderr
    assert f"{broken}/index.txt:16: 2 tab-separated fields" in bad.stderr
    assert "nothing was imported" in bad.stderr
    status = await asyncio.to_thread(control_call, socket, {"cmd": "import_status"})
    assert status["issuers"]["class3"]["import"] is None
    # dry run: what it would do, nothing sent
    dry = await signer_cli("import", "--config", str(config_path), *histories, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would import into class3:" in dry.stdout and "next_crl_number: 257" in dry.stdout
    status = await asyncio.to_thread(control_call, socket, {"cmd": "import_status"})
    assert status["issuers"]["class1"]["import"] is None
    # the import
    done = await signer_cli("import", "--config", str(config_path), *histories, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [i["issuer"] for i in report["imports"]] == ["class1", "class3"]
    assert "first CRL after the import: number 257" in done.stderr
    repo = server.ca.repository
    assert repo.check_consistency().ok
    for name in ("class1", "class3"):
        key_id = server.ca.issuers[name].key_id
        first = report["imports"][[i["issuer"] for i in report["imports"]].index(name)]["first_crl"]
        assert first["crl_number"] == int((legacy.directory(name) / "crlnumber").read_text(), 16)
        # the CRL equals what openssl ca -gencrl makes of the same index.txt, less the entries
        # of certificates that had expired when the earlier CA's last CRL listed them
        assert server.crl is not None
        ours = await server.crl.current(name)
        assert ours is not None
        openssl = openssl_gencrl(legacy, name, tmp)
        assert (
            ours.number
            == openssl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        )
        expired = legacy.expired[name]
        assert crl_serials(ours.der) == {e.serial_number for e in openssl} - expired
        assert len(crl_serials(ours.der)) == first["entries"] == 5
        assert repo.counts()["issuers"][key_id]["certificates"] == len(legacy.issued[name])
    await _webdb_revokes_an_old_certificate(server, client, line, tmp)
    await _new_certificates_verify_against_the_old_chain(legacy, client, tmp)
    health = await client.call("health")
    assert health["sections"]["repository"]["consistent"] is True
    assert not [w for w in health["warnings"] if "crls" in w], health["warnings"]
    # export beside the running signer
    exported = await signer_cli("export", "--config", str(config_path), "--out", str(tmp / "exp"))
    assert exported.returncode == 0, exported.stderr
    index = (tmp / "exp" / "class3" / "index.txt").read_text().splitlines()
    assert index[0].startswith("R\t") and index[0].split("\t")[3] == "2A00"  # revoked since
    assert len(index) == len(legacy.issued["class3"]) + 1  # and the new certificate
    assert (tmp / "exp" / "class3" / "crlnumber").read_text().strip() == "0103"  # after CRL 0x102


async def _webdb_revokes_an_old_certificate(server, client, line, tmp: Path) -> None:
    """A member revokes a certificate the old signer issued, as the web application asks: the
    WebDB client's revocation succeeds and the next CRL lists it."""
    (tmp / "www").mkdir()
    text = {
        "database": {"driver": "sqlite", "path": str(tmp / "webdb.sqlite")},
        "base_dir": "www",
        "lines": [{"device": str(line.end_b), "baudrate": BAUD, "reopen_interval": 0.1}],
        "timeout": 20,
        "crl": {"outputs": {"class1": "crl/revoke.crl", "class3": "crl/class3-revoke.crl"}},
    }
    (tmp / "webdb.yaml").write_text(yaml.safe_dump(text))
    await client.close()  # the WebDB client takes the line
    async with WebdbClient(load(tmp / "webdb.yaml", WebdbClientConfig)) as webdb:
        db = webdb.db
        await create_schema(db)
        rows = {}
        for serial in ("2A00", "2A01"):  # valid; revoked already by the old signer
            rows[serial] = await insert_row(db, "emailcerts", {
                "memid": 1, "serial": serial, "rootcert": 2, "md": "sha256",
                "subject": "/CN=member/emailAddress=member@example.org",
                "csr_name": "../csr/client/0/client-1.csr",
                "crt_name": "../crt/client/0/client-1.crt",
                "created": db_time(utcnow()), "expire": "2028-12-03 16:46:50"})  # fmt: skip
            await request_revocation(db, "emailcerts", rows[serial])
        report = await webdb.process_pending()
        assert sorted(report.done) == sorted(f"emailcerts:{i}:revoke" for i in rows.values())
        assert not report.failed
        for row_id in rows.values():
            [row] = await db.query("SELECT * FROM emailcerts WHERE id = ?", (row_id,))
            assert str(row["revoked"]) not in (REVOCATION_SENTINEL, "0000-00-00 00:00:00")
            assert row["warning"] == 0
    await client.start()
    repo = server.ca.repository
    key_id = server.ca.issuers["class3"].key_id
    revocation = repo.get_certificate(key_id, 0x2A00)["revocation"]
    assert revocation.request_id == f"emailcerts:{rows['2A00']}:revoke"
    assert repo.get_certificate(key_id, 0x2A01)["revocation"].request_id is None  # the old one
    status = await client.call("request_status", {"request_id": revocation.request_id})
    assert status["state"] == "done" and status["result"]["status"] == "revoked"
    crl = await server.crl.publish("class3")
    assert 0x2A00 in crl_serials(crl.der) and crl.number == 0x102


async def _new_certificates_verify_against_the_old_chain(legacy: LegacyCa, client, tmp) -> None:
    args = {
        "profile": "server",
        "csr": csr("new.example.org"),
        "sans": [["dns", "new.example.org"]],
    }
    issued = await client.call("sign_x509", args, request_id="domaincerts:7:sign")
    assert int(issued["serial"], 16) >= 2**127  # never one of the sequential legacy serials
    leaf = tmp / "leaf.pem"
    cert = x509.load_der_x509_certificate(issued["certificate"])
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(legacy.keys / "root.crt"), "-untrusted",
         str(legacy.keys / "class3.crt"), str(leaf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


# --- export, then import again: the same records ----------------------------------------------


def test_an_export_imports_again_to_the_same_records(legacy: LegacyCa, migrated: tuple, tmp_path):
    cas = issuers(migrated)
    histories = {name: legacy.directory(name) for name in cas}
    first = _imported(tmp_path / "one", plan_imports(cas, histories))
    export_history(first, cas, tmp_path / "exp", progress=lambda _: None)
    again = plan_imports(cas, {name: tmp_path / "exp" / name for name in cas})
    second = _imported(tmp_path / "two", again)
    try:
        for ca in cas.values():
            ours = [c._replace(import_id=None) for c in first.iter_certificates(ca.key_id)]
            theirs = [c._replace(import_id=None) for c in second.iter_certificates(ca.key_id)]
            assert ours == theirs and len(ours) == len(legacy.issued[ca.name])
            assert list(first.iter_revoked(ca.key_id)) == list(second.iter_revoked(ca.key_id))
            assert list(first.iter_crl_blocks(ca.key_id)) == list(second.iter_crl_blocks(ca.key_id))
            one, two = first.last_crl_history(ca.key_id), second.last_crl_history(ca.key_id)
            assert (one["crl_number"], one["entries"]) == (two["crl_number"], two["entries"])
        export_history(second, cas, tmp_path / "exp2", progress=lambda _: None)
        for name in cas:
            for file in ("index.txt", "serial", "crlnumber"):
                assert (tmp_path / "exp" / name / file).read_bytes() == (
                    tmp_path / "exp2" / name / file
                ).read_bytes()
            assert (tmp_path / "exp" / name / "index.txt").read_bytes() == (
                legacy.directory(name) / "index.txt"
            ).read_bytes()  # the very lines openssl wrote
    finally:
        first.close()
        second.close()


def _imported(path: Path, plans: list) -> Repository:
    repository = Repository(path, 1 << 30)
    commands = []
    for plan in plans:
        commands += [
            plan.begin(0),
            *(plan.batch(n) for n in range(1, plan.batches + 1)),
            plan.finish(),
        ]
    results = repository.apply_batch(list(enumerate(commands, start=1)))
    assert all(r.status == "import" for r in results), results
    assert repository.check_consistency().ok
    return repository


# --- bad input: every line reported, nothing decided -------------------------------------------


GOOD = "V\t301231235959Z\t\t01\tunknown\t/CN=a\n"


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ("V\t301231235959Z\t\t01\tunknown\n", "5 tab-separated fields, index.txt lines have 6"),
        ("X\t301231235959Z\t\t02\tunknown\t/CN=b\n", "status 'X' is not V, R or E"),
        ("V\t301231235959Z\t\t01\tunknown\t/CN=b\n", "serial 01 also on line 1"),
        ("R\t301231235959Z\t\t02\tunknown\t/CN=b\n", "revoked without a revocation time"),
        ("V\t301231235959Z\t200101000000Z\t02\tunknown\t/CN=b\n", "status V but a revocation"),
        ("V\t301331235959Z\t\t02\tunknown\t/CN=b\n", "time '301331235959Z' is out of range"),
        ("V\t3012312359Z\t\t02\tunknown\t/CN=b\n", "time '3012312359Z' is not YYMMDDHHMMSSZ"),
        ("R\t301231235959Z\t291231235959Z\t02\tunknown\t/CN=b\n",
         "revocation time 291231235959Z lies in the future"),
        ("R\t301231235959Z\t200101000000Z,keyTime,20491231235959Z\t02\tunknown\t/CN=b\n",
         "compromise time 491231235959Z lies in the future"),
        ("R\t301231235959Z\t200101000000Z,removeFromCRL\t02\tunknown\t/CN=b\n", "delta CRLs"),
        ("R\t301231235959Z\t200101000000Z,holdInstruction,1.2.3\t02\tunknown\t/CN=b\n",
         "holdInstruction codes are not supported"),
        ("R\t301231235959Z\t200101000000Z,keyTime\t02\tunknown\t/CN=b\n",
         "keyTime without the compromise time"),
        ("R\t301231235959Z\t200101000000Z,sometimes\t02\tunknown\t/CN=b\n",
         "unknown revocation reason 'sometimes'"),
        ("V\t301231235959Z\t\tXYZ\tunknown\t/CN=b\n", "serial 'XYZ' is not 1 to 40 hex digits"),
        ("V\t301231235959Z\t\t00\tunknown\t/CN=b\n", "serial 00 is out of range"),
    ],
)  # fmt: skip
def test_each_bad_line_is_reported(index: str, problem: str, migrated: tuple, tmp_path: Path):
    (tmp_path / "index.txt").write_text(GOOD + index)
    with pytest.raises(BadHistory) as bad:
        plan_imports(issuers(migrated), {"class3": tmp_path})
    [only] = bad.value.problems
    assert (only.source, only.line) == (str(tmp_path / "index.txt"), 2)
    assert problem in only.message


def test_certificate_files_are_checked_against_the_index_and_the_issuer(
    legacy: LegacyCa, migrated: tuple, tmp_path: Path
):
    """A certificate not signed by the named issuer, one whose serial or expiry is not the
    line's, a serial file behind the index, a revocation before the certificate existed."""
    copy = tmp_path / "class3"
    shutil.copytree(legacy.directory("class3"), copy)
    newcerts = copy / "newcerts"
    forged = _forged(newcerts / "2A00.pem")  # same names and serial, another key
    (newcerts / "2A00.pem").write_bytes(forged)
    shutil.copy(newcerts / "2A04.pem", newcerts / "2A01.pem")
    lines = (copy / "index.txt").read_text().splitlines()
    fields = lines[8].split("\t")
    lines[8] = "\t".join([fields[0], "301231235959Z", *fields[2:]])
    fields = lines[9].split("\t")
    lines[9] = "\t".join([fields[0], fields[1], "100101000000Z", *fields[3:]])
    (copy / "index.txt").write_text("\n".join(lines) + "\n")
    (copy / "serial").write_text("2A05\n")
    with pytest.raises(BadHistory) as bad:
        plan_imports(issuers(migrated), {"class3": copy})
    found = {(Path(p.source).name, p.line): p.message for p in bad.value.problems}
    assert found == {
        ("index.txt", 1): f"certificate 2A00: {newcerts}/2A00.pem is not signed by the issuer",
        ("index.txt", 2): f"certificate 2A01: {newcerts}/2A01.pem holds serial 2A04",
        ("index.txt", 9): "index.txt says expiry 301231235959Z, the certificate "
        + _time_of(newcerts / "2A08.pem", "after"),
        ("index.txt", 10): "revoked at 100101000000Z, before the certificate's notBefore "
        + _time_of(newcerts / "2A09.pem", "before"),
        ("serial", 1): "next serial 2A05 is not above the highest in index.txt (2A0D)",
    }


def _forged(path: Path) -> bytes:
    real = x509.load_pem_x509_certificate(path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)
        .public_key(key.public_key())
        .serial_number(real.serial_number)
        .not_valid_before(real.not_valid_before_utc)
        .not_valid_after(real.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
    return forged.public_bytes(serialization.Encoding.PEM)


def _time_of(path: Path, which: str) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    moment = cert.not_valid_after_utc if which == "after" else cert.not_valid_before_utc
    return moment.strftime("%y%m%d%H%M%SZ")


def test_webdb_rows_join_the_index(legacy: LegacyCa, migrated: tuple, tmp_path: Path):
    """The WebDB's rows: rows index.txt has are only cross-checked, others added (a pending
    revocation imports as valid); bad rows are reported by line."""
    rows = tmp_path / "rows.tsv"
    rows.write_text(
        "id\tserial\trootcert\texpire\trevoked\tsubject\n"
        "1\t2A00\t2\t2028-12-03 16:46:50\t2020-01-01 00:00:00\t/CN=a\n"  # index.txt: valid
        "2\t3000\t2\t2029-01-01 00:00:00\t0000-00-00 00:00:00\t/CN=b\n"
        f"3\t3001\t2\t2029-01-01 00:00:00\t{REVOCATION_SENTINEL}\t/CN=c\n"
        "4\t3002\t2\t2029-01-01 00:00:00\t2024-05-06 07:08:09\t/CN=d\n"
        "5\t\t2\t0000-00-00 00:00:00\t0000-00-00 00:00:00\t/CN=never issued\n"
    )
    [plan] = plan_imports(issuers(migrated), {"class3": legacy.directory("class3")}, rows)
    by_serial = {r.serial: r for r in plan.records}
    assert by_serial[0x2A00].status == "V"  # index.txt wins
    assert (by_serial[0x3000].status, by_serial[0x3001].status) == ("V", "V")
    assert by_serial[0x3002].revoked_at == 1714979289 and by_serial[0x3002].listed
    assert plan.counts["from_webdb"] == 3 and plan.counts["webdb_rows_without_serial"] == 1
    assert any("1 WebDB row(s) disagree" in w for w in plan.warnings)
    rows.write_text(
        "serial\trootcert\texpire\trevoked\n"
        "3000\t7\t2029-01-01 00:00:00\t0000-00-00 00:00:00\n"
        "3001\t2\t0000-00-00 00:00:00\t0000-00-00 00:00:00\n"
        "3002\t2\t2029-01-01 00:00:00\t0000-00-00 00:00:00\n"
        "3002\t2\t2029-01-01 00:00:00\t0000-00-00 00:00:00\n"
    )
    with pytest.raises(BadHistory) as bad:
        plan_imports(issuers(migrated), {}, rows)
    assert [p.line for p in bad.value.problems] == [2, 3, 5]


# --- interrupted and resumed -------------------------------------------------------------------


def synthetic_history(directory: Path, count: int, first_serial: int = 1) -> Path:
    """An index.txt of `count` certificates with sequential serials: a third revoked, some of
    them after their certificate expired; crlnumber 0x500."""
    directory.mkdir(parents=True)
    with open(directory / "index.txt", "w") as index:
        for n in range(count):
            serial = first_serial + n
            expiry = "180101000000Z" if n % 7 == 0 else "301231235959Z"
            if n % 3 == 0:
                reason = ("", ",keyCompromise", ",superseded")[n % 9 // 3]
                index.write(f"R\t{expiry}\t240101000000Z{reason}\t{serial:04X}\tunknown\t"
                            f"/CN=member {n}/emailAddress=member{n}@example.org\n")  # fmt: skip
            else:
                index.write(f"V\t{expiry}\t\t{serial:04X}\tunknown\t"
                            f"/CN=member {n}/emailAddress=member{n}@example.org\n")  # fmt: skip
    (directory / "crlnumber").write_text("0500\n")
    return directory


def same_records(one: Repository, two: Repository, key_id: bytes) -> None:
    assert [c._replace(import_id=None) for c in one.iter_certificates(key_id)] == [
        c._replace(import_id=None) for c in two.iter_certificates(key_id)
    ]
    assert list(one.iter_revoked(key_id)) == list(two.iter_revoked(key_id))
    assert list(one.iter_crl_blocks(key_id)) == list(two.iter_crl_blocks(key_id))
    assert list(one.iter_crl_expiry(key_id)) == list(two.iter_crl_expiry(key_id))
    assert one.counts()["issuers"] == two.counts()["issuers"]


async def test_an_interrupted_import_continues_without_duplicates(
    migrated: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ctrl-C while batches are in flight: the signer completes what it has, the same command
    continues after the last batch in; the result is the import done in one go."""
    from replication.log import LocalLog
    from signer.server.ca import Issuer
    from signer.server.control import ControlServer
    from signer.server.importer import ImportService
    from signer.tools import history

    ca = issuers(migrated)["class3"]
    [plan] = plan_imports({"class3": ca}, {"class3": synthetic_history(tmp_path / "h", 12000)})
    assert plan.batches > 20
    repository = Repository(tmp_path / "repo", 1 << 30)
    commit_log = LocalLog(repository)
    service = ImportService([Issuer("class3", ca.certificate, "class3", ca.key_id)], repository,
                            commit_log, None)  # fmt: skip
    control = ControlServer(None, tmp_path / "control.sock")
    control.add(*service.control())
    await control.start()
    update = history.Meter.update

    def ctrl_c(meter: history.Meter, done: int, force: bool = False) -> None:
        if done >= 3000:
            raise KeyboardInterrupt
        update(meter, done, force)

    def interrupted() -> str:
        try:
            history.run_import(plan, control.path, progress=lambda _: None)
        except KeyboardInterrupt:
            return "interrupted"
        return "finished"

    lines: list[str] = []
    try:
        monkeypatch.setattr(history.Meter, "update", ctrl_c)
        assert await asyncio.to_thread(interrupted) == "interrupted"
        monkeypatch.setattr(history.Meter, "update", update)
        state = repository.import_state(ca.key_id)
        assert not state.finished and 0 < state.applied_batches < plan.batches
        result = await asyncio.to_thread(history.run_import, plan, control.path, lines.append)
        assert not result["already_finished"]
        assert any("continues after batch" in line for line in lines), lines
        again = await asyncio.to_thread(history.run_import, plan, control.path, lines.append)
        assert again["already_finished"]  # a third run changes nothing
        once = Repository(tmp_path / "once", 1 << 30)
        try:
            commands = [plan.begin(0), *(plan.batch(n) for n in range(1, plan.batches + 1)),
                        plan.finish()]  # fmt: skip
            once.apply_batch(list(enumerate(commands, start=1)))
            same_records(repository, once, ca.key_id)
        finally:
            once.close()
        assert repository.check_consistency().ok
        assert repository.counts()["issuers"][ca.key_id]["certificates"] == 12000
    finally:
        await control.close()
        await asyncio.to_thread(commit_log.close)
        repository.close()


async def test_a_signer_killed_during_an_import_continues_it(migrated: tuple, tmp_path: Path):
    """The signer process dies (SIGKILL) with batches in flight; after its restart the same
    `signer import` continues after the last batch its repository holds."""
    hist = synthetic_history(tmp_path / "h", 150_000, first_serial=0x100000)
    with LineEmulator(tmp_path / "line", baud=None) as line:
        config_path = signer_yaml(migrated, tmp_path / "signer", line.end_a)
        socket = load(config_path, SignerConfig).control_path()
        command = ["import", "--config", str(config_path), "--history", f"class3={hist}"]
        serve = await _serve(config_path, socket)
        importer = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "signer", *command, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            while True:
                state = (await asyncio.to_thread(control_call, socket, {"cmd": "import_status"}))[
                    "issuers"
                ]["class3"]["import"]
                if state is not None and state["applied_batches"] >= 30:
                    break
                await asyncio.sleep(0.01)
            serve.kill()
            await serve.wait()
            assert state["finished_index"] is None
            _, stderr = await importer.communicate()
            assert importer.returncode == 3, stderr.decode()  # the signer could not be reached
            serve = await _serve(config_path, socket)
            done = await signer_cli(*command)
            assert done.returncode == 0, done.stderr
            assert "continues after batch" in done.stdout
            status = await asyncio.to_thread(control_call, socket, {"cmd": "import_status"})
            finished = status["issuers"]["class3"]
            assert finished["import"]["applied_certificates"] == 150_000
            assert finished["certificates"] == 150_000 and finished["crl_number"] == 0x500
        finally:
            if serve.returncode is None:
                serve.terminate()
                await serve.wait()
            if importer.returncode is None:
                importer.kill()
                await importer.wait()
    with Repository(tmp_path / "signer" / "repo", 1 << 30) as repository:
        assert repository.check_consistency().ok


async def _serve(config_path: Path, socket: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signer", "serve", "--config", str(config_path), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(600):
        try:
            await asyncio.to_thread(control_call, socket, {"cmd": "import_status"}, 2)
            return process
        except Exception:
            await asyncio.sleep(0.05)
    process.kill()
    raise AssertionError("the signer did not start")


# --- a replicated pair -------------------------------------------------------------------------


async def test_both_signers_of_a_pair_end_identical(
    legacy: LegacyCa, migrated: tuple, tmp_path: Path
):
    from raft_cluster import FAST, free_ports, wait_for

    from replication.settings import ReplicationSettings

    sections = ReplicationSettings.local_pair(tmp_path, tuple(free_ports(2)), **FAST)
    with (
        LineEmulator(tmp_path / "line-a", baud=None) as line_a,
        LineEmulator(tmp_path / "line-b", baud=None) as line_b,
    ):
        paths = [
            signer_yaml(migrated, tmp_path / name, line.end_a, replication=section)
            for name, line, section in zip("ab", (line_a, line_b), sections, strict=True)
        ]
        servers = [SignerServer(load(path, SignerConfig)) for path in paths]
        try:
            for server in servers:
                await server.start()
            hist = synthetic_history(tmp_path / "h", 20_000, first_serial=0x5000)
            done = await signer_cli("import", "--config", str(paths[1]), "--history",
                                    f"class3={hist}", "--history",
                                    f"class1={legacy.directory('class1')}")  # fmt: skip
            assert done.returncode == 0, done.stderr
            repos = [server.ca.repository for server in servers]
            await wait_for(
                lambda: repos[0].content_digest() == repos[1].content_digest(), 20, "same data"
            )
            for repo in repos:
                key_id = servers[0].ca.issuers["class3"].key_id
                assert repo.import_state(key_id).finished
                assert (
                    repo.last_crl_history(key_id)["crl_number"] == 0x500
                )  # the first after: crlnumber
                assert repo.check_consistency().ok
        finally:
            for server in servers:
                await server.stop()


def test_many_certificate_files_are_checked_in_worker_processes(
    legacy: LegacyCa, migrated: tuple, monkeypatch: pytest.MonkeyPatch
):
    """Beyond POOL_THRESHOLD files the checks run in a process pool: the same decisions."""
    from signer.tools import history

    histories = {name: legacy.directory(name) for name in ("class1", "class3")}
    alone = plan_imports(issuers(migrated), histories)
    monkeypatch.setattr(history, "POOL_THRESHOLD", 5)
    monkeypatch.setattr(history, "POOL_CHUNK", 4)
    pooled = plan_imports(issuers(migrated), histories)
    assert [p.records for p in pooled] == [p.records for p in alone]
    assert [p.import_id for p in pooled] == [p.import_id for p in alone]
    assert all(p.counts["with_certificate"] == len(legacy.issued[p.issuer.name]) for p in pooled)


async def test_webdb_rows_alone_continue_above_the_signers_own_crl(
    legacy: LegacyCa, migrated: tuple, tmp_path: Path
):
    """Without the old crlnumber (WebDB rows only), the imported CRL is numbered above the
    empty CRL the new signer published at its first start, so numbers never go back."""
    rows = tmp_path / "rows.tsv"
    rows.write_text(
        "serial\trootcert\texpire\trevoked\n"
        "3000\t2\t2029-01-01 00:00:00\t0000-00-00 00:00:00\n"
        "3001\t2\t2029-01-01 00:00:00\t2024-05-06 07:08:09\n"
    )
    with LineEmulator(tmp_path / "line", baud=None) as line:
        config_path = signer_yaml(migrated, tmp_path / "signer", line.end_a)
        server = SignerServer(load(config_path, SignerConfig))
        await server.start()
        try:
            done = await signer_cli("import", "--config", str(config_path), "--webdb-rows",
                                    str(rows))  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert "the imported CRL takes number 3" in done.stdout
            assert "first CRL after the import: number 4, 1 entries" in done.stdout
            assert server.crl is not None
            current = await server.crl.current("class3")
            assert current is not None
            assert {e.serial_number for e in x509.load_der_x509_crl(current.der)} == {0x3001}
        finally:
            await server.stop()
