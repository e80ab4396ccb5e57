"""The serial link over real ptys joined by the line emulator: no mock of the link anywhere."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import select
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conditions import eventually

from signer.errors import ErrorCode, LinkDown
from signer.link.serial_link import LinkSettings, SerialLink
from signer.tools.line_emulator import LineEmulator
from signer.wire.framing import Frame, FrameError, FrameEvent, encode_frame

REOPEN = 0.1
LOGGER = "signer.link.serial_link"


class Inbox:
    """The `on_event` callback of a link: records events and lets a test wait for them."""

    def __init__(self) -> None:
        self.events: list[FrameEvent] = []

    def __call__(self, event: FrameEvent) -> None:
        self.events.append(event)

    @property
    def messages(self) -> list[Any]:
        return [event.message for event in self.events if isinstance(event, Frame)]

    @property
    def errors(self) -> list[FrameError]:
        return [event for event in self.events if isinstance(event, FrameError)]


def message(tag: str, index: int, size: int = 200) -> dict[str, Any]:
    """A message whose body is derived from its index, so a damaged one cannot pass for it."""
    return {"tag": tag, "n": index, "body": random.Random(f"{tag}{index}").randbytes(size)}


def intact(received: dict[str, Any]) -> bool:
    expected = message(received["tag"], received["n"], len(received["body"]))
    return received == expected


@pytest.fixture
def emulator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LineEmulator]:
    """An emulated cable; `@pytest.mark.parametrize("baud", ...)` picks its speed."""
    baud = getattr(request, "param", 921600)
    with LineEmulator(tmp_path / "line", baud=baud, seed=42) as line:
        yield line


@pytest.fixture
async def links() -> AsyncIterator[Callable[..., SerialLink]]:
    """Make started links; all are closed at the end of the test."""
    made: list[SerialLink] = []

    async def make(
        device: Path, on_event: Callable[[FrameEvent], None], name: str, **settings: Any
    ) -> SerialLink:
        link = SerialLink(LinkSettings(device, reopen_interval=REOPEN, **settings), on_event, name)
        made.append(link)
        await link.start()
        return link

    yield make
    for link in made:
        await link.close()


@pytest.fixture
async def pair(emulator: LineEmulator, links) -> tuple[SerialLink, Inbox, SerialLink, Inbox]:
    """Two connected links, one on each end of the cable."""
    inbox_a, inbox_b = Inbox(), Inbox()
    a = await links(emulator.end_a, inbox_a, "a")
    b = await links(emulator.end_b, inbox_b, "b")
    assert await a.wait_connected(3.0)
    assert await b.wait_connected(3.0)
    return a, inbox_a, b, inbox_b


def raw_open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


def raw_read(fd: int, size: int, timeout: float = 3.0) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, size) if ready else b""


async def test_frames_flow_both_ways_in_order(pair) -> None:
    a, inbox_a, b, inbox_b = pair
    count = 100
    forth = [message("forth", i) for i in range(count)]
    back = [message("back", i) for i in range(count)]

    async def send_all(link: SerialLink, messages: list[dict[str, Any]]) -> None:
        for item in messages:
            await link.send(item)

    await asyncio.gather(send_all(a, forth), send_all(b, back))
    await eventually(lambda: len(inbox_b.events) >= count and len(inbox_a.events) >= count)
    assert inbox_b.messages == forth and inbox_a.messages == back
    assert not inbox_a.errors and not inbox_b.errors
    sa, sb = a.stats, b.stats
    assert (sa.frames_out, sa.frames_in, sb.frames_out, sb.frames_in) == (count,) * 4
    assert sa.state == sb.state == "open"
    assert sa.bytes_out == sb.bytes_in and sb.bytes_out == sa.bytes_in
    # One resynchronising 0x00 from each opening, then the frames.
    assert sa.bytes_out == 1 + sum(len(encode_frame(item)) for item in forth)
    assert sa.broken_frames == sb.broken_frames == 0 and sa.reconnects == 0


@pytest.mark.parametrize("emulator", [None], indirect=True, ids=["unpaced"])
async def test_concurrent_senders_never_interleave(pair) -> None:
    a, _, b, inbox_b = pair
    rng = random.Random(5)
    plan = {f"task{t}": [rng.randrange(1, 20_000) for _ in range(20)] + [150_000] for t in range(6)}

    async def sender(tag: str, sizes: list[int]) -> None:
        for index, size in enumerate(sizes):
            await a.send(message(tag, index, size))

    await asyncio.gather(*(sender(tag, sizes) for tag, sizes in plan.items()))
    total = sum(len(sizes) for sizes in plan.values())
    await eventually(lambda: len(inbox_b.events) >= total)
    assert not inbox_b.errors
    assert all(intact(item) for item in inbox_b.messages)
    for tag, sizes in plan.items():
        indices = [item["n"] for item in inbox_b.messages if item["tag"] == tag]
        assert indices == list(range(len(sizes)))
    assert b.stats.frames_in == total


async def test_send_waits_while_the_line_is_full(pair, emulator: LineEmulator) -> None:
    """A stalled line fills the kernel and transport buffers; then send must wait (drain)."""
    a, _, _, inbox_b = pair
    emulator.stall(2.0, "a_to_b")
    sent = 0
    blocked: asyncio.Task[None] | None = None
    while sent < 100:  # 100 x 8 KB is far more than every buffer on the way
        task = asyncio.create_task(a.send(message("fill", sent, 8192)))
        done, _ = await asyncio.wait({task}, timeout=0.3)
        sent += 1
        if not done:
            blocked = task
            break
        task.result()
    assert blocked is not None, "send never waited although the line was stalled"
    assert sent > 3, "send waited before the buffers could have been full"
    await asyncio.wait_for(blocked, 5.0)  # the stall ends, the buffers drain
    await eventually(lambda: len(inbox_b.messages) == sent)
    assert [item["n"] for item in inbox_b.messages] == list(range(sent))


async def test_corruption_gives_frame_errors_and_later_frames_arrive(
    pair, emulator: LineEmulator
) -> None:
    a, _, b, inbox_b = pair
    emulator.set_faults("a_to_b", corrupt=0.003)
    for index in range(40):
        await a.send(message("noisy", index, 300))
    await eventually(lambda: b.stats.bytes_in == a.stats.bytes_out)
    assert inbox_b.errors, "corruption produced no FrameError"
    assert all(intact(item) for item in inbox_b.messages)  # the CRC let no damage through

    emulator.set_faults()
    for index in range(5):
        await a.send(message("clean", index))
    # A corrupted final delimiter could swallow the first clean frame; never the others.
    await eventually(
        lambda: [m["n"] for m in inbox_b.messages if m["tag"] == "clean"][-4:] == [1, 2, 3, 4]
    )
    stats = b.stats
    assert stats.broken_frames == len(inbox_b.errors) == sum(stats.broken_by_code.values())
    assert set(stats.broken_by_code) <= {code.value for code in ErrorCode}
    assert stats.frames_in == len(inbox_b.messages)
    assert emulator.stats.a_to_b.corrupted > 0


async def test_oversize_frame_is_reported_and_skipped(emulator: LineEmulator, links) -> None:
    inbox_b = Inbox()
    a = await links(emulator.end_a, Inbox(), "a")
    b = await links(emulator.end_b, inbox_b, "b", max_frame=1024)
    assert await a.wait_connected(3.0) and await b.wait_connected(3.0)
    await a.send(message("big", 0, 5000))
    await a.send(message("small", 1, 100))
    await eventually(lambda: len(inbox_b.events) == 2)
    assert [error.code for error in inbox_b.errors] == [ErrorCode.FRAME_TOO_LARGE]
    assert inbox_b.messages == [message("small", 1, 100)]
    assert b.stats.broken_by_code == {ErrorCode.FRAME_TOO_LARGE.value: 1}


async def test_device_absent_at_start_then_appears(
    tmp_path: Path, links, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    directory = tmp_path / "later"
    inbox_a = Inbox()
    a = await links(directory / "a", inbox_a, "a")

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    await eventually(lambda: logged("still no device") >= 3)  # three attempts after the first
    assert not a.connected and a.stats.state == "down"
    assert not await a.wait_connected(0.05)
    with pytest.raises(LinkDown):
        await a.send("too early")
    assert logged("waiting for device") == 1  # one warning, however many attempts

    with LineEmulator(directory, baud=921600) as line:
        assert await a.wait_connected(3.0)
        b = await links(line.end_b, Inbox(), "b")
        assert await b.wait_connected(3.0)
        await b.send("hello")
        await eventually(lambda: inbox_a.messages == ["hello"])
        assert a.stats.state == "open" and a.stats.reconnects == 0
        await a.close()
        await b.close()


async def test_unplug_then_replug(pair, emulator: LineEmulator, caplog) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    a, inbox_a, b, inbox_b = pair
    await a.send("before")
    await eventually(lambda: inbox_b.messages == ["before"])

    emulator.unplug("b")
    await eventually(lambda: not b.connected)
    assert b.stats.state == "down"
    with pytest.raises(LinkDown):
        await b.send("while unplugged")
    assert a.connected  # the other end of a cable does not notice an unplug

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records if r.name == LOGGER)

    await eventually(lambda: logged("still no device") >= 3)  # several more attempts ...
    assert logged("lost") == 1 and logged("waiting for device") == 1  # ... still one line each

    emulator.replug("b")
    assert await b.wait_connected(3.0)
    assert b.stats.state == "open" and b.stats.reconnects == 1
    await b.send("after")
    await a.send("after too")
    await eventually(lambda: inbox_a.messages == ["after"])
    await eventually(lambda: inbox_b.messages == ["before", "after too"])
    assert not inbox_a.errors and not inbox_b.errors


async def test_a_send_waiting_when_the_port_is_lost_fails_quietly(
    pair, emulator: LineEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Unplugged with unsent bytes: the waiting sender gets LINK_DOWN, and the failed write is
    logged once as the link's loss, not as an error traceback from the event loop."""
    caplog.set_level(logging.INFO)
    _, _, b, _ = pair
    emulator.stall(60.0, "b_to_a")
    pending = [asyncio.create_task(b.send(message("stuck", i, 8192))) for i in range(30)]
    await eventually(lambda: sum(task.done() for task in pending) >= 5)
    await eventually(lambda: b.held_back)  # the buffers are full: the others must wait
    assert not all(task.done() for task in pending)
    emulator.unplug("b")
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 3.0)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures and all(isinstance(r, LinkDown) for r in failures)
    assert not b.connected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1


async def test_reopening_sends_a_resync_and_drops_a_half_frame(
    emulator: LineEmulator, links
) -> None:
    """Raw bytes on end a: a link on end b must announce each opening with 0x00 and forget,
    on reconnect, the half frame it held before the drop."""
    raw = raw_open(emulator.end_a)
    try:
        inbox_b = Inbox()
        b = await links(emulator.end_b, inbox_b, "b")
        assert await b.wait_connected(3.0)
        assert await asyncio.to_thread(raw_read, raw, 16) == b"\x00"

        frame = encode_frame(message("whole", 0))
        half = frame[: len(frame) // 2]
        os.write(raw, half)
        await eventually(lambda: b.stats.bytes_in == len(half))
        emulator.unplug("b")
        await eventually(lambda: not b.connected)
        emulator.replug("b")
        assert await b.wait_connected(3.0)
        assert await asyncio.to_thread(raw_read, raw, 16) == b"\x00"

        os.write(raw, frame)
        await eventually(lambda: len(inbox_b.events) >= 1)
        await asyncio.sleep(0.05)
        assert inbox_b.events == [Frame(message("whole", 0), len(frame))]
    finally:
        os.close(raw)


async def test_a_failing_handler_does_not_stop_the_link(emulator: LineEmulator, links) -> None:
    received: list[Any] = []

    def handler(event: FrameEvent) -> None:
        assert isinstance(event, Frame)
        if event.message == "boom":
            raise RuntimeError("handler bug")
        received.append(event.message)

    a = await links(emulator.end_a, Inbox(), "a")
    b = await links(emulator.end_b, handler, "b")
    assert await a.wait_connected(3.0) and await b.wait_connected(3.0)
    for item in ("one", "boom", "two"):
        await a.send(item)
    await eventually(lambda: received == ["one", "two"])
    assert b.connected and b.stats.frames_in == 3


async def test_close_never_hangs_on_a_stalled_line(pair, emulator: LineEmulator) -> None:
    """Closing while senders wait for a stalled line releases them at once with LINK_DOWN
    (the stall outlasts the test: only close() can have released them)."""
    a, _, _, _ = pair
    emulator.stall(60.0)
    pending = [asyncio.create_task(a.send(message("stuck", i, 8192))) for i in range(30)]
    await eventually(lambda: a.held_back)
    assert not all(task.done() for task in pending), "the buffers cannot hold 240 KB"
    await asyncio.wait_for(a.close(), 2.0)
    assert not a.connected and a.stats.state == "down"
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 2.0)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures, "sends into a stalled, closed line cannot all have succeeded"
    assert all(isinstance(r, LinkDown) for r in failures)
    await a.close()  # closing twice is harmless
