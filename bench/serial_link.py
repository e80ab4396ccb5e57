"""Sustained request/response throughput over the emulated serial line, against its bound.

Each exchange is a 1.5 KB request and a 2 KB response (the size of a CSR and a certificate),
through the real stack: client library, serial link, line emulator paced at 8N1, protocol handler.
The bound is the busier direction (the responses) at 10 bits a byte. Run:

    python bench/serial_link.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

# The project root first: bench/replication.py must not shadow the replication package.
# bench/replication.py shadows the `replication` package in this folder, which Python puts first
# on sys.path for a script: take the folder off (nothing is added; the venv has the project).
sys.path.remove(str(Path(__file__).resolve().parent))

from signer.client.library import SignerClient
from signer.config import LinkConfig
from signer.link.serial_link import LinkSettings
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.line_emulator import LineEmulator
from signer.wire.framing import encode_frame
from signer.wire.protocol import Response, encode_request, encode_response

REQUEST_BYTES = 1536
RESPONSE_BYTES = 2048


async def run_case(directory: Path, baud: int, exchanges: int, window: int) -> dict[str, float]:
    with LineEmulator(directory, baud=baud) as line:
        server = SignerServer(SignerConfig(link=LinkConfig(device=str(line.end_a), baudrate=baud)))
        payload = os.urandom(RESPONSE_BYTES)

        async def answer(args, ctx):
            return {"public_key": payload, "fingerprint": "00", "certified_uids": []}

        server.handlers["sign_openpgp"] = answer
        await server.start()
        settings = LinkSettings(device=str(line.end_b), baudrate=baud)
        client = SignerClient(settings, max_in_flight=window, timeout=120, attempts=1)
        await client.start()
        try:
            args = {"public_key": os.urandom(REQUEST_BYTES), "uids": ["bench@example.org"]}
            await client.call("sign_openpgp", args)  # warm up, and the link is surely open
            done: list[float] = []

            async def one() -> None:
                await client.call("sign_openpgp", args)
                done.append(time.perf_counter())

            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(exchanges)))
        finally:
            await client.close()
            await server.stop()
    request_wire = len(encode_frame(encode_request("x" * 32, "sign_openpgp", args)))
    response = {"public_key": payload, "fingerprint": "00", "certified_uids": []}
    response_wire = len(encode_frame(encode_response(Response("x" * 32, response))))
    bound = (baud / 10) / max(request_wire, response_wire)
    # Sustained rate: between the first and the last answer, so that filling the pipe (one
    # request's transit before the first answer can start) is not counted against the line.
    rate = (
        (exchanges - 1) / (done[-1] - done[0]) if window > 1 else exchanges / (done[-1] - started)
    )
    return {"rate": rate, "bound": bound, "ratio": rate / bound, "wire": response_wire}


async def main_async(quick: bool) -> dict[str, float]:
    results: dict[str, float] = {}
    rows = []
    plan = {115200: (25, 4) if quick else (80, 10), 921600: (100, 20) if quick else (500, 60)}
    with tempfile.TemporaryDirectory() as tmp:
        for baud, (pipelined, single) in plan.items():
            for mode, count, window in (("one-at-a-time", single, 1), ("pipelined", pipelined, 8)):
                case = await run_case(Path(tmp) / f"{baud}-{mode}", baud, count, window)
                rows.append((baud, mode, count, case))
                if mode == "pipelined":
                    results[f"ratio_{baud}"] = case["ratio"]
    print(f"{'baud':>7} {'mode':<14} {'exch':>5} {'exch/s':>8} {'bound/s':>8} {'ratio':>6}")
    for baud, mode, count, case in rows:
        print(
            f"{baud:>7} {mode:<14} {count:>5} {case['rate']:>8.2f} {case['bound']:>8.2f}"
            f" {case['ratio']:>6.3f}"
        )
    wire = rows[0][3]["wire"]
    print(f"(response frame on the wire: {wire} bytes for a {RESPONSE_BYTES}-byte payload;")
    print(" bound = baud / 10 / bytes of the busier direction's frame)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer exchanges (under a minute)")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.quick))
    print("RESULT " + " ".join(f"{key}={value:.3f}" for key, value in sorted(results.items())))


if __name__ == "__main__":
    main()
