"""`signer webdb-client`: poll the WebDB database, drive the signer, write back (WebDB host)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signer.cli.common import EXIT_OK, setup_logging
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


def run(args: argparse.Namespace) -> int:
    from signer.client.webdb import WebdbClientConfig
    from signer.config import check_secret_file, load

    config = load(args.config, WebdbClientConfig)
    if config.database.password_file:
        check_secret_file(config.database.password_file)
    setup_logging(config.log_level)
    return asyncio.run(_run(config, args.once))


async def _run(config: WebdbClientConfig, once: bool) -> int:
    from signer.client.webdb import WebdbClient

    async with WebdbClient(config) as client:
        if once:
            outcome = await client.run_once()
            if _a_signer_did_not_answer(outcome):
                raise Unreachable("a signer did not answer during this pass (see the alerts)")
            return EXIT_OK
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        log.info("webdb client polling every %.0f s", config.poll_interval)
        await client.run_forever(stop)
    return EXIT_OK


def _a_signer_did_not_answer(outcome: dict[str, Any]) -> bool:
    """Whether a pass met a signer out of reach (exit 3).

    TODO(issue 10): learn this by type, a `signer.errors.Unreachable` reported by
    `signer.client.webdb` for the pass, once the WebDB client offers it; until then the alert's
    text is the only sign.
    """
    return any("not answering" in alert.text for alert in outcome["alerts"])
