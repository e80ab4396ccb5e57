"""`signer export`: the repository back to openssl ca directories, one per issuer (signer
host), so an operator is never locked in. Reads only: safe while the signer runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from signer.cli.common import EXIT_OK, CommandFailed, print_json

HELP = "write each issuer's certificates as an openssl ca directory (signer host)"
DESCRIPTION = (
    "Write index.txt, index.txt.attr, serial, crlnumber, newcerts/<SERIAL>.pem and the last "
    "CRL (crl.der) of each issuer under OUT/<issuer>. Reads the repository only, so it may run "
    "beside the signer; `signer import` takes the result back."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the signer's YAML file")
    parser.add_argument("--out", required=True, type=Path, help="directory to write into")
    parser.add_argument(
        "--issuer", action="append", default=[], help="only this issuer (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from signer.config import ConfigError, load
    from signer.server.config import SignerConfig
    from signer.tools.history import ControlFailed, export_history, issuer_cas
    from storage import Repository, RepositoryError

    config = load(args.config, SignerConfig)
    if config.repository is None:
        raise ConfigError(f"{args.config}: no repository section")
    issuers = issuer_cas(config)
    unknown = sorted(set(args.issuer) - set(issuers))
    if unknown:
        raise ConfigError(f"no issuer(s) {', '.join(unknown)}; known: {', '.join(issuers)}")
    if args.issuer:
        issuers = {name: issuers[name] for name in args.issuer}
    out = sys.stderr if args.json else sys.stdout
    try:
        with Repository(
            config.repository.path, config.repository.map_size_gb << 30, readonly=True
        ) as repository:
            summary = export_history(
                repository, issuers, args.out, lambda line: print(line, file=out, flush=True)
            )
    except RepositoryError as exc:
        raise CommandFailed("repository_error", str(exc)) from None
    except ControlFailed as exc:
        raise CommandFailed(exc.code, exc.message) from None
    if args.json:
        print_json({"ok": True, "issuers": summary})
    return EXIT_OK
