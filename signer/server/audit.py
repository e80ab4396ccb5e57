"""The audit log's service on the signer host (docs/audit.md): what the repository cannot see
by itself (refusals before any commit, operator actions, the configuration in use), signed
tree heads, and the line's `fetch_audit`, `prove_inclusion` and `sign_tree_head`.

Refusals are batched: a flood from the line becomes at most one log entry per interval, with
individual records up to a bound and counts beyond it, in bounded memory. Tree heads are decided
here (size, root, time, the HSM's signature) and then recorded through the log, which keeps one
only if it names the tree every replica holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from replication.log import Log
from signer.clock import utcnow
from signer.errors import ErrorCode, SignerError
from signer.pki import merkle
from signer.pki.audit import (
    TreeHead,
    algorithm_for,
    check_audit_certificate,
    tree_head_message,
    verify_tree_head,
)
from signer.server.ca import Issuer
from signer.server.config import AuditConfig, SignerConfig
from signer.server.dispatch import Handler, RequestContext
from signer.server.health import Section
from signer.server.hsm import Hsm
from signer.server.recorder import Recorder
from signer.wire.protocol import (
    FetchAuditArgs,
    FetchAuditResult,
    ProveInclusionArgs,
    ProveInclusionResult,
    SignTreeHeadArgs,
    SignTreeHeadResult,
)
from storage import AuditEvent, Done, RecordAudit, RecordTreeHead, Repository, Result
from storage.commands import MAX_AUDIT_BYTES, MAX_AUDIT_DETAIL, encode

log = logging.getLogger(__name__)

MAX_TEXT = 128  # a request id or command name in a refusal record is cut to this


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


class RefusalBatch:
    """Refusals waiting for the next audit entry: individual records up to `limit`, then one
    count per (command, code); memory is bounded by `limit` and the known names."""

    def __init__(self, limit: int, known: Iterable[str]):
        self.limit = limit
        self.known = frozenset(known)
        self.records: list[AuditEvent] = []
        self.counts: dict[tuple[str, str], list[int]] = {}  # -> [count, first time]

    def add(self, time: int, command: str | None, request_id: str | None, code: str) -> None:
        name = command if command in self.known else "unknown" if command else "none"
        if len(self.records) < self.limit:
            detail = {"command": name, "request_id": _cut(request_id), "code": code, "count": 1}
            self.records.append(AuditEvent("refused", time, detail))
            return
        entry = self.counts.setdefault((name, code), [0, time])
        entry[0] += 1

    def take(self) -> list[AuditEvent]:
        coalesced = [
            AuditEvent("refused", first, {"command": name, "code": code, "count": count})
            for (name, code), (count, first) in sorted(self.counts.items())
        ]
        events, self.records, self.counts = self.records + coalesced, [], {}
        return events


def entries_of(events: list[AuditEvent]) -> list[RecordAudit]:
    """Events cut into commands that each stay under MAX_AUDIT_BYTES."""
    commands: list[RecordAudit] = []
    current: list[AuditEvent] = []
    for event in events:
        trial = RecordAudit((*current, event))
        if current and (len(trial.events) > 64 or len(encode(trial)) > MAX_AUDIT_BYTES):
            commands.append(RecordAudit(tuple(current)))
            current = []
        current.append(event)
    if current:
        commands.append(RecordAudit(tuple(current)))
    return commands


class AuditService:
    def __init__(
        self,
        repository: Repository,
        commit_log: Log[Result],
        hsm: Hsm | None,
        config: AuditConfig,
        issuers: Iterable[Issuer] = (),
        known_commands: Iterable[str] = (),
        clock: Callable[[], datetime] = utcnow,
    ):
        self.repository = repository
        self.recorder = Recorder(commit_log)
        self.hsm = hsm
        self.config = config
        self.issuers = list(issuers)
        self.clock = clock
        self.batch = RefusalBatch(config.refusal_records, known_commands)
        self.certificate: x509.Certificate | None = None
        if config.certificate is not None:
            self.certificate = x509.load_pem_x509_certificate(config.certificate.read_bytes())
            check_audit_certificate(self.certificate)
        self._task: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._signing = asyncio.Lock()
        self.stats = {"refusals": 0, "entries": 0, "heads": 0, "failures": 0}

    def handlers(self) -> dict[str, Handler]:
        return {
            "fetch_audit": self.fetch_audit,
            "prove_inclusion": self.prove_inclusion,
            "sign_tree_head": self.sign_tree_head_request,
        }

    def _now(self) -> int:
        return int(self.clock().timestamp())

    # --- refusals and operator actions -----------------------------------------------------

    def refused(self, command: str | None, request_id: str | None, code: str) -> None:
        """A request answered with an error (never raises, never blocks)."""
        self.stats["refusals"] += 1
        self.batch.add(self._now(), command, request_id, code)

    async def flush(self) -> None:
        """Commit the waiting refusals (one entry, or a few when they do not fit in one)."""
        events = self.batch.take()
        for command in entries_of(events):
            await self._commit(command)

    async def operator(self, action: str, **detail: Any) -> None:
        """An operator's action at this signer, recorded now (its detail: small, no secret)."""
        fields = {"action": action, **detail}
        if len(fields) > MAX_AUDIT_DETAIL:
            raise ValueError(f"an operator record has at most {MAX_AUDIT_DETAIL} fields")
        await self._commit(RecordAudit((AuditEvent("operator", self._now(), fields),)))

    async def operator_action(self, command: str, detail: dict[str, Any]) -> None:
        """A control-socket command that succeeded (signer cluster, signer import, ...)."""
        fields = dict(list(detail.items())[: MAX_AUDIT_DETAIL - 2])
        if "action" in fields or "key" in fields:
            fields = {f"arg_{k}": v for k, v in fields.items()}
        await self.operator(f"control:{command}", **fields)

    async def health_section(self) -> Section:
        head = self.latest_head()
        data: dict[str, Any] = {"size": self.repository.audit_size(), **self.stats}
        data["head_size"] = None if head is None else head.size
        data["head_time"] = None if head is None else head.timestamp
        data["signs_heads"] = self.config.key is not None  # optional, like the OpenPGP CA
        return Section(data, [])

    async def _commit(self, command: RecordAudit | RecordTreeHead) -> Result:
        try:
            result = await self.recorder.record(command)
        except Exception:
            self.stats["failures"] += 1
            raise
        self.stats["entries"] += 1
        return result

    async def record_start(self, node: str, digests: dict[str, bytes]) -> bool:
        """Record the configuration in use if it differs from the last one recorded for this
        node (a config, profile set or certificate change between two starts)."""
        last = self.repository.last_operator(f"start:{node}")
        if last is not None and all(last.get(k) == v for k, v in digests.items()):
            return False
        await self.operator("start", node=node, key=f"start:{node}", **digests)
        return True

    async def record_start_soon(
        self, node: str, digests: dict[str, bytes], attempts: int = 30, wait: float = 2.0
    ) -> None:
        """`record_start` in the background: a pair may have no leader yet at start."""
        for attempt in range(attempts):
            try:
                await self.record_start(node, digests)
                return
            except Exception as exc:
                if attempt == attempts - 1:
                    log.warning("the configuration in use is not in the audit log: %s", exc)
                    return
                await asyncio.sleep(wait)

    async def start(self, node: str, digests: dict[str, bytes]) -> None:
        """Record the configuration (standalone: now; in a pair: as soon as there is a leader)
        and start the refusals' batches."""
        self._task = asyncio.create_task(self._run(), name="audit-refusals")
        self._starting = asyncio.create_task(self.record_start_soon(node, digests))

    async def started(self) -> None:
        """Wait for the start record (tests, and a clean stop)."""
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)

    async def stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
        except Exception as exc:
            log.warning("refusals not recorded at stop: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.refusal_interval_seconds)
            try:  # each signer records what its own lines refused (a follower's commit goes
                # to the leader like any write)
                await self.flush()
            except Exception as exc:  # recorded with the next batch's count lost: said in the log
                log.warning("refusals not recorded: %s", exc)

    # --- tree heads --------------------------------------------------------------------------

    async def sign_tree_head(self) -> TreeHead:
        """Sign the tree as this signer holds it, then record the head through the log."""
        if self.hsm is None or self.config.key is None or self.certificate is None:
            raise SignerError(ErrorCode.AUDIT_UNAVAILABLE, "no audit key is configured")
        async with self._signing:
            await self.recorder.barrier()
            size, root = await asyncio.to_thread(self._tree)
            timestamp = self._now()
            key = await self.hsm.run(self.hsm.key, self.config.key)
            message = tree_head_message(size, timestamp, root)
            signature = await self.hsm.run(_sign, key, message)
            head = TreeHead(size, timestamp, root, algorithm_for(key.public_key()), signature)
            try:
                verify_tree_head(head, self.certificate)
            except Exception as exc:
                raise SignerError(
                    ErrorCode.HSM_ERROR, f"the audit key's signature does not verify: {exc}"
                ) from None
            record = RecordTreeHead(size, timestamp, root, head.algorithm, signature)
            result = await self._commit(record)
            if not isinstance(result, Done):
                raise SignerError(ErrorCode.INTERNAL_ERROR, f"tree head answered {result.status}")
            self.stats["heads"] += 1
            return head

    async def after_crl(self) -> None:
        """A CRL was published: sign a tree head with it (a failure is logged, not raised)."""
        if self.config.key is None:
            return
        try:
            await self.sign_tree_head()
        except Exception as exc:
            log.warning("no tree head signed with this CRL: %s", exc)

    def _tree(self) -> tuple[int, bytes]:
        with self.repository.audit_tree() as (size, perfect):
            return size, merkle.root(perfect, size)

    def latest_head(self) -> TreeHead | None:
        stored = self.repository.tree_head()
        return None if stored is None else TreeHead(**stored)

    # --- the line -----------------------------------------------------------------------------

    async def fetch_audit(self, args: FetchAuditArgs, _ctx: RequestContext) -> FetchAuditResult:
        return await asyncio.to_thread(self._fetch, args)

    def _fetch(self, args: FetchAuditArgs) -> FetchAuditResult:
        head = self.latest_head()
        records = self.repository.audit_records(args.start, args.max_records, args.max_bytes)
        proof = None
        if head is not None and args.have_size is not None:
            if args.have_size > head.size:
                proof = []  # the client holds more than the signer: it must alert
            else:
                with self.repository.audit_tree() as (_size, perfect):
                    proof = merkle.consistency_proof(perfect, args.have_size, head.size)
        return FetchAuditResult(
            size=self.repository.audit_size(),
            start=args.start,
            records=records,
            head=None if head is None else _wire_head(head),
            consistency=proof,
        )

    async def prove_inclusion(
        self, args: ProveInclusionArgs, _ctx: RequestContext
    ) -> ProveInclusionResult:
        issuer = self._issuer(args.issuer)
        serial = int(args.serial, 16)
        return await asyncio.to_thread(self._prove, issuer, serial, args.size)

    def _prove(self, issuer: Issuer, serial: int, size: int | None) -> ProveInclusionResult:
        position = self.repository.audit_position(issuer.key_id, serial)
        if position is None:
            raise SignerError(
                ErrorCode.UNKNOWN_CERTIFICATE,
                f"no issuance of serial {serial:x} by {issuer.name} in the audit log",
            )
        head = self.latest_head() if size is None else None
        if size is None:
            if head is None or head.size <= position:
                raise SignerError(
                    ErrorCode.AUDIT_UNAVAILABLE,
                    "no signed tree head covers this record yet: ask sign_tree_head",
                )
            size = head.size
        with self.repository.audit_tree() as (held, perfect):
            if not position < size <= held:
                raise SignerError(ErrorCode.AUDIT_UNAVAILABLE, f"no tree of {size} covers it")
            proof = merkle.inclusion_proof(perfect, position, size)
        [record] = self.repository.audit_records(position, 1)
        return ProveInclusionResult(
            index=position,
            size=size,
            record=record,
            proof=proof,
            head=None if head is None else _wire_head(head),
        )

    async def sign_tree_head_request(
        self, _args: SignTreeHeadArgs, _ctx: RequestContext
    ) -> SignTreeHeadResult:
        return SignTreeHeadResult(head=_wire_head(await self.sign_tree_head()))

    def _issuer(self, reference: str) -> Issuer:
        for issuer in self.issuers:
            if issuer.matches(reference):
                return issuer
        raise SignerError(ErrorCode.UNKNOWN_ISSUER, f"no issuer {reference[:80]!r}")


def _sign(key: Any, message: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    raise SignerError(ErrorCode.HSM_ERROR, "the audit key is neither RSA nor EC")


def _wire_head(head: TreeHead) -> dict[str, Any]:
    return {
        "size": head.size,
        "timestamp": head.timestamp,
        "root": head.root,
        "algorithm": head.algorithm,
        "signature": head.signature,
    }


def profile_files(profiles: Path | None) -> list[Path | None]:
    """The files of a profile set (a file, or a directory's YAML files in name order)."""
    if profiles is None or not profiles.is_dir():
        return [profiles]
    return [*sorted(profiles.glob("*.yaml")), *sorted(profiles.glob("*.yml"))]


def config_digest(config: SignerConfig) -> bytes:
    """SHA-256 of the configuration as loaded (JSON, sorted keys). It names where PINs and
    secrets come from (a file, a variable), never holds them."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).digest()


def file_digest(paths: Iterable[Path | None]) -> bytes:
    """SHA-256 over files' contents (a config, a profile set, certificates), in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        data = b"" if path is None or not path.is_file() else path.read_bytes()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.digest()
