"""The log that feeds a state machine: standalone (`LocalLog`) or Raft-replicated (`RaftLog`).

A log entry is bytes, opaque here: the state machine decodes it (for the signer, the
repository's command codec, storage/commands.py) and answers a result of its own type `R`,
which the log hands back to the caller that committed the entry without looking into it. This
is hashicorp/raft's FSM contract: `apply` (here `apply_batch`, several entries in one durable
write), plus snapshot and restore for the replicated log.

Callers decide everything first (serials, times, signatures) and hand a finished entry to
`commit`, which returns the state machine's result once the entry is durable. The standalone
log applies entries in order from one writer thread, grouping whatever is waiting into one
batch (one fsync for many entries when requests arrive together).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from replication.errors import EntryTooLarge

# The largest log entry (a command's bytes). Replicated entries must stay below pysyncobj's
# append batch size (replication/pysyncobj_adapter.py, A8); the standalone log keeps the same
# bound, so that any repository can become the start of a replicated log.
MAX_ENTRY_BYTES = 63 * 1024

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class StateMachine(Protocol[R_co]):
    def last_applied_index(self) -> int: ...

    def apply_batch(self, items: Sequence[tuple[int, bytes]]) -> Sequence[R_co]:
        """Apply (index, entry) pairs in one durable write; an index at or below the last
        applied one is a replay and changes nothing."""
        ...


class ReplicatedMachine(StateMachine[R_co], Protocol):
    """What the replicated log needs besides applying: snapshots, and a few named values of its
    own (the cluster record) that the machine keeps with its data, written through the log."""

    def snapshot(self, path: Path) -> int: ...

    def restore(self, snapshot_path: Path) -> int: ...

    def meta(self, name: str) -> bytes | None: ...

    def meta_entry(self, name: str, expected: bytes | None, value: bytes) -> bytes:
        """The entry that sets `name` to `value` if it holds `expected` (None: absent)."""
        ...


class Log(Protocol[R_co]):
    async def commit(self, entry: bytes) -> R_co: ...

    async def barrier(self) -> None:
        """Return once everything committed before the call is applied here."""

    def close(self) -> None: ...


_Item = tuple[bytes, asyncio.AbstractEventLoop, asyncio.Future[Any]]


class LocalLog(Generic[R]):
    """A single signer's log: the next index is simply the last applied one plus one."""

    MAX_GROUP = 256

    def __init__(self, state_machine: StateMachine[R]):
        self._machine = state_machine
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="log-writer", daemon=True)
        self._thread.start()
        self.groups = 0
        self.commands = 0

    async def commit(self, entry: bytes) -> R:
        if len(entry) > MAX_ENTRY_BYTES:  # the same bound as replicated: a signer may join later
            raise EntryTooLarge(
                f"a log entry of {len(entry)} bytes is over the bound of {MAX_ENTRY_BYTES}"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put((entry, loop, future))
        return await future

    async def barrier(self) -> None:
        """A single signer applies its own commits before answering: nothing to wait for."""

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < self.MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this group, then stop
                    break
                group.append(item)
            self._apply(group)

    def _apply(self, group: list[_Item]) -> None:
        start = self._machine.last_applied_index() + 1
        items = [(start + i, entry) for i, (entry, _, _) in enumerate(group)]
        try:
            results: list[Any] = list(self._machine.apply_batch(items))
        except Exception as exc:  # storage failure: every waiting caller learns it
            results = [exc] * len(group)
        self.groups += 1
        self.commands += len(group)
        for (_, loop, future), result in zip(group, results, strict=True):
            loop.call_soon_threadsafe(settle, future, result)


def settle(future: asyncio.Future[Any], outcome: Any) -> None:
    """Resolve a future from another thread's outcome (an exception or a value), once: called
    on the future's loop with `loop.call_soon_threadsafe(settle, future, outcome)`."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def settle_all(outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """`settle` for several futures of one loop: one cross-thread wake-up for a batch."""
    for future, outcome in outcomes:
        settle(future, outcome)
