"""The emulated serial cable, driven through real ptys with plain fds (no serial library)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conditions import wait_until

from signer.cli import main
from signer.tools.line_emulator import BITS_PER_BYTE, LineEmulator

Factory = Callable[..., LineEmulator]


@pytest.fixture
def make_emulator(tmp_path: Path) -> Iterator[Factory]:
    """Started emulators in fresh directories, all closed at the end of the test."""
    made: list[LineEmulator] = []

    def make(baud: int | None = None, seed: int = 0) -> LineEmulator:
        emulator = LineEmulator(tmp_path / f"line{len(made)}", baud=baud, seed=seed).start()
        made.append(emulator)
        return emulator

    yield make
    for emulator in made:
        emulator.close()


@pytest.fixture
def fds() -> Iterator[Callable[[Path], int]]:
    """Open a device path as the code under test would (non-blocking here); closed at the end."""
    opened: list[int] = []

    def open_device(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        opened.append(fd)
        return fd

    yield open_device
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def pump(
    src: int, dst: int, data: bytes, expected: int | None = None, timeout: float = 5.0
) -> bytes:
    """Write `data` into `src` while reading `dst`, until `expected` bytes (default: as many as
    written) arrived or `timeout` passed; returns what arrived."""
    expected = len(data) if expected is None else expected
    view = memoryview(data)
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        readable, writable, _ = select.select([dst], [src] if view else [], [], 0.05)
        if writable:
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(src, view[:4096]) :]
        if readable:
            with contextlib.suppress(BlockingIOError):
                out += os.read(dst, 65536)
    return bytes(out)


def drain(fd: int, quiet: float = 0.2) -> bytes:
    """Everything `fd` delivers until it has been silent for `quiet` seconds."""
    out = bytearray()
    while select.select([fd], [], [], quiet)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def is_subsequence(short: bytes, long: bytes) -> bool:
    it = iter(long)
    return all(byte in it for byte in short)


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("baud", [None, 921600], ids=["unpaced", "921600"])
def test_bytes_cross_intact_both_ways(make_emulator: Factory, fds, baud: int | None) -> None:
    emulator = make_emulator(baud)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    size = 200_000 if baud is None else 30_000
    forth, back = payload(size, 1), payload(size, 2)
    assert pump(a, b, forth) == forth
    assert pump(b, a, back) == back
    stats = emulator.stats
    assert stats.a_to_b.bytes_in == stats.a_to_b.bytes_out == size
    assert stats.b_to_a.bytes_in == stats.b_to_a.bytes_out == size


@pytest.mark.parametrize("baud", [9600, 38400, 115200])
def test_pacing_is_never_faster_than_the_line(make_emulator: Factory, fds, baud: int) -> None:
    emulator = make_emulator(baud)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    size = baud // BITS_PER_BYTE // 2  # half a second of line time
    data = payload(size)
    started = time.monotonic()
    assert pump(a, b, data) == data
    elapsed = time.monotonic() - started
    assert elapsed >= 0.9 * size * BITS_PER_BYTE / baud


def test_directions_are_paced_independently(make_emulator: Factory, fds) -> None:
    """Both directions at once: each still takes its own line time, and both arrive intact."""
    emulator = make_emulator(38400)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    size = 1920  # 0.5 s at 38400
    forth, back = payload(size, 3), payload(size, 4)
    started = time.monotonic()
    os.write(b, back)  # fits in the kernel's buffer: sent while a -> b is pumped
    assert pump(a, b, forth) == forth
    assert pump(b, a, b"", expected=size) == back
    assert time.monotonic() - started >= 0.9 * size * BITS_PER_BYTE / 38400


def corrupt_run(make_emulator: Factory, fds, seed: int, data: bytes) -> tuple[bytes, int]:
    emulator = make_emulator(None, seed)
    emulator.set_faults("a_to_b", corrupt=0.05)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    received = pump(a, b, data)
    return received, emulator.stats.a_to_b.corrupted


def test_corrupt_flips_one_bit_per_damaged_byte_reproducibly(make_emulator: Factory, fds) -> None:
    data = payload(4000)
    received, corrupted = corrupt_run(make_emulator, fds, 7, data)
    assert len(received) == len(data)
    damaged = [x ^ y for x, y in zip(data, received, strict=True) if x != y]
    assert len(damaged) == corrupted
    assert 100 <= corrupted <= 300  # 5 % of 4000 = 200
    assert all(bin(flip).count("1") == 1 for flip in damaged)
    again, _ = corrupt_run(make_emulator, fds, 7, data)
    other, _ = corrupt_run(make_emulator, fds, 8, data)
    assert again == received
    assert other != received


def test_corrupt_only_the_chosen_direction(make_emulator: Factory, fds) -> None:
    emulator = make_emulator(None)
    emulator.set_faults("a_to_b", corrupt=0.5)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    data = payload(2000)
    assert pump(b, a, data) == data
    assert pump(a, b, data) != data
    assert emulator.stats.b_to_a.corrupted == 0


def test_drop_loses_bytes_and_keeps_order(make_emulator: Factory, fds) -> None:
    emulator = make_emulator(None, seed=3)
    emulator.set_faults(drop=0.1)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    data = payload(5000)
    os.set_blocking(a, True)
    os.write(a, data)
    wait_until(lambda: emulator.stats.a_to_b.bytes_in == len(data))
    dropped = emulator.stats.a_to_b.dropped
    received = pump(a, b, b"", expected=len(data) - dropped)
    assert len(received) == len(data) - dropped
    assert 300 <= dropped <= 700  # 10 % of 5000 = 500
    assert is_subsequence(received, data)


def test_duplicate_repeats_bytes_in_place(make_emulator: Factory, fds) -> None:
    emulator = make_emulator(None, seed=4)
    emulator.set_faults(duplicate=0.1)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    data = payload(5000)
    os.set_blocking(a, True)
    os.write(a, data)
    wait_until(lambda: emulator.stats.a_to_b.bytes_in == len(data))
    duplicated = emulator.stats.a_to_b.duplicated
    received = pump(a, b, b"", expected=len(data) + duplicated)
    assert len(received) == len(data) + duplicated
    assert 300 <= duplicated <= 700
    assert is_subsequence(data, received)


def test_faults_can_be_cleared(make_emulator: Factory, fds) -> None:
    emulator = make_emulator(None)
    emulator.set_faults(corrupt=1.0, drop=0.0, duplicate=0.0)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    data = payload(500)
    assert pump(a, b, data) != data
    emulator.set_faults()
    assert pump(a, b, data) == data


def test_delay_adds_latency(make_emulator: Factory, fds) -> None:
    emulator = make_emulator(None)
    emulator.set_faults("b_to_a", delay=0.3)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    started = time.monotonic()
    assert pump(b, a, b"ping") == b"ping"
    assert time.monotonic() - started >= 0.3


def test_stall_holds_bytes_then_delivers_them(make_emulator: Factory, fds) -> None:
    emulator = make_emulator(115200)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    emulator.stall(0.5)
    started = time.monotonic()
    data = payload(1000)
    assert pump(a, b, data) == data
    assert time.monotonic() - started >= 0.45


def test_unplug_hangs_up_and_replug_brings_the_path_back(make_emulator: Factory, fds) -> None:
    emulator = make_emulator(None)
    a, b = fds(emulator.end_a), fds(emulator.end_b)
    assert pump(a, b, b"before") == b"before"
    emulator.unplug("b")
    assert not emulator.end_b.exists()
    assert not emulator.plugged("b")
    assert select.select([b], [], [], 1.0)[0], "a hung-up device reports readable"
    try:
        assert os.read(b, 10) == b""  # EOF, or EIO on some kernels
    except OSError as exc:
        assert exc.errno == errno.EIO
    with pytest.raises(OSError) as write_error:
        os.write(b, b"x")
    assert write_error.value.errno == errno.EIO
    with pytest.raises(FileNotFoundError):
        os.open(emulator.end_b, os.O_RDWR | os.O_NOCTTY)

    os.write(a, b"into the void")
    wait_until(lambda: emulator.stats.a_to_b.discarded == len(b"into the void"))

    emulator.replug("b")
    assert emulator.end_b.is_symlink() and emulator.plugged("b")
    b2 = fds(emulator.end_b)
    assert pump(a, b2, b"after") == b"after"
    assert pump(b2, a, b"back") == b"back"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with LineEmulator(tmp_path, baud=None) as emulator:
        with pytest.raises(ValueError):
            emulator.set_faults(corrupt=1.5)
        with pytest.raises(ValueError):
            emulator.set_faults("sideways", drop=0.1)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            emulator.unplug("c")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["line-emulator", "--help"])
    assert exit_info.value.code == 0
    assert "--baud" in capsys.readouterr().out


def test_main_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before any pty is made: exit 2 and the reason."""
    assert main(["line-emulator", "--dir", str(tmp_path / "l"), "--baud", "-1"]) == 2
    assert "--baud must not be negative" in capsys.readouterr().err
    assert main(["line-emulator", "--dir", str(tmp_path / "l"), "--drop", "1.5"]) == 2
    assert "drop must be a probability" in capsys.readouterr().err
    assert not (tmp_path / "l").exists()


def test_standalone_process_relays_until_sigterm(tmp_path: Path, fds) -> None:
    directory = tmp_path / "line"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "signer",
            "line-emulator",
            "--dir",
            str(directory),
            "--baud",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert select.select([process.stdout], [], [], 5.0)[0], "no JSON line from the emulator"
        ends = json.loads(process.stdout.readline())
        assert ends == {"a": str(directory / "a"), "b": str(directory / "b")}
        a, b = fds(Path(ends["a"])), fds(Path(ends["b"]))
        data = payload(10_000)
        assert pump(a, b, data) == data
        assert pump(b, a, data) == data
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(5.0) == 0
        assert not (directory / "a").exists() and not (directory / "b").exists()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
