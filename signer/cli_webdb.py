"""`signer webdb-client`: poll the WebDB database, drive the signer, write back (WebDB host)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from signer.client.webdb import WebdbClient, WebdbClientConfig
from signer.config import ConfigError, check_secret_file, load

log = logging.getLogger("signer.client.webdb")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="signer webdb-client",
        description="poll the WebDB database, drive the signer, write the results back",
    )
    parser.add_argument("--config", type=Path, required=True, help="webdb-client YAML file")
    parser.add_argument(
        "--once", action="store_true", help="one pass (requests, CRLs, health), then exit"
    )
    args = parser.parse_args(argv)
    try:
        config = load(args.config, WebdbClientConfig)
        if config.database.password_file:
            check_secret_file(config.database.password_file)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_run(config, args.once))
    except KeyboardInterrupt:
        return 130


async def _run(config: WebdbClientConfig, once: bool) -> int:
    async with WebdbClient(config) as client:
        if once:
            outcome = await client.run_once()
            unreachable = any("not answering" in a.text for a in outcome["alerts"])
            return 3 if unreachable else 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        log.info("webdb client polling every %.0f s", config.poll_interval)
        await client.run_forever(stop)
    return 0
