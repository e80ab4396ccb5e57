"""Waiting in tests: for a condition to hold, never for a fixed time.

A fixed sleep before checking that something did NOT happen proves nothing when the machine is
slow (the thing may simply not have happened yet). Wait instead for the event that must come
first, which can fail: `eventually` / `wait_until` fail the test when it does not come in time.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

import pytest

POLL = 0.01


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Poll `predicate` (plain or async) on the event loop until it holds; fail the test after
    `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await _holds(predicate):
        if loop.time() > deadline:
            pytest.fail(f"condition not reached within {timeout} s {what}".rstrip())
        await asyncio.sleep(POLL)


async def _holds(predicate: Callable[[], bool | Awaitable[bool]]) -> bool:
    outcome = predicate()
    return bool(await outcome) if inspect.isawaitable(outcome) else bool(outcome)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """The same, blocking (threads, subprocesses)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout} s {what}".rstrip())
        time.sleep(POLL)
