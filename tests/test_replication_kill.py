"""kill -9 of either signer during a stream of issuances and revocations: each signer is a
process of its own (tests/raft_node.py: RaftLog + LMDB repository), killed and restarted with its
files. Afterwards every acknowledged operation is on both signers, no serial was issued twice,
and the repositories are identical."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from raft_cluster import FAST, ISSUER, assert_same_audit_logs, free_ports, issue, revoke

from storage import Command, Repository

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "tests" / "raft_node.py"

pytestmark = pytest.mark.timeout(180)


def as_map(command: Command) -> dict[str, Any]:
    """A command as raft_node.py takes it on stdin (then encoded there as the signer does)."""
    return {"op": command.op, **dataclasses.asdict(command)}


def wire(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {key: wire(item) for key, item in value.items()}
    return value


class Node:
    """One signer process; answers arrive on a shared queue as (node, message)."""

    def __init__(self, name: str, settings: dict[str, Any], base: Path, answers: queue.Queue):
        self.name = name
        self.settings = json.dumps(settings)
        self.repository = base / f"repo-{name}"
        self.log = base / f"{name}.log"
        self.answers = answers
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(NODE), self.settings, str(self.repository)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        ready = self.process.stdout.readline()  # type: ignore[union-attr]
        assert json.loads(ready) == {"ready": True}, ready
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            self.answers.put((self.name, json.loads(line)))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, request_id: int, command: dict[str, Any]) -> bool:
        try:
            line = json.dumps({"id": request_id, "command": wire(command)}) + "\n"
            self.process.stdin.write(line.encode())  # type: ignore[union-attr]
            self.process.stdin.flush()  # type: ignore[union-attr]
            return True
        except (BrokenPipeError, OSError):
            return False

    def ask_role(self, request_id: int) -> None:
        """The answer arrives on the queue like the others (see Stream.settle)."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": request_id, "status": 1}).encode() + b"\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


class Stream:
    """Issuances and revocations sent to live signers, several in flight; what was answered."""

    def __init__(self, nodes: dict[str, Node], answers: queue.Queue):
        self.nodes = nodes
        self.answers = answers
        self.next_id = 0
        self.commands: dict[int, dict[str, Any]] = {}
        self.in_flight: dict[int, str] = {}  # request id -> node
        self.acknowledged: dict[str, dict[str, Any]] = {}  # request_id -> result
        self.unsettled: dict[str, dict[str, Any]] = {}  # request_id -> command to retry
        self.roles: dict[str, str] = {}
        self.issued = 0
        self.refusals: dict[str, int] = {}

    def command(self) -> dict[str, Any]:
        n = self.next_id
        serials = [r["serial"] for k, r in self.acknowledged.items() if k.startswith("issue")]
        if n % 4 == 3 and serials:
            return as_map(revoke(n, serials[n % len(serials)]))
        self.issued += 1
        return as_map(issue(n))

    def send(self, node: Node, command: dict[str, Any]) -> None:
        self.next_id += 1
        self.commands[self.next_id] = command
        if node.send(self.next_id, command):
            self.in_flight[self.next_id] = node.name
        else:
            self.unsettled[command["request_id"]] = command

    def pump(self, seconds: float, depth: int = 4, interval: float = 0.01) -> None:
        """Keep up to `depth` requests in flight on each live node for `seconds`, at most one
        new request per node every `interval` (refusals come fast without quorum)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                busy = sum(1 for name in self.in_flight.values() if name == node.name)
                if node.alive and busy < depth:
                    self.send(node, self.command())
            self.drain(interval)

    def drain(self, timeout: float) -> None:
        try:
            while True:
                name, message = self.answers.get(timeout=timeout)
                self.settle(name, message)
                timeout = 0
        except queue.Empty:
            return

    def settle(self, name: str, message: dict[str, Any]) -> None:
        if "command" not in message and message.get("ok") and "role" in message["result"]:
            self.roles[name] = message["result"]["role"]
            return
        self.in_flight.pop(message["id"], None)
        command = self.commands[message["id"]]
        request_id = command["request_id"]
        if message["ok"]:
            result = message["result"]
            if result["status"] in ("issued", "revoked", "duplicate", "already_revoked"):
                self.acknowledged[request_id] = {
                    "serial": result["serial"],
                    "recorded": result["status"] != "already_revoked",  # not recorded by id
                }
                self.unsettled.pop(request_id, None)
                return
            raise AssertionError(f"unexpected result {result}")
        assert message["code"] in ("no_quorum", "not_committed"), message
        self.refusals[message["code"]] = self.refusals.get(message["code"], 0) + 1
        if request_id not in self.acknowledged:
            self.unsettled[request_id] = command

    def forget(self, node: Node) -> None:
        """Requests in flight on a killed node have unknown outcomes: retry them later."""
        for request_id, name in list(self.in_flight.items()):
            if name == node.name:
                del self.in_flight[request_id]
                command = self.commands[request_id]
                self.unsettled[command["request_id"]] = command

    def leader(self) -> str:
        self.roles.clear()
        for node in self.nodes.values():
            if node.alive:
                self.next_id += 1
                self.commands[self.next_id] = {}
                node.ask_role(self.next_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.drain(0.05)
            leaders = [name for name, role in self.roles.items() if role == "leader"]
            if leaders:
                return leaders[0]
            if len(self.roles) == len(self.nodes):
                self.roles.clear()
                time.sleep(0.1)
                return self.leader()
        raise AssertionError("no leader")

    def retry_unsettled(self, timeout: float = 60, depth: int = 8) -> None:
        """Retry every unknown outcome with its request id (as the WebDB client does), a few at
        a time, until each one is acknowledged."""
        deadline = time.monotonic() + timeout
        while self.unsettled or self.in_flight:
            assert time.monotonic() < deadline, f"unsettled: {list(self.unsettled)[:5]}"
            for request_id, command in list(self.unsettled.items())[: depth - len(self.in_flight)]:
                retry = dict(command)
                if retry["op"] == "issue_x509":
                    retry["serial"] = command["serial"] + 2**120  # a retry decides a new serial
                del self.unsettled[request_id]
                live = [n for n in self.nodes.values() if n.alive]
                self.send(live[self.next_id % len(live)], retry)
            self.drain(0.1)


def test_kill_either_signer_during_a_stream(tmp_path):
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    answers: queue.Queue = queue.Queue()
    nodes = {}
    for index, address in enumerate(addresses):
        settings = {
            **FAST,
            "self_address": address,
            "peers": [a for a in addresses if a != address],
            "secret_env": "UNUSED",
            "journal_dir": str(tmp_path / f"journal-{index}"),
            "snapshot_every_entries": 150,
        }
        nodes[address] = Node(address, settings, tmp_path, answers)
    for node in nodes.values():
        node.start()
    stream = Stream(nodes, answers)
    try:
        stream.pump(2.0)
        for victim_role in ("leader", "follower"):
            leader = stream.leader()
            victim = (
                nodes[leader]
                if victim_role == "leader"
                else next(n for a, n in nodes.items() if a != leader)
            )
            victim.kill()
            stream.forget(victim)
            stream.pump(1.5)  # the survivor alone: refusals, fast
            victim.start()
            stream.pump(2.0)
        stream.retry_unsettled()
    finally:
        for node in nodes.values():
            node.stop()
    print(f"acknowledged {len(stream.acknowledged)}, refusals {stream.refusals}")
    assert stream.refusals.get("no_quorum", 0) > 0  # quorum was really lost, and said so
    repos = [Repository(node.repository, 1 << 30) for node in nodes.values()]
    try:
        assert len(repos[0].content_digest() and {r.content_digest() for r in repos}) == 1
        assert_same_audit_logs(repos)  # one audit log, record for record
        assert repos[0].audit_size() >= len(stream.acknowledged)
        for repo in repos:
            assert repo.check_consistency().ok
            for request_id, result in stream.acknowledged.items():
                if not result["recorded"]:  # already_revoked: the certificate is revoked
                    cert = repo.get_certificate(ISSUER, result["serial"])
                    assert cert is not None and cert["revocation"] is not None
                    continue
                recorded = repo.get_request(request_id)
                assert recorded is not None, f"acknowledged {request_id} lost"
                assert recorded.result.serial == result["serial"]
        issued = [k for k in stream.acknowledged if k.startswith("issue")]
        # every issue request recorded exactly once: no serial issued twice
        assert repos[0].counts()["certificates"] == len(issued)
        revoked = [k for k in stream.acknowledged if k.startswith("revoke")]
        assert revoked and repos[0].counts()["revoked"] >= 1
    finally:
        for repo in repos:
            repo.close()
