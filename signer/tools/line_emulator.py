"""An emulated serial cable: two pty pairs joined by a relay that paces bytes like a real line.

Linux ptys ignore the baud rate and never lose a byte, so without this the serial link would be
tested at memory speed over a perfect wire. The code under test opens the two *slave* devices
exactly as it would open /dev/ttyUSB0, through stable symlinks (`<dir>/a`, `<dir>/b`) that
`unplug` removes and `replug` points at a fresh pty, as a USB adapter vanishes and comes back.

One relay thread serves both directions (called lanes here). Each lane reads what one end wrote
from that end's pty master, applies the configured faults with a seeded `random.Random` (so a
fault run is reproducible), and hands each byte to the other master once the wire, clocked on
the monotonic clock at 10 bits a byte (8N1), has carried it: the relay never runs ahead of the
physical line, and writes every millisecond or so of line time. Every change of
state (faults, stall, unplug, replug) is executed by the relay thread itself, so the fds it
selects on are never closed under it, and the emulator can be driven from sync or asyncio code.

Run standalone with ``python -m signer.tools.line_emulator --dir DIR --baud N``: it prints
``{"a": path, "b": path}`` as one JSON line and relays until SIGTERM or SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import random
import select
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

End = Literal["a", "b"]
Direction = Literal["a_to_b", "b_to_a", "both"]
T = TypeVar("T")

BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit
CHUNK_TIME = 0.001  # deliver about this much line time per write (fewer syscalls, ~UART FIFO)
QUEUE_LIMIT = 4096  # bytes held in the relay per lane, beyond what a delay fault needs
READ_THRESHOLD = 1024  # a busy lane reads again only once this much room is free
READ_SIZE = 4096
COMMAND_TIMEOUT = 5.0
ENDS: tuple[End, End] = ("a", "b")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Faults:
    """Per-byte fault probabilities and extra latency of one direction."""

    corrupt: float = 0.0  # probability of flipping one random bit of a byte
    drop: float = 0.0  # probability of losing a byte
    duplicate: float = 0.0  # probability of delivering a byte twice
    delay: float = 0.0  # seconds added to every byte's travel time

    def __post_init__(self) -> None:
        for name in ("corrupt", "drop", "duplicate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], not {value}")
        if self.delay < 0:
            raise ValueError(f"delay must not be negative, not {self.delay}")

    @property
    def mangles(self) -> bool:
        """Whether bytes need the (slow) per-byte treatment at all."""
        return bool(self.corrupt or self.drop or self.duplicate)


@dataclass(frozen=True, slots=True)
class DirectionStats:
    """Counters of one direction since the emulator was created."""

    bytes_in: int  # read from the sending end
    bytes_out: int  # delivered to the receiving end
    corrupted: int
    dropped: int
    duplicated: int
    discarded: int  # sent while the receiving end was unplugged


@dataclass(frozen=True, slots=True)
class EmulatorStats:
    a_to_b: DirectionStats
    b_to_a: DirectionStats


class _Pty:
    """One end's pty pair. The relay keeps its own slave fd open: a master read returns EIO once
    every slave fd is closed, which would happen each time the code under test closes the port."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no CR/LF translation, no XON/XOFF: bytes are bytes
        os.set_blocking(self.master, False)
        self.device = os.ttyname(self.slave)

    def close(self) -> None:
        """Closing the master hangs the slave up: an opened device reads EOF, writes get EIO."""
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Lane:
    """One direction of the cable: queued bytes, the wire's clock and the faults applied.

    The wire is modelled, not approximated by a token bucket with credit: `clock` is when the
    line finishes its last byte, a byte is delivered only once its 10 bits have been on the
    wire (as a UART receiver gets it after its stop bit), and an idle line restarts at the
    arrival of the next byte. So no window ever carries more than the line could, and a relay
    that wakes late catches up instead of losing line time.
    """

    def __init__(self, rate: float | None, rng: random.Random):
        self.rate = rate  # bytes per second; None when unpaced
        self.byte_time = 1.0 / rate if rate else 0.0
        self.chunk = max(1, round(rate * CHUNK_TIME)) if rate else 1
        self.clock = 0.0
        self.rng = rng
        self.faults = Faults()
        self.stalled_until = 0.0
        self.blocked = False  # the receiving master is full: wait until it is writable
        self.queue: deque[tuple[float, bytes]] = deque()  # (deliverable from, bytes)
        self.queued = 0
        self.bytes_in = self.bytes_out = 0
        self.corrupted = self.dropped = self.duplicated = self.discarded = 0

    def room(self) -> int:
        """How much more to read from the sender; the rest waits in the kernel (back-pressure)."""
        limit = QUEUE_LIMIT + int((self.rate or 16 * QUEUE_LIMIT) * self.faults.delay)
        return max(0, limit - self.queued)

    def wants_input(self) -> bool:
        """Read in big gulps when busy (hysteresis), so a full lane is not woken per byte."""
        return self.room() >= READ_THRESHOLD

    def accept(self, data: bytes, now: float) -> None:
        self.bytes_in += len(data)
        if self.faults.mangles:
            data = self._mangle(data)
        if data:
            self.queue.append((now + self.faults.delay, data))
            self.queued += len(data)

    def _mangle(self, data: bytes) -> bytes:
        """Apply the per-byte faults; draws nothing for a fault that is off, so runs replay."""
        corrupt, drop, duplicate = self.faults.corrupt, self.faults.drop, self.faults.duplicate
        rng = self.rng
        out = bytearray()
        for byte in data:
            if drop and rng.random() < drop:
                self.dropped += 1
                continue
            if corrupt and rng.random() < corrupt:
                byte ^= 1 << rng.randrange(8)
                self.corrupted += 1
            out.append(byte)
            if duplicate and rng.random() < duplicate:
                out.append(byte)
                self.duplicated += 1
        return bytes(out)

    def next_wake(self) -> float:
        """Monotonic time at which `take` next has bytes; inf while waiting on I/O."""
        if not self.queue or self.blocked:
            return math.inf
        start = max(self.clock, self.queue[0][0], self.stalled_until)
        return start + min(self.chunk, self.queued) * self.byte_time

    def take(self, now: float) -> bytes:
        """Remove and return the bytes that have finished crossing the wire by `now`."""
        if self.blocked or now < self.stalled_until:
            return b""
        out = bytearray()
        while self.queue and self.queue[0][0] <= now:
            due, data = self.queue[0]
            start = max(self.clock, due, self.stalled_until)
            count = len(data)
            if self.byte_time:
                count = min(count, int((now - start) / self.byte_time + 1e-9))
            if count <= 0:
                break
            self.clock = start + count * self.byte_time
            out += data[:count]
            if count < len(data):
                self.queue[0] = (due, data[count:])
                break
            self.queue.popleft()
        self.queued -= len(out)
        return bytes(out)

    def give_back(self, data: bytes) -> None:
        """Bytes the receiving master refused: first in line again, as if never sent."""
        self.queue.appendleft((0.0, data))
        self.queued += len(data)
        self.clock -= len(data) * self.byte_time
        self.blocked = True

    def unblock(self, now: float) -> None:
        """The receiver has room again; like a line halted by flow control, resume from now."""
        if self.blocked:
            self.blocked = False
            self.clock = max(self.clock, now)

    def stats(self) -> DirectionStats:
        return DirectionStats(
            self.bytes_in,
            self.bytes_out,
            self.corrupted,
            self.dropped,
            self.duplicated,
            self.discarded,
        )


class LineEmulator:
    """Two pty ends joined by a paced, fault-injecting relay; see the module docstring.

    `baud=None` (or 0) relays unpaced; `seed` makes fault runs reproducible.
    """

    def __init__(self, directory: Path | str, baud: int | None = 115200, seed: int = 0):
        if baud is not None and baud < 0:
            raise ValueError(f"baud must be positive, 0 or None, not {baud}")
        self.directory = Path(directory).absolute()
        self.baud = baud or None
        self._paths: dict[End, Path] = {end: self.directory / end for end in ENDS}
        self._ptys: dict[End, _Pty | None] = {end: None for end in ENDS}
        rate = self.baud / BITS_PER_BYTE if self.baud else None
        self._lanes: dict[tuple[End, End], _Lane] = {
            ("a", "b"): _Lane(rate, random.Random(f"{seed}:a_to_b")),
            ("b", "a"): _Lane(rate, random.Random(f"{seed}:b_to_a")),
        }
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]
        self._commands = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LineEmulator:
        """Create both ends and start relaying."""
        if self._closed:
            raise RuntimeError("the line emulator is closed")
        if self._thread is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        for end in ENDS:
            self._plug(end)
        self._thread = threading.Thread(target=self._run, name="line-emulator", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop relaying, hang both ends up and remove the symlinks."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stopping = True
            self._wake()
            self._thread.join(COMMAND_TIMEOUT)
        for end in ENDS:
            self._unplug(end)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> LineEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- public controls ---------------------------------------------------------------------

    @property
    def end_a(self) -> Path:
        return self._paths["a"]

    @property
    def end_b(self) -> Path:
        return self._paths["b"]

    @property
    def bytes_per_second(self) -> float | None:
        """The line's physical bound in each direction; None when unpaced."""
        return self.baud / BITS_PER_BYTE if self.baud else None

    def set_faults(
        self,
        direction: Direction = "both",
        corrupt: float = 0.0,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
    ) -> None:
        """Replace the faults of a direction (all zero: a perfect line again)."""
        faults = Faults(corrupt, drop, duplicate, delay)
        lanes = self._select(direction)

        def apply() -> None:
            for lane in lanes:
                lane.faults = faults

        self._call(apply)

    def stall(self, seconds: float, direction: Direction = "both") -> None:
        """Forward nothing for `seconds`; bytes sent meanwhile wait (and then back-pressure)."""
        lanes = self._select(direction)

        def apply() -> None:
            until = time.monotonic() + seconds
            for lane in lanes:
                lane.stalled_until = max(lane.stalled_until, until)

        self._call(apply)

    def unplug(self, end: End) -> None:
        """Hang `end` up and remove its symlink: an opened device sees EOF/EIO, opening fails."""
        self._call(lambda: self._unplug(self._check_end(end)))

    def replug(self, end: End) -> None:
        """Give `end` a fresh pty pair behind the same symlink (no-op if it is plugged)."""
        self._call(lambda: self._plug(self._check_end(end)))

    def plugged(self, end: End) -> bool:
        return self._ptys[self._check_end(end)] is not None

    @property
    def stats(self) -> EmulatorStats:
        """A consistent snapshot of the byte and fault counters."""
        return self._call(
            lambda: EmulatorStats(self._lanes[("a", "b")].stats(), self._lanes[("b", "a")].stats())
        )

    # -- helpers run on the caller's side ----------------------------------------------------

    def _select(self, direction: Direction) -> list[_Lane]:
        if direction == "both":
            return list(self._lanes.values())
        if direction == "a_to_b":
            return [self._lanes[("a", "b")]]
        if direction == "b_to_a":
            return [self._lanes[("b", "a")]]
        raise ValueError(f"direction must be 'a_to_b', 'b_to_a' or 'both', not {direction!r}")

    @staticmethod
    def _check_end(end: str) -> End:
        if end not in ENDS:
            raise ValueError(f"end must be 'a' or 'b', not {end!r}")
        return end

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the relay thread (or right here when it does not run) and return its
        result: only that thread touches the fds and lanes, so none is closed while in use."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return fn()
        done: Future[Any] = Future()
        self._commands.put((fn, done))
        self._wake()
        return cast(T, done.result(COMMAND_TIMEOUT))

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    # -- plugging (relay thread, or before it starts / after it stops) -----------------------

    def _plug(self, end: End) -> None:
        if self._ptys[end] is not None:
            return
        pty = _Pty()
        self._ptys[end] = pty
        path = self._paths[end]
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.unlink(missing_ok=True)
        os.symlink(pty.device, temporary)
        os.replace(temporary, path)  # atomic: the path is never half-made

    def _unplug(self, end: End) -> None:
        pty, self._ptys[end] = self._ptys[end], None
        if pty is None:
            return
        path = self._paths[end]
        if path.is_symlink() and os.readlink(path) == pty.device:
            path.unlink()
        pty.close()

    # -- the relay ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._relay()
        except Exception:
            log.exception("line emulator relay stopped")
        finally:
            self._run_commands()  # nobody waits forever on a command posted just before the end

    def _relay(self) -> None:
        while not self._stopping:
            readers, writers, timeout = self._wait_set(time.monotonic())
            readable, writable, _ = select.select(readers, writers, [], timeout)
            if self._wake_r in readable:
                self._run_commands()
                continue  # fds may have changed: select again before touching any
            now = time.monotonic()
            for (src, dst), lane in self._lanes.items():
                self._receive(src, lane, readable, now)
                self._deliver(dst, lane, writable, now)

    def _wait_set(self, now: float) -> tuple[list[int], list[int], float]:
        readers, writers = [self._wake_r], []
        wake = now + 1.0
        for (src, dst), lane in self._lanes.items():
            source, target = self._ptys[src], self._ptys[dst]
            if source is not None and lane.wants_input():
                readers.append(source.master)
            if lane.blocked and target is not None:
                writers.append(target.master)
            wake = min(wake, lane.next_wake())
        return readers, writers, max(0.0, wake - now)

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                done.set_result(fn())
            except Exception as exc:
                done.set_exception(exc)

    def _receive(self, src: End, lane: _Lane, readable: list[int], now: float) -> None:
        pty = self._ptys[src]
        if pty is None or pty.master not in readable:
            return
        try:
            data = os.read(pty.master, min(READ_SIZE, lane.room()))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO cannot happen while we hold the slave; never let it stop the relay
        lane.accept(data, now)

    def _deliver(self, dst: End, lane: _Lane, writable: list[int], now: float) -> None:
        pty = self._ptys[dst]
        if pty is None or pty.master in writable:
            lane.unblock(now)
        data = lane.take(now)
        if not data:
            return
        if pty is None:
            lane.discarded += len(data)  # into an unplugged cable: gone, but it took line time
            return
        try:
            written = os.write(pty.master, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            lane.discarded += len(data)
            return
        lane.bytes_out += written
        if written < len(data):
            lane.give_back(data[written:])
