"""The `signer` command line: one parser tree for every verb, one error printer, one exit code
per error family.

Exit codes: 0 success; 1 the signer refused or failed the request (the error code is printed);
2 usage or configuration error; 3 the signer could not be reached (timeout, line down). They come
from the error's type (signer.cli.common.exit_code), never from its text.

Each verb is a module of this package with `HELP`, optional `DESCRIPTION`, `add_arguments` and
`run`; a verb imports what it runs only inside `run`, so the WebDB host builds the whole tree
without the signer host's libraries (LMDB, pysyncobj, PKCS#11, PGPy).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Protocol

from signer import __version__
from signer.cli import (
    audit,
    backup,
    ceremony,
    ceremony_issue,
    check,
    client,
    cluster,
    demo,
    history_export,
    history_import,
    line_emulator,
    openpgp,
    replication_secret,
    restore,
    serve,
    webdb,
)
from signer.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, exit_code, print_error


class Verb(Protocol):
    """What a verb module offers (a module satisfies it by its top-level names)."""

    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


VERBS: dict[str, Verb] = {
    "serve": serve,
    "client": client,
    "line-emulator": line_emulator,
    "ceremony": ceremony,
    "ceremony-issue": ceremony_issue,
    "demo": demo,
    "openpgp-export": openpgp,
    "webdb-client": webdb,
    "cluster": cluster,
    "import": history_import,
    "export": history_export,
    "replication-secret": replication_secret,
    "backup": backup,
    "check": check,
    "restore": restore,
    "audit": audit,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if getattr(args, "run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:
        code = exit_code(error)
        if code is None:
            raise  # a bug: its traceback is the report
        print_error(error, as_json=bool(getattr(args, "json", False)))
        return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signer", description="cacert-signer: the offline signer of a community CA"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, module in VERBS.items():
        verb = verbs.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP)
        )
        module.add_arguments(verb)
        verb.set_defaults(run=module.run)
    return parser
