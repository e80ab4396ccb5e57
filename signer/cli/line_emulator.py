"""`signer line-emulator`: an emulated serial cable between two ptys, paced, optionally faulty,
as a process of its own (tests, the demo, trying the signer without hardware)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from signer.cli.common import EXIT_OK, UsageError

HELP = "an emulated serial cable (two ptys, paced)"
DESCRIPTION = (
    "Emulate a serial cable between two pty devices, paced at a baud rate, "
    'optionally with faults. Prints {"a": path, "b": path} as one JSON line, then '
    "relays until SIGTERM or SIGINT."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, required=True, help="directory for the a and b links")
    parser.add_argument("--baud", type=int, default=115200, help="baud rate, 8N1; 0 = unpaced")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault generator")
    parser.add_argument("--corrupt", type=float, default=0.0, help="bit-flip probability/byte")
    parser.add_argument("--drop", type=float, default=0.0, help="drop probability per byte")
    parser.add_argument("--duplicate", type=float, default=0.0, help="duplication prob./byte")
    parser.add_argument("--delay", type=float, default=0.0, help="extra latency in seconds")


def run(args: argparse.Namespace) -> int:
    """Relays until SIGTERM or SIGINT, then removes its links."""
    from signer.tools.line_emulator import Faults, LineEmulator

    if args.baud < 0:
        raise UsageError("--baud must not be negative")
    try:
        Faults(args.corrupt, args.drop, args.duplicate, args.delay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda _sig, _frame: stop.set()) for sig in signals}
    try:
        with LineEmulator(args.dir, baud=args.baud or None, seed=args.seed) as emulator:
            emulator.set_faults("both", args.corrupt, args.drop, args.duplicate, args.delay)
            print(json.dumps({"a": str(emulator.end_a), "b": str(emulator.end_b)}), flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK
