"""The CRL service: one CRL per issuer, decided here, signed in the HSM, recorded through the log.

Membership is kept by the repository: the entries of the last published CRL (`crl_entries`, by
serial; `crl_expiry`, by expiry). A new CRL is that list minus the entries RFC 5280 lets go
(they were on the previous CRL, which was issued more than `grace_days` after they expired),
plus every revocation since the previous CRL. Everything is decided here, before the
`publish_crl` command goes to the log: number, times, the entries that leave, the signature.
The bytes are assembled by signer/pki/crl.py, which the client shares. See docs/crl.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from signer.clock import utcnow
from signer.errors import ErrorCode, SignerError
from signer.pki.crl import (
    SIGNATURE_ALGORITHMS,
    CrlHeader,
    CrlIssuer,
    algorithm_for,
    crl_der,
    tbs_der,
)
from signer.pki.der import serial_hex
from signer.server.errors import rejection_error
from signer.server.health import Section
from signer.server.recorder import Recorder
from signer.wire.protocol import FetchCrlArgs, FetchCrlResult
from storage import (
    CrlPublished,
    PublishCrl,
    Rejected,
    RevokedEntry,
    crl_block_rows,
    serial_bytes,
)
from storage.commands import MAX_REMOVED

if TYPE_CHECKING:
    from replication.log import Log
    from signer.server.ca import Issuer
    from signer.server.config import CrlConfig
    from signer.server.dispatch import Handler, RequestContext
    from signer.server.hsm import Hsm
    from storage import Repository, Result

log = logging.getLogger(__name__)

FIRST_CRL_NUMBER = 2  # the key ceremony published number 1
SMALL_ADDITIONS = 10_000  # beyond this, new entries are read in serial order instead of sorted
OLDER_KEPT = 2  # earlier CRLs kept in memory per issuer, for pinned chunked transfers
DELTA_HEADER = 200  # bytes of a delta result besides its lists and signature (msgpack)
ADDED_HEADER = 3  # msgpack bin header of an added entry
REMOVED_WIRE_SIZE = 44  # a removed serial in a delta: up to 42 hex digits and a str header

# --------------------------------------------------------------------------- building


def merge_entries(
    blocks: Iterable[tuple[bytes, bytes, bytes]],
    drop: Iterable[bytes],
    additions: Iterable[tuple[bytes, bytes]],
) -> tuple[bytearray, int]:
    """Concatenate the entries of `blocks` (the repository's `crl_entries`, in serial order)
    without the serials in `drop` and with `additions` ((serial20, entry) in serial order)
    merged in. A block nothing touches is copied whole: building a CRL is mostly memcpy."""
    body = bytearray()
    count = 0
    pending, drops = iter(additions), iter(sorted(drop))
    add, gone = next(pending, None), next(drops, None)

    def add_below(bound: bytes | None) -> None:
        nonlocal add, count
        while add is not None and (bound is None or add[0] < bound):
            body.extend(add[1])
            count += 1
            add = next(pending, None)

    for serials, sizes, entries in blocks:
        first, last = serials[:20], serials[-20:]
        add_below(first)
        while gone is not None and gone < first:
            gone = next(drops, None)
        if (add is None or add[0] > last) and (gone is None or gone > last):
            body += entries
            count += len(serials) // 20
            continue
        for serial, entry in crl_block_rows(serials, sizes, entries):
            add_below(serial)
            while gone is not None and gone < serial:
                gone = next(drops, None)
            if gone != serial:
                body += entry
                count += 1
    add_below(None)
    return body, count


class _Additions:
    """Revocations with sequence number in (after, upto], as (serial20, entry) in serial order;
    notes the earliest certificate expiry among them."""

    def __init__(self, repository: Repository, key_id: bytes, after: int, upto: int):
        self.repository, self.key_id, self.after, self.upto = repository, key_id, after, upto
        self.min_not_after: int | None = None

    def _note(self, entry: RevokedEntry) -> tuple[bytes, bytes]:
        if self.min_not_after is None or entry.not_after < self.min_not_after:
            self.min_not_after = entry.not_after
        return serial_bytes(entry.serial), entry.crl_entry

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        if self.upto - self.after <= SMALL_ADDITIONS:
            since = self.repository.iter_revocations_since(self.key_id, self.after)
            rows = [self._note(e) for e in since if e.seq <= self.upto]
            yield from sorted(rows)
            return
        for entry in self.repository.iter_revoked(self.key_id):  # a first CRL: read in order
            if self.after < entry.seq <= self.upto:
                yield self._note(entry)


@dataclass
class CrlDraft:
    """A CRL decided and assembled but not signed: all `publish_crl` carries but the signature."""

    key_id: bytes
    header: CrlHeader
    revocation_seq: int
    removed: list[int]
    entries: int
    removed_before: int | None
    tbs: bytes


def draft_crl(
    repository: Repository,
    issuer: CrlIssuer,
    key_id: bytes,
    crl_number: int,
    this_update: int,
    config: CrlConfig,
) -> CrlDraft:
    """Decide the next CRL of an issuer and assemble its TBS; reads the repository only.

    RFC 5280 §3.3 retention: an entry leaves once it has been on a CRL issued more than
    `grace_days` after its certificate expired (the previous CRL: every entry in the membership
    index was on it). The CRL carries ExpiredCertsOnCRL when it lists expired certificates.
    """
    last = repository.last_crl_history(key_id)
    upto = repository.revocation_seq(key_id)
    after = 0 if last is None else last["revocation_seq"]
    removed: list[int] = []
    removed_before = None if last is None else last["removed_before"]
    first_kept = None
    if last is not None:
        threshold = last["this_update"] - int(config.grace_days * 86400)
        for not_after, serial in repository.iter_crl_expiry(key_id):
            if not_after >= threshold or len(removed) == MAX_REMOVED:
                first_kept = not_after  # (at MAX_REMOVED, the rest leave with the next CRLs)
                break
            removed.append(serial)
            removed_before = max(removed_before or 0, not_after + 1)
    removed.sort()
    additions = _Additions(repository, key_id, after, upto)
    drop = [serial_bytes(serial) for serial in removed]
    body, count = merge_entries(repository.iter_crl_blocks(key_id), drop, additions)
    earliest = min(
        (t for t in (first_kept, additions.min_not_after) if t is not None), default=None
    )
    expired = None
    if earliest is not None and earliest < this_update:
        expired = removed_before if removed_before is not None else earliest
    header = CrlHeader(
        crl_number,
        this_update,
        this_update + config.next_update_days * 86400,
        expired,
        algorithm_for(issuer.public_key),
    )
    tbs = tbs_der(issuer, header, body)
    return CrlDraft(key_id, header, upto, removed, count, removed_before, tbs)


def rebuild_crl(
    repository: Repository, issuer: CrlIssuer, key_id: bytes, crl_number: int
) -> bytes | None:
    """An earlier published CRL, byte for byte, from the membership of the last one and the
    history between them (None if that CRL was not published with history). The caller keeps
    publications out meanwhile."""
    target = repository.crl_history(key_id, crl_number)
    last = repository.last_crl_history(key_id)
    algorithm = None if target is None else SIGNATURE_ALGORITHMS.get(target["signature_algorithm"])
    if target is None or last is None or algorithm is None:
        return None
    newer = repository.iter_revocations_since(key_id, target["revocation_seq"])
    drop = {serial_bytes(e.serial) for e in newer if e.seq <= last["revocation_seq"]}
    back = []
    for record in repository.iter_crl_history(key_id, after=crl_number):
        if record["crl_number"] > last["crl_number"]:
            break
        for serial, seq in record["removed"]:
            entry = repository.revocation(key_id, serial)
            if seq <= target["revocation_seq"] and entry is not None:
                back.append((serial_bytes(serial), entry.crl_entry))
    body, _ = merge_entries(repository.iter_crl_blocks(key_id), drop, sorted(back))
    header = CrlHeader(
        crl_number,
        target["this_update"],
        target["next_update"],
        target["expired_certs_on_crl"],
        algorithm,
    )
    der = crl_der(tbs_der(issuer, header, body), algorithm, target["signature"])
    return der if hashlib.sha256(der).digest() == target["sha256"] else None


def delta_since(
    repository: Repository, key_id: bytes, have: int, current: dict[str, Any], budget: int
) -> tuple[list[bytes], list[str]] | None:
    """(added entries, removed serials) from CRL `have` to `current` (a history record), or None
    when `have` has no history, is not older, or the delta's result would exceed `budget` bytes."""
    old = repository.crl_history(key_id, have)
    if old is None or old.get("imported") or have >= current["crl_number"]:
        return None  # an imported CRL's entries are the earlier CA's: the client gets it whole
    size = DELTA_HEADER + len(current["signature"])
    gone, removed = set(), []
    for record in repository.iter_crl_history(key_id, after=have):
        if record["crl_number"] > current["crl_number"]:
            break
        for serial, seq in record["removed"]:
            gone.add(serial)
            if seq <= old["revocation_seq"]:  # the client's CRL lists it
                removed.append(serial)
                size += REMOVED_WIRE_SIZE
        if size > budget:
            return None
    added = []
    for entry in repository.iter_revocations_since(key_id, old["revocation_seq"]):
        if entry.seq > current["revocation_seq"]:
            break
        if entry.serial not in gone:
            added.append(entry.crl_entry)
            size += len(entry.crl_entry) + ADDED_HEADER
            if size > budget:
                return None
    return added, [serial_hex(serial) for serial in sorted(removed)]


# --------------------------------------------------------------------------- the service


def _time(moment: int) -> datetime:
    return datetime.fromtimestamp(moment, UTC)


@dataclass
class PublishedCrl:
    """A CRL the signer published: its history record, DER and SHA-256."""

    record: dict[str, Any]
    der: bytes
    sha256: bytes

    @property
    def number(self) -> int:
        return self.record["crl_number"]


@dataclass
class _IssuerCrls:
    issuer: Issuer
    crl_issuer: CrlIssuer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    current: PublishedCrl | None = None
    older: OrderedDict[int, PublishedCrl] = field(default_factory=OrderedDict)
    last_error: str | None = None
    failed_after: int | None = None  # the newest CRL number when `last_error` happened
    build_seconds: float | None = None  # the last CRL: decided, assembled and signed
    commit_seconds: float | None = None  # the last CRL: recorded through the log

    @property
    def key_id(self) -> bytes:
        return self.issuer.key_id

    def keep(self, crl: PublishedCrl) -> None:
        """Make `crl` current; the one it replaces stays for transfers pinned to it."""
        if self.current is not None and self.current.number != crl.number:
            self.older[self.current.number] = self.current
            while len(self.older) > OLDER_KEPT:
                self.older.popitem(last=False)
        self.current = crl


class _Superseded(Exception):
    """Another signer of the pair committed this CRL number first (both schedulers ran)."""

    def __init__(self, ours: int, theirs: int):
        super().__init__(f"CRL number {ours} was taken (latest is {theirs})")
        self.ours, self.theirs = ours, theirs


class CrlService:
    """Issues each issuer's CRL when due (a periodic task) and answers `fetch_crl`.

    The request path signs only when the issuer has no CRL yet or the current one is stale
    (within `refresh_margin_hours` of its nextUpdate); otherwise it serves what the scheduler made.
    """

    def __init__(
        self,
        issuers: Iterable[Issuer],
        hsm: Hsm,
        repository: Repository,
        commit_log: Log[Result],
        config: CrlConfig,
        clock: Callable[[], datetime] = utcnow,
        scheduling: Callable[[], bool] = lambda: True,
    ):
        self.hsm = hsm
        self.scheduling = scheduling  # in a pair: only the leader's scheduler publishes
        self.repository = repository
        self.log = commit_log
        self.recorder = Recorder(commit_log)
        self.config = config
        self.clock = clock
        self._states = {
            i.name: _IssuerCrls(i, CrlIssuer.from_certificate(i.certificate)) for i in issuers
        }
        self._task: asyncio.Task[None] | None = None
        self.published: list[Callable[[], Awaitable[None]]] = []  # the audit log's tree head

    def handlers(self) -> dict[str, Handler]:
        return {"fetch_crl": self.fetch_crl}

    # --- scheduling --------------------------------------------------------------------------

    async def start(self) -> None:
        """Issue what is due now (so a new signer has CRLs before it answers), then keep at it."""
        await self.refresh_due()
        self._task = asyncio.create_task(self._run(), name="crl-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_seconds)
            await self.refresh_due()

    def _now(self) -> int:
        return int(self.clock().timestamp())

    def due(self, name: str) -> str | None:
        """Why the issuer needs a new CRL now, or None (never while its import runs)."""
        state = self._states[name]
        if self._importing(state.key_id):
            return None
        last = self.repository.last_crl_history(state.key_id)
        now = self._now()
        if last is None:
            return "no CRL yet"
        if last.get("imported"):
            return "first CRL after the import"
        if now <= last["this_update"]:
            return None  # one CRL per second at most: the restore rule counts on it
        if now >= last["next_update"] - self.config.refresh_margin_hours * 3600:
            return "nextUpdate is near"
        if now >= last["this_update"] + self.config.reissue_hours * 3600:
            return "scheduled"
        if self.repository.revocation_seq(state.key_id) > last["revocation_seq"] and (
            now >= last["this_update"] + self.config.min_interval_seconds
        ):
            return "new revocations"
        return None

    async def refresh_due(self) -> dict[str, str]:
        """Publish every CRL that is due; a failure is logged and retried at the next poll.
        Only where `scheduling()` holds: in a pair the leader publishes, the other signer
        follows through the log (no HSM signature lost in a race for the number)."""
        outcome: dict[str, str] = {}
        if not self.scheduling():
            return outcome
        for name, state in self._states.items():
            try:
                async with state.lock:
                    reason = self.due(name)
                    if reason is None:
                        continue
                    crl = await self._publish(state)
                outcome[name] = f"published {crl.number} ({reason})"
                log.info("CRL %s of %s published (%s)", crl.number, name, reason)
            except _Superseded as race:
                state.last_error = None  # the other signer of the pair was first: nothing lost
                outcome[name] = f"published {race.theirs} by the other signer"
                log.info("CRL of %s: number %s was taken by the other signer", name, race.ours)
            except SignerError as exc:
                self._failed(state, f"{exc.code.value}: {exc.message}")
                outcome[name] = f"failed: {state.last_error}"
                log.error("CRL of %s not published: %s", name, exc)
            except Exception as exc:  # the scheduler must outlive any bug
                self._failed(state, f"internal error: {type(exc).__name__}")
                outcome[name] = f"failed: {state.last_error}"
                log.exception("CRL of %s not published", name)
        return outcome

    def _failed(self, state: _IssuerCrls, error: str) -> None:
        last = self.repository.last_crl_history(state.key_id)
        state.last_error = error
        state.failed_after = None if last is None else int(last["crl_number"])

    async def publish(self, name: str) -> PublishedCrl:
        """Publish a new CRL of `name` now, due or not."""
        state = self._state(name)
        async with state.lock:
            return await self._publish(state)

    def _importing(self, key_id: bytes) -> bool:
        imported = self.repository.import_state(key_id)
        return imported is not None and not imported.finished

    async def _publish(self, state: _IssuerCrls) -> PublishedCrl:
        # In a pair: apply what the other signer committed and check the clock against the
        # cluster's, so CRL numbers and times never go backwards across a switch of signer.
        await self.recorder.barrier()
        if self._importing(state.key_id):
            raise SignerError(
                ErrorCode.CRL_UNAVAILABLE,
                f"the history of {state.issuer.name} is being imported: its CRL follows the import",
            )
        started = time.perf_counter()
        number = await asyncio.to_thread(self._next_number, state.key_id)
        draft, digest = await asyncio.to_thread(self._draft, state, number, self._now())
        key = await self.hsm.run(self.hsm.key, state.issuer.key_label)
        algorithm = draft.header.algorithm
        signature = await self.hsm.run(algorithm.sign, key, digest)
        if not algorithm.verify(state.crl_issuer.public_key, signature, digest):
            raise SignerError(ErrorCode.HSM_ERROR, "the HSM's CRL signature does not verify")
        der, sha256 = await asyncio.to_thread(finish_crl, draft, signature)
        signed = time.perf_counter()
        result = await self.recorder.commit(_command(draft, signature, sha256, der))
        if not isinstance(result, CrlPublished):
            last = self.repository.last_crl_history(state.key_id)
            if last is not None and int(last["crl_number"]) >= number:
                raise _Superseded(number, int(last["crl_number"]))
            if isinstance(result, Rejected):
                raise rejection_error(result)
            raise SignerError(ErrorCode.INTERNAL_ERROR, f"publishing was answered {result.status}")
        record = self.repository.crl_history(state.key_id, number)
        if record is None:
            raise SignerError(ErrorCode.REPOSITORY_ERROR, f"CRL {number} was not recorded")
        crl = PublishedCrl(record, der, sha256)
        state.keep(crl)
        state.last_error = None
        state.build_seconds = signed - started
        state.commit_seconds = time.perf_counter() - signed
        for hook in self.published:
            await hook()
        return crl

    def _next_number(self, key_id: bytes) -> int:
        """After the last one published (or imported: the earlier CA's numbers go on); the
        first after one recorded without history (the ceremony's); at least the floor a
        restore set (storage/restore.py)."""
        floor = self.repository.crl_number_floor(key_id)
        last = self.repository.last_crl_history(key_id)
        if last is not None:
            return max(int(last["crl_number"]) + 1, floor)
        recorded = self.repository.latest_crl(key_id)  # one recorded without history
        first = 0 if recorded is None else recorded["crl_number"] + 1
        return max(FIRST_CRL_NUMBER, first, floor)

    def _draft(self, state: _IssuerCrls, number: int, now: int) -> tuple[CrlDraft, bytes]:
        draft = draft_crl(self.repository, state.crl_issuer, state.key_id, number, now, self.config)
        return draft, draft.header.algorithm.digest(draft.tbs)

    # --- fetch_crl ---------------------------------------------------------------------------

    async def fetch_crl(self, args: FetchCrlArgs, _ctx: RequestContext) -> FetchCrlResult:
        state = self._issuer_ref(args.issuer)
        current = await self._fresh(state)
        if args.want == "auto" and args.have_number is not None:
            if args.have_number == current.number:
                return _summary(current, "unchanged")
            budget = args.max_bytes
            delta = await asyncio.to_thread(
                delta_since, self.repository, state.key_id, args.have_number, current.record, budget
            )
            if delta is not None:
                return _delta_result(current, *delta)
            return _chunk(current, 0, args.max_bytes)
        if args.want == "full" and args.crl_number not in (None, current.number):
            pinned = await self._pinned(state, args.crl_number)
            if pinned is None:  # gone: the client starts over with the current one
                return _chunk(current, 0, args.max_bytes)
            return _chunk(pinned, args.offset, args.max_bytes)
        return _chunk(current, args.offset if args.want == "full" else 0, args.max_bytes)

    async def _fresh(self, state: _IssuerCrls) -> PublishedCrl:
        """The current CRL; made here only when there is none or it is stale."""
        current = await self._current(state)
        margin = self.config.refresh_margin_hours * 3600
        if current is not None and self._now() < current.record["next_update"] - margin:
            return current
        try:
            async with state.lock:
                current = await self._current(state)
                if current is None or self._now() >= current.record["next_update"] - margin:
                    current = await self._publish(state)
        except SignerError as exc:
            self._failed(state, f"{exc.code.value}: {exc.message}")
            if current is None:
                raise SignerError(
                    ErrorCode.CRL_UNAVAILABLE,
                    f"no CRL of {state.issuer.name} could be made: {exc.message}",
                    {"cause": exc.code.value},
                ) from exc
            log.error("serving a stale CRL of %s: %s", state.issuer.name, exc)
        return current

    async def current(self, name: str) -> PublishedCrl | None:
        """The newest published CRL of `name` (its DER rebuilt from the history when it is not
        in memory), None before the first."""
        return await self._current(self._state(name))

    async def _current(self, state: _IssuerCrls) -> PublishedCrl | None:
        """The newest published CRL, from memory when it is still the newest (None before the
        first, also when the last one is the earlier CA's, imported)."""
        last = self.repository.last_crl_history(state.key_id)
        if last is None or last.get("imported"):
            return None
        if state.current is not None and state.current.number == last["crl_number"]:
            return state.current
        stored = await asyncio.to_thread(self.repository.latest_crl, state.key_id)
        if stored is not None and stored["crl_number"] == last["crl_number"] and stored["der"]:
            der = stored["der"]  # (a CRL stored whole by an earlier version)
        else:
            der = await asyncio.to_thread(self._rebuild, state, last["crl_number"])
        if der is None or await asyncio.to_thread(_sha256, der) != last["sha256"]:
            raise SignerError(ErrorCode.CRL_UNAVAILABLE, f"CRL {last['crl_number']} is damaged")
        crl = PublishedCrl(last, der, last["sha256"])
        state.keep(crl)
        return crl

    async def _pinned(self, state: _IssuerCrls, number: int) -> PublishedCrl | None:
        """An earlier CRL a chunked transfer is pinned to: from memory, or rebuilt."""
        if number in state.older:
            return state.older[number]
        async with state.lock:
            record = self.repository.crl_history(state.key_id, number)
            der = await asyncio.to_thread(self._rebuild, state, number)
        if record is None or der is None:
            return None
        crl = PublishedCrl(record, der, record["sha256"])
        state.older[number] = crl
        while len(state.older) > OLDER_KEPT:
            state.older.popitem(last=False)
        return crl

    def _rebuild(self, state: _IssuerCrls, number: int) -> bytes | None:
        return rebuild_crl(self.repository, state.crl_issuer, state.key_id, number)

    def _state(self, name: str) -> _IssuerCrls:
        state = self._states.get(name)
        if state is None:
            raise SignerError(ErrorCode.UNKNOWN_ISSUER, f"issuer {name!r} is not configured")
        return state

    def _issuer_ref(self, reference: str) -> _IssuerCrls:
        for state in self._states.values():
            if state.issuer.matches(reference):
                return state
        raise SignerError(
            ErrorCode.UNKNOWN_ISSUER,
            f"no issuer {reference[:80]!r}; known: {', '.join(self._states)}",
        )

    # --- health ------------------------------------------------------------------------------

    async def health_section(self) -> Section:
        now = self._now()
        margin = self.config.refresh_margin_hours * 3600
        data: dict[str, Any] = {}
        warnings, errors = [], []
        for name, state in self._states.items():
            last = self.repository.last_crl_history(state.key_id)
            if last is not None and state.failed_after != last["crl_number"]:
                state.last_error = None  # a newer CRL was published since (here or replicated)
            if last is None or last.get("imported"):
                errors.append(f"{name}: no CRL ({state.last_error or 'not made yet'})")
                data[name] = {"crl_number": None, "last_error": state.last_error}
                continue
            data[name] = {
                "crl_number": last["crl_number"],
                "this_update": _time(last["this_update"]).isoformat(),
                "next_update": _time(last["next_update"]).isoformat(),
                "entries": last["entries"],
                "size": last["size"],
                "hours_left": round((last["next_update"] - now) / 3600, 1),
                "build_seconds": state.build_seconds,
                "commit_seconds": state.commit_seconds,
                "last_error": state.last_error,
            }
            if now >= last["next_update"]:
                errors.append(f"{name}: CRL {last['crl_number']} expired (nextUpdate passed)")
            elif now >= last["next_update"] - margin:
                warnings.append(f"{name}: CRL {last['crl_number']} is stale and not reissued")
            elif state.last_error:
                warnings.append(f"{name}: last CRL attempt failed: {state.last_error}")
        return Section(data, warnings, errors)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def finish_crl(draft: CrlDraft, signature: bytes) -> tuple[bytes, bytes]:
    """The signed CRL's DER and SHA-256 (the draft gives up its TBS, now inside the DER)."""
    der = crl_der(draft.tbs, draft.header.algorithm, signature)
    draft.tbs = b""  # the TBS is inside `der` now: let the copy go
    return der, hashlib.sha256(der).digest()


def _command(draft: CrlDraft, signature: bytes, sha256: bytes, der: bytes) -> PublishCrl:
    """The log entry: everything to rebuild the CRL byte for byte, not its DER (docs/crl.md)."""
    header = draft.header
    return PublishCrl(
        issuer=draft.key_id,
        crl_number=header.crl_number,
        this_update=header.this_update,
        next_update=header.next_update,
        revocation_seq=draft.revocation_seq,
        removed=tuple(draft.removed),
        entries=draft.entries,
        removed_before=draft.removed_before,
        expired_certs_on_crl=header.expired_certs_on_crl,
        signature_algorithm=header.algorithm.der,
        signature=signature,
        sha256=sha256,
        size=len(der),
    )


def _summary(crl: PublishedCrl, kind: str, **fields: Any) -> FetchCrlResult:
    return FetchCrlResult(
        kind=kind,
        crl_number=crl.number,
        this_update=_time(crl.record["this_update"]),
        next_update=_time(crl.record["next_update"]),
        **fields,
    )


def _delta_result(crl: PublishedCrl, added: list[bytes], removed: list[str]) -> FetchCrlResult:
    expired = crl.record["expired_certs_on_crl"]
    return _summary(
        crl,
        "delta",
        added=added,
        removed=removed,
        expired_certs_on_crl=None if expired is None else _time(expired),
        signature_algorithm=crl.record["signature_algorithm"],
        signature=crl.record["signature"],
    )


def _chunk(crl: PublishedCrl, offset: int, max_bytes: int) -> FetchCrlResult:
    if offset > len(crl.der):
        raise SignerError(
            ErrorCode.BAD_ARGUMENTS,
            f"offset {offset} lies beyond CRL {crl.number} ({len(crl.der)} bytes)",
        )
    return _summary(
        crl,
        "full",
        total_size=len(crl.der),
        offset=offset,
        chunk=crl.der[offset : offset + max_bytes],
        sha256=crl.sha256,
    )
