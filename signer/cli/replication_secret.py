"""`signer replication-secret`: make the secret that authenticates and encrypts the replication
link (signer host, once per cluster; copy the file to every signer, never over the WebDB side)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from signer.cli.common import EXIT_OK, CommandFailed

HELP = "write a new random replication secret (mode 0600) for a pair of signers"
DESCRIPTION = (
    "Write 32 random bytes (base64) to a new file of mode 0600, for replication.secret_file. "
    "Never overwrites an existing file. Copy the file to every signer of the cluster."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="the secret file to create")


def run(args: argparse.Namespace) -> int:
    from replication.settings import write_secret

    try:
        write_secret(args.out)
    except FileExistsError:
        raise CommandFailed("exists", f"{args.out} exists: it is never overwritten") from None
    except OSError as exc:
        raise CommandFailed("cannot_write", f"{args.out}: {exc.strerror}") from None
    print(f"wrote a new replication secret to {args.out} (mode 0600)", file=sys.stderr)
    return EXIT_OK
