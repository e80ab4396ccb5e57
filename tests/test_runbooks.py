"""The runbooks of docs/operations.md, walked command by command as written there.

Each test is named in the runbook table of docs/operations.md, and each `$ command` of its
runbook appears below verbatim (tests/unit/test_runbook_table.py checks both). The hosts are
directories of this machine (tests/runbook_hosts.py): /etc/cacert-signer, /var/lib/cacert-signer
and the doc's replication addresses stand for the test's own; `systemctl start cacert-signer`
runs `signer serve` as the unit does.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from ceremony_ca import make_ceremony_ca
from runbook_hosts import BAUD, Host, Network, signer_yaml

from signer.tools.line_emulator import LineEmulator

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
    a.write_yaml("signer.yaml", signer_yaml(a, ca, {"self_address": "10.99.0.1:4321",
                                                    "peers": ["10.99.0.2:4321"]}))  # fmt: skip
    b.write_yaml("signer.yaml", signer_yaml(b, ca, {"self_address": "10.99.0.2:4321",
                                                    "peers": ["10.99.0.1:4321"]}))  # fmt: skip


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
    return next(line.split(": ", 1)[1] for line in done.stdout.splitlines()
                if line.startswith(f"{key}: "))  # fmt: skip


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
        c.write_yaml("signer.yaml", signer_yaml(c, ca, {
            "self_address": "10.99.0.3:4321", "peers": ["10.99.0.1:4321", "10.99.0.2:4321"]},
            hsm=False))  # fmt: skip
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


CSR = ("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout www.key "
       "-subj /CN=www.example.org -out req.pem")  # fmt: skip
SIGN = ("signer client --port /dev/ttyUSB0 sign-x509 --csr req.pem --profile server "
        "--san dns:www.example.org --out www.crt")  # fmt: skip


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
        c.write_yaml("signer.yaml", signer_yaml(c, ca, {"self_address": "10.99.0.3:4321",
                                                        "peers": ["10.99.0.1:4321"]}))  # fmt: skip
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
