"""The protocol handler: turns frames into handler calls and handler outcomes into answers.

Each request runs in its own task, so a slow handler (an HSM can take seconds per signature)
never stops frames from being read or other answers from going out. The number of requests in
flight is bounded; beyond it the answer is `busy` at once. A request whose id is already running
waits for that run and gets the same answer: a retry never runs a command twice concurrently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from signer.errors import ErrorCode, SignerError
from signer.server.errors import wire_error
from signer.wire.framing import Frame, FrameError, FrameEvent
from signer.wire.protocol import (
    ErrorResponse,
    Request,
    Response,
    Result,
    decode_request,
    dump_result,
    encode_response,
    error_response_for,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 32


@dataclass(frozen=True)
class RequestContext:
    """What a handler may know about the request besides its arguments."""

    request_id: str
    command: str
    digest: bytes


Handler = Callable[[Any, RequestContext], Awaitable[Result | dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Refused = Callable[[str | None, str | None, str], None]  # (command, request id, code)


@dataclass
class HandlerStats:
    requests: int = 0
    answered_ok: int = 0
    answered_error: int = 0
    busy: int = 0
    coalesced: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)


class ProtocolHandler:
    def __init__(
        self,
        handlers: dict[str, Handler],
        send: Send,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ):
        self._handlers = handlers
        self._send = send
        self._max_in_flight = max_in_flight
        self._running: dict[str, tuple[bytes, asyncio.Task[Response | ErrorResponse]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = HandlerStats()
        self.refused: Refused | None = None  # every error answer goes to the audit log

    def _audit(self, command: str | None, request_id: str | None, error: SignerError) -> None:
        if self.refused is not None:
            try:
                self.refused(command, request_id, error.code.value)
            except Exception:
                log.exception("refusal not audited")

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def running(self, request_id: str) -> bool:
        return request_id in self._running

    def on_frame(self, event: FrameEvent) -> None:
        """Accept one event from the link; never blocks and never raises."""
        if isinstance(event, FrameError):
            log.warning("broken frame (%s): %s", event.code.value, event.detail)
            error = SignerError(event.code, event.detail)
            self._audit(None, None, error)
            self._answer_later(ErrorResponse(None, error))
            return
        assert isinstance(event, Frame)
        try:
            request = decode_request(event.message)
        except SignerError as exc:
            log.warning("refused request %s: %s", exc.details.get("id"), exc)
            command = event.message.get("cmd") if isinstance(event.message, dict) else None
            self._audit(command if isinstance(command, str) else None, exc.details.get("id"), exc)
            self._answer_later(error_response_for(exc))
            return
        self._accept(request)

    def _accept(self, request: Request) -> None:
        self.stats.requests += 1
        current = self._running.get(request.request_id)
        if current is not None:
            self._join(request, *current)
            return
        if len(self._running) >= self._max_in_flight:
            self.stats.busy += 1
            text = f"{self._max_in_flight} requests already in flight; retry later"
            busy = SignerError(ErrorCode.BUSY, text)
            self._audit(request.command.name, request.request_id, busy)
            self._answer_later(ErrorResponse(request.request_id, busy))
            return
        task = asyncio.create_task(self._run(request), name=f"request {request.request_id}")
        self._running[request.request_id] = (request.digest, task)
        task.add_done_callback(lambda _t: self._running.pop(request.request_id, None))
        self._spawn(self._answer_when_done(task))

    def _join(self, request: Request, digest: bytes, task: asyncio.Task[Any]) -> None:
        if digest != request.digest:
            text = f"request id {request.request_id!r} is running with other arguments"
            error = SignerError(ErrorCode.REQUEST_ID_CONFLICT, text)
            self._audit(request.command.name, request.request_id, error)
            self._answer_later(ErrorResponse(request.request_id, error))
            return
        self.stats.coalesced += 1
        self._spawn(self._answer_when_done(task))

    async def _run(self, request: Request) -> Response | ErrorResponse:
        answer = await self._handle(request)
        if isinstance(answer, ErrorResponse):
            self._audit(request.command.name, request.request_id, answer.error)
        return answer

    async def _handle(self, request: Request) -> Response | ErrorResponse:
        handler = self._handlers.get(request.command.name)
        if handler is None:
            text = f"command {request.command.name!r} is not available on this signer"
            return ErrorResponse(request.request_id, SignerError(ErrorCode.UNKNOWN_COMMAND, text))
        context = RequestContext(request.request_id, request.command.name, request.digest)
        try:
            result = await handler(request.args, context)
            return Response(request.request_id, dump_result(result))
        except Exception as exc:
            error = wire_error(exc)  # the repository's and replication's failures too
            if error is None:
                log.exception(
                    "request %s (%s): handler failed", request.request_id, context.command
                )
                text = f"internal error while handling request {request.request_id!r} (logged)"
                error = SignerError(ErrorCode.INTERNAL_ERROR, text)
            else:
                log.info("request %s (%s) failed: %s", request.request_id, context.command, error)
            return ErrorResponse(request.request_id, error)

    async def _answer_when_done(self, task: asyncio.Task[Response | ErrorResponse]) -> None:
        await self._answer(await asyncio.shield(task))

    def _answer_later(self, event: Response | ErrorResponse) -> None:
        self._spawn(self._answer(event))

    async def _answer(self, event: Response | ErrorResponse) -> None:
        if isinstance(event, Response):
            self.stats.answered_ok += 1
        else:
            self.stats.answered_error += 1
            code = event.error.code.value
            self.stats.errors_by_code[code] = self.stats.errors_by_code.get(code, 0) + 1
        try:
            await self._send(encode_response(event))
        except SignerError as exc:
            log.warning("answer to %s not sent: %s", event.request_id, exc)
        except Exception:
            log.exception("answer to %s not sent", event.request_id)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel what is still running (the process is stopping)."""
        pending = list(self._tasks) + [task for _, task in self._running.values()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


__all__ = ["Handler", "ProtocolHandler", "RequestContext"]
