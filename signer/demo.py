"""`signer demo`: the main job on embedded defaults, on one machine.

A line emulator stands in for the serial cable (two ptys, paced at the real baud rate); a signer
process serves one end, and the client drives it from the other end exactly as the WebDB side
would. Everything lives in one working directory, kept afterwards for a look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from signer.client import SignerClient
from signer.errors import ErrorCode, SignerError
from signer.line_emulator import LineEmulator
from signer.serial_link import LinkSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="signer demo", description="run a signer and a client on an emulated serial line"
    )
    parser.add_argument("--dir", type=Path, help="working directory (default: a new temp dir)")
    parser.add_argument("--baud", type=int, default=115200, help="emulated line speed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="signer-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = run(workdir, args.baud, say=(lambda _t: None) if args.json else print)
    if args.json:
        print(json.dumps(report, default=str, indent=2))
    return 0 if report["health"]["status"] != "error" else 1


def run(workdir: Path, baud: int, say: Any = print) -> dict[str, Any]:
    say(f"demo: working in {workdir}")
    with LineEmulator(workdir / "line", baud=baud) as line:
        say(f"demo: emulated serial line at {baud} baud: {line.end_a} <-> {line.end_b}")
        config = write_signer_config(workdir, line.end_a, baud)
        signer = start_signer(config, workdir / "signer.log")
        say(f"demo: signer started (pid {signer.pid}), log in {workdir / 'signer.log'}")
        try:
            return asyncio.run(drive(line.end_b, baud, say))
        finally:
            signer.terminate()
            signer.wait(timeout=10)
            say("demo: signer stopped")


def write_signer_config(workdir: Path, device: Path, baud: int) -> Path:
    config = {"link": {"device": str(device), "baudrate": baud}, "log_level": "INFO"}
    path = workdir / "signer.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_signer(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "signer", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def drive(device: Path, baud: int, say: Any) -> dict[str, Any]:
    settings = LinkSettings(device=str(device), baudrate=baud)
    async with SignerClient(settings, timeout=20.0) as client:
        await wait_ready(client, say)
        started = time.monotonic()
        health = await client.call("health")
        elapsed = time.monotonic() - started
    say(f"demo: health over the line in {elapsed * 1000:.0f} ms: status {health['status']}")
    say(f"demo:   signer version {health['version']}, clock {health['time'].isoformat()}")
    link = health["sections"]["link"]
    say(f"demo:   link {link['state']}, frames in {link['frames_in']}, out {link['frames_out']}")
    return {"health": health, "round_trip_ms": round(elapsed * 1000, 1)}


async def wait_ready(client: SignerClient, say: Any, limit: float = 60.0) -> None:
    """Bytes sent before the signer opens its end are lost, as on a real line: probe until up."""
    deadline = time.monotonic() + limit
    while True:
        try:
            await client.call("health", timeout=1.0, attempts=1)
            return
        except SignerError as exc:
            if exc.code is not ErrorCode.TIMEOUT or time.monotonic() > deadline:
                raise
            say("demo: waiting for the signer to answer ...")
