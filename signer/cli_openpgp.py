"""`signer openpgp-export`: the OpenPGP CA's public key for publication (signer host)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from signer.config import ConfigError, load
from signer.errors import SignerError
from signer.pki.openpgp_armor import armor
from signer.server.config import SignerConfig
from signer.server.hsm import Hsm
from signer.server.openpgp import pgpy_certifier


def main(argv: Sequence[str] | None = None) -> int:
    """`signer openpgp-export --config signer.yaml [--out FILE] [--armor]`: the CA's public key."""
    parser = argparse.ArgumentParser(
        prog="signer openpgp-export",
        description="Write the OpenPGP CA's public key, self-signed by the HSM, for publication. "
        "Its fingerprint never changes (the creation time comes from openpgp-ca.yaml).",
    )
    parser.add_argument("--config", required=True, type=Path, help="signer YAML file")
    parser.add_argument("--out", type=Path, help="output file (default: standard output)")
    parser.add_argument("--armor", action="store_true", help="ASCII armor")
    args = parser.parse_args(argv)
    try:
        config = load(args.config, SignerConfig)
        if config.openpgp is None or config.hsm is None:
            raise ConfigError(f"{args.config}: needs the hsm and openpgp sections")
        with Hsm(config.hsm) as hsm:
            certifier = pgpy_certifier(hsm, config.openpgp)
            blob = certifier.export_ca_public_key()
            fingerprint = certifier.ca_fingerprint()
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except SignerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.armor:
        blob = armor(blob)
    if args.out:
        args.out.write_bytes(blob)
    else:
        sys.stdout.buffer.write(blob)
    print(f"OpenPGP CA fingerprint: {fingerprint.hex().upper()}", file=sys.stderr)
    return 0
