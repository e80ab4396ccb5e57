"""The log that feeds the repository's state machine: standalone today, Raft-replicated later.

Callers decide everything first (serials, times, signatures) and hand a finished command to
`commit`, which returns the state machine's result once the command is durable. The standalone
log applies commands in order from one writer thread, grouping whatever is waiting into one
transaction (one fsync for many commands when requests arrive together).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Protocol


class StateMachine(Protocol):
    def last_applied_index(self) -> int: ...

    def apply_batch(self, items: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]: ...


class Log(Protocol):
    async def commit(self, command: dict[str, Any]) -> dict[str, Any]: ...

    async def barrier(self) -> None:
        """Return once everything committed before the call is applied here."""

    def close(self) -> None: ...


_Item = tuple[dict[str, Any], asyncio.AbstractEventLoop, asyncio.Future[dict[str, Any]]]


class LocalLog:
    """A single signer's log: the next index is simply the last applied one plus one."""

    MAX_GROUP = 256

    def __init__(self, state_machine: StateMachine):
        self._machine = state_machine
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="log-writer", daemon=True)
        self._thread.start()
        self.groups = 0
        self.commands = 0

    async def commit(self, command: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._queue.put((command, loop, future))
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
        items = [(start + i, command) for i, (command, _, _) in enumerate(group)]
        try:
            results: list[Any] = self._machine.apply_batch(items)
        except Exception as exc:  # storage failure: every waiting caller learns it
            results = [exc] * len(group)
        self.groups += 1
        self.commands += len(group)
        for (_, loop, future), result in zip(group, results, strict=True):
            loop.call_soon_threadsafe(_settle, future, result)


def _settle(future: asyncio.Future[dict[str, Any]], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
