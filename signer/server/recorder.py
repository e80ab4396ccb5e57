"""The log as the signer's services use it: typed commands in, typed storage results out.

Commands are encoded here (storage/commands.py) and committed through the log, standalone or
replicated, which sees bytes only. Every failure below, of the repository or of replication,
comes out as a `SignerError` with its wire code (signer/server/errors.py), so the services
handle one family.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from replication.log import Log
from signer.errors import SignerError
from signer.server.errors import rejection_error, wire_error
from storage import Command, Rejected, Result, encode

T = TypeVar("T")


class Recorder:
    def __init__(self, log: Log[Result]):
        self.log = log

    async def commit(self, command: Command) -> Result:
        """The repository's result, a rejection included."""
        return await _mapped(self.log.commit(encode(command)))

    async def record(self, command: Command) -> Result:
        """The repository's result; a rejection raises its wire error."""
        result = await self.commit(command)
        if isinstance(result, Rejected):
            raise rejection_error(result)
        return result

    async def barrier(self) -> None:
        """Return once everything committed before is applied here (a no-op standalone)."""
        await _mapped(self.log.barrier())


async def _mapped(step: Awaitable[T]) -> T:
    try:
        return await step
    except SignerError:
        raise
    except Exception as exc:
        error = wire_error(exc)
        if error is None:
            raise
        raise error from exc
