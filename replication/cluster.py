"""Cluster identity: which signers may replicate with which, decided from data, not from hope.

The repository records the cluster's identity (`set_cluster` commands, see docs/repository.md):
a random cluster id, a generation that grows at every membership change (add, remove,
force-standalone), a random epoch per generation, and the history of [generation, epoch,
members]. When two signers connect, each sends a hello with its record and judges the other's
with `judge` (pure; both sides reach the same verdict independently):

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


class Verdict(Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"  # do not replicate with the peer (it is stale, foreign or diverged)
    FENCE_SELF = "fence_self"  # this signer is the stale one: stop for good until wiped


@dataclass(frozen=True)
class Hello:
    node: str
    applied: int  # the repository's applied index (0: empty)
    record: dict[str, Any] | None  # Repository.cluster_info()

    def wire(self) -> dict[str, Any]:
        return {"node": self.node, "applied": self.applied, "record": self.record}

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Hello:
        record = message.get("record")
        if record is not None and not isinstance(record, dict):
            raise ValueError("record must be a map or nil")
        return cls(str(message["node"]), int(message["applied"]), record)


def _key(record: dict[str, Any]) -> tuple[int, bytes]:
    return int(record["generation"]), bytes(record["epoch"])


def _removed_since(record: dict[str, Any], node: str, generation: int) -> int | None:
    """The first generation after `generation` in `record`'s history without `node`."""
    for entry in record["history"]:
        later, _epoch, members = entry
        if later > generation and node not in members:
            return int(later)
    return None


def judge(mine: Hello, peer: Hello) -> tuple[Verdict, str]:
    """May this signer (`mine`) replicate with `peer`? Returns the verdict and why."""
    m, p = mine.record, peer.record
    if m is None or p is None:
        return _judge_fresh(mine, peer)
    if m["cluster_id"] != p["cluster_id"]:
        return Verdict.REFUSE, (
            f"{peer.node} belongs to another cluster ({bytes(p['cluster_id']).hex()[:12]}, "
            f"ours {bytes(m['cluster_id']).hex()[:12]})"
        )
    if _key(m) == _key(p):
        return Verdict.ACCEPT, "same generation"
    history_m = {(int(g), bytes(e)) for g, e, _ in m["history"]}
    history_p = {(int(g), bytes(e)) for g, e, _ in p["history"]}
    if _key(p) in history_m and _key(p)[0] < _key(m)[0]:
        removed = _removed_since(m, peer.node, _key(p)[0])
        if removed is None:
            return Verdict.ACCEPT, f"{peer.node} is behind (generation {_key(p)[0]})"
        return Verdict.REFUSE, (
            f"{peer.node} was removed at generation {removed} and holds older data: "
            "wipe it before adding it again"
        )
    if _key(m) in history_p and _key(m)[0] < _key(p)[0]:
        removed = _removed_since(p, mine.node, _key(m)[0])
        if removed is None:
            return Verdict.ACCEPT, f"this signer is behind {peer.node}"
        return Verdict.FENCE_SELF, (
            f"this signer was removed from the cluster at generation {removed} "
            f"(told by {peer.node}); wipe its journal and repository to add it again"
        )
    return Verdict.REFUSE, (
        f"histories diverged: {peer.node} is at generation {_key(p)[0]}, this signer at "
        f"{_key(m)[0]}, neither descends from the other (both forced standalone?)"
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


def next_record_command(
    current: dict[str, Any] | None, members: list[str], event: str, now: float | None = None
) -> dict[str, Any]:
    """The `set_cluster` command for the next generation (decided here, before replication)."""
    return {
        "op": "set_cluster",
        "cluster_id": bytes(current["cluster_id"]) if current else os.urandom(16),
        "generation": int(current["generation"]) + 1 if current else 1,
        "epoch": os.urandom(8),
        "members": sorted(members),
        "event": event,
        "at": int(time.time() if now is None else now),
    }
