"""The protocol handler: turns frames into handler calls and handler outcomes into answers.

Each request runs in its own task, so a slow handler (an HSM can take seconds per signature)
never stops frames from being read or other answers from going out. The number of requests in
flight is bounded; beyond it the answer is `busy` at once. A request whose id is already running
waits for that run and gets the same answer: a retry never runs a command twice concurrently.

Answers are handed to `post`, which queues them on the line without waiting (the serial link
bounds that queue and stops reading requests while it is full: back-pressure, not memory). No
task waits per answer. Broken frames and refusals of unreadable requests, which line noise or
an attacker can produce by the thousand, are reported once per interval with a count (answer and
log line alike); other refusals are logged at a bounded rate too.

Stopping (item 10 of issue 11): after `begin_shutdown` every new request is answered
`shutting_down`; `drain` waits a bounded time for the running ones and answers those still
running `shutting_down` too (a write that was committed meanwhile is found again by its id).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from signer.errors import ErrorCode, SignerError
from signer.link.ratelimit import DEFAULT_INTERVAL, Coalescer, describe
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
CANCEL_GRACE = 1.0  # seconds a cancelled request gets to end before it is answered anyway
LOG_BURST = 5  # refusals logged one by one per interval, before a summary line


@dataclass(frozen=True)
class RequestContext:
    """What a handler may know about the request besides its arguments."""

    request_id: str
    command: str
    digest: bytes


Handler = Callable[[Any, RequestContext], Awaitable[Result | dict[str, Any]]]
Post = Callable[[dict[str, Any]], bool]  # queue one answer; False when it cannot go out
Refused = Callable[[str | None, str | None, str], None]  # (command, request id, code)


@dataclass
class HandlerStats:
    requests: int = 0
    answered_ok: int = 0
    answered_error: int = 0
    busy: int = 0
    coalesced: int = 0
    not_sent: int = 0  # answers the line could not take (down): the client retries by id
    broken_reports: int = 0  # coalesced answers to broken frames and unreadable requests
    shutting_down: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)


class ProtocolHandler:
    def __init__(
        self,
        handlers: dict[str, Handler],
        post: Post,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        report_interval: float = DEFAULT_INTERVAL,
    ):
        self._handlers = handlers
        self._post = post
        self._max_in_flight = max_in_flight
        self._running: dict[str, tuple[bytes, asyncio.Task[Response | ErrorResponse]]] = {}
        self._waiting = 0  # copies of running requests waiting for their answer
        self._closing = False
        self._abandoned: set[asyncio.Task[Response | ErrorResponse]] = set()
        self.stats = HandlerStats()
        self._noise = Coalescer(self._report_noise, report_interval)
        self._refusals = Coalescer(self._log_refusals, report_interval, burst=LOG_BURST)
        self._unsent = Coalescer(self._log_unsent, report_interval)
        self._last_refusal = ""
        self._last_noise: dict[str, str] = {}
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

    # --- frames in ----------------------------------------------------------------------

    def on_frame(self, event: FrameEvent) -> None:
        """Accept one event from the link; never blocks and never raises."""
        if isinstance(event, FrameError):
            self._last_noise[event.code.value] = event.detail
            self._noise.note(event.code.value)
            self._audit(None, None, SignerError(event.code, event.detail))
            return
        assert isinstance(event, Frame)
        try:
            request = decode_request(event.message)
        except SignerError as exc:
            command = event.message.get("cmd") if isinstance(event.message, dict) else None
            self._audit(command if isinstance(command, str) else None, exc.details.get("id"), exc)
            self._refused(exc)
            return
        self._accept(request)

    def _refused(self, exc: SignerError) -> None:
        """A request that could not be read as one: answered, and logged at a bounded rate."""
        answer = error_response_for(exc)
        if answer.request_id is None:  # nobody to answer by id: reported like a broken frame
            self._last_noise[exc.code.value] = exc.message
            self._noise.note(exc.code.value)
            return
        self._last_refusal = f"request {answer.request_id}: {exc}"
        self._refusals.note(exc.code.value)
        self._answer(answer)

    def _accept(self, request: Request) -> None:
        self.stats.requests += 1
        if self._closing:
            self._answer(_shutting_down(request.request_id))
            return
        current = self._running.get(request.request_id)
        if current is not None:
            self._join(request, *current)
            return
        if len(self._running) >= self._max_in_flight:
            self.stats.busy += 1
            text = f"{self._max_in_flight} requests already in flight; retry later"
            busy = SignerError(ErrorCode.BUSY, text)
            self._audit(request.command.name, request.request_id, busy)
            self._answer(ErrorResponse(request.request_id, busy))
            return
        task = asyncio.create_task(self._run(request), name=f"request {request.request_id}")
        self._running[request.request_id] = (request.digest, task)
        task.add_done_callback(self._answer_task(request.request_id))

    def _join(self, request: Request, digest: bytes, task: asyncio.Task[Any]) -> None:
        if digest != request.digest:
            text = f"request id {request.request_id!r} is running with other arguments"
            error = SignerError(ErrorCode.REQUEST_ID_CONFLICT, text)
            self._audit(request.command.name, request.request_id, error)
            self._answer(ErrorResponse(request.request_id, error))
            return
        if self._waiting >= self._max_in_flight:  # copies are bounded like runs
            self.stats.busy += 1
            text = f"request {request.request_id!r} is running; ask again later"
            busy = SignerError(ErrorCode.BUSY, text)
            self._audit(request.command.name, request.request_id, busy)
            self._answer(ErrorResponse(request.request_id, busy))
            return
        self.stats.coalesced += 1
        self._waiting += 1
        task.add_done_callback(self._answer_task(request.request_id, joined=True))

    # --- running ------------------------------------------------------------------------

    async def _run(self, request: Request) -> Response | ErrorResponse:
        try:
            answer = await self._call(request)
            if isinstance(answer, ErrorResponse):
                self._audit(request.command.name, request.request_id, answer.error)
            return answer
        finally:  # at once, not in a later callback: in-flight counts only what runs
            current = self._running.get(request.request_id)
            if current is not None and current[1] is asyncio.current_task():
                del self._running[request.request_id]

    async def _call(self, request: Request) -> Response | ErrorResponse:
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
                self._last_refusal = f"request {request.request_id} ({context.command}): {error}"
                self._refusals.note(error.code.value)
            return ErrorResponse(request.request_id, error)

    def _answer_task(
        self, request_id: str, joined: bool = False
    ) -> Callable[[asyncio.Task[Response | ErrorResponse]], None]:
        def answer(task: asyncio.Task[Response | ErrorResponse]) -> None:
            if joined:
                self._waiting -= 1
            if task in self._abandoned:  # already answered shutting_down by drain
                return
            if task.cancelled():
                self._answer(_shutting_down(request_id))
            elif (exc := task.exception()) is not None:  # a bug in _run itself
                log.error("request %s: %r", request_id, exc)
                text = f"internal error while handling request {request_id!r} (logged)"
                self._answer(ErrorResponse(request_id, SignerError(ErrorCode.INTERNAL_ERROR, text)))
            else:
                self._answer(task.result())

        return answer

    # --- answers out ----------------------------------------------------------------------

    def _answer(self, event: Response | ErrorResponse) -> None:
        if isinstance(event, Response):
            self.stats.answered_ok += 1
        else:
            self.stats.answered_error += 1
            code = event.error.code.value
            self.stats.errors_by_code[code] = self.stats.errors_by_code.get(code, 0) + 1
            if event.error.code is ErrorCode.SHUTTING_DOWN:
                self.stats.shutting_down += 1
        try:
            sent = self._post(encode_response(event))
        except Exception:
            log.exception("answer to %s not sent", event.request_id)
            sent = False
        if not sent:
            self.stats.not_sent += 1
            self._unsent.note("not_sent")

    def _report_noise(self, counts: Counter[str]) -> None:
        """One answer (nil id) and one log line for broken frames and unreadable requests: at
        once for the first of a quiet interval, then one summary per interval."""
        total = sum(counts.values())
        code, _ = counts.most_common(1)[0]
        self.stats.broken_reports += 1
        if total == 1:
            detail = self._last_noise.get(code, code)
            log.warning("broken frame or unreadable request (%s): %s", code, detail)
            error = SignerError(ErrorCode(code), detail)
        else:
            text = f"{total} broken frames or unreadable requests in {self._noise.interval:g} s"
            log.warning("%s: %s", text, describe(counts))
            error = SignerError(ErrorCode(code), text, {"count": total, "by_code": dict(counts)})
        self._answer(ErrorResponse(None, error))

    def _log_refusals(self, counts: Counter[str]) -> None:
        if sum(counts.values()) == 1:
            log.info("refused %s", self._last_refusal)
        else:
            log.info("refused %s more requests in the last %g s", describe(counts),
                     self._refusals.interval)  # fmt: skip

    def _log_unsent(self, counts: Counter[str]) -> None:
        log.warning("%d answers not sent: the line is down (the client asks again by id)",
                    counts.total())  # fmt: skip

    # --- stopping -------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """From now on every new request is answered `shutting_down`."""
        self._closing = True

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` s for the running requests; cancel those still running then,
        and answer `shutting_down` for any that ignores its cancellation (its late result is
        never sent). Never waits longer than `timeout` + CANCEL_GRACE."""
        self.begin_shutdown()
        running = {task: request_id for request_id, (_, task) in self._running.items()}
        if running:
            _, pending = await asyncio.wait(running, timeout=max(0.0, timeout))
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d requests still running at shutdown: answered shutting_down",
                            len(pending))  # fmt: skip
                _, stuck = await asyncio.wait(pending, timeout=CANCEL_GRACE)
                for task in stuck:  # a task that swallowed its cancellation: answered now
                    self._abandoned.add(task)
                    self._answer(_shutting_down(running[task]))
        self._noise.flush()
        self._refusals.flush()
        self._unsent.flush()

    async def close(self) -> None:
        """Stop at once: cancel what is still running (the process is stopping)."""
        await self.drain(0)


def _shutting_down(request_id: str) -> ErrorResponse:
    text = "the signer is stopping: ask again (the same id is safe) here later or on another signer"
    return ErrorResponse(request_id, SignerError(ErrorCode.SHUTTING_DOWN, text))


__all__ = ["Handler", "Post", "ProtocolHandler", "RequestContext"]
