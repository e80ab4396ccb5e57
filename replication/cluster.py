"""Cluster identity: which signers may replicate with which, decided from data, not from hope.

Replication keeps its cluster record in the state machine (a named value, `CLUSTER_META`,
written through the log by compare-and-set, so it is applied with the data and travels in
snapshots and backups): a random cluster id, a generation that grows at every membership change
(add, remove, force-standalone), a random epoch per generation, and the history of
[generation, epoch, members]. When two signers connect, each sends a hello with its record and
judges the other's with `judge` (pure; both sides reach the same verdict independently):

- a fresh signer (no record, empty repository) may join;
- the same generation and epoch, or a peer that is behind but has been a member of every
  generation since: accepted (Raft catches it up);
- a peer that was removed since its generation: refused, and it fences itself, so a removed
  signer never comes back with its old data;
- different clusters or diverged histories (two survivors both forced standalone): refused on
  both sides, for an operator to decide.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

CLUSTER_META = "cluster"  # the state machine's name for the record
MAX_MEMBERS = 16
MAX_TEXT = 1024

Generation = tuple[int, bytes, tuple[str, ...]]  # (generation, epoch, members)


class Verdict(Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"  # do not replicate with the peer (it is stale, foreign or diverged)
    FENCE_SELF = "fence_self"  # this signer is the stale one: stop for good until wiped


@dataclass(frozen=True)
class ClusterRecord:
    """The cluster's identity at one generation, and every generation before it."""

    cluster_id: bytes  # 16 random bytes, fixed for the cluster's life
    generation: int  # 1, then +1 at every membership change
    epoch: bytes  # 8 random bytes per generation
    members: tuple[str, ...]  # voters' "IP:port", sorted, distinct
    event: str  # why: "create", "add ...", "remove ...", "force-standalone ..."
    at: int  # Unix seconds of the proposal
    history: tuple[Generation, ...]  # every generation so far, this one last

    def pack(self) -> bytes:
        """The stored and replicated form: a msgpack map (docs/replication.md §2)."""
        data: bytes = msgpack.packb(self.to_map(), use_bin_type=True)
        return data

    def to_map(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "generation": self.generation,
            "epoch": self.epoch,
            "members": list(self.members),
            "event": self.event,
            "at": self.at,
            "history": [[g, e, list(m)] for g, e, m in self.history],
        }

    @classmethod
    def unpack(cls, data: bytes) -> ClusterRecord:
        try:
            fields = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise ValueError(f"the cluster record is not msgpack: {exc}") from None
        return cls.from_map(fields)

    @classmethod
    def from_map(cls, fields: Any) -> ClusterRecord:
        """A record from its map (stored, or in a peer's hello); raises ValueError. Records
        written before the record moved into replication also carry `index`: ignored."""
        if not isinstance(fields, dict):
            raise ValueError("a cluster record is a map")
        try:
            record = cls(
                cluster_id=_sized(fields["cluster_id"], 16, "cluster_id"),
                generation=_positive(fields["generation"], "generation"),
                epoch=_sized(fields["epoch"], 8, "epoch"),
                members=_members(fields["members"]),
                event=_text(fields["event"], "event"),
                at=_positive(fields["at"], "at", low=0),
                history=tuple(
                    (_positive(g, "generation"), _sized(e, 8, "epoch"), _members(m))
                    for g, e, m in fields["history"]
                ),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed cluster record: {exc!r}") from None
        if not record.history or record.history[-1] != (*record.key, record.members):
            raise ValueError("the cluster record's history does not end with it")
        return record

    @property
    def key(self) -> tuple[int, bytes]:
        return self.generation, self.epoch

    def summary(self) -> dict[str, Any]:
        """What status and health show of it."""
        return {
            "id": self.cluster_id.hex(),
            "generation": self.generation,
            "members": list(self.members),
            "event": self.event,
            "at": self.at,
        }


def next_record(
    current: ClusterRecord | None, members: list[str], event: str, now: float | None = None
) -> ClusterRecord:
    """The record of the next generation (decided here, before replication): the same cluster
    id, the next generation, a new epoch, and the history so far."""
    generation = current.generation + 1 if current else 1
    epoch = os.urandom(8)
    chosen = _members(sorted(members))
    return ClusterRecord(
        cluster_id=current.cluster_id if current else os.urandom(16),
        generation=generation,
        epoch=epoch,
        members=chosen,
        event=_text(event, "event"),
        at=int(time.time() if now is None else now),
        history=(*(current.history if current else ()), (generation, epoch, chosen)),
    )


def _sized(value: Any, size: int, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")
    return value


def _positive(value: Any, name: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value.encode("utf-8", "replace")) <= MAX_TEXT:
        raise ValueError(f"{name} must be 1 to {MAX_TEXT} bytes of text")
    return value


def _members(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_MEMBERS:
        raise ValueError(f"members must be a list of 1 to {MAX_MEMBERS} addresses")
    members = tuple(_text(member, "a member") for member in value)
    if list(members) != sorted(set(members)):
        raise ValueError("members must be sorted and distinct")
    return members


@dataclass(frozen=True)
class Hello:
    node: str
    applied: int  # the state machine's applied index (0: empty)
    record: ClusterRecord | None

    def wire(self) -> dict[str, Any]:
        record = None if self.record is None else self.record.to_map()
        return {"node": self.node, "applied": self.applied, "record": record}

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Hello:
        record = message.get("record")
        if record is not None and not isinstance(record, dict):
            raise ValueError("record must be a map or nil")
        parsed = None if record is None else ClusterRecord.from_map(record)
        return cls(str(message["node"]), int(message["applied"]), parsed)


def _removed_since(record: ClusterRecord, node: str, generation: int) -> int | None:
    """The first generation after `generation` in `record`'s history without `node`."""
    for later, _epoch, members in record.history:
        if later > generation and node not in members:
            return later
    return None


def judge(mine: Hello, peer: Hello) -> tuple[Verdict, str]:
    """May this signer (`mine`) replicate with `peer`? Returns the verdict and why."""
    m, p = mine.record, peer.record
    if m is None or p is None:
        return _judge_fresh(mine, peer)
    if m.cluster_id != p.cluster_id:
        return Verdict.REFUSE, (
            f"{peer.node} belongs to another cluster ({p.cluster_id.hex()[:12]}, "
            f"ours {m.cluster_id.hex()[:12]})"
        )
    if m.key == p.key:
        return Verdict.ACCEPT, "same generation"
    history_m = {(g, e) for g, e, _ in m.history}
    history_p = {(g, e) for g, e, _ in p.history}
    if p.key in history_m and p.generation < m.generation:
        removed = _removed_since(m, peer.node, p.generation)
        if removed is None:
            return Verdict.ACCEPT, f"{peer.node} is behind (generation {p.generation})"
        return Verdict.REFUSE, (
            f"{peer.node} was removed at generation {removed} and holds older data: "
            "wipe it before adding it again"
        )
    if m.key in history_p and m.generation < p.generation:
        removed = _removed_since(p, mine.node, m.generation)
        if removed is None:
            return Verdict.ACCEPT, f"this signer is behind {peer.node}"
        return Verdict.FENCE_SELF, (
            f"this signer was removed from the cluster at generation {removed} "
            f"(told by {peer.node}); wipe its journal and repository to add it again"
        )
    return Verdict.REFUSE, (
        f"histories diverged: {peer.node} is at generation {p.generation}, this signer at "
        f"{m.generation}, neither descends from the other (both forced standalone?)"
    )


def _judge_fresh(mine: Hello, peer: Hello) -> tuple[Verdict, str]:
    if mine.record is None and peer.record is None:
        if mine.applied and peer.applied:
            return Verdict.REFUSE, (
                "both signers hold data and neither belongs to a cluster: wipe one of them"
            )
        return Verdict.ACCEPT, "new cluster"
    if mine.record is None:
        if mine.applied:
            return Verdict.FENCE_SELF, (
                f"this signer holds data outside the cluster of {peer.node}: wipe it to join"
            )
        return Verdict.ACCEPT, "this signer is new"
    if peer.applied:
        return Verdict.REFUSE, f"{peer.node} holds data outside this cluster"
    return Verdict.ACCEPT, f"{peer.node} is new"
