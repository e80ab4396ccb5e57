"""`signer webdb-client`: poll the WebDB database, drive the signer, write back (WebDB host)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from signer.cli.common import EXIT_OK, add_log_format, setup_logging
from signer.errors import Unreachable

if TYPE_CHECKING:
    from signer.client.webdb import WebdbClientConfig

HELP = "poll the WebDB database, drive the signer, write back"
DESCRIPTION = "poll the WebDB database, drive the signer, write the results back"

log = logging.getLogger("signer.client.webdb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="webdb-client YAML file")
    parser.add_argument(
        "--once", action="store_true", help="one pass (requests, CRLs, health), then exit"
    )
    add_log_format(parser)


def run(args: argparse.Namespace) -> int:
    from signer.client.webdb import WebdbClientConfig
    from signer.config import check_secret_file, load

    config = load(args.config, WebdbClientConfig)
    if config.database.password_file:
        check_secret_file(config.database.password_file)
    setup_logging(config.log_level, args.log_format)
    return asyncio.run(_run(config, args.once))


async def _run(config: WebdbClientConfig, once: bool) -> int:
    from signer.client.webdb import WebdbClient
    from signer.tools.progress import Progress

    def progress(what: str) -> Progress:
        return Progress(what, "bytes", out=None)  # a service: lines in its log

    async with WebdbClient(config, progress=progress) as client:
        if once:
            report = await client.run_once()
            if report.unanswered_lines:
                lines = ", ".join(report.unanswered_lines)
                raise Unreachable(f"no health report from the signer on line(s) {lines}")
            return EXIT_OK
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        log.info("webdb client polling every %.0f s", config.poll_interval)
        await client.run_forever(stop)
    return EXIT_OK
