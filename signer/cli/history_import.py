"""`signer import`: the certificate history of the signer CAcert ran before (openssl ca state,
WebDB rows) into the running signer's repository, through its log (signer host)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from signer.cli.common import (
    EXIT_OK,
    EXIT_REFUSED,
    CommandFailed,
    UsageError,
    print_json,
    show_mapping,
)
from signer.errors import ConfigError, Unreachable

HELP = "import the earlier signer's certificates and revocations (signer host)"
DESCRIPTION = (
    "Import each issuer's history from an openssl ca directory (index.txt, serial, crlnumber, "
    "newcerts/, crl.pem or crl.der) and/or a tab-separated export of the WebDB's certificate "
    "rows. The whole input is checked first (every bad line is reported, nothing is written); "
    "then the running signer commits it through its log. Safe to interrupt: the same command "
    "continues where it stopped. See docs/migration.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the signer's YAML file")
    parser.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="ISSUER=DIR",
        help="an issuer's openssl ca directory (repeat per issuer)",
    )
    parser.add_argument(
        "--webdb-rows",
        type=Path,
        help="tab-separated WebDB rows with a header line: serial, rootcert, expire, revoked",
    )
    parser.add_argument(
        "--rootcert",
        action="append",
        default=[],
        metavar="N=ISSUER",
        help="the issuer of WebDB rows with rootcert N (default 1=class1, 2=class3)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check and decide, print what would be imported"
    )
    parser.add_argument(
        "--no-crl", action="store_true", help="do not publish the first CRL after the import"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from signer.config import load
    from signer.server.config import SignerConfig
    from signer.tools import history

    config = load(args.config, SignerConfig)
    issuers = history.issuer_cas(config)
    histories = {name: Path(path) for name, path in _pairs(args.history, "--history")}
    rootcerts = {int(n): name for n, name in _pairs(args.rootcert, "--rootcert", number=True)}
    if not histories and args.webdb_rows is None:
        raise UsageError("give --history ISSUER=DIR and/or --webdb-rows FILE")
    socket = config.control_path()
    if socket is None:
        raise ConfigError(f"{args.config}: no repository: nothing to import into")
    out = sys.stderr if args.json else sys.stdout

    def progress(line: str) -> None:
        print(line, file=out, flush=True)

    try:
        plans = history.plan_imports(
            issuers,
            histories,
            args.webdb_rows,
            rootcerts or None,
            config.crl.grace_days,
            progress=progress,
        )
    except history.BadHistory as bad:
        return _bad_input(bad, args.json)
    summaries = [plan.summary() for plan in plans]
    if args.dry_run:
        _show_plans(summaries, args.json)
        return EXIT_OK
    results: list[dict[str, Any]] = []
    try:
        for plan in plans:
            result = history.run_import(plan, socket, progress)
            if result["crl_due"] and not args.no_crl:
                result["first_crl"] = history.publish_first_crl(plan, socket)
                _show_crl(result["first_crl"], progress)
            results.append(result)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        raise
    except history.ControlFailed as exc:
        raise CommandFailed(exc.code, exc.message) from None
    except history.ControlUnreachable as exc:
        raise Unreachable(str(exc)) from None
    if args.json:
        print_json({"ok": True, "plans": summaries, "imports": results})
    return EXIT_OK


def _pairs(values: list[str], option: str, number: bool = False) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        left, sep, right = value.partition("=")
        if not sep or not left or not right or (number and not left.isdigit()):
            raise UsageError(f"{option} {value!r}: expected {'N' if number else 'ISSUER'}=...")
        pairs.append((left, right))
    return pairs


def _bad_input(bad: Any, as_json: bool) -> int:
    for problem in bad.problems:
        print(f"bad input: {problem}", file=sys.stderr)
    message = f"{len(bad.problems)} problem(s) in the input; nothing was imported"
    print(f"error: bad_input: {message}", file=sys.stderr)
    if as_json:
        problems = [
            {"source": p.source, "line": p.line, "message": p.message} for p in bad.problems
        ]
        error = {"code": "bad_input", "message": message}
        print_json({"ok": False, "error": error, "problems": problems})
    return EXIT_REFUSED


def _show_plans(summaries: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json({"ok": True, "dry_run": True, "plans": summaries})
        return
    for summary in summaries:
        print(f"would import into {summary['issuer']}:")
        show_mapping({k: v for k, v in summary.items() if k != "issuer"}, "  ")
    print("dry run: nothing was sent to the signer")


def _show_crl(crl: dict[str, Any], progress: Any) -> None:
    text = (
        f"{crl['issuer']}: first CRL after the import: number {crl['crl_number']}, "
        f"{crl['entries']:,} entries, {crl['size']:,} bytes ({crl['seconds']} s)"
    )
    if "earlier_crl_entries" in crl:
        text += (
            f"; the earlier CA's last CRL listed {crl['earlier_crl_entries']:,}, "
            f"{crl['left_for_expiry']:,} left as expired (RFC 5280)"
        )
    progress(text)
