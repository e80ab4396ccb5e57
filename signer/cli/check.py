"""`signer check`: a Nagios/Icinga plugin on the WebDB host, reading the metrics file the WebDB
client writes each poll (signer/client/webdb/check.py). Exit codes are the plugin's, not the
command line's: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also for a wrong command line)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

HELP = "Nagios/Icinga check of the signers and the WebDB, from the WebDB client's metrics"
DESCRIPTION = (
    "Judge the metrics file the WebDB client writes each poll (monitoring.metrics_file) against "
    "the thresholds of its configuration (monitoring.*): signers answering, HSM, CA "
    "certificates, published CRLs, replication, line errors, waiting and failed WebDB rows. "
    "Prints one status line with performance data; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."
)
UNKNOWN = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="webdb-client YAML file")
    parser.add_argument("--metrics", type=Path, help="the metrics file (default: from --config)")

    def error(message: str) -> NoReturn:  # a plugin's wrong usage is UNKNOWN, not CRITICAL
        parser.print_usage(sys.stderr)
        print(f"SIGNER UNKNOWN - {message}")
        sys.exit(UNKNOWN)

    parser.error = error  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    from signer.client.webdb.check import check_file
    from signer.client.webdb.config import WebdbClientConfig
    from signer.config import ConfigError, load

    try:
        config = load(args.config, WebdbClientConfig)
    except ConfigError as exc:
        print(f"SIGNER UNKNOWN - {exc}".splitlines()[0])
        return UNKNOWN
    result = check_file(args.metrics or config.monitoring.metrics_file, config.monitoring,
                        time.time())  # fmt: skip
    print(result.line())
    return result.status
