"""The serial link: keeps one port open across unplugs and turns its bytes into frame events.

All the I/O of the line lives here; signer/wire/framing.py stays a pure codec. A supervisor opens
the port, and re-opens it whenever it disappears and comes back (a USB adapter pulled and
plugged in again, a device that is not there yet at start). Each opening gets a fresh decoder,
so half a frame from before a drop is never glued to what comes after, and starts by sending
one 0x00 so the peer's decoder drops its own half frame too.

Both sides use the same class; `on_event` receives every `Frame` and `FrameError` in the event
loop, and `send` writes one whole frame at a time, waiting while the transport's buffer is full.
The signer answers through `post` instead, which never waits: frames go into a queue bounded in
frames and bytes that one writer task empties; while the queue is over its bound the link stops
reading (back-pressure: the peer's writes block, as a real UART's do), and reads again once half
of it has gone out. What is queued when the port is lost is dropped (the client asks again by
request id). `close` is bounded whatever the port does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import serial
import serial_asyncio

from signer.errors import LinkDown
from signer.wire.framing import (
    DEFAULT_MAX_FRAME,
    DELIMITER,
    FrameDecoder,
    FrameError,
    FrameEvent,
    encode_frame,
)

log = logging.getLogger(__name__)

LinkState = Literal["open", "down"]
HANG_UP_TIMEOUT = 1.0  # seconds close() waits for the transport to let go of the port
CLOSE_TIMEOUT = 3.0  # seconds close() waits for the supervisor and writer to end
DEFAULT_QUEUE_FRAMES = 64
DEFAULT_QUEUE_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """How to open the serial port; `max_frame` bounds a received frame's payload."""

    device: str | Path
    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    rtscts: bool = False
    xonxoff: bool = False
    reopen_interval: float = 1.0
    max_frame: int = DEFAULT_MAX_FRAME
    queue_frames: int = DEFAULT_QUEUE_FRAMES  # `post`: reading stops above this many frames
    queue_bytes: int = DEFAULT_QUEUE_BYTES  # ... or above this many bytes queued
    exclusive: bool = True  # flock the device: a second process on the same line is refused

    def __post_init__(self) -> None:
        # Checked here so that a bad setting fails at start-up, not as an endless reopen loop.
        if self.baudrate <= 0:
            raise ValueError(f"baudrate must be positive, not {self.baudrate}")
        if self.bytesize not in (5, 6, 7, 8):
            raise ValueError(f"bytesize must be 5, 6, 7 or 8, not {self.bytesize}")
        if self.parity not in ("N", "E", "O", "M", "S"):
            raise ValueError(f"parity must be one of N E O M S, not {self.parity!r}")
        if self.stopbits not in (1, 1.5, 2):
            raise ValueError(f"stopbits must be 1, 1.5 or 2, not {self.stopbits}")
        if self.reopen_interval <= 0:
            raise ValueError(f"reopen_interval must be positive, not {self.reopen_interval}")
        if self.max_frame <= 0:
            raise ValueError(f"max_frame must be positive, not {self.max_frame}")
        if self.queue_frames <= 0 or self.queue_bytes <= 0:
            raise ValueError("queue_frames and queue_bytes must be positive")


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of the link's counters; `since` is the Unix time of the last state change."""

    state: LinkState
    since: float
    frames_in: int
    frames_out: int
    broken_frames: int
    broken_by_code: dict[str, int]
    bytes_in: int
    bytes_out: int
    reconnects: int
    queued_frames: int  # answers waiting to go out (`post`)
    queued_bytes: int
    dropped_frames: int  # queued answers lost with the port
    read_pauses: int  # times reading stopped because the queue was full (back-pressure)
    reading_paused: bool


@dataclass(slots=True)
class _Counters:
    frames_in: int = 0
    frames_out: int = 0
    broken: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    reconnects: int = 0
    dropped: int = 0
    read_pauses: int = 0


class _SerialTransport(serial_asyncio.SerialTransport):
    """pyserial-asyncio reports a failed write to the loop's exception handler (a traceback at
    ERROR level) before it aborts. Losing the port is routine here and the link logs it once,
    so only abort. (`_fatal_error` is private API: pyserial-asyncio is pinned below 0.7.)"""

    def _fatal_error(self, exc: Exception, message: str = "") -> None:
        self._abort(exc)


class _Connection(asyncio.Protocol):
    """One opening of the port: its transport, its decoder, write flow control and its end."""

    def __init__(self, max_frame: int, on_data: Callable[[_Connection, bytes], None]):
        loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self._on_data = on_data

    @property
    def alive(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing() and not self.lost.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self.writable.set()  # wake senders waiting for room: they must see the loss

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class SerialLink:
    """A serial port that stays open across unplugs, speaking frames; see the module docstring.

    `on_event` runs in the event loop for every received `Frame` or `FrameError`: keep it
    non-blocking (hand work to a task or a queue). `name` prefixes the log lines.
    """

    def __init__(
        self,
        settings: LinkSettings,
        on_event: Callable[[FrameEvent], None],
        name: str = "serial",
    ):
        self.settings = settings
        self.name = name
        self._on_event = on_event
        self._device = os.fspath(settings.device)
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._counters = _Counters()
        self._state: LinkState = "down"
        self._since = time.time()
        self._ever_opened = False
        self._closing = False
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._queued = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._paused = False

    # -- public ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the supervisor; the port opens in the background, now or once it appears."""
        self._closing = False
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise(), name=f"link-{self.name}")
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(), name=f"writer-{self.name}")

    async def close(self) -> None:
        """Stop reopening and let go of the port; bytes not yet written are discarded. Bounded:
        a supervisor that does not end when cancelled (a cancellation swallowed by a wait that
        completed at the same moment) is left behind, and can never reopen the port."""
        self._closing = True  # checked by the supervisor before every (re)open
        tasks = [t for t in (self._supervisor, self._writer) if t is not None]
        self._supervisor = self._writer = None
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            if stuck:
                log.error("%s: %d task(s) did not stop in %g s", self.name, len(stuck),
                          CLOSE_TIMEOUT)  # fmt: skip
        conn = self._conn
        if conn is not None:
            await self._hang_up(conn)
            self._went_down(conn, None)
        self._drop_queue()

    async def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the queued frames to be written; True when they were."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queue and self.connected and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not self._queue

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.alive

    @property
    def held_back(self) -> bool:
        """Whether the port's output buffer is full, so senders wait (the line is slower than
        what is being sent, or the peer stopped reading: a stall, RTS/CTS or XOFF)."""
        return self._conn is not None and self._conn.alive and not self._conn.writable.is_set()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the port is open; False if it is still down after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.connected:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._connected.wait(), remaining)
            except TimeoutError:
                return False
            if not self.connected:
                await asyncio.sleep(0.01)  # opened, but already dying: wait for the news
        return True

    async def send(self, message: Any) -> None:
        """Write one frame and wait while the transport's buffer is over its high-water mark.

        Raises `LinkDown` when the port is not open, or is lost while waiting.
        One frame at a time: concurrent senders never interleave, and memory stays bounded.
        """
        await self._write(encode_frame(message))

    def post(self, message: Any) -> bool:
        """Queue one frame for the writer task, without waiting; False (and nothing queued)
        when the port is not open. Above the queue's bound reading stops until it drains."""
        if self._closing or not self.connected:
            self._counters.dropped += 1
            return False
        frame = encode_frame(message)
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        self._queued.set()
        if not self._paused and (
            len(self._queue) > self.settings.queue_frames
            or self._queued_bytes > self.settings.queue_bytes
        ):
            self._pause_reading()
        return True

    @property
    def stats(self) -> LinkStats:
        c = self._counters
        return LinkStats(
            state=self._state,
            since=self._since,
            frames_in=c.frames_in,
            frames_out=c.frames_out,
            broken_frames=sum(c.broken.values()),
            broken_by_code=dict(c.broken),
            bytes_in=c.bytes_in,
            bytes_out=c.bytes_out,
            reconnects=c.reconnects,
            queued_frames=len(self._queue),
            queued_bytes=self._queued_bytes,
            dropped_frames=c.dropped,
            read_pauses=c.read_pauses,
            reading_paused=self._paused,
        )

    # -- the queue (post) --------------------------------------------------------------------

    async def _write_queued(self) -> None:
        """Write the queued frames in order, one at a time; only cancellation ends it."""
        while True:
            await self._queued.wait()
            while self._queue:
                frame = self._queue[0]
                try:
                    await self._write(frame)
                except LinkDown:
                    self._drop_queue()
                    break
                self._queue.popleft()
                self._queued_bytes -= len(frame)
                if self._paused and self._below_half():
                    self._resume_reading()
            if not self._queue:
                self._queued.clear()

    async def _write(self, frame: bytes) -> None:
        async with self._send_lock:
            conn = self._conn
            if conn is None or not conn.alive or conn.transport is None:
                raise LinkDown(f"serial line {self.name} is down")
            conn.transport.write(frame)
            self._counters.frames_out += 1
            self._counters.bytes_out += len(frame)
            await conn.writable.wait()
            if conn.lost.done():
                raise LinkDown(f"serial line {self.name} lost while sending")

    def _below_half(self) -> bool:
        return (
            len(self._queue) <= self.settings.queue_frames // 2
            and self._queued_bytes <= self.settings.queue_bytes // 2
        )

    def _drop_queue(self) -> None:
        self._counters.dropped += len(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._queued.clear()
        self._paused = False  # a new opening reads from the start

    def _pause_reading(self) -> None:
        self._paused = True
        self._counters.read_pauses += 1
        conn = self._conn
        if conn is not None and conn.transport is not None and conn.alive:
            conn.transport.pause_reading()

    def _resume_reading(self) -> None:
        self._paused = False
        conn = self._conn
        if conn is not None and conn.transport is not None and conn.alive:
            conn.transport.resume_reading()

    # -- supervisor --------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Open, serve until lost, wait, repeat. Cancellation ends it, and so does `close`
        even when a cancellation got lost: the port is never opened again once closing."""
        waiting_reported = False
        while not self._closing:
            try:
                conn = await self._open()
            except Exception as exc:
                if not waiting_reported:
                    log.warning("%s: waiting for device %s: %s", self.name, self._device, exc)
                    waiting_reported = True
                else:
                    log.debug("%s: still no device %s: %s", self.name, self._device, exc)
            else:
                if self._closing:  # close() came while the port was opening
                    await self._hang_up(conn)
                    return
                waiting_reported = False
                await self._serve(conn)
            await asyncio.sleep(self.settings.reopen_interval)

    async def _open(self) -> _Connection:
        s = self.settings
        port = serial.serial_for_url(
            self._device,
            baudrate=s.baudrate,
            bytesize=s.bytesize,
            parity=s.parity,
            stopbits=s.stopbits,
            rtscts=s.rtscts,
            xonxoff=s.xonxoff,
            exclusive=s.exclusive or None,
            do_not_open=True,
        )
        port.open()
        try:
            loop = asyncio.get_running_loop()
            conn = _Connection(s.max_frame, self._data_received)
            conn.transport = _SerialTransport(loop, conn, port)  # connection_made comes later
        except BaseException:
            port.close()
            raise
        return conn

    async def _serve(self, conn: _Connection) -> None:
        """Announce the connection, then wait for its end; errors here never stop the loop."""
        try:
            assert conn.transport is not None
            conn.transport.write(DELIMITER)  # the peer's decoder drops its half frame, if any
            self._counters.bytes_out += len(DELIMITER)
            self._went_up(conn)
            exc = await self._wait_lost(conn)
            self._went_down(conn, str(exc) if exc else "closed by the transport")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: unexpected error on %s", self.name, self._device)
            await self._hang_up(conn)
            self._went_down(conn, f"unexpected error: {exc!r}")

    async def _wait_lost(self, conn: _Connection) -> Exception | None:
        """Wait for the end of the connection. A read error closes the transport gracefully,
        which waits for its unsent bytes; should a dead port never take them, abort it."""
        closing_seen = False
        while True:
            with contextlib.suppress(TimeoutError):
                # shield: cancelling the supervisor must not settle `lost` (close() needs it)
                interval = self.settings.reopen_interval
                return await asyncio.wait_for(asyncio.shield(conn.lost), interval)
            assert conn.transport is not None
            if closing_seen:
                conn.transport.abort()
            closing_seen = conn.transport.is_closing()

    def _went_up(self, conn: _Connection) -> None:
        if self._ever_opened:
            self._counters.reconnects += 1
        self._ever_opened = True
        self._conn = conn
        self._set_state("open")
        self._connected.set()
        log.info("%s: opened %s", self.name, self._device)

    def _went_down(self, conn: _Connection, reason: str | None) -> None:
        """`reason` None: closed on purpose, not worth a warning."""
        if self._conn is not conn:
            return
        self._conn = None
        self._drop_queue()
        self._connected.clear()
        self._set_state("down")
        if reason is None:
            log.info("%s: closed %s", self.name, self._device)
        else:
            log.warning("%s: lost %s: %s", self.name, self._device, reason)

    def _set_state(self, state: LinkState) -> None:
        self._state = state
        self._since = time.time()

    async def _hang_up(self, conn: _Connection) -> None:
        """Abort the transport without ever blocking: pyserial-asyncio's close path calls
        tcdrain(), which waits for the kernel's output queue, so empty that queue first."""
        transport = conn.transport
        if transport is not None and not conn.lost.done():
            port = transport.get_extra_info("serial")
            if port is not None:
                with contextlib.suppress(Exception):
                    port.reset_output_buffer()
            transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.lost), HANG_UP_TIMEOUT)

    # -- receiving ---------------------------------------------------------------------------

    def _data_received(self, conn: _Connection, data: bytes) -> None:
        c = self._counters
        c.bytes_in += len(data)
        for event in conn.decoder.feed(data):
            if isinstance(event, FrameError):
                c.broken[event.code.value] += 1
            else:
                c.frames_in += 1
            try:
                self._on_event(event)
            except Exception:
                log.exception("%s: the frame handler failed", self.name)
