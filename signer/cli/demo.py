"""`signer demo`: a CA on SoftHSM2, two signers and the clients on emulated lines, one machine."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from signer.cli.common import EXIT_OK, EXIT_REFUSED, CommandFailed

HELP = "run a signer and a client on an emulated line"
DESCRIPTION = "make a CA on SoftHSM2, run a signer and a client on an emulated line"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, help="working directory (default: a new temp dir)")
    parser.add_argument("--baud", type=int, default=115200, help="emulated line speed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    from signer.tools.demo import run as run_demo
    from signer.tools.softhsm import SoftHsmError

    workdir = (args.dir or Path(tempfile.mkdtemp(prefix="signer-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        if not args.json:
            print(text)

    try:
        report: dict[str, Any] = run_demo(workdir, args.baud, say)
    except SoftHsmError as exc:
        raise CommandFailed("softhsm_error", str(exc)) from None
    if args.json:
        print(json.dumps(report, default=str, indent=2))
    return EXIT_OK if report["health"]["status"] != "error" else EXIT_REFUSED
