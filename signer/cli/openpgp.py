"""`signer openpgp-export`: the OpenPGP CA's public key for publication (signer host)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from signer.cli.common import EXIT_OK, write_output

HELP = "write the OpenPGP CA's public key for publication"
DESCRIPTION = (
    "Write the OpenPGP CA's public key, self-signed by the HSM, for publication. "
    "Its fingerprint never changes (the creation time comes from openpgp-ca.yaml)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="signer YAML file")
    parser.add_argument("--out", type=Path, help="output file (default: standard output)")
    parser.add_argument("--armor", action="store_true", help="ASCII armor")


def run(args: argparse.Namespace) -> int:
    from signer.config import ConfigError, load
    from signer.pki.openpgp_armor import armor
    from signer.server.config import SignerConfig
    from signer.server.hsm import Hsm
    from signer.server.openpgp import pgpy_certifier

    config = load(args.config, SignerConfig)
    if config.openpgp is None or config.hsm is None:
        raise ConfigError(f"{args.config}: needs the hsm and openpgp sections")
    with Hsm(config.hsm) as hsm:
        certifier = pgpy_certifier(hsm, config.openpgp)
        blob = certifier.export_ca_public_key()
        fingerprint = certifier.ca_fingerprint()
    if args.armor:
        blob = armor(blob)
    if args.out:
        write_output(args.out, blob)
    else:
        sys.stdout.buffer.write(blob)
    print(f"OpenPGP CA fingerprint: {fingerprint.hex().upper()}", file=sys.stderr)
    return EXIT_OK
