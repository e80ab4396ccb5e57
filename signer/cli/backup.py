"""`signer backup`: a consistent copy of the repository while the signer serves, with a
manifest; `signer backup verify FILE` checks a copy against its manifest (signer host)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from signer.cli.common import EXIT_OK, CommandFailed, UsageError, print_json, show_mapping

HELP = "copy the repository while the signer serves; verify a copy (signer host)"
DESCRIPTION = (
    "Write a consistent copy of the signer's repository (one LMDB read transaction: the "
    "signer keeps serving) as one tar file holding data.mdb and manifest.json (applied index, "
    "each issuer's last CRL number, content digest, counts). `verify FILE` recomputes all of "
    "it from the file. Restore with `signer restore FILE`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="the signer's YAML file")
    parser.add_argument(
        "--out",
        type=Path,
        help="the backup file to write (.tar); a directory: repository-<UTC time>.tar in it",
    )
    parser.add_argument("--verify", action="store_true", help="verify the file once written")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    sub = parser.add_subparsers(dest="backup_command", metavar="COMMAND")
    verify = sub.add_parser("verify", help="check a backup file against its manifest")
    verify.add_argument("file", type=Path, metavar="FILE", help="the backup file")
    verify.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args: argparse.Namespace) -> int:
    from signer.config import load
    from signer.server.config import SignerConfig
    from signer.tools import backup
    from storage import RepositoryError
    from storage.backup import BackupError

    out = sys.stderr  # progress and the summary's title; stdout carries --json
    try:
        if args.backup_command == "verify":
            manifest = backup.verify(args.file, out)
            title = f"{args.file}: verified"
        else:
            if args.config is None or args.out is None:
                raise UsageError("signer backup needs --config and --out (or: verify FILE)")
            config = load(args.config, SignerConfig)
            target = args.out
            if target.is_dir():
                target = target / time.strftime("repository-%Y%m%dT%H%M%SZ.tar", time.gmtime())
            manifest = backup.backup(config, args.config, target, out)
            title = f"{target}: written"
            if args.verify:
                backup.verify(target, out)
                title += " and verified"
    except BackupError as exc:
        raise CommandFailed("bad_backup", str(exc)) from None
    except RepositoryError as exc:
        raise CommandFailed("repository_error", str(exc)) from None
    facts = backup.summary(manifest)
    if args.json:
        print_json({"ok": True, "manifest": facts})
    else:
        print(title)
        show_mapping(facts, "  ")
    return EXIT_OK
