"""The runbooks of docs/operations.md, walked command by command as written there.

Each test is named in the runbook table of docs/operations.md and walks the `host# command`
lines of its runbook there, in order (tests/unit/test_runbook_table.py checks the table). The
hosts are directories of this machine (tests/runbook_hosts.py): /etc/cacert-signer,
/var/lib/cacert-signer and the doc's replication addresses stand for the test's own;
`systemctl start cacert-signer` runs `signer serve` as the unit does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ceremony_ca import make_ceremony_ca
from runbook_hosts import (
    BAUD,
    CEREMONY_ISSUERS,
    Host,
    Network,
    ceremony_yaml,
    signer_yaml,
    webdb_yaml,
)

from signer.client.webdb import Database, DatabaseConfig
from signer.tools.line_emulator import LineEmulator
from signer.tools.webdb_fixture import WebApplication, create_schema, request_revocation

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ca(softhsm_token_factory, tmp_path_factory):
    """The CA's keys in a SoftHSM2 token (both signers' HSMs hold the same keys)."""
    token = softhsm_token_factory()
    base = tmp_path_factory.mktemp("ca")
    make_ceremony_ca(token, base, root_kind="ec-p256")
    return base, token


@contextlib.contextmanager
def machines(tmp_path: Path, names: str = "ab") -> Iterator[dict[str, Host]]:
    """Signer hosts a, b (c), each with its serial line to the WebDB host `web`, whose
    /dev/ttyUSB0 goes to a and /dev/ttyUSB1 to b."""
    network = Network()
    lines = {name: LineEmulator(tmp_path / f"line-{name}", baud=BAUD).start() for name in names}
    hosts = {name: Host(tmp_path, name, network, lines[name]) for name in names}
    web = hosts["web"] = Host(tmp_path, "web", network)
    web.serial = {f"/dev/ttyUSB{i}": lines[n].end_b for i, n in enumerate(names) if n in "ab"}
    try:
        yield hosts
    finally:
        for host in hosts.values():
            host.stop()
        for line in lines.values():
            line.close()


def pair(hosts: dict[str, Host], ca) -> None:
    """Signers a and b configured as config/signer-a.yaml and signer-b.yaml say."""
    a, b = hosts["a"], hosts["b"]
    a.write_yaml(
        "signer.yaml",
        signer_yaml(a, ca, {"self_address": "10.99.0.1:4321", "peers": ["10.99.0.2:4321"]}),
    )
    b.write_yaml(
        "signer.yaml",
        signer_yaml(b, ca, {"self_address": "10.99.0.2:4321", "peers": ["10.99.0.1:4321"]}),
    )


def healthy(done) -> bool:
    """`signer client health` answered and said `status:  ok`."""
    return done.returncode == 0 and done.stdout.split()[:2] == ["status:", "ok"]


def quorum(done) -> bool:
    return done.returncode == 0 and "quorum: True" in done.stdout


STATUS = "signer cluster --config /etc/cacert-signer/signer.yaml status"


def members(host: Host, done) -> set[str]:
    """The `members:` line of `signer cluster status`, in the doc's addresses."""
    text = host.substitute_back(done.stdout)
    line = next(line for line in text.splitlines() if line.startswith("members: "))
    return set(line.removeprefix("members: ").strip("[]").replace("'", "").split(", "))


def caught_up(done) -> bool:
    """`signer cluster status` of a signer that has everything the cluster committed."""
    if not quorum(done) or field(done, "role") not in ("leader", "follower"):
        return False
    return field(done, "applied_index") == field(done, "commit_index") != "0"


def field(done, key: str) -> str:
    """A top-level `key: value` of a command's human output."""
    return next(
        line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith(f"{key}: ")
    )


def start_the_pair(hosts: dict[str, Host]) -> None:
    """Runbook "Start the pair"."""
    a, b = hosts["a"], hosts["b"]
    a.run("head -c 32 /dev/urandom | base64 > /etc/cacert-signer/replication.secret")
    a.run("chmod 600 /etc/cacert-signer/replication.secret")
    shutil.copy2(a.etc / "replication.secret", b.etc / "replication.secret")  # a USB stick
    a.run("systemctl start cacert-signer")
    b.run("systemctl start cacert-signer")
    status = a.until(STATUS, quorum)
    assert members(a, status) == {"10.99.0.1:4321", "10.99.0.2:4321"}
    b.until(STATUS, quorum)
    health = hosts["web"].until("signer client --port /dev/ttyUSB0 health", healthy)
    assert "cluster:" in health.stdout


def test_runbook_start_the_pair(ca, tmp_path):
    with machines(tmp_path) as hosts:
        pair(hosts, ca)
        start_the_pair(hosts)
        web = hosts["web"]
        web.until("signer client --port /dev/ttyUSB1 health", lambda d: d.returncode == 0)
        listed = web.run("signer client --port /dev/ttyUSB1 --json list-issuers")
        assert [i["name"] for i in json.loads(listed.stdout)["issuers"]] == ["class1", "class3"]


def test_runbook_add_and_remove_a_signer(ca, tmp_path):
    with machines(tmp_path, "abc") as hosts:
        pair(hosts, ca)
        start_the_pair(hosts)
        a, c = hosts["a"], hosts["c"]
        shutil.copy2(a.etc / "replication.secret", c.etc / "replication.secret")
        c.write_yaml(
            "signer.yaml",
            signer_yaml(
                c,
                ca,
                {"self_address": "10.99.0.3:4321", "peers": ["10.99.0.1:4321", "10.99.0.2:4321"]},
                hsm=False,
            ),
        )
        added = a.run("signer cluster --config /etc/cacert-signer/signer.yaml add 10.99.0.3:4321")
        assert field(added, "status") == "added"
        c.run("systemctl start cacert-signer")
        status = c.until(STATUS, caught_up)
        assert members(c, status) == {"10.99.0.1:4321", "10.99.0.2:4321", "10.99.0.3:4321"}
        removed = a.run(
            "signer cluster --config /etc/cacert-signer/signer.yaml remove 10.99.0.3:4321"
        )
        assert field(removed, "status") == "removed"
        fenced = c.until(STATUS, lambda d: d.returncode == 0 and field(d, "role") == "fenced")
        assert "removed from the cluster" in c.substitute_back(fenced.stdout)
        c.run("systemctl stop cacert-signer")
        c.run("rm -rf /var/lib/cacert-signer/repository /var/lib/cacert-signer/raft")
        status = a.until(STATUS, quorum)
        assert members(a, status) == {"10.99.0.1:4321", "10.99.0.2:4321"}


CSR = (
    "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout www.key "
    "-subj /CN=www.example.org -out req.pem"
)
SIGN = (
    "signer client --port /dev/ttyUSB0 sign-x509 --csr req.pem --profile server "
    "--san dns:www.example.org --out www.crt"
)


def test_runbook_force_standalone_and_rejoin(ca, tmp_path):
    with machines(tmp_path) as hosts:
        pair(hosts, ca)
        start_the_pair(hosts)
        a, b, web = hosts["a"], hosts["b"], hosts["web"]
        b.power_off()  # fenced: powered off, its cables unplugged
        a.until(STATUS, lambda d: d.returncode == 0 and field(d, "quorum") == "False")
        forced = a.run(
            "signer cluster --config /etc/cacert-signer/signer.yaml force-standalone "
            "--fenced 10.99.0.2:4321"
        )
        assert field(forced, "status") == "standalone", forced.stdout
        status = a.until(STATUS, quorum)
        assert members(a, status) == {"10.99.0.1:4321"}
        web.run(CSR)
        web.run(SIGN)
        assert "BEGIN CERTIFICATE" in (web.root / "www.crt").read_text()
        # b comes back: wiped first, added, started; it catches up by itself.
        b.run("rm -rf /var/lib/cacert-signer/repository /var/lib/cacert-signer/raft")
        a.run("signer cluster --config /etc/cacert-signer/signer.yaml add 10.99.0.2:4321")
        b.run("systemctl start cacert-signer")
        status = b.until(STATUS, caught_up)
        assert members(b, status) == {"10.99.0.1:4321", "10.99.0.2:4321"}
        assert field(a.run(STATUS), "quorum") == "True"


def test_runbook_replace_a_failed_signer(ca, tmp_path):
    with machines(tmp_path, "abc") as hosts:
        pair(hosts, ca)
        start_the_pair(hosts)
        a, b, c, web = hosts["a"], hosts["b"], hosts["c"], hosts["web"]
        b.power_off()  # b failed for good: power off, unplug
        a.until(STATUS, lambda d: d.returncode == 0 and field(d, "quorum") == "False")
        a.run(
            "signer cluster --config /etc/cacert-signer/signer.yaml force-standalone "
            "--fenced 10.99.0.2:4321"
        )
        # The new machine c: the CA keys in its HSM, the secret, an empty state directory.
        shutil.copy2(a.etc / "replication.secret", c.etc / "replication.secret")
        c.write_yaml(
            "signer.yaml",
            signer_yaml(c, ca, {"self_address": "10.99.0.3:4321", "peers": ["10.99.0.1:4321"]}),
        )
        a.run("signer cluster --config /etc/cacert-signer/signer.yaml add 10.99.0.3:4321")
        c.run("systemctl start cacert-signer")
        status = c.until(STATUS, caught_up)
        assert members(c, status) == {"10.99.0.1:4321", "10.99.0.3:4321"}
        web.run(CSR)
        web.run(SIGN)
        # The failed b, started again with its old data: nobody talks to it, it commits nothing.
        b.run("systemctl start cacert-signer")
        alone = b.until(STATUS, lambda d: d.returncode == 0 and "connected: False" in d.stdout)
        assert field(alone, "quorum") == "False"
        b.run("systemctl stop cacert-signer")
        b.run("rm -rf /var/lib/cacert-signer/repository /var/lib/cacert-signer/raft")
        status = a.run(STATUS)
        assert members(a, status) == {"10.99.0.1:4321", "10.99.0.3:4321"} and quorum(status)


# --- one signer and the WebDB host ------------------------------------------------------------


def answering(done) -> bool:
    """`signer client health` answered (whatever its status)."""
    return done.returncode == 0 and done.stdout.startswith("status:")


def standalone(hosts: dict[str, Host], ca, ready=healthy, **extra) -> tuple[Host, Host]:
    """Signer a alone (no replication) and the WebDB host with its WebDB and client config."""
    a, web = hosts["a"], hosts["web"]
    a.write_yaml("signer.yaml", signer_yaml(a, ca, None, **extra))
    web.write_yaml("webdb-client.yaml", webdb_yaml(web))
    asyncio.run(_schema(web.var / "webdb.sqlite"))
    a.run("systemctl start cacert-signer")
    web.until("signer client --port /dev/ttyUSB0 health", ready)
    return a, web


async def _schema(path: Path) -> None:
    db = Database(DatabaseConfig(driver="sqlite", path=path))
    try:
        await create_schema(db)
    finally:
        await db.close()


ONCE = "signer webdb-client --config /etc/cacert-signer/webdb-client.yaml --once"
CHECK = "signer check --config /etc/cacert-signer/webdb-client.yaml"


def test_runbook_line_unplugged(ca, tmp_path):
    with machines(tmp_path, "a") as hosts:
        a, web = standalone(hosts, ca)
        web.run(ONCE)
        assert web.run(CHECK).stdout.startswith("SIGNER OK - 1 of 1 signer(s) answering")
        a.line.set_faults(drop=1.0)  # the cable is pulled: nothing goes through
        web.run(ONCE, code=3)
        check = web.run(CHECK, code=2)
        line = web.substitute_back(check.stdout)
        assert line.startswith("SIGNER CRITICAL - the signer on line /dev/ttyUSB0 is not answering")
        down = web.run("signer client --port /dev/ttyUSB0 --timeout 5 health", code=3)
        assert down.stderr.startswith("error: timeout: no answer to")
        a.line.set_faults()  # plugged back: the signer never noticed, the client reconnects
        web.run("signer client --port /dev/ttyUSB0 --timeout 5 health")
        web.run(ONCE)
        web.run(CHECK)


def test_runbook_hsm_pin_locked(softhsm_token_factory, tmp_path):
    token = softhsm_token_factory()
    with machines(tmp_path, "a") as hosts:
        a, web = hosts["a"], hosts["web"]
        a.write_yaml("ceremony.yaml", ceremony_yaml(a, token))
        a.run("signer ceremony --config /etc/cacert-signer/ceremony.yaml")
        (a.root / "hsm-so.pin").write_text(token.so_pin + "\n")
        a.network.map["/root/hsm-so.pin"] = str(a.root / "hsm-so.pin")
        a.network.map["/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"] = token.store.module
        a.network.map["--token-label cacert "] = f"--token-label {token.label} "
        standalone(hosts, (None, token), issuers=CEREMONY_ISSUERS)
        # The token's user PIN no longer is the one in hsm.pin (locked, or reset by its SO).
        a.run(
            "pkcs11-tool --module /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so --token-label "
            'cacert --login --login-type so --so-pin "$(cat /root/hsm-so.pin)" --init-pin '
            "--new-pin 99999999"
        )
        a.run("systemctl restart cacert-signer")
        health = web.until(
            "signer client --port /dev/ttyUSB0 health",
            lambda d: d.returncode == 0 and "status:  error" in d.stdout,
        )
        assert "hsm: key cacert-root: hsm_login_failed: token" in health.stdout
        web.run(ONCE)
        check = web.run(CHECK, code=2)
        assert "the HSM of the signer on line" in check.stdout and "is not usable" in check.stdout
        # The security officer sets a new user PIN, the PIN file gets it, the signer restarts (a
        # PKCS#11 module may keep the token's old PIN in the process: SoftHSM2 does).
        a.run("(umask 077; openssl rand -hex 8 > /etc/cacert-signer/hsm.pin.new)")
        a.run(
            "pkcs11-tool --module /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so --token-label "
            'cacert --login --login-type so --so-pin "$(cat /root/hsm-so.pin)" --init-pin '
            '--new-pin "$(cat /etc/cacert-signer/hsm.pin.new)"'
        )
        a.run("mv /etc/cacert-signer/hsm.pin.new /etc/cacert-signer/hsm.pin")
        a.run("systemctl restart cacert-signer")
        web.until("signer client --port /dev/ttyUSB0 health", healthy)
        web.run(ONCE)
        web.run(CHECK)
        assert a.running()


def test_runbook_crl_stale(ca, tmp_path):
    with machines(tmp_path, "a") as hosts:
        _, web = standalone(hosts, ca)
        published = web.var / "www" / "class3-revoke.crl"
        published.mkdir()  # in the way: the client cannot publish there
        web.run(ONCE)
        check = web.run(CHECK, code=2)
        assert "no valid CRL of class3 is published" in check.stdout
        health = web.run("signer client --port /dev/ttyUSB0 health")
        assert "hours_left: 168.0" in health.stdout  # the signer's own CRL is fresh
        published.rmdir()  # what was in the way is gone
        web.run(ONCE)
        web.run(CHECK)
        dump = web.run(
            "openssl crl -inform DER -in /var/lib/cacert-webdb/www/class3-revoke.crl "
            "-noout -nextupdate"
        )
        assert dump.stdout.startswith("nextUpdate=")


def test_runbook_ca_certificate_nearing_expiry(softhsm_token_factory, tmp_path):
    token = softhsm_token_factory()
    with machines(tmp_path, "a") as hosts:
        a, web = hosts["a"], hosts["web"]
        ceremony = ceremony_yaml(a, token, class3_days=20)
        a.write_yaml("ceremony.yaml", ceremony)
        a.run("signer ceremony --config /etc/cacert-signer/ceremony.yaml")
        standalone(hosts, (None, token), issuers=CEREMONY_ISSUERS, ready=answering)
        web.run(ONCE)
        check = web.run(CHECK, code=2)
        assert "CA certificate class3 expires in 19 days" in check.stdout
        # A new certificate for the same key and subject (class3-2), then the signer uses it.
        renewed = {**ceremony["certificates"][1], "name": "class3-2", "validity_days": 3652}
        ceremony["certificates"].append(renewed)
        a.write_yaml("ceremony.yaml", ceremony)
        made = a.run("signer ceremony --config /etc/cacert-signer/ceremony.yaml")
        assert "certificate class3-2: created" in made.stdout + made.stderr
        a.run(
            "openssl verify -CAfile /etc/cacert-signer/ca/root.crt "
            "/etc/cacert-signer/ca/class3-2.crt"
        )
        a.run("sed -i 's#ca/class3.crt#ca/class3-2.crt#' /etc/cacert-signer/signer.yaml")
        a.run("systemctl restart cacert-signer")
        health = web.until("signer client --port /dev/ttyUSB0 health", healthy)
        assert "days_left: 3651" in health.stdout
        web.run(ONCE)
        web.run(CHECK)


def test_runbook_ceremony(softhsm_token_factory, tmp_path):
    token = softhsm_token_factory()
    with machines(tmp_path, "a") as hosts:
        a = hosts["a"]
        a.write_yaml("ceremony.yaml", ceremony_yaml(a, token))
        made = a.run("signer ceremony --config /etc/cacert-signer/ceremony.yaml")
        assert "ceremony: done, 6 item(s) created, imported or repaired" in made.stdout
        again = a.run("signer ceremony --config /etc/cacert-signer/ceremony.yaml --json")
        record = json.loads(again.stdout)
        assert record["changed"] is False
        assert {item["status"] for item in record["items"]} == {"exists"}
        a.run(
            "openssl verify -CAfile /etc/cacert-signer/ca/root.crt /etc/cacert-signer/ca/class3.crt"
        )


async def _webdb(path: Path, work) -> Any:
    """Run `work(db)` on the WebDB host's database (what the web application does)."""
    db = Database(DatabaseConfig(driver="sqlite", path=path))
    try:
        return await work(db)
    finally:
        await db.close()


def _server_row(web: Host, name: str) -> int:
    """A member asks for a server certificate (account.php), as the web application writes it."""

    async def ask(db) -> int:
        app = WebApplication(db, web.var / "www")
        if not await db.query("SELECT id FROM notary"):
            await app.assurance(1, 100)
            await app.domain(1, "example.org")
        domain = (await db.query("SELECT id FROM domains"))[0]["id"]
        return await app.server_certificate(domain, [name], rootcert=2, md="sha256")

    return asyncio.run(_webdb(web.var / "webdb.sqlite", ask))


def _revoke_row(web: Host, row_id: int) -> str:
    """A member revokes it (account.php); the certificate's serial, as openssl prints it."""

    async def revoke(db) -> str:
        await request_revocation(db, "domaincerts", row_id)
        rows = await db.query("SELECT serial FROM domaincerts WHERE id = ?", (row_id,))
        return str(rows[0]["serial"]).upper()

    return asyncio.run(_webdb(web.var / "webdb.sqlite", revoke))


CRL3 = "openssl crl -inform DER -in /var/lib/cacert-webdb/www/class3-revoke.crl -noout"
LATEST = "$(ls -t /var/backups/cacert-signer/*.tar | head -1)"


def test_runbook_backup_and_restore(ca, tmp_path):
    with machines(tmp_path, "a") as hosts:
        fast = {"min_interval_seconds": 0, "poll_seconds": 0.2}
        a, web = standalone(hosts, ca, crl=fast)
        kept = _server_row(web, "www.example.org")
        web.run(ONCE)
        made = a.run(
            "signer backup --config /etc/cacert-signer/signer.yaml "
            "--out /var/backups/cacert-signer/ --verify"
        )
        assert "written and verified" in made.stderr + made.stdout
        checked = a.run(f'signer backup verify "{LATEST}" --json')
        manifest = json.loads(checked.stdout)["manifest"]
        assert manifest["counts"]["certificates"] == 1
        # After the backup: a certificate issued, one revoked, CRLs published to the world.
        later = _server_row(web, "shop.example.org")
        web.run(ONCE)
        serial = _revoke_row(web, kept)
        web.run(ONCE)
        web.until(ONCE, lambda d: d.returncode == 0 and serial in web.run(f"{CRL3} -text").stdout)
        published = int(web.run(f"{CRL3} -crlnumber").stdout.split("=")[1], 16)
        # Every copy of the repository is lost.
        a.run("systemctl stop cacert-signer")
        a.run("rm -rf /var/lib/cacert-signer/repository")
        restored = a.run(f'signer restore --config /etc/cacert-signer/signer.yaml "{LATEST}"')
        floor = int(restored.stdout.split("CRLs of class3: the next is numbered ")[1].split()[0])
        assert floor > published
        a.run(f'signer restore --config /etc/cacert-signer/signer.yaml "{LATEST}"', code=1)
        a.run("systemctl start cacert-signer")
        web.until("signer client --port /dev/ttyUSB0 health", healthy)
        since = manifest["created"]  # the copy's time (the doc: minus an hour)
        reconcile = (
            "signer webdb-client --config /etc/cacert-signer/webdb-client.yaml --reconcile "
            f"--since {since}"
        )
        done = web.until(reconcile, lambda d: d.returncode == 0)
        assert done.stdout.rstrip().endswith("reconcile: ok")
        web.run(ONCE)
        crl = web.run(f"{CRL3} -text -crlnumber")
        assert int(crl.stdout.split("crlNumber=")[1].split()[0], 16) >= floor
        assert serial in crl.stdout  # the revocation after the backup is on the new CRL
        rows = asyncio.run(
            _webdb(web.var / "webdb.sqlite",
                   lambda db: db.query("SELECT crt_name FROM domaincerts WHERE id = ?", (later,)))
        )  # fmt: skip
        assert rows[0]["crt_name"]
