"""Monitoring from the web side: the WebDB client's metrics file and `signer check` over it.

End to end, each condition is made true for real (a row that waits, rows given up, the HSM
token gone, a noisy line, the line unplugged, a CA certificate near its end, a CRL near its
nextUpdate, a pair that lost its quorum) and `signer check` (the real command) goes WARNING or
CRITICAL naming it while the metric is in the file. What cannot be made true on one machine
(a slow HSM, a peer's clock off, a peer far behind, a stale report) is shown on health reports
of the real shape (`test_thresholds_of_each_condition`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ceremony_ca import make_ceremony_ca
from conditions import eventually
from cryptography.hazmat.primitives.asymmetric import ec

from signer.client.webdb import WebdbClient, WebdbClientConfig, db_time
from signer.client.webdb.check import CRITICAL, OK, WARNING, check_file, evaluate, parse
from signer.client.webdb.config import MonitoringConfig
from signer.client.webdb.metrics import LineView, Observations, PublishedCrl, RowStats, write
from signer.clock import utcnow
from signer.config import load
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.ceremony import run_ceremony
from signer.tools.line_emulator import LineEmulator
from signer.tools.webdb_fixture import create_schema, insert_row, make_csr

ROOT = Path(__file__).resolve().parent.parent
FAST = 921600
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ca(softhsm_token_factory, tmp_path_factory):
    """The usual test CA, and a third CA certificate (`short`, under the root) that ends in 20
    days: a CA certificate nearing its expiry."""
    token = softhsm_token_factory()
    base = tmp_path_factory.mktemp("ca")
    make_ceremony_ca(token, base, class3_kind="rsa-2048")
    ceremony = yaml.safe_load((base / "ceremony.yaml").read_text())
    ceremony["keys"].append({"label": "short", "kind": "ec-p256"})
    ceremony["certificates"].append(
        {"name": "short", "key": "short", "issuer": "class1", "validity_days": 20,
         "path_length": 0, "subject": [["O", "Test CA"], ["CN", "Short"]],
         "crl": {"next_update_days": 7}}
    )  # fmt: skip
    (base / "ceremony.yaml").write_text(yaml.safe_dump(ceremony))
    run_ceremony(base / "ceremony.yaml", progress=lambda *_: None)
    return base, token


def signer_config(ca, directory: Path, device: Path, **extra: Any) -> SignerConfig:
    base, token = ca
    issuers = {
        "class1": {"certificate": str(base / "ca" / "class1.crt"), "key": "root"},
        "class3": {"certificate": str(base / "ca" / "class3.crt"), "key": "class3"},
    }
    if extra.pop("short_ca", False):
        issuers["short"] = {"certificate": str(base / "ca" / "short.crt"), "key": "short"}
    text = {
        "link": {"device": str(device), "baudrate": FAST, "reopen_interval": 0.1},
        "repository": {"path": str(directory / "repo")},
        "hsm": {"module": token.store.module, "token_label": token.label,
                "pin_file": str(token.pin_file)},
        "profiles": "cacert",
        "issuers": issuers,
        **extra,
    }  # fmt: skip
    path = directory / "signer.yaml"
    path.write_text(yaml.safe_dump(text))
    return load(path, SignerConfig)


def client_config(tmp: Path, device: Path, issuers: tuple[str, ...] = ("class1", "class3")):
    text = {
        "database": {"driver": "sqlite", "path": str(tmp / "webdb.sqlite")},
        "base_dir": "www",
        "lines": [{"device": str(device), "baudrate": FAST, "reopen_interval": 0.1}],
        "timeout": 3,
        "crl": {"outputs": {name: f"crl/{name}.crl" for name in issuers}},
        "monitoring": {"metrics_file": "metrics/cacert-signer.prom"},
    }
    path = tmp / "webdb-client.yaml"
    path.write_text(yaml.safe_dump(text))
    (tmp / "www").mkdir(exist_ok=True)
    return path, load(path, WebdbClientConfig)


def check(config: Path) -> tuple[int, str]:
    """`signer check --config` as monitoring runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "signer", "check", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout.count("\n") == 1, done.stdout + done.stderr  # one status line
    return done.returncode, done.stdout.strip()


def metrics(config: WebdbClientConfig) -> dict[str, list[tuple[dict[str, str], float]]]:
    assert config.monitoring.metrics_file is not None
    return parse(config.monitoring.metrics_file.read_text())


class Running:
    """An in-process signer on an emulated cable."""

    def __init__(self, config: SignerConfig):
        self.server = SignerServer(config)

    async def __aenter__(self) -> SignerServer:
        await self.server.start()
        return self.server

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()


async def test_each_condition_makes_the_check_go_off_and_its_metric_is_written(ca, tmp_path):
    cable = LineEmulator(tmp_path / "line", baud=FAST).start()
    path, config = client_config(tmp_path, cable.end_b)
    (tmp_path / "signer").mkdir()
    try:
        async with (
            Running(signer_config(ca, tmp_path / "signer", cable.end_a)),
            WebdbClient(config) as client,
        ):
            await create_schema(client.db)
            await client.run_once()
            status, line = check(path)
            assert status == OK, line
            assert line.startswith("SIGNER OK - 1 of 1 signer(s) answering, CRLs valid for")
            assert "'ca_days_left_class3'=" in line and "'crl_margin_hours_class1'=" in line
            seen = metrics(config)
            for name in ("up", "health_status", "health_age_seconds", "ca_days_left", "hsm_up",
                         "hsm_signature_seconds", "crl_next_update_margin_seconds", "crl_number",
                         "crl_published", "line_errors_recent", "line_errors_client_total",
                         "line_errors_signer_total", "webdb_pending_rows",
                         "webdb_oldest_pending_seconds", "webdb_failed_rows", "webdb_up",
                         "written_timestamp_seconds"):  # fmt: skip
                assert seen.get(name), f"no {name} in the metrics file"

            # A row waits (written before the pass that serves it): its age, from `created`.
            csr = config.base_dir / "req.csr"
            csr.write_bytes(make_csr(ec.generate_private_key(ec.SECP256R1())))
            server = "/CN=a.example.org/subjectAltName=DNS:a.example.org"
            created = db_time(utcnow().replace(microsecond=0) - _hours(2))
            waiting = await insert_row(client.db, "domaincerts",
                                       {"subject": server, "csr_name": "req.csr", "rootcert": 2,
                                        "created": created})  # fmt: skip
            await client.write_metrics()
            status, line = check(path)
            assert status == CRITICAL and "a domaincerts row (sign) waits for 72" in line, line
            assert _value(metrics(config), "webdb_pending_rows", table="domaincerts") == 1
            await client.poll()  # served now, and the file written after the poll
            assert check(path)[0] == OK

            # Rows given up: a garbage CSR fails three times.
            (config.base_dir / "bad.csr").write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nx\n")
            values = {"subject": server, "csr_name": "bad.csr", "rootcert": 2}
            bad = await insert_row(client.db, "domaincerts", values)
            for _ in range(3):
                await client.poll()
            status, line = check(path)
            assert status == WARNING and "1 WebDB row(s) given up" in line, line
            assert _value(metrics(config), "webdb_failed_rows", table="domaincerts") == 1
            await client.db.execute("DELETE FROM domaincerts WHERE id IN (?, ?)", (waiting, bad))

            # The HSM token is gone.
            _, token = ca
            away = tmp_path / "token-away"  # out of the token store: SoftHSM sees no token
            shutil.move(token.directory, away)
            try:
                await client.check_health()
                await client.write_metrics()
                status, line = check(path)
                assert status == CRITICAL and "HSM of the signer on line" in line, line
                assert _value(metrics(config), "hsm_up") == 0
            finally:
                shutil.move(away, token.directory)
            await client.check_health()
            await client.write_metrics()
            assert check(path)[0] == OK

            # A noisy line: broken frames on both ends.
            cable.set_faults(corrupt=0.003)
            for _ in range(4):
                await client.check_health()
            cable.set_faults()
            await client.check_health()
            await client.write_metrics()
            status, line = check(path)
            assert status >= WARNING and "line error(s) on" in line, line
            assert _value(metrics(config), "line_errors_recent") >= 10

            # The line is unplugged.
            cable.unplug("b")
            await client.check_health()
            await client.write_metrics()
            status, line = check(path)
            assert status == CRITICAL and "is not answering" in line, line
            assert _value(metrics(config), "up") == 0
    finally:
        cable.close()


async def test_a_ca_certificate_nearing_expiry_and_a_crl_near_its_next_update(ca, tmp_path):
    cable = LineEmulator(tmp_path / "line", baud=FAST).start()
    path, config = client_config(tmp_path, cable.end_b, ("class1", "class3", "short"))
    (tmp_path / "signer").mkdir()
    crl = {"next_update_days": 1, "refresh_margin_hours": 1}  # CRLs valid for a day only
    signer = signer_config(ca, tmp_path / "signer", cable.end_a, short_ca=True, crl=crl)
    try:
        async with Running(signer), WebdbClient(config) as client:
            await create_schema(client.db)
            await client.run_once()
            status, line = check(path)
    finally:
        cable.close()
    assert status == CRITICAL, line
    assert "CA certificate short expires in 19 days" in line
    assert "the CRL of class3 reaches its nextUpdate in 24.0 h" in line  # below 48 h: warning
    seen = metrics(config)
    assert _value(seen, "ca_days_left", ca="short") == 19
    assert (
        23.9 * 3600 < _value(seen, "crl_next_update_margin_seconds", issuer="class3") <= 24 * 3600
    )


async def test_a_pair_that_lost_its_quorum(ca, tmp_path):
    from raft_cluster import FAST as RAFT
    from raft_cluster import free_ports, wait_for

    from replication.settings import ReplicationSettings

    cables = [LineEmulator(tmp_path / f"line{i}", baud=FAST).start() for i in range(2)]
    sections = ReplicationSettings.local_pair(tmp_path, tuple(free_ports(2)), **RAFT)
    servers = []
    for name, section, cable in zip("ab", sections, cables, strict=True):
        (tmp_path / name).mkdir()
        servers.append(SignerServer(signer_config(ca, tmp_path / name, cable.end_a,
                                                  replication=section)))  # fmt: skip
    path, config = client_config(tmp_path, cables[0].end_b)
    try:
        for server in servers:
            await server.start()
        await wait_for(lambda: all(s.cluster.view.has_quorum for s in servers), 20, "quorum")
        async with WebdbClient(config) as client:
            await create_schema(client.db)
            await client.run_once()
            seen = metrics(config)
            assert _value(seen, "replication_quorum") == 1
            assert seen.get("replication_role")

            async def offset_measured() -> bool:  # every second over the link
                await client.check_health()
                await client.write_metrics()
                return bool(metrics(config).get("replication_clock_offset_seconds"))

            await eventually(offset_measured, 20)
            if servers[0].cluster.view.role == "leader":  # the leader sees its peer's lag
                assert metrics(config).get("replication_lag_entries")
            await servers[1].stop()
            servers.pop()
            await wait_for(lambda: not servers[0].cluster.view.has_quorum, 20, "quorum lost")
            await client.check_health()
            await client.write_metrics()
            status, line = check(path)
            assert status == CRITICAL and "has no quorum" in line, line
            assert _value(metrics(config), "replication_quorum") == 0
    finally:
        for server in servers:
            await server.stop()
        for cable in cables:
            cable.close()


# --- the thresholds, on reports of the real shape ---------------------------------------------


def report(**sections: Any) -> dict[str, Any]:
    base = {
        "link": {"broken_frames": 0},
        "hsm": {"token_present": True, "logged_in": True,
                "keys": [{"label": "root", "test_signature_ok": True, "latency_ms": 12.0}]},
        "cas": {"class1": {"days_left": 3000}},
        "cluster": {"role": "leader", "quorum": True,
                    "peers": {"10.0.0.2:4321": {"lag": 0, "clock_offset_s": 0.01}}},
    }  # fmt: skip
    base.update(sections)
    return {"status": "ok", "sections": base}


CONDITIONS = {
    "slow HSM": (report(hsm={"token_present": True, "logged_in": True, "keys": [
        {"label": "root", "test_signature_ok": True, "latency_ms": 2500}]}),
        WARNING, "HSM key root on line l1 takes 2.50 s to sign", "hsm_signature_seconds"),
    "HSM PIN locked": (report(hsm={"token_present": True, "logged_in": False, "keys": []}),
                       CRITICAL, "HSM of the signer on line l1 is not usable", "hsm_up"),
    "peer behind": (report(cluster={"role": "leader", "quorum": True,
                                    "peers": {"p:1": {"lag": 200000, "clock_offset_s": 0}}}),
                    CRITICAL, "peer p:1 is 200000 entries behind", "replication_lag_entries"),
    "clock off": (report(cluster={"role": "follower", "quorum": True,
                                  "peers": {"p:1": {"lag": None, "clock_offset_s": -1.5}}}),
                  WARNING, "the clock of peer p:1 differs by -1.50 s",
                  "replication_clock_offset_seconds"),
    "fenced": (report(cluster={"role": "fenced", "quorum": False, "peers": {}}),
               CRITICAL, "the signer on line l1 is fenced", "replication_role"),
    "CA expired": (report(cas={"class1": {"days_left": -2}}), CRITICAL,
                   "CA certificate class1 expires in -2 days", "ca_days_left"),
    "health errors": ({**report(), "status": "error"}, CRITICAL,
                      "the signer on line l1 reports errors", "health_status"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_thresholds_of_each_condition(name: str, tmp_path: Path) -> None:
    health, level, text, metric = CONDITIONS[name]
    now = 1_800_000_000.0
    seen = Observations(
        lines=[LineView("l1", health, now - 10, True)],
        crls=[PublishedCrl("class1", 7, now + 100 * 3600)],
        rows=[RowStats("emailcerts", "sign", 0, None, 0)],
    )
    write(tmp_path / "m.prom", seen, now)
    samples = parse((tmp_path / "m.prom").read_text())
    assert samples.get(metric), f"no {metric}"
    result = evaluate(samples, MonitoringConfig(), now)
    assert result.status == level and text in result.line(), result.line()
    healthy = Observations(lines=[LineView("l1", report(), now - 10, True)], crls=seen.crls)
    write(tmp_path / "ok.prom", healthy, now)
    assert check_file(tmp_path / "ok.prom", MonitoringConfig(), now).status == OK


def test_stale_files_and_reports_and_crls(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    limits = MonitoringConfig()
    seen = Observations(
        lines=[LineView("l1", report(), now - 4000, True)],
        crls=[PublishedCrl("class3", 9, now - 3600), PublishedCrl("class1", None, None)],
    )
    write(tmp_path / "m.prom", seen, now)
    line = check_file(tmp_path / "m.prom", limits, now).line()
    assert line.startswith("SIGNER CRITICAL - ")
    assert "health of line l1 is 4000 s old" in line
    assert "the CRL of class3 expired 1.0 h ago" in line
    assert "no valid CRL of class1 is published" in line
    late = check_file(tmp_path / "m.prom", limits, now + 600)
    assert late.status == CRITICAL and "metrics written 600 s ago" in late.line()
    assert check_file(tmp_path / "none.prom", limits, now).status == CRITICAL
    (tmp_path / "junk.prom").write_text("this is { not prometheus\n")
    assert check_file(tmp_path / "junk.prom", limits, now).status == 3
    assert check_file(None, limits, now).status == 3


def test_check_exit_codes_for_a_wrong_command_line(tmp_path: Path) -> None:
    """A plugin's own trouble is UNKNOWN (3), never CRITICAL (2)."""
    for argv in (["check"], ["check", "--config", str(tmp_path / "absent.yaml")]):
        done = subprocess.run([sys.executable, "-m", "signer", *argv], capture_output=True,
                              text=True, cwd=ROOT, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 3 and done.stdout.startswith("SIGNER UNKNOWN - "), done


def _hours(n: float) -> Any:
    from datetime import timedelta

    return timedelta(hours=n)


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str):
    found = [v for got, v in samples.get(name, []) if labels.items() <= got.items()]
    assert found, f"no {name} {labels} in the metrics file"
    return found[0]
