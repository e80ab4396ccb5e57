"""The client library: the WebDB side's half of the protocol.

Several requests may be in flight on one line; answers are matched by request id and may come
back in any order. A request that gets no answer in time is sent again with the SAME request id,
which the signer treats as the same request (it never issues twice), so retrying is always safe.
When the signer reports a broken frame (an error answer without an id, i.e. line noise ate a
request), or an answer arrives broken, every request still waiting is re-sent instead of waiting
for its timeout: at once for the first such event of a quiet interval (RESEND_INTERVAL),
once more at the interval's end if others followed, never once per event (a noisy line would
otherwise multiply the traffic).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from signer.errors import ErrorCode, LinkDown, RequestTimeout, SignerError
from signer.link.ratelimit import Coalescer
from signer.link.serial_link import LinkSettings, SerialLink
from signer.wire.framing import Frame, FrameError, FrameEvent
from signer.wire.protocol import ErrorResponse, Response, decode_response, encode_request

log = logging.getLogger(__name__)

# At most one re-send of every waiting request per this many seconds, on nil-id errors and on
# broken answers: a noisy line must not multiply the traffic, yet lost answers come back fast.
RESEND_INTERVAL = 0.25


@dataclass
class ClientStats:
    calls: int = 0
    sends: int = 0
    retries: int = 0
    fast_resends: int = 0
    resend_rounds: int = 0  # times every waiting request was re-sent (at most one per interval)
    timeouts: int = 0
    stray_answers: int = 0
    signer_saw_broken_frames: int = 0
    broken_frames_received: int = 0


@dataclass
class _Pending:
    message: dict[str, Any]
    future: asyncio.Future[Response | ErrorResponse]
    resend: asyncio.Event = field(default_factory=asyncio.Event)


def new_request_id() -> str:
    return uuid.uuid4().hex


class SignerClient:
    """Calls commands on a signer over one serial line."""

    def __init__(
        self,
        settings: LinkSettings,
        *,
        max_in_flight: int = 8,
        timeout: float = 30.0,
        attempts: int = 3,
        name: str = "client",
        resend_interval: float = RESEND_INTERVAL,
    ):
        self._link = SerialLink(settings, self._on_event, name)
        self._pending: dict[str, _Pending] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self.timeout = timeout
        self.attempts = attempts
        self.stats = ClientStats()
        self._last_noise = ""
        self._resends = Coalescer(self._resend_waiting, resend_interval)

    @property
    def link(self) -> SerialLink:
        return self._link

    async def start(self) -> None:
        await self._link.start()

    async def close(self) -> None:
        self._resends.cancel()
        for pending in self._pending.values():
            pending.future.cancel()
        await self._link.close()

    async def __aenter__(self) -> SignerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def call(
        self,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        attempts: int | None = None,
    ) -> dict[str, Any]:
        """Run `command` on the signer and return its result; failures raise `SignerError`.

        `timeout` bounds the whole call; it is split evenly over `attempts` sends of the same
        request id. Pass your own `request_id` to make the call idempotent across restarts.
        """
        request_id = request_id or new_request_id()
        total = self.timeout if timeout is None else timeout
        tries = max(1, self.attempts if attempts is None else attempts)
        message = encode_request(request_id, command, args or {})
        self.stats.calls += 1
        async with self._slots:
            answer = await self._exchange(request_id, message, total, tries)
        if isinstance(answer, ErrorResponse):
            raise answer.error
        return answer.result

    async def _exchange(
        self, request_id: str, message: dict[str, Any], total: float, tries: int
    ) -> Response | ErrorResponse:
        if request_id in self._pending:
            raise SignerError(ErrorCode.REQUEST_ID_CONFLICT, f"{request_id!r} is already waiting")
        loop = asyncio.get_running_loop()
        pending = _Pending(message, loop.create_future())
        self._pending[request_id] = pending
        deadline = time.monotonic() + total
        try:
            for attempt in range(tries):
                if attempt:
                    self.stats.retries += 1
                    log.info("no answer to %s yet: sending it again", request_id)
                await self._send(pending.message, deadline)
                slice_end = min(deadline, time.monotonic() + total / tries)
                if await self._wait(pending, slice_end, deadline):
                    return pending.future.result()
            self.stats.timeouts += 1
            raise RequestTimeout(f"no answer to {request_id!r} in {total:.1f} s")
        finally:
            self._pending.pop(request_id, None)

    async def _wait(self, pending: _Pending, slice_end: float, deadline: float) -> bool:
        """Wait for the answer until slice_end; True when it came. Fast re-sends happen here."""
        while True:
            remaining = slice_end - time.monotonic()
            if remaining <= 0:
                return False
            pending.resend.clear()
            resend: asyncio.Future[Any] = asyncio.ensure_future(pending.resend.wait())
            waiting: set[asyncio.Future[Any]] = {pending.future, resend}
            try:
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when="FIRST_COMPLETED"
                )
            finally:
                resend.cancel()
            if pending.future.done():
                return True
            if resend in done:
                self.stats.fast_resends += 1
                await self._send(pending.message, deadline)

    async def _send(self, message: dict[str, Any], deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if not self._link.connected and not await self._link.wait_connected(max(0.0, remaining)):
            raise LinkDown("the serial line to the signer is down")
        self.stats.sends += 1
        await self._link.send(message)

    def _on_event(self, event: FrameEvent) -> None:
        if isinstance(event, FrameError):
            self.stats.broken_frames_received += 1
            log.warning("broken frame from the signer (%s): %s", event.code.value, event.detail)
            self._resends.note("broken_answer")  # probably an answer we wait for: ask again
            return
        assert isinstance(event, Frame)
        try:
            answer = decode_response(event.message)
        except SignerError as exc:
            log.warning("unreadable answer from the signer: %s", exc)
            return
        if answer.request_id is None:
            self._signer_saw_noise(answer)
            return
        pending = self._pending.get(answer.request_id)
        if pending is None or pending.future.done():
            self.stats.stray_answers += 1
            return
        pending.future.set_result(answer)

    def _signer_saw_noise(self, answer: Response | ErrorResponse) -> None:
        self.stats.signer_saw_broken_frames += 1
        self._last_noise = str(answer.error if isinstance(answer, ErrorResponse) else answer.result)
        self._resends.note("noise")

    def _resend_waiting(self, counts: Counter[str]) -> None:
        """Re-send every waiting request: once per interval, however many reports came."""
        self.stats.resend_rounds += 1
        text = f"{counts.total()} reports, last: {self._last_noise}"
        log.warning("the signer received broken frames (%s): re-sending waiting requests", text)
        for pending in self._pending.values():
            pending.resend.set()
