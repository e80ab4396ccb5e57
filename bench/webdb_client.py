"""WebDB client throughput: database row to written result, per second, against the line's bound.

The whole chain as in production, on one machine: WebDB rows in SQLite, the WebDB client
(`signer.client.webdb`), an emulated serial cable paced at 8N1, and `signer serve` as a separate
process with its CA keys (RSA-2048, made by the ceremony) in SoftHSM2, serving CAcert's profile
set. The rows are the real mix, inserted as CAcert's web application inserts them
(signer/tools/webdb_fixture.py): half personal client certificates (RSA-2048 PKCS#10 PEM, the
member's name and two addresses), a quarter server certificates for two domains with their
XmppAddr names (P-256), a quarter organisation certificates (client and server alternately,
long attribute names, OU). Rows are inserted after the client started, so no `request_status`
precedes them. The time runs from the start of the poll to the last row's certificate file and
columns written.

The bound is the line: baud / 10 bytes a second divided by the bytes one sign exchange puts on
the wire in the busier direction (the average frames of this run, measured on the client's link).
Run: python bench/webdb_client.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# The project root first: bench/replication.py must not shadow the replication package.
# bench/replication.py shadows the `replication` package in this folder, which Python puts first
# on sys.path for a script: take the folder off (nothing is added; the venv has the project).
sys.path.remove(str(Path(__file__).resolve().parent))

from signer.client.webdb import WebdbClient, WebdbClientConfig
from signer.config import validate
from signer.errors import SignerError
from signer.tools.ceremony import run_ceremony
from signer.tools.line_emulator import LineEmulator
from signer.tools.softhsm import find_softhsm_module, new_token
from signer.tools.webdb_fixture import Organisation, WebApplication, create_schema

ROOT = Path(__file__).resolve().parent.parent
LABEL = "bench"


def make_ca(work: Path) -> dict[str, Any]:
    conf, pin_file = new_token(work / "softhsm", LABEL)
    hsm = {
        "module": find_softhsm_module(),
        "token_label": LABEL,
        "pin_file": str(pin_file),
        "softhsm_conf": str(conf),
    }
    ceremony = {
        "hsm": hsm,
        "output_dir": str(work / "ca"),
        "keys": [{"label": "root", "kind": "rsa-2048"}, {"label": "class3", "kind": "rsa-2048"}],
        "certificates": [
            {"name": "class1", "key": "root", "issuer": "self", "validity_days": 7000,
             "path_length": 1, "subject": [["O", "Bench CA"], ["CN", "Bench Root"]]},
            {"name": "class3", "key": "class3", "issuer": "class1", "validity_days": 3000,
             "path_length": 0, "subject": [["O", "Bench CA"], ["CN", "Bench Class 3"]]},
        ],
    }  # fmt: skip
    (work / "ceremony.yaml").write_text(yaml.safe_dump(ceremony))
    run_ceremony(work / "ceremony.yaml", progress=lambda *_: None)
    return hsm


def start_signer(work: Path, device: Path, baud: int, hsm: dict[str, Any]) -> subprocess.Popen:
    config = {
        "link": {"device": str(device), "baudrate": baud, "reopen_interval": 0.1},
        "log_level": "WARNING",
        "repository": {"path": str(work / "repository")},
        "hsm": hsm,
        "profiles": "cacert",
        "issuers": {
            "class1": {"certificate": str(work / "ca" / "class1.crt"), "key": "root"},
            "class3": {"certificate": str(work / "ca" / "class3.crt"), "key": "class3"},
        },
    }
    (work / "signer.yaml").write_text(yaml.safe_dump(config))
    log = (work / "signer.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "signer", "serve", "--config", str(work / "signer.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def client_config(work: Path, device: Path, baud: int) -> WebdbClientConfig:
    data = {
        "database": {"driver": "sqlite", "path": str(work / "webdb.sqlite")},
        "base_dir": str(work / "www"),
        "lines": [{"device": str(device), "baudrate": baud, "reopen_interval": 0.1}],
        "timeout": 120,
        "max_in_flight": 8,
        "log_level": "WARNING",
    }
    return validate(data, WebdbClientConfig, work / "webdb-client.yaml")


ORG = Organisation("Example e.V.", "Berlin", "Berlin", "DE")


async def insert_rows(client: WebdbClient, base: Path, count: int) -> None:
    """The real mix: 2 personal client rows, 1 server row, 1 organisation row in every 4."""
    assert client.db is not None
    web = WebApplication(client.db, base)
    rsa_key, ec_key = rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())
    for i in range(count):
        if i % 4 in (0, 2):
            await web.client_certificate(
                1, [f"u{i}@example.org", f"u{i}@example.net"], "Alice Example", rootcert=2,
                md="sha256", key=rsa_key,
            )  # fmt: skip
        elif i % 4 == 1:
            await web.server_certificate(
                1, [f"h{i}.example.org", f"w{i}.example.org"], rootcert=2, md="sha256", key=ec_key
            )
        elif i % 8 == 3:
            await web.org_client_certificate(
                1, ORG, [f"office{i}@example.org"], "Example Office", "IT", rootcert=2,
                md="sha256", key=rsa_key,
            )  # fmt: skip
        else:
            await web.org_server_certificate(
                1, ORG, [f"shop{i}.example.org"], "Web", rootcert=2, md="sha256", key=ec_key
            )


async def wait_ready(client: WebdbClient) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            await client.lines.call("health", timeout=1.0)
            return
        except SignerError:
            if time.monotonic() > deadline:
                raise


async def measure(work: Path, device: Path, baud: int, rows: int) -> dict[str, float]:
    config = client_config(work, device, baud)
    (work / "www").mkdir()
    async with WebdbClient(config) as client:
        assert client.db is not None
        await create_schema(client.db)
        web = WebApplication(client.db, config.base_dir)
        await web.assurance(1, 100)
        await web.domain(1, "example.org")
        await client.source.start()  # today's rows are known; new ones go straight to sign_x509
        await wait_ready(client)
        await insert_rows(client, config.base_dir, 2)
        assert len((await client.process_pending()).done) == 2  # warm-up, list_profiles
        await insert_rows(client, config.base_dir, rows)
        link = client.lines.clients[0].link
        before = link.stats
        started = time.perf_counter()
        report = await client.process_pending()
        elapsed = time.perf_counter() - started
        after = link.stats
    if len(report.done) != rows:
        raise SystemExit(f"only {len(report.done)} of {rows} rows done: {report}")
    up = (after.bytes_out - before.bytes_out) / rows
    down = (after.bytes_in - before.bytes_in) / rows
    bound = (baud / 10) / max(up, down)
    rate = rows / elapsed
    return {"rows": rows, "seconds": elapsed, "rate": rate, "bound": bound, "up": up, "down": down}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows (under a minute)")
    parser.add_argument("--baud", type=int, default=115200)
    args = parser.parse_args()
    rows = 40 if args.quick else 200
    with tempfile.TemporaryDirectory(prefix="bench-webdb-") as tmp:
        work = Path(tmp)
        hsm = make_ca(work)
        with LineEmulator(work / "line", baud=args.baud) as line:
            signer = start_signer(work, line.end_a, args.baud, hsm)
            try:
                result = asyncio.run(measure(work, line.end_b, args.baud, rows))
            finally:
                signer.terminate()
                signer.wait(timeout=10)
    ratio = result["rate"] / result["bound"]
    print(f"{'baud':>7} {'rows':>5} {'seconds':>8} {'rows/s':>7} {'bound/s':>8} {'ratio':>6}")
    print(
        f"{args.baud:>7} {rows:>5} {result['seconds']:>8.2f} {result['rate']:>7.2f}"
        f" {result['bound']:>8.2f} {ratio:>6.3f}"
    )
    print(
        f"(bytes on the wire per row: client->signer {result['up']:.0f}, "
        f"signer->client {result['down']:.0f}; bound = baud / 10 / the busier direction)"
    )
    print(
        f"RESULT rows_per_s={result['rate']:.3f} line_bound_per_s={result['bound']:.3f} "
        f"ratio={ratio:.3f}"
    )


if __name__ == "__main__":
    main()
