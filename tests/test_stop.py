"""Issue 11, item 10: a signer that got SIGTERM as its serial device vanished hung, ignored
further signals and, minutes later, reopened the line and issued. Stopping is now bounded: the
process exits within `stop_timeout` whatever the link does, and never opens the line again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from signer.tools.flood import call_health, signer_on_pty, wait_open

STOP_TIMEOUT = 2.0
MARGIN = 3.0  # interpreter exit, logging; the watchdog fires at stop_timeout + 2 s


def sigterm_as_the_device_vanishes(tmp_path, delay: float) -> float:
    """Seconds from SIGTERM to the process's exit; the pty master closes at the same moment."""
    with signer_on_pty(tmp_path, f"stop_timeout: {STOP_TIMEOUT}\n") as (process, fd, log):
        wait_open(fd)
        assert call_health(fd, "before").message["ok"]
        os.write(fd, b"\x01\x00" * 100)  # something in flight on the line
        time.sleep(delay)
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        os.close(fd)  # the device vanishes (the pty's other end is gone)
        try:
            process.wait(STOP_TIMEOUT + MARGIN)
        finally:
            os.dup2(os.open(os.devnull, os.O_RDONLY), fd)  # the fixture closes fd again
        took = time.monotonic() - began
        text = log.read_text()
    assert "signer stopping" in text, text[-2000:]
    assert process.returncode is not None
    return took


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_sigterm_as_the_device_vanishes_stops_in_time(tmp_path, delay):
    assert sigterm_as_the_device_vanishes(tmp_path, delay) < STOP_TIMEOUT + MARGIN


@pytest.mark.soak
def test_sigterm_as_the_device_vanishes_stops_in_time_repeatedly(tmp_path):
    for run in range(40):
        workdir = tmp_path / str(run)
        workdir.mkdir()
        took = sigterm_as_the_device_vanishes(workdir, delay=(run % 8) * 0.01)
        assert took < STOP_TIMEOUT + MARGIN, (run, took)


def test_stop_timeout_is_configurable_and_bounded(tmp_path):
    """A SIGTERM on an idle signer: it exits at once, with code 0."""
    with signer_on_pty(tmp_path, "stop_timeout: 1.5\n") as (process, fd, _log):
        wait_open(fd)
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(1.5 + MARGIN) == 0
        assert time.monotonic() - began < 1.5 + MARGIN
    with pytest.raises(subprocess.CalledProcessError):
        (tmp_path / "bad.yaml").write_text("link:\n  device: /dev/null\nstop_timeout: 0\n")
        subprocess.run(
            [sys.executable, "-m", "signer", "serve", "--config", str(tmp_path / "bad.yaml")],
            check=True,
            capture_output=True,
            timeout=30,
        )
