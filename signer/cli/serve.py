"""`signer serve`: run the signer on its serial line (signer host)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from signer.cli.common import EXIT_OK, add_log_format, setup_logging

HELP = "run the signer on its serial line"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="signer YAML file")
    add_log_format(parser)


def run(args: argparse.Namespace) -> int:
    from signer.config import load
    from signer.server.config import SignerConfig
    from signer.server.process import SignerServer

    config = load(args.config, SignerConfig)
    setup_logging(config.log_level, args.log_format)
    asyncio.run(SignerServer(config).serve_forever())
    return EXIT_OK
