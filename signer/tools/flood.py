"""A flood on the serial line, as issue 11 ran it against a live signer: broken frames and
pipelined requests whose answers are never read, while the signer's memory and log are watched.

`signer serve` runs as its own process on one end of a pty; this side holds the master, so the
kernel's small pty buffer is the whole "cable" and nothing in between absorbs back-pressure:
when the signer stops reading, writes here block, exactly as a real UART's would. Used by
tests/test_flood.py (the default run) and bench/flood.py (the figures in docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from signer.wire.framing import Frame, FrameDecoder, encode_frame
from signer.wire.protocol import encode_request

BROKEN_FRAME = b"\x01\x00"  # a COBS frame shorter than its CRC: `bad_frame`
READ_SIZE = 65536


@dataclass(frozen=True)
class FloodFigures:
    """What one flood did to the signer."""

    idle_rss_mb: float  # after start and one answered request
    peak_rss_mb: float  # highest VmRSS sampled during the flood and the draining
    hwm_mb: float  # the kernel's own high-water mark of the process (VmHWM)
    log_lines: int  # lines the signer logged from the flood's start to its end
    broken_sent: int
    requests_sent: int
    answered: int  # request ids answered (ok or busy), each once
    busy: int
    broken_answers: int  # answers with a nil id (coalesced reports of broken frames)
    largest_answer: int  # bytes of the largest frame the signer sent
    flood_seconds: float  # writing everything (held back while the signer pushed back)
    drain_seconds: float  # reading every answer afterwards

    @property
    def growth_mb(self) -> float:
        return max(self.peak_rss_mb, self.hwm_mb) - self.idle_rss_mb


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


@contextlib.contextmanager
def signer_on_pty(
    workdir: Path, extra: str = ""
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """`signer serve` (health only) on a fresh pty: (process, master fd, log file)."""
    master, slave = os.openpty()
    tty.setraw(master)
    device = os.ttyname(slave)
    config = workdir / "signer.yaml"
    config.write_text(f"link:\n  device: {device}\n  reopen_interval: 0.2\n{extra}")
    log = workdir / "signer.log"
    with log.open("wb") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "signer", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    os.close(slave)  # the signer opens the device by its name
    os.set_blocking(master, False)
    try:
        yield process, master, log
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        os.close(master)


def _read(fd: int, decoder: FrameDecoder, into: list[Frame], timeout: float) -> int:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return 0
    try:
        data = os.read(fd, READ_SIZE)
    except BlockingIOError:
        return 0
    except OSError:  # EIO: the other end is closed
        return -1
    into.extend(event for event in decoder.feed(data) if isinstance(event, Frame))
    return len(data)


def call_health(fd: int, request_id: str, timeout: float = 30.0) -> Frame:
    """One request written and its answer read (nil-id answers are skipped)."""
    decoder, frames = FrameDecoder(16 * 1024 * 1024), list[Frame]()
    _write_all(fd, encode_frame(encode_request(request_id, "health", {})), timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _read(fd, decoder, frames, 0.1)
        for frame in frames:
            if isinstance(frame.message, dict) and frame.message.get("id") == request_id:
                return frame
    raise TimeoutError(f"no answer to {request_id} in {timeout} s")


def _write_all(fd: int, data: bytes, timeout: float) -> None:
    view, deadline = memoryview(data), time.monotonic() + timeout
    while view:
        if time.monotonic() > deadline:
            raise TimeoutError("the signer does not read")
        select.select([], [fd], [], 0.1)
        with contextlib.suppress(BlockingIOError):
            view = view[os.write(fd, view[:4096]) :]


def wait_open(fd: int, timeout: float = 60.0) -> None:
    """Until the signer opened its end (it sends one 0x00 when it opens the port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                if os.read(fd, READ_SIZE):
                    return
            except BlockingIOError:
                pass
            except OSError:  # EIO until the signer has opened its end
                time.sleep(0.05)
    raise TimeoutError("the signer did not open its end of the pty")


def flood(
    workdir: Path,
    broken: int = 50_000,
    requests: int = 5_000,
    progress: Callable[[str], None] = lambda _line: None,
    timeout: float = 120.0,
) -> FloodFigures:
    """Start a signer, flood it without reading, then read everything; see FloodFigures."""
    payload = BROKEN_FRAME * broken + b"".join(
        encode_frame(encode_request(f"flood-{i}", "health", {})) for i in range(requests)
    )
    with signer_on_pty(workdir) as (process, fd, log):
        wait_open(fd)
        call_health(fd, "warm-up")
        time.sleep(0.5)
        idle = rss_mb(process.pid)
        lines_before = len(log.read_bytes().splitlines())
        progress(f"idle RSS {idle:.1f} MB; writing {len(payload)} bytes without reading")
        peak, view = idle, memoryview(payload)
        started = time.monotonic()
        deadline = started + timeout
        stalled_since: float | None = None
        while view and time.monotonic() < deadline:
            _, writable, _ = select.select([], [fd], [], 0.02)
            peak = max(peak, rss_mb(process.pid))
            if writable:
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(fd, view[:4096]) :]
                    stalled_since = None
                    continue
            # The signer stopped reading (back-pressure): the flood is held back here.
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 2.0:
                break
        flooded = time.monotonic() - started
        held_back = len(view)
        progress(f"held back after {flooded:.1f} s with {held_back} bytes unwritten")
        decoder, frames = FrameDecoder(16 * 1024 * 1024), list[Frame]()
        drain_started = time.monotonic()
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if view:
                _, writable, _ = select.select([], [fd], [], 0)
                if writable:
                    with contextlib.suppress(BlockingIOError):
                        view = view[os.write(fd, view[:4096]) :]
            got = _read(fd, decoder, frames, 0.05)
            peak = max(peak, rss_mb(process.pid))
            if got > 0:
                quiet_since = time.monotonic()
            elif not view and time.monotonic() - quiet_since > 1.5:
                break
        drained = time.monotonic() - drain_started
        hwm = rss_mb(process.pid, "VmHWM")
        time.sleep(1.5)  # the last summary lines of the interval
        log_lines = len(log.read_bytes().splitlines()) - lines_before
        answered: dict[str, int] = {}
        busy = nil = largest = 0
        for frame in frames:
            message = frame.message
            largest = max(largest, frame.wire_size)
            rid = message.get("id") if isinstance(message, dict) else None
            if rid is None:
                nil += 1
                continue
            answered[rid] = answered.get(rid, 0) + 1
            if not message.get("ok") and message["error"]["code"] == "busy":
                busy += 1
        duplicates = sum(n - 1 for n in answered.values())
        if duplicates:
            raise AssertionError(f"{duplicates} requests were answered more than once")
        return FloodFigures(
            idle_rss_mb=idle,
            peak_rss_mb=peak,
            hwm_mb=hwm,
            log_lines=log_lines,
            broken_sent=broken,
            requests_sent=requests,
            answered=len(answered),
            busy=busy,
            broken_answers=nil,
            largest_answer=largest,
            flood_seconds=flooded,
            drain_seconds=drained,
        )
