"""`signer audit verify`: check an audit log file against a signed tree head, with nothing but
the file, the head and the audit key's certificate (docs/audit.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from signer.cli.common import EXIT_OK, CommandFailed, UsageError, print_json

HELP = "verify the audit log (a file of records against a signed tree head)"
DESCRIPTION = (
    "Check every record of an audit log file against a signed tree head: the head's signature "
    "by the audit certificate's key (with its audit EKU), and the Merkle root (RFC 9162) of the "
    "file's first head-size records. Exit 0: the file is the signed log; 1: it is not (a record "
    "changed, removed, added, moved, or a forged head); 2: a file cannot be read."
)
CHUNK = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help=HELP, description=DESCRIPTION)
    verify.add_argument("--log", required=True, type=Path, help="the audit log file")
    verify.add_argument("--head", required=True, type=Path, help="a signed tree head (JSON)")
    verify.add_argument("--cert", required=True, type=Path, help="the audit certificate (PEM)")
    verify.add_argument("--json", action="store_true", help="print the outcome as JSON")
    verify.add_argument("--quiet", action="store_true", help="no progress on standard error")
    verify.set_defaults(run=run)


def _chunks(path: Path, quiet: bool) -> Iterator[bytes]:
    total, done, shown = path.stat().st_size, 0, time.monotonic()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            done += len(chunk)
            if not quiet and time.monotonic() - shown > 1:
                print(f"verified {done * 100 // max(total, 1)}% of {path}", file=sys.stderr)
                shown = time.monotonic()
            yield chunk


def run(args: argparse.Namespace) -> int:
    from cryptography import x509

    from signer.pki.audit import AuditFormatError, TreeHead, verify_log
    from signer.pki.merkle import ProofError

    try:
        head = TreeHead.from_json(json.loads(args.head.read_text(encoding="utf-8")))
        cert = x509.load_pem_x509_certificate(args.cert.read_bytes())
        args.log.stat()
    except (OSError, ValueError, AuditFormatError) as exc:
        raise UsageError(f"cannot read the inputs: {exc}") from None
    try:
        found = verify_log(_chunks(args.log, args.quiet or args.json), head, cert)
    except (ProofError, AuditFormatError) as exc:
        raise CommandFailed("audit_mismatch", f"{args.log}: {exc}") from None
    outcome: dict[str, Any] = {
        "ok": True,
        "records": found.records,
        "head_size": found.head_size,
        "root": found.root.hex(),
        "timestamp": head.timestamp,
        "after_head": found.records - found.head_size,
        "events": found.events,
    }
    if args.json:
        print_json(outcome)
    else:
        print(
            f"OK: the first {found.head_size} of {found.records} records make the tree head "
            f"signed at {head.timestamp} (root {found.root.hex()})"
        )
    return EXIT_OK
