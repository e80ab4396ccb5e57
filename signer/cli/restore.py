"""`signer restore FILE`: a backup back in place of the stopped signer's repository, through the
safe restore path (the manifest verified first, CRL numbers raised past any published, a
replicated signer starting a new generation alone) (signer host)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from signer.cli.common import EXIT_OK, CommandFailed, print_json, show_mapping

HELP = "put a backup in place of the stopped signer's repository (signer host)"
DESCRIPTION = (
    "Verify FILE against its manifest, put the copy in place of the repository (the signer "
    "stopped; --replace to overwrite an existing repository) and raise each issuer's next CRL "
    "number past any that can have been published since the copy (storage/restore.py). A "
    "replicated signer (empty journal_dir) then starts a new log alone, as `signer cluster "
    "recover` does: add the others afterwards. Then run `signer webdb-client --reconcile` on "
    "the WebDB host (docs/operations.md, Backup and restore). Exit 0 restored; 1 the backup is "
    "bad or the situation refuses a restore; 2 usage or configuration error."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="the backup file (signer backup)")
    parser.add_argument("--config", type=Path, required=True, help="the signer's YAML file")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="overwrite the repository that is there (it is lost: keep a backup of it first)",
    )
    parser.add_argument(
        "--crl-number",
        action="append",
        default=[],
        metavar="ISSUER=N",
        help="the highest CRL number of an issuer known published: the next is N + 1 instead "
        "of the estimate (as signer cluster recover)",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")


def run(args: argparse.Namespace) -> int:
    from replication.errors import ReplicationError
    from signer.cli.cluster import _published_numbers
    from signer.config import load
    from signer.server.config import SignerConfig
    from signer.tools import backup
    from signer.tools.history import issuer_cas
    from storage import RepositoryError
    from storage.backup import BackupError

    config = load(args.config, SignerConfig)
    published = _published_numbers(config, args.crl_number)
    try:
        restored = backup.restore(
            config, args.config, args.file, published, sys.stderr, replace=args.replace
        )
    except BackupError as exc:
        raise CommandFailed("bad_backup", str(exc)) from None
    except (backup.RestoreRefused, ReplicationError) as exc:  # the situation does not allow it
        raise CommandFailed("restore_refused", str(exc)) from None
    except RepositoryError as exc:
        raise CommandFailed("repository_error", str(exc)) from None
    names = {ca.key_id: name for name, ca in issuer_cas(config).items()} if config.issuers else {}
    floors = {names.get(key, key.hex()): number for key, number in restored.floors.items()}
    manifest = backup.summary(restored.manifest)
    facts = {
        "restored": str(args.file),
        "manifest": manifest,
        "next_crl_numbers": floors,
        "generation": restored.generation,
    }
    if args.json:
        print_json({"ok": True, **facts})
        return EXIT_OK
    print(f"{args.file}: restored")
    show_mapping(manifest, "  ")
    for name, number in floors.items():
        print(f"CRLs of {name}: the next is numbered {number} at least")
    if restored.generation is not None:
        print(f"this signer alone, generation {restored.generation}; start it, then add the others")
    print("start the signer, then run `signer webdb-client --reconcile` on the WebDB host")
    return EXIT_OK
