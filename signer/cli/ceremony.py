"""`signer ceremony`: generate the CA's keys in the HSM and make its certificates and first CRLs
(signer host, offline)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from signer.cli.common import EXIT_OK, CommandFailed, print_json
from signer.errors import ConfigError

HELP = "generate CA keys in the HSM and make the CA"
DESCRIPTION = (
    "Generate CA keys in the HSM and make the root/subordinate certificates and first CRLs "
    "described by a YAML file. Never overwrites; safe to re-run."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="ceremony YAML file")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on stdout (progress lines go to stderr)",
    )


def run(args: argparse.Namespace) -> int:
    from signer.tools.ceremony import CeremonyError, run_ceremony

    def progress(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        result = run_ceremony(args.config, progress=progress)
    except ConfigError:
        raise
    except CeremonyError as exc:  # the token and the output directory disagree
        raise CommandFailed("ceremony_failed", str(exc)) from None
    if args.json:
        print_json({"ok": True, **result.to_dict()})
    return EXIT_OK
