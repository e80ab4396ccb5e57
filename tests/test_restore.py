"""Restore from an older copy, end to end: a replicated signer (alone in its cluster) and the
WebDB client over an emulated line; a backup is taken, more is issued, revoked and published;
the signer is lost and recovered from the backup (`signer cluster recover`); its next CRL
number jumps past every published one, and `signer webdb-client --reconcile` brings back the
revocations (with their times) and records the issuances without issuing anything twice."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from ceremony_ca import make_ceremony_ca
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from raft_cluster import free_ports

from signer.client.webdb import WebdbClient, WebdbClientConfig
from signer.client.webdb.reconcile import Reconciler
from signer.config import load
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.line_emulator import LineEmulator
from signer.tools.webdb_fixture import demo_rows, insert_row, make_csr, request_revocation
from storage import Repository

ROOT = Path(__file__).resolve().parent.parent
BAUD = 921600

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ca(softhsm_token_factory, tmp_path_factory):
    token = softhsm_token_factory()
    base = tmp_path_factory.mktemp("ca")
    make_ceremony_ca(token, base, class3_kind="rsa-2048", openpgp_kind="ec-p256")
    return base, token


def write_configs(ca: Any, tmp: Path, cable: LineEmulator) -> tuple[Path, WebdbClientConfig]:
    base, token = ca
    secret = tmp / "replication.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(24).hex().encode())
    os.close(fd)
    signer = {
        "link": {"device": str(cable.end_a), "baudrate": BAUD, "reopen_interval": 0.1},
        "repository": {"path": str(tmp / "repo")},
        "hsm": {"module": token.store.module, "token_label": token.label,
                "pin_file": str(token.pin_file)},
        "profiles": "cacert",
        "issuers": {
            "class1": {"certificate": str(base / "ca" / "class1.crt"), "key": "root"},
            "class3": {"certificate": str(base / "ca" / "class3.crt"), "key": "class3"},
        },
        "crl": {"min_interval_seconds": 0, "poll_seconds": 0.2},
        "replication": {"self_address": f"127.0.0.1:{free_ports(1)[0]}", "peers": [],
                        "secret_file": str(secret), "journal_dir": str(tmp / "journal")},
    }  # fmt: skip
    signer_path = tmp / "signer.yaml"
    signer_path.write_text(yaml.safe_dump(signer))
    client = {
        "database": {"driver": "sqlite", "path": str(tmp / "webdb.sqlite")},
        "base_dir": "www",
        "lines": [{"device": str(cable.end_b), "baudrate": BAUD, "reopen_interval": 0.1}],
        "timeout": 20,
        "crl": {"outputs": {"class1": "crl/revoke.crl", "class3": "crl/class3-revoke.crl"}},
    }
    client_path = tmp / "webdb-client.yaml"
    client_path.write_text(yaml.safe_dump(client))
    (tmp / "www").mkdir(exist_ok=True)
    return signer_path, load(client_path, WebdbClientConfig)


async def started(path: Path) -> SignerServer:
    server = SignerServer(load(path, SignerConfig))
    await server.start()
    assert server.cluster is not None
    for _ in range(200):  # a lone voter elects itself at once
        if server.cluster.view.role == "leader":
            break
        await asyncio.sleep(0.05)
    return server


async def new_server_row(client: WebdbClient, config: WebdbClientConfig, name: str) -> int:
    csr = config.base_dir / f"{name}.csr"
    csr.write_bytes(make_csr(ec.generate_private_key(ec.SECP256R1())))
    assert client.db is not None
    return await insert_row(
        client.db,
        "domaincerts",
        {"subject": f"/CN={name}/subjectAltName=DNS:{name}", "csr_name": str(csr), "rootcert": 2},
    )


def crl_file_number(path: Path) -> int:
    crl = x509.load_der_x509_crl(path.read_bytes())
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


async def test_restore_an_old_backup_then_reconcile(ca, tmp_path):
    cable = LineEmulator(tmp_path / "line", baud=BAUD)
    cable.start()
    signer_path, config = write_configs(ca, tmp_path, cable)
    server = await started(signer_path)
    try:
        async with WebdbClient(config) as client:
            assert client.db is not None
            ids = await demo_rows(client.db, config.base_dir)
            before = await client.process_pending()
            assert before.done and not before.failed
            await client.refresh_crls()
            backup_time = datetime.now(UTC)
            repository = server.ca.repository  # type: ignore[union-attr]
            await asyncio.to_thread(repository.snapshot, tmp_path / "backup")  # taken live
            # after the backup: an issuance, two revocations (one of an older certificate),
            # and CRLs published and fetched by the WebDB side
            later = await new_server_row(client, config, "later.example.org")
            assert (await client.process_pending()).done == [f"domaincerts:{later}:sign"]
            await request_revocation(client.db, "domaincerts", ids["server"])
            await request_revocation(client.db, "domaincerts", later)
            assert len((await client.process_pending()).done) == 2
            for _ in range(3):
                await server.crl.publish("class3")  # type: ignore[union-attr]
                await asyncio.sleep(1.01)  # a CRL per second at most
            await client.refresh_crls()
            published = crl_file_number(config.crl.outputs["class3"])
            revoked_rows = {
                row["id"]: row
                for row in await client.db.query(
                    "SELECT id, serial, revoked, crt_name FROM domaincerts WHERE id IN (?, ?)",
                    (ids["server"], later),
                )
            }
            await server.stop()
            # Both the signer's disk and every other copy are lost: the backup is restored.
            shutil.rmtree(tmp_path / "repo")
            shutil.rmtree(tmp_path / "journal")
            with Repository(tmp_path / "repo") as restored:
                restored.restore(tmp_path / "backup")
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "signer", "cluster", "--config", str(signer_path),
                 "recover"],
                capture_output=True, text=True, cwd=ROOT,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert "CRLs of class3: the next is numbered" in done.stdout
            server = await started(signer_path)
            repository = server.ca.repository  # type: ignore[union-attr]
            key_id = server.ca.issuers["class3"].key_id  # type: ignore[union-attr]
            assert repository.last_crl_history(key_id)["crl_number"] < published
            assert repository.crl_number_floor(key_id) > published  # the rule, before any CRL
            for row_id in revoked_rows:
                assert repository.get_request(f"domaincerts:{row_id}:revoke") is None
            assert repository.get_request(f"domaincerts:{later}:sign") is None
            # The WebDB side puts back what the copy lacks; a dry run first.
            since = backup_time - timedelta(minutes=5)
            reconciler = Reconciler(client.db, client.lines, config)
            dry = await reconciler.run(since, dry_run=True)
            assert sorted(dry.missing) == sorted(
                [f"domaincerts:{later}:sign", *(f"domaincerts:{i}:revoke" for i in revoked_rows)]
            )
            report = await reconciler.run(since)
            assert report.requests_ok, report.as_dict()
            assert report.recorded == [f"domaincerts:{later}:sign"]
            assert sorted(report.revoked) == sorted(f"domaincerts:{i}:revoke" for i in revoked_rows)
            # everything the WebDB recorded is the signer's again, nothing issued twice
            for row in revoked_rows.values():
                certificate = x509.load_pem_x509_certificate(
                    (config.base_dir / row["crt_name"]).read_bytes()
                )
                serial = certificate.serial_number
                record = repository.get_certificate(key_id, serial)
                assert record is not None
                der = certificate.public_bytes(serialization.Encoding.DER)
                assert record["der"] == der  # the very certificate the WebDB holds
                revocation = repository.revocation(key_id, serial)
                assert revocation is not None
                assert abs(revocation.revoked_at - _epoch(row["revoked"])) <= 1
            issued = 0
            for table in ("emailcerts", "domaincerts", "orgemailcerts", "orgdomaincerts"):
                rows = await client.db.query(f"SELECT COUNT(*) AS n FROM {table} "
                                             "WHERE crt_name != ''")  # fmt: skip
                issued += rows[0]["n"]
            assert repository.counts()["certificates"] == issued
            # the next CRL is numbered past the published one and lists both revocations
            crl = await server.crl.publish("class3")  # type: ignore[union-attr]
            assert crl.number > published
            listed = {e.serial_number for e in x509.load_der_x509_crl(crl.der)}
            for row in revoked_rows.values():
                assert int(row["serial"], 16) in listed
            outcome = await client.refresh_crls()
            assert outcome["class3"].startswith("published")
        # run again from the command line (the line is its own now): everything is there
        again = await asyncio.to_thread(
                subprocess.run,
            [sys.executable, "-m", "signer", "webdb-client", "--config",
             str(tmp_path / "webdb-client.yaml"), "--reconcile", "--all", "--json"],
            capture_output=True, text=True, cwd=tmp_path,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        answer = json.loads(again.stdout)
        assert answer["ok"] and not answer["recorded"] and not answer["revoked"]
        assert answer["crls"]["class3"]["ok"]
    finally:
        await server.stop()
        cable.close()


def _epoch(value: Any) -> int:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return int(moment.replace(tzinfo=moment.tzinfo or UTC).timestamp())
