"""Machines for the runbook tests (tests/test_runbooks.py): each runbook of docs/operations.md is
walked with its own commands, as written there, on "hosts" that are directories of this machine.

A `Host` has its /etc/cacert-signer, /var/lib/cacert-signer and /var/backups/cacert-signer
(directories of the test), its serial line (a line emulator), and the replication addresses of
the doc (10.99.0.N:4321) stand for ports on 127.0.0.1. `run("signer cluster --config
/etc/cacert-signer/signer.yaml status")` runs that command with those paths; `systemctl start
cacert-signer` starts `signer serve` as the unit does.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from raft_cluster import FAST, free_ports

from signer.tools.line_emulator import LineEmulator

ROOT = Path(__file__).resolve().parent.parent
BAUD = 921600
ADDRESSES = ("10.99.0.1:4321", "10.99.0.2:4321", "10.99.0.3:4321")
SHELL = ("|", ">", "&&", "$(")


class Network:
    """The replication link's addresses of the doc, as ports of 127.0.0.1."""

    def __init__(self) -> None:
        ports = free_ports(len(ADDRESSES))
        self.map = {doc: f"127.0.0.1:{port}" for doc, port in zip(ADDRESSES, ports, strict=True)}

    def address(self, doc: str) -> str:
        return self.map[doc]


class Host:
    """One machine of a runbook: a signer host (with its serial line) or the WebDB host."""

    def __init__(self, base: Path, name: str, network: Network, line: LineEmulator | None = None):
        self.name = name
        self.root = base / name
        self.etc = self.root / "etc"
        self.var = self.root / "var"
        self.backups = self.root / "backups"
        for directory in (self.etc, self.var, self.backups):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.network = network
        self.line = line
        self.serial: dict[str, Path] = {}  # the WebDB host's /dev/ttyUSB0, /dev/ttyUSB1
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.root / "signer.log"

    def substitute(self, command: str) -> str:
        subs = {
            "/etc/cacert-signer": str(self.etc),
            "/var/lib/cacert-signer": str(self.var),
            "/var/lib/cacert-webdb": str(self.var),
            "/var/backups/cacert-signer": str(self.backups),
            **{device: str(path) for device, path in self.serial.items()},
            **self.network.map,
        }
        for doc, here in subs.items():
            command = command.replace(doc, here)
        return command

    def substitute_back(self, text: str) -> str:
        """Output as the doc shows it: the doc's addresses and paths."""
        for doc, here in self.network.map.items():
            text = text.replace(here, doc)
        for device, path in self.serial.items():
            text = text.replace(str(path), device)
        for doc, here in (("/etc/cacert-signer", self.etc), ("/var/lib/cacert-signer", self.var)):
            text = text.replace(str(here), doc)
        return text

    def run(self, command: str, code: int | None = 0, timeout: float = 120) -> Any:
        """One command of a runbook, as written there; its exit code checked (None: any)."""
        if command.startswith("systemctl "):
            return self.systemctl(command)
        text = self.substitute(command)
        if any(mark in text for mark in SHELL):
            argv = [
                "bash",
                "-c",
                text.replace("signer ", f"{sys.executable} -m signer ", 1)
                if text.startswith("signer ")
                else text,
            ]
        else:
            argv = shlex.split(text)
            if argv[0] == "signer":
                argv = [sys.executable, "-m", "signer", *argv[1:]]
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=self.root, timeout=timeout, check=False
        )
        if code is not None:
            assert done.returncode == code, (
                f"{self.name}$ {command}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def until(self, command: str, holds: Callable[[Any], bool], timeout: float = 60) -> Any:
        """Run the command again until its output shows what the runbook expects."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.run(command, code=None)
            if holds(done):
                return done
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}$ {command}: not as expected within {timeout} s"
                    f"\n{done.stdout}\n{done.stderr}\n{self.tail()}"
                )
            time.sleep(0.3)

    # -- the service ------------------------------------------------------------------------

    def systemctl(self, command: str) -> None:
        verb, unit = command.split()[1:3]
        assert unit == "cacert-signer", f"no such unit in the tests: {unit}"
        if verb in ("stop", "restart"):
            self.stop()
        if verb in ("start", "restart"):
            self.start()

    def start(self) -> None:
        """`signer serve --config /etc/cacert-signer/signer.yaml`, as the unit starts it."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "signer",
                    "serve",
                    "--config",
                    str(self.etc / "signer.yaml"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def stop(self, how: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(how)
        code = self.process.wait(timeout=60)
        self.process = None
        return code

    def power_off(self) -> None:
        """Fencing a signer: it stops at once and never runs again as it is."""
        self.stop(signal.SIGKILL)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    # -- configuration ----------------------------------------------------------------------

    def write_yaml(self, name: str, value: dict[str, Any]) -> Path:
        path = self.etc / name
        path.write_text(yaml.safe_dump(value, sort_keys=False))
        return path


def signer_yaml(
    host: Host,
    ca: tuple[Path, Any],
    replication: dict[str, Any] | None,
    hsm: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """/etc/cacert-signer/signer.yaml as config/signer-a.yaml has it (this host's paths, the
    test token, fast Raft timings); `hsm=False`: a third voter (stores and votes only)."""
    base, token = ca
    assert host.line is not None
    config: dict[str, Any] = {
        "link": {"device": str(host.line.end_a), "baudrate": BAUD, "reopen_interval": 0.1},
        "log_level": "INFO",
        "repository": {"path": "/var/lib/cacert-signer/repository"},
    }
    if hsm:
        pin = host.etc / "hsm.pin"
        fd = os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token.pin + "\n")
        config |= {
            "hsm": {
                "module": token.store.module,
                "token_label": token.label,
                "pin_file": "/etc/cacert-signer/hsm.pin",
            },
            "profiles": "cacert",
            "issuers": extra.pop("issuers", None)
            or {
                "class1": {"certificate": str(base / "ca" / "class1.crt"), "key": "root"},
                "class3": {"certificate": str(base / "ca" / "class3.crt"), "key": "class3"},
            },
        }
    if replication is not None:
        config["replication"] = {
            "secret_file": "/etc/cacert-signer/replication.secret",
            "journal_dir": "/var/lib/cacert-signer/raft",
            **FAST,
            **replication,
        }
    config |= extra
    text = yaml.safe_dump(config, sort_keys=False)
    return yaml.safe_load(host.substitute(text))


def webdb_yaml(web: Host) -> dict[str, Any]:
    """/etc/cacert-signer/webdb-client.yaml on the WebDB host: SQLite for the WebDB, one line."""
    config = {
        "database": {"driver": "sqlite", "path": "/var/lib/cacert-webdb/webdb.sqlite"},
        "base_dir": "/var/lib/cacert-webdb/www",
        "lines": [{"device": "/dev/ttyUSB0", "baudrate": BAUD, "reopen_interval": 0.1}],
        "timeout": 3,
        "attempts": 2,
        "crl": {
            "outputs": {
                "class1": "/var/lib/cacert-webdb/www/revoke.crl",
                "class3": "/var/lib/cacert-webdb/www/class3-revoke.crl",
            }
        },
        "monitoring": {"metrics_file": "/var/lib/cacert-webdb/metrics/cacert-signer.prom"},
    }
    (web.var / "www").mkdir(exist_ok=True)
    return yaml.safe_load(web.substitute(yaml.safe_dump(config, sort_keys=False)))


def ceremony_yaml(host: Host, token: Any, class3_days: int = 3000) -> dict[str, Any]:
    """/etc/cacert-signer/ceremony.yaml as config/ceremony.yaml has it (smaller keys)."""
    pin = host.etc / "hsm.pin"
    fd = os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token.pin + "\n")
    subject = [["O", "CAcert Inc."], ["OU", "http://www.CAcert.org"]]
    config = {
        "hsm": {
            "module": token.store.module,
            "token_label": token.label,
            "pin_file": "/etc/cacert-signer/hsm.pin",
        },
        "output_dir": "/etc/cacert-signer/ca",
        "keys": [
            {"label": "cacert-root", "kind": "ec-p256"},
            {"label": "cacert-class3", "kind": "ec-p256"},
        ],
        "certificates": [
            {
                "name": "root",
                "key": "cacert-root",
                "issuer": "self",
                "validity_days": 7305,
                "path_length": 1,
                "subject": [*subject, ["CN", "CAcert Class 1 Root"]],
                "crl": {"next_update_days": 7, "url": "http://crl.cacert.org/revoke.crl"},
            },
            {
                "name": "class3",
                "key": "cacert-class3",
                "issuer": "root",
                "validity_days": class3_days,
                "path_length": 0,
                "subject": [*subject, ["CN", "CAcert Class 3 Root"]],
                "crl": {"next_update_days": 7, "url": "http://crl.cacert.org/class3-revoke.crl"},
            },
        ],
    }
    return yaml.safe_load(host.substitute(yaml.safe_dump(config, sort_keys=False)))


CEREMONY_ISSUERS = {
    "class1": {"certificate": "/etc/cacert-signer/ca/root.crt", "key": "cacert-root"},
    "class3": {"certificate": "/etc/cacert-signer/ca/class3.crt", "key": "cacert-class3"},
}
