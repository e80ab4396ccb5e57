"""Replication's own exceptions. The signer host maps them to wire codes in one place
(signer/server/errors.py); nothing here knows what a wire code is."""

from __future__ import annotations


class ReplicationError(Exception):
    """A failure of the replicated log (base of the family; an unexpected internal state)."""


class StartRefused(ReplicationError):
    """The replicated log must not start as things are (fenced, not a member, a journal that
    does not match the repository, no secret): the message says why and what to do."""


class NoQuorum(ReplicationError):
    """Nothing can be committed now: too few voters reachable, no leader, or not running."""


class Fenced(NoQuorum):
    """This signer was removed from its cluster or found stale: it stops for good until wiped."""


class NotCommitted(ReplicationError):
    """Proposed but not confirmed (timed out, or the leader changed): it may still commit, so a
    retry must use the same request id."""


class QueueFull(ReplicationError):
    """The log's proposal queue is full; retry later."""


class ClockBehind(ReplicationError):
    """This signer's clock is behind times the cluster already recorded."""


class ApplyFailed(ReplicationError):
    """Committed entries cannot be applied to the state machine here (its storage fails, or a
    received snapshot could not be restored)."""


class JournalFailed(ApplyFailed):
    """A signer cannot write its Raft journal (disk full, I/O error): nothing can be committed
    until it can; it carries on by itself once it can write again."""


class EntryTooLarge(ReplicationError):
    """A log entry over the bound (`replication.log.MAX_ENTRY_BYTES`): refused before it is
    proposed, so no entry that large ever exists."""


class MembershipRefused(ReplicationError):
    """A membership change that cannot be made as asked (bad address, already a member, the
    cluster still has quorum, ...)."""


class MembershipConflict(ReplicationError):
    """The membership record changed while a change was being recorded (another change won)."""
