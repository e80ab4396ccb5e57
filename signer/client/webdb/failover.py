"""Failover between the serial lines to the signers (one to each of the pair, or two cables)."""

from __future__ import annotations

import logging
from typing import Any

from signer.client.library import SignerClient, new_request_id
from signer.errors import Unreachable

log = logging.getLogger(__name__)


class SignerLines:
    """One `SignerClient` per serial line; a call that times out on one goes to the other with
    the same request id (the repository records an id once, so it never issues twice)."""

    def __init__(self, clients: list[SignerClient], names: list[str]):
        self.clients = clients
        self.names = names
        self.preferred = 0
        self.failovers = 0

    async def start(self) -> None:
        for client in self.clients:
            await client.start()

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    def _order(self) -> list[int]:
        """The preferred line first, then the others; lines known to be down last."""
        n = len(self.clients)
        order = [(self.preferred + k) % n for k in range(n)]
        return sorted(order, key=lambda i: not self.clients[i].link.connected)

    async def call(
        self,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """`SignerClient.call` on the best line; `Unreachable` only when no line answered."""
        request_id = request_id or new_request_id()
        error: Unreachable | None = None
        for index in self._order():
            try:
                return await self.clients[index].call(
                    command, args, request_id=request_id, timeout=timeout
                )
            except Unreachable as exc:
                if len(self.clients) == 1:
                    raise
                error = exc
                self._switch_from(index, exc)
        assert error is not None
        raise error

    def _switch_from(self, index: int, exc: Unreachable) -> None:
        self.failovers += 1
        if self.preferred == index:
            self.preferred = (index + 1) % len(self.clients)
            log.warning(
                "line %s: %s; switching to line %s",
                self.names[index],
                exc,
                self.names[self.preferred],
            )
