"""`signer webdb-client`: poll the WebDB database, drive the signer, write back (WebDB host)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from signer.cli.common import (
    EXIT_OK,
    EXIT_REFUSED,
    UsageError,
    add_log_format,
    print_json,
    setup_logging,
)
from signer.errors import Unreachable

if TYPE_CHECKING:
    from signer.client.webdb import WebdbClientConfig

HELP = "poll the WebDB database, drive the signer, write back"
DESCRIPTION = "poll the WebDB database, drive the signer, write the results back"

log = logging.getLogger("signer.client.webdb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="webdb-client YAML file")
    parser.add_argument(
        "--once", action="store_true", help="one pass (requests, CRLs, health), then exit"
    )
    add_log_format(parser)
    parser.add_argument(
        "--reconcile",
        action="store_true",
        help="after the signer was restored from an older copy: ask it for every issuance, "
        "revocation and certification the WebDB recorded as done, record or send again what "
        "it lost, report, exit (1 when something is left)",
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--since",
        type=_moment,
        metavar="TIME",
        help="with --reconcile: rows changed since TIME (ISO 8601, UTC unless it says; "
        "take the restored copy's time minus an hour)",
    )
    when.add_argument("--all", action="store_true", help="with --reconcile: every row")
    parser.add_argument(
        "--dry-run", action="store_true", help="with --reconcile: report only, send nothing"
    )
    parser.add_argument("--json", action="store_true", help="with --reconcile: a JSON report")


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def run(args: argparse.Namespace) -> int:
    from signer.client.webdb import WebdbClientConfig
    from signer.config import check_secret_file, load

    config = load(args.config, WebdbClientConfig)
    if config.database.password_file:
        check_secret_file(config.database.password_file)
    setup_logging(config.log_level, args.log_format)
    if args.reconcile:
        if args.since is None and not args.all:
            raise UsageError("--reconcile needs --since TIME or --all")
        return asyncio.run(_reconcile(config, args.since, args.dry_run, args.json))
    if args.since or args.all or args.dry_run:
        raise UsageError("--since, --all and --dry-run go with --reconcile")
    return asyncio.run(_run(config, args.once))


async def _reconcile(
    config: WebdbClientConfig, since: datetime | None, dry_run: bool, as_json: bool
) -> int:
    from signer.client.webdb import WebdbClient
    from signer.client.webdb.reconcile import Reconciler

    def progress(line: str) -> None:
        print(line, file=sys.stderr if as_json else sys.stdout, flush=True)

    async with WebdbClient(config) as client:
        assert client.db is not None
        report = await Reconciler(client.db, client.lines, config, progress).run(since, dry_run)
    if as_json:
        print_json(report.as_dict())
    else:
        for title, items in (("recorded again", report.recorded), ("revoked again",
                             report.revoked), ("missing", report.missing),
                             ("in progress", report.in_progress)):  # fmt: skip
            if items:
                print(f"{title}: {', '.join(items)}")
        for request_id, why in report.failed.items():
            print(f"failed: {request_id}: {why}")
        for name, crl in report.crls.items():
            print(f"CRL {name}: {crl}")
        print("reconcile: ok" if report.ok else "reconcile: NOT ok (see above)")
    return EXIT_OK if report.ok else EXIT_REFUSED


async def _run(config: WebdbClientConfig, once: bool) -> int:
    from signer.client.webdb import WebdbClient
    from signer.tools.progress import Progress

    def progress(what: str) -> Progress:
        return Progress(what, "bytes", out=None)  # a service: lines in its log

    async with WebdbClient(config, progress=progress) as client:
        if once:
            report = await client.run_once()
            if report.unanswered_lines:
                lines = ", ".join(report.unanswered_lines)
                raise Unreachable(f"no health report from the signer on line(s) {lines}")
            return EXIT_OK
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        log.info("webdb client polling every %.0f s", config.poll_interval)
        await client.run_forever(stop)
    return EXIT_OK
