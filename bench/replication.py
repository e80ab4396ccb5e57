"""Replication: what Raft between two signers costs, and how fast a wiped signer catches up.

Measured in one run, side by side (the shared VM's speed drifts: compare the ratios):

1. Commit latency of the log alone (a 1.5 KB command, one at a time): the unreplicated
   LocalLog (LMDB, sync on) against RaftLog on the leader and on the follower, and RaftLog with
   the journal's fdatasync switched off (the price of "on disk on both before the answer").
   The physical bound beside it: two journal fdatasyncs (one per signer) and one LMDB commit
   as the replicated signer makes it (one fdatasync), this disk probed between the rounds of
   the leader's commits (the bound of the same moments). The barrier is what a writer pays
   before deciding (on a pair's leader: a local read, no log entry). Then where a leader's
   commit goes: the p50 of each step, timestamped on the leader.
2. Issuance through the CA service, as served (barrier, plan, serial, SoftHSM2 signature,
   commit): one at a time (latency) and 8 in flight (throughput), unreplicated against
   replicated; interleaved rounds, medians.
3. Catch-up of a wiped signer: a repository of N small fake certificates (100k; 1M in the full
   run), the other signer wiped and started: time until its repository is identical (snapshot
   built, sent in chunks, restored, log tail applied), and the longest turn of either Raft loop
   meanwhile (it must stay under the election timeout, or the pair would flap).
4. (full run) A snapshot built while commits run on the 1M repository: longest Raft loop turn
   and commit latency during the build.

Run: python bench/replication.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent

# bench/replication.py shadows the `replication` package in this folder, which Python puts first
# on sys.path for a script: take the folder off (nothing is added; the venv has the project).
sys.path.remove(str(Path(__file__).resolve().parent))

from replication import journal as journal_module
from replication.errors import ReplicationError
from replication.log import LocalLog
from replication.raft import RaftLog
from replication.settings import ReplicationSettings
from signer.pki.profiles import load_profiles
from signer.server.ca import CertificateAuthority, Issuer
from signer.server.dispatch import RequestContext
from signer.server.hsm import Hsm, HsmSettings
from signer.tools.ceremony import run_ceremony
from signer.tools.softhsm import find_softhsm_module, new_token
from signer.wire.protocol import SignX509Args, request_digest
from storage import IssueX509, Repository, Result, encode

SECRET = b"test replication secret 0123456789"  # as tests/raft_node.py (the peer) uses
ISSUER_ID = bytes(range(20))
MAP_SIZE = 8 << 30


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(n: int, size: int = 1500, request_id: str | None = None) -> bytes:
    """The log entry of an issuance, encoded as the CA commits it."""
    return encode(
        IssueX509(
            request_id=request_id or f"bench-{n}",
            request_digest=b"d" * 32,
            issuer=ISSUER_ID,
            serial=2**140 + n,
            der=os.urandom(size),
            profile="server",
            not_before=1_700_000_000,
            not_after=1_800_000_000,
            issued_at=1_700_000_000,
        )
    )


# --------------------------------------------------------------------------- physical bound


class DiskProbe:
    """The physical bound: an fdatasync of a 1.7 KB append and an LMDB commit of one 1.5 KB
    command as the replicated signer commits it (one fdatasync, the meta page unsynced;
    docs/repository.md section 2). Sampled between the rounds of the leader's commits, since
    this VM's disk drifts within a run: the bound is the disk of the same moments."""

    def __init__(self, base: Path):
        self.fd = os.open(base / "sync-probe", os.O_RDWR | os.O_CREAT, 0o600)
        self.repository = Repository(base / "lmdb-probe", MAP_SIZE, metasync=False)
        self.syncs: list[float] = []
        self.commits: list[float] = []

    def sample(self, count: int) -> None:
        for _ in range(count):
            n = len(self.syncs)
            began = time.perf_counter()
            os.pwrite(self.fd, b"x" * 1700, n * 1700)
            os.fdatasync(self.fd)
            self.syncs.append(time.perf_counter() - began)
            began = time.perf_counter()
            self.repository.apply(n + 1, command(n))
            self.commits.append(time.perf_counter() - began)

    @property
    def fsync_ms(self) -> float:
        return statistics.median(self.syncs) * 1000

    @property
    def lmdb_ms(self) -> float:
        return statistics.median(self.commits) * 1000

    @property
    def bound_ms(self) -> float:
        """Two journal fdatasyncs (one per signer) and one LMDB commit."""
        return 2 * self.fsync_ms + self.lmdb_ms

    def close(self) -> None:
        os.close(self.fd)
        self.repository.close()


# --------------------------------------------------------------------------- clusters


class Remote:
    """The other signer, a process of its own (tests/raft_node.py): no GIL shared with us."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.next_id = 0

    @classmethod
    async def start(cls, settings: ReplicationSettings, repository: Path) -> Remote:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "tests" / "raft_node.py"),
            settings.model_dump_json(),
            str(repository),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=open(repository.with_suffix(".log"), "ab"),  # noqa: SIM115 (the child's)
            limit=1 << 20,
        )
        assert process.stdout is not None
        await process.stdout.readline()  # {"ready": true}
        return cls(process)

    async def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.next_id += 1
        self.process.stdin.write(json.dumps({"id": self.next_id, **request}).encode() + b"\n")
        await self.process.stdin.drain()
        while True:
            answer = json.loads(await self.process.stdout.readline())
            if answer.get("id") == self.next_id:
                return dict(answer["result"])

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


class Pair:
    """This process's signer (index 0) and the other one in its own process (index 1),
    production timings, on 127.0.0.1."""

    def __init__(self, base: Path, **overrides: Any):
        self.base = base
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        self.overrides = overrides
        self.local: RaftLog[Result] | None = None
        self.repository: Repository | None = None
        self.remote: Remote | None = None

    def settings(self, index: int) -> ReplicationSettings:
        address = self.addresses[index]
        return ReplicationSettings(
            self_address=address,
            peers=[a for a in self.addresses if a != address],
            secret_env="UNUSED",
            journal_dir=self.base / f"raft-{index}",
            **self.overrides,
        )

    def start_local(self) -> RaftLog[Result]:
        self.repository = Repository(self.base / "repo-0", MAP_SIZE, metasync=False)
        self.local = RaftLog(self.settings(0), self.repository, secret=SECRET).start()
        return self.local

    async def start_remote(self) -> Remote:
        self.remote = await Remote.start(self.settings(1), self.base / "repo-1")
        return self.remote

    @classmethod
    async def running(cls, base: Path, **overrides: Any) -> Pair:
        pair = cls(base, **overrides)
        pair.start_local()
        await pair.start_remote()
        await pair.ready()
        return pair

    async def ready(self) -> None:
        """Until a barrier passes (elections, a catch-up in progress: retry)."""
        assert self.local is not None
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.local.barrier()
                return
            except ReplicationError:
                if time.monotonic() > deadline:
                    raise SystemExit("no leader elected") from None
                await asyncio.sleep(0.1)

    async def make_local(self, role: str) -> None:
        """Move leadership so that this process's signer has `role`."""
        assert self.local is not None and self.remote is not None
        for _ in range(20):
            if self.local.view.role == role:
                await self.local.barrier()
                return
            if self.local.view.role == "leader":
                await self.local.transfer_leadership()
            else:
                await self.remote.ask(transfer=1)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.local.view.role != role:
                await asyncio.sleep(0.02)
            await self.ready()
        raise SystemExit(f"could not make this signer the {role}")

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()
        if self.local is not None:
            self.local.close()
        if self.repository is not None:
            self.repository.close()


async def sequential(call: Callable[[int], Awaitable[Any]], count: int, start: int) -> list[float]:
    times = []
    for n in range(start, start + count):
        began = time.perf_counter()
        await call(n)
        times.append(time.perf_counter() - began)
    return times


# --------------------------------------------------------------------------- 1. commits


async def commit_latency(base: Path, count: int, probe: DiskProbe) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    local_repo = Repository(base / "local", MAP_SIZE)
    local = LocalLog(local_repo)
    results["LocalLog (unreplicated)"] = await sequential(
        lambda n: local.commit(command(n)), count, 0
    )
    local.close()
    local_repo.close()
    pair = await Pair.running(base / "pair")
    raft = pair.local
    assert raft is not None
    await pair.make_local("leader")
    leader: list[float] = []
    rounds = 5
    for r in range(rounds):  # the disk probed between rounds: the bound of the same moments
        probe.sample(20)
        leader += await sequential(
            lambda n: raft.commit(command(n)), count // rounds, 10_000 + r * count
        )
    probe.sample(20)
    results["RaftLog, on the leader"] = leader
    results["barrier (no repository write)"] = await sequential(lambda n: raft.barrier(), count, 0)
    await pair.make_local("follower")
    results["RaftLog, on the follower"] = await sequential(
        lambda n: raft.commit(command(n)), count, 20_000
    )
    await pair.close()
    original = journal_module._fdatasync
    journal_module._fdatasync = lambda _fd: None  # what the fdatasync costs is what this measures
    try:  # (only this process's journal skips its fdatasync: the leader's, one of the two)
        unsynced = await Pair.running(base / "unsynced")
        await unsynced.make_local("leader")
        raft = unsynced.local
        assert raft is not None
        results["RaftLog, leader, its journal not synced"] = await sequential(
            lambda n: raft.commit(command(n)), count, 30_000
        )
        await unsynced.close()
    finally:
        journal_module._fdatasync = original
    return results


# --------------------------------------------------------------------------- 1b. timeline

TIMELINE_STEPS = (
    ("event loop -> Raft thread wakes", "proposed", "woke"),
    ("append out (journal write, pickle, seal, send)", "woke", "append_sent"),
    ("the leader's journal fdatasync (overlapped)", "fsync_start", "fsync_end"),
    ("follower: receipt, append, fdatasync, ack", "append_sent", "ack"),
    ("both durable -> apply starts", "durable", "apply_start"),
    ("apply: LMDB transaction and its fdatasync", "apply_start", "apply_end"),
    ("applied -> event loop resumes", "apply_end", "answered"),
)


class Timeline:
    """Timestamps of the steps of each commit on the leader, taken by wrapping the functions
    that do them (this process only: the follower's share is one step, seen from here)."""

    def __init__(self) -> None:
        self.marks: dict[str, list[float]] = {}
        self.on = False

    def mark(self, name: str) -> None:
        if self.on:
            self.marks.setdefault(name, []).append(time.perf_counter())

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from pysyncobj.poller import PollPoller

        from replication.pysyncobj_adapter import TransportBase, carries_entries, is_success_ack
        from replication.transport import ReplicationTransport

        sync, apply = journal_module._fdatasync, Repository.apply_batch
        poll, send = PollPoller.poll, TransportBase.raft_send
        receive = ReplicationTransport.on_message

        def timed_sync(fd: int) -> None:
            self.mark("fsync_start")
            sync(fd)
            self.mark("fsync_end")

        def timed_apply(repository: Repository, commands: Any) -> Any:
            self.mark("apply_start")
            try:
                return apply(repository, commands)
            finally:
                self.mark("apply_end")

        def timed_poll(poller: Any, timeout: float) -> Any:
            events = poll(poller, timeout)
            self.mark("woke")
            return events

        def timed_send(transport: Any, node: Any, message: Any) -> bool:
            sent = send(transport, node, message)
            if carries_entries(message):
                self.mark("append_sent")
            return sent

        def timed_receive(transport: Any, node: Any, message: Any) -> None:
            if is_success_ack(message):
                self.mark("ack")
            receive(transport, node, message)

        patches = [
            (journal_module, "_fdatasync", timed_sync),
            (Repository, "apply_batch", timed_apply),
            (PollPoller, "poll", timed_poll),
            (TransportBase, "raft_send", timed_send),
            (ReplicationTransport, "on_message", timed_receive),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    def steps(self, proposed: float, answered: float) -> dict[str, float] | None:
        """One commit's step durations (s), or None if a step is missing in its window."""
        at = {"proposed": proposed, "answered": answered}
        previous = proposed
        for name in ("woke", "append_sent", "fsync_start", "fsync_end"):
            at[name] = previous = self._first(name, previous, answered)
        at["ack"] = self._first("ack", at["append_sent"], answered)
        at["durable"] = max(at["ack"], at["fsync_end"])
        at["apply_start"] = self._first("apply_start", at["durable"], answered)
        at["apply_end"] = self._first("apply_end", at["apply_start"], answered)
        if any(math.isnan(value) for value in at.values()):  # a step not seen in the window
            return None
        return {label: at[end] - at[start] for label, start, end in TIMELINE_STEPS}

    def _first(self, name: str, after: float, before: float) -> float:
        times = self.marks.get(name, [])
        i = bisect.bisect_right(times, after)
        return times[i] if i < len(times) and times[i] < before else float("nan")


async def leader_timeline(base: Path, count: int) -> dict[str, list[float]]:
    """Where a leader's commit goes: the p50 of each step over `count` sequential commits."""
    timeline = Timeline()
    steps: dict[str, list[float]] = {label: [] for label, _, _ in TIMELINE_STEPS}
    with timeline.installed():
        pair = await Pair.running(base / "timeline")
        try:
            raft = pair.local
            assert raft is not None
            await pair.make_local("leader")
            await sequential(lambda n: raft.commit(command(n)), 50, 40_000)  # warm
            timeline.on = True
            for n in range(50_000, 50_000 + count):
                entry = command(n)
                proposed = time.perf_counter()
                await raft.commit(entry)
                one = timeline.steps(proposed, time.perf_counter())
                for label, seconds in (one or {}).items():
                    steps[label].append(seconds)
        finally:
            timeline.on = False
            await pair.close()
    return steps


# --------------------------------------------------------------------------- 2. issuance


def make_ca(base: Path) -> tuple[HsmSettings, Path]:
    module = find_softhsm_module()
    if module is None:
        raise SystemExit("SoftHSM2 is not installed (apt install softhsm2)")
    conf, pin_file = new_token(base / "softhsm", "bench")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    settings = HsmSettings(module=module, token_label="bench", pin_file=pin_file)
    config = {
        "hsm": settings.model_dump(mode="json", exclude_none=True),
        "output_dir": str(base / "ca"),
        "keys": [{"label": "class3", "kind": "ec-p256"}],
        "certificates": [
            {
                "name": "class3",
                "key": "class3",
                "validity_days": 3650,
                "path_length": 0,
                "subject": [["O", "Bench CA"], ["CN", "Bench class3"]],
            }
        ],
    }
    (base / "ceremony.yaml").write_text(yaml.safe_dump(config))
    run_ceremony(base / "ceremony.yaml", progress=lambda *_: None)
    return settings, base / "ca" / "class3.crt"


def make_csrs(count: int) -> list[bytes]:
    csrs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"host{i}.example.org")])
        request = x509.CertificateSigningRequestBuilder().subject_name(name)
        csrs.append(request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    return csrs


class Issuing:
    """sign_x509 as served: through the barrier when replicated."""

    def __init__(
        self, name: str, ca: CertificateAuthority, raft: RaftLog | None, csrs: list[bytes]
    ):
        self.name = name
        self.handler = raft.guard(ca.sign_x509) if raft is not None else ca.sign_x509
        self.csrs = csrs
        self.sent = 0

    async def sign(self, _n: int = 0) -> None:
        n = self.sent
        self.sent += 1
        name = f"host{n % len(self.csrs)}.example.org"
        raw = {"profile": "server", "csr": self.csrs[n % len(self.csrs)], "sans": [["dns", name]]}
        ctx = RequestContext(f"{self.name}:{n}", "sign_x509", request_digest("sign_x509", raw))
        await self.handler(SignX509Args.model_validate(raw), ctx)

    async def rate(self, seconds: float, window: int = 8) -> float:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await self.sign()
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(window)))
        return done / (time.perf_counter() - began)


async def issuance(base: Path, rounds: int, seconds: float, latency_count: int) -> dict[str, Any]:
    hsm_settings, certificate = make_ca(base)
    hsm = Hsm(hsm_settings)
    profiles = load_profiles("cacert")
    issuer = Issuer.load("class3", certificate, "class3")
    csrs = make_csrs(64)
    local_repo = Repository(base / "ca-local", MAP_SIZE)
    local_log = LocalLog(local_repo)
    local = Issuing("local", CertificateAuthority([issuer], profiles, hsm, local_repo, local_log),
                    None, csrs)  # fmt: skip
    pair = await Pair.running(base / "ca-pair")
    await pair.make_local("leader")
    leader, repo = pair.local, pair.repository
    assert leader is not None and repo is not None
    replicated = Issuing(
        "pair", CertificateAuthority([issuer], profiles, hsm, repo, leader), leader, csrs
    )
    out: dict[str, Any] = {"latency": {}, "rate": {"unreplicated": [], "replicated": []}}
    await local.sign()
    await replicated.sign()
    for name in ("unreplicated", "replicated"):
        out["latency"][name] = []
    for _ in range(rounds):
        for name, run in (("unreplicated", local), ("replicated", replicated)):
            out["latency"][name] += await sequential(run.sign, latency_count // rounds, 0)
            out["rate"][name].append(await run.rate(seconds))
    await pair.close()
    local_log.close()
    local_repo.close()
    hsm.close()
    return out


# --------------------------------------------------------------------------- 3. catch-up


def fill(repository: Repository, count: int, say: Callable[[str], None]) -> float:
    """`count` small fake certificates in batches (one transaction each): fast to build."""
    began = time.perf_counter()
    batch = 10_000
    for start in range(0, count, batch):
        items = []
        for n in range(start, min(count, start + batch)):
            items.append((n + 1, command(n, size=200, request_id=f"fill-{n}")))
        repository.apply_batch(items)
    took = time.perf_counter() - began
    say(f"  filled {count} certificates in {took:.1f} s")
    return took


async def catch_up(base: Path, count: int, say: Callable[[str], None]) -> dict[str, Any]:
    """This signer holds `count` certificates; the other one starts empty (wiped)."""
    pair = Pair(base / f"catchup-{count}", snapshot_every_entries=1000)
    seed = Repository(pair.base / "repo-0", MAP_SIZE)
    fill(seed, count, say)
    seed.close()
    began = time.perf_counter()
    local = pair.start_local()  # its repository becomes the start of the log: a snapshot first
    build = time.perf_counter() - began
    size = local.last_snapshot.size if local.last_snapshot else 0
    began = time.perf_counter()
    remote = await pair.start_remote()
    while True:
        status = await remote.ask(status=1)
        if status["repository_index"] >= count and status["applied_index"] >= count:
            break
        if time.perf_counter() - began > 3600:
            raise SystemExit("catch-up did not finish")
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - began
    await pair.ready()
    target = local.view.applied_index
    while (status := await remote.ask(status=1, digest=1))["applied_index"] < target:
        await asyncio.sleep(0.02)
    assert pair.repository is not None
    identical = status.get("digest") == pair.repository.content_digest().hex()
    result = {
        "count": count,
        "seconds": seconds,
        "snapshot_mb": size / 1e6,
        "build_s": build,
        "identical": identical,
        "max_loop_ms": max(local.max_loop * 1000, status["max_loop_ms"]),
        "election_ms": pair.settings(0).election_min_timeout * 1000,
    }
    if count >= 1_000_000:
        result["during_snapshot"] = await snapshot_under_load(pair)
    await pair.close()
    shutil.rmtree(pair.base, ignore_errors=True)
    return result


async def snapshot_under_load(pair: Pair) -> dict[str, float]:
    """Commit one at a time across a snapshot of the large repository on both signers."""
    local, remote = pair.local, pair.remote
    assert local is not None and remote is not None
    await pair.make_local("leader")
    local.max_loop = 0.0
    before = local.last_snapshot.created if local.last_snapshot else 0.0
    times = []
    n = 5_000_000
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        began = time.perf_counter()
        await local.commit(command(n))
        times.append(time.perf_counter() - began)
        n += 1
        built = local.last_snapshot.created if local.last_snapshot else 0.0
        if built > before and len(times) > 1100:
            break
    status = await remote.ask(status=1)
    return {
        "commits": len(times),
        "p50_ms": percentile(times, 0.5) * 1000,
        "p99_ms": percentile(times, 0.99) * 1000,
        "max_loop_ms": max(local.max_loop * 1000, status["max_loop_ms"]),
        "build_s": local.snapshot_seconds or 0.0,
    }


# --------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under a minute: 100k catch-up only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s: %(message)s")
    base = Path(tempfile.mkdtemp(prefix="bench-replication-"))
    try:
        asyncio.run(run(base, args.quick))
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def run(base: Path, quick: bool) -> None:
    count = 150 if quick else 500
    probe = DiskProbe(base)
    try:
        latencies = await commit_latency(base, count, probe)
    finally:
        probe.close()
    bound = probe.bound_ms
    print(
        f"disk here, between the leader's rounds: fdatasync of an append {probe.fsync_ms:.2f} "
        f"ms, LMDB commit {probe.lmdb_ms:.2f} ms ({len(probe.syncs)} of each)"
    )
    print("\n1. Commit latency, one at a time (1.5 KB command), ms")
    print(f"{'log':40} {'p50':>8} {'p99':>8} {'vs bound':>9}")
    for name, times in latencies.items():
        p50, p99 = percentile(times, 0.5) * 1000, percentile(times, 0.99) * 1000
        print(f"{name:40} {p50:8.2f} {p99:8.2f} {p50 / bound:9.2f}")
    print(f"{'bound: 2 journal fdatasync + LMDB commit':40} {bound:8.2f}")
    leader = latencies["RaftLog, on the leader"]
    p50_ms, p99_ms = percentile(leader, 0.5) * 1000, percentile(leader, 0.99) * 1000
    local_ms = percentile(latencies["LocalLog (unreplicated)"], 0.5) * 1000
    unsynced = percentile(latencies["RaftLog, leader, its journal not synced"], 0.5) * 1000
    print(f"the leader's journal fdatasync costs {p50_ms - unsynced:.2f} ms per commit at p50")
    print("\n1b. Where a commit on the leader goes (p50 of each step, a pair of its own), ms")
    steps = await leader_timeline(base, count)
    for label, times in steps.items():
        print(f"  {label:48} {statistics.median(times) * 1000 if times else math.nan:6.3f}")
    print(f"  ({len(steps[TIMELINE_STEPS[0][0]])} of {count} commits with every step seen)")
    overhead = p50_ms / local_ms

    rounds, seconds = (3, 0.6) if quick else (6, 1.5)
    print("\n2. Issuance through the CA service (SoftHSM2 P-256 key), as served")
    result = await issuance(base, rounds, seconds, 60 if quick else 150)
    lat = {k: statistics.median(v) * 1000 for k, v in result["latency"].items()}
    rate = {k: statistics.median(v) for k, v in result["rate"].items()}
    print(f"{'':14} {'latency p50 ms':>15} {'p99 ms':>8} {'certs/s (8 in flight)':>22}")
    for name in ("unreplicated", "replicated"):
        p99 = percentile(result["latency"][name], 0.99) * 1000
        print(f"{name:14} {lat[name]:15.2f} {p99:8.2f} {rate[name]:22.1f}")
    throughput = rate["replicated"] / rate["unreplicated"]
    print(f"replicated/unreplicated: latency x{lat['replicated'] / lat['unreplicated']:.2f}, "
          f"throughput x{throughput:.2f}")  # fmt: skip

    print("\n3. Catch-up of a wiped signer (snapshot + log), small fake certificates")
    sizes = [100_000] if quick else [100_000, 1_000_000]
    catchups = {}
    for size in sizes:
        outcome = await catch_up(base, size, print)
        catchups[size] = outcome
        print(
            f"  {size:>9} certs: {outcome['seconds']:.1f} s to identical={outcome['identical']}, "
            f"snapshot {outcome['snapshot_mb']:.0f} MB built in {outcome['build_s']:.1f} s, "
            f"longest Raft loop turn {outcome['max_loop_ms']:.0f} ms "
            f"(election timeout {outcome['election_ms']:.0f} ms)"
        )
        if "during_snapshot" in outcome:
            during = outcome["during_snapshot"]
            print(
                f"  snapshot of the 1M repository while committing: {during['commits']} commits, "
                f"p50 {during['p50_ms']:.1f} ms, p99 {during['p99_ms']:.1f} ms, longest loop "
                f"turn {during['max_loop_ms']:.0f} ms, build {during['build_s']:.1f} s"
            )
    print("\nGoals (issue 14)")
    goals = [
        ("p50 <= 1.5 x bound", p50_ms <= 1.5 * bound, f"{p50_ms / bound:.2f} x bound"),
        ("throughput_ratio >= 0.8", throughput >= 0.8, f"{throughput:.2f}"),
    ]
    if 1_000_000 in catchups:
        seconds_1m = catchups[1_000_000]["seconds"]
        goals.append(("catch-up of 1M <= 15 s", seconds_1m <= 15, f"{seconds_1m:.1f} s"))
    for goal, met, value in goals:
        print(f"  {goal:28} {value:>14}  {'met' if met else 'MISSED'}")
    extra = ""
    if 1_000_000 in catchups:
        extra = f" catchup_1m_s={catchups[1_000_000]['seconds']:.1f}"
    print(
        f"RESULT p50_ms={p50_ms:.2f} p99_ms={p99_ms:.2f} bound_ms={bound:.2f} "
        f"overhead_ratio={overhead:.2f} throughput_ratio={throughput:.2f} "
        f"catchup_100k_s={catchups[100_000]['seconds']:.1f}{extra}"
    )


if __name__ == "__main__":
    main()
