"""`signer client ...`: one command to a signer over the serial line (WebDB host).

Imports the client library only when a command runs, and never the signer host's modules.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signer.cli.common import (
    EXIT_OK,
    UsageError,
    print_json,
    read_input,
    setup_logging,
    show_mapping,
    write_output,
)

if TYPE_CHECKING:
    from signer.client.config import ClientConfig
    from signer.client.library import SignerClient

HELP = "send one command to a signer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="client YAML file (link settings)")
    where.add_argument("--port", help="serial device of the line to the signer")
    parser.add_argument("--baud", type=int, default=115200, help="with --port (default 115200)")
    parser.add_argument("--timeout", type=float, help="seconds for the whole call")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--request-id", help="request id (retrying with the same id is safe)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the line's events")
    commands = parser.add_subparsers(title="signer commands", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        command = commands.add_parser(name, help=spec.help, description=spec.help)
        spec.arguments(command)
        command.set_defaults(command=spec)


def run(args: argparse.Namespace) -> int:
    spec: ClientCommand = args.command
    config = _client_config(args)
    command, payload = spec.build(args)
    setup_logging("INFO" if args.verbose else "ERROR")
    result = asyncio.run(_call(config, spec, command, payload, args))
    if args.json:
        print_json(result)
    spec.show(result, args, args.json)  # quiet with --json: it only writes --out
    return EXIT_OK


def _client_config(args: argparse.Namespace) -> ClientConfig:
    from signer.client.config import ClientConfig
    from signer.config import LinkConfig, load

    if args.config:
        config = load(args.config, ClientConfig)
    else:
        config = ClientConfig(link=LinkConfig(device=args.port, baudrate=args.baud))
    if args.timeout:
        config = config.model_copy(update={"timeout": args.timeout})
    return config


async def _call(
    config: ClientConfig,
    spec: ClientCommand,
    command: str,
    payload: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from signer.client.library import SignerClient

    client = SignerClient(
        config.link.settings(),
        timeout=config.timeout,
        attempts=config.attempts,
        max_in_flight=config.max_in_flight,
    )
    async with client:
        if spec.session is not None:  # a command that takes several calls
            return await spec.session(client, args)
        return await client.call(command, payload, request_id=args.request_id)


# --- the commands ----------------------------------------------------------------------------


def _show_health(result: dict[str, Any], _args: argparse.Namespace, quiet: bool) -> None:
    if quiet:
        return
    print(f"status:  {result['status']}")
    print(f"version: {result['version']}")
    print(f"time:    {result['time'].isoformat()}")
    print(f"uptime:  {result['uptime_s']:.1f} s")
    for text in result.get("warnings", []):
        print(f"warning: {text}")
    for name, section in result.get("sections", {}).items():
        print(f"[{name}]")
        show_mapping(section, "  ")


def _show_plain(result: dict[str, Any], _args: argparse.Namespace, quiet: bool) -> None:
    if not quiet:
        show_mapping({k: v for k, v in result.items() if not isinstance(v, bytes)})


def _no_arguments(_parser: argparse.ArgumentParser) -> None:
    return None


def _pairs(values: list[str] | None, separator: str, what: str) -> list[list[str]] | None:
    """`CN=x` or `dns:example.org` command-line items as [name, value] pairs."""
    if not values:
        return None
    pairs = []
    for item in values:
        name, found, value = item.partition(separator)
        if not found or not name:
            raise UsageError(f"signer client: {what} {item!r}: expected NAME{separator}VALUE")
        pairs.append([name, value])
    return pairs


def _sign_x509_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csr", type=Path, required=True, help="PKCS#10 (PEM/DER) or SPKAC")
    parser.add_argument("--profile", required=True, help="certificate profile, e.g. server")
    parser.add_argument(
        "--subject",
        action="append",
        metavar="ATTR=VALUE",
        help="subject attribute, in order (repeat); default: the CSR's subject",
    )
    parser.add_argument(
        "--san",
        action="append",
        metavar="TYPE:VALUE",
        help="subjectAltName: dns, email, ip, uri, xmpp (repeat)",
    )
    parser.add_argument("--days", type=int, help="validity in days (default: the profile's)")
    parser.add_argument("--digest", default="sha256", choices=["sha256", "sha384", "sha512"])
    parser.add_argument(
        "--challenge",
        help="the challenge the request must carry (SPKAC challenge, PKCS#10 challengePassword)",
    )
    parser.add_argument("--out", type=Path, help="write the certificate here (PEM)")


def _sign_x509_build(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    payload: dict[str, Any] = {"profile": args.profile, "digest": args.digest}
    if subject := _pairs(args.subject, "=", "--subject"):
        payload["subject"] = subject
    if sans := _pairs(args.san, ":", "--san"):
        payload["sans"] = sans
    if args.days is not None:
        payload["validity_days"] = args.days
    if args.challenge is not None:
        payload["challenge"] = args.challenge
    payload["csr"] = read_input(args.csr)
    return "sign_x509", payload


def _sign_x509_show(result: dict[str, Any], args: argparse.Namespace, quiet: bool) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = x509.load_der_x509_certificate(result["certificate"]).public_bytes(Encoding.PEM)
    if args.out:
        write_output(args.out, pem)
    if quiet:
        return
    print(f"serial:     {result['serial']}")
    print(f"issuer:     {result['issuer']}")
    print(f"not before: {result['not_before'].isoformat()}")
    print(f"not after:  {result['not_after'].isoformat()}")
    print(f"written to: {args.out}" if args.out else pem.decode(), end="\n")


def _revoke_x509_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--issuer", required=True, help="issuer name, DN or hex key id")
    parser.add_argument("--serial", required=True, help="serial number in hex")
    parser.add_argument("--reason", help="RFC 5280 reason, e.g. keyCompromise, superseded")


def _revoke_x509_build(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    payload = {"issuer": args.issuer, "serial": args.serial}
    if args.reason:
        payload["reason"] = args.reason
    return "revoke_x509", payload


def _request_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lookup", metavar="REQUEST_ID", help="the earlier request's id")


def _sign_openpgp_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", type=Path, required=True, help="public key, binary or armored")
    parser.add_argument(
        "--uid",
        action="append",
        required=True,
        metavar="USER_ID",
        help="a whole user ID to certify, exactly as on the key, e.g. 'Alice <alice@example.org>'"
        " (repeat)",
    )
    parser.add_argument("--out", type=Path, help="write the certified key here (binary)")


def _sign_openpgp_build(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    return "sign_openpgp", {"public_key": read_input(args.key), "uids": args.uid}


def _sign_openpgp_show(result: dict[str, Any], args: argparse.Namespace, quiet: bool) -> None:
    if args.out:
        write_output(args.out, result["public_key"])
    if quiet:
        return
    print(f"fingerprint: {result['fingerprint']}")
    for uid in result["certified_uids"]:
        print(f"certified:   {uid}")
    print(f"expires:     {result['expires'].isoformat()}")
    if args.out:
        print(f"written to:  {args.out}")


def _fetch_crl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--issuer", required=True, help="issuer name, DN or hex key id")
    parser.add_argument(
        "--out", type=Path, required=True, help="the local CRL (DER), refreshed in place"
    )
    parser.add_argument(
        "--ca-cert",
        type=Path,
        help="the issuer's certificate (PEM or DER) to check the CRL with; default: the one the "
        "signer lists, fetched once and kept in OUT.state",
    )
    parser.add_argument(
        "--max-bytes", type=int, default=65536, help="largest answer wanted (1024-1048576)"
    )


def _fetch_crl_build(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.ca_cert:
        read_input(args.ca_cert)  # unreadable: a usage error before the line is opened
    return "fetch_crl", {}


async def _fetch_crl_session(client: SignerClient, args: argparse.Namespace) -> dict[str, Any]:
    from signer.client.crl_refresh import refresh_file
    from signer.tools.progress import Progress

    progress = Progress(f"CRL of {args.issuer}", "bytes")  # shown when it comes whole
    return await refresh_file(client, args.issuer, args.out, args.ca_cert, args.max_bytes, progress)


def _fixed(command: str, payload: dict[str, Any] | None = None) -> Builder:
    """A command whose payload the command line does not shape."""
    return lambda _args: (command, dict(payload or {}))


Builder = Callable[[argparse.Namespace], tuple[str, dict[str, Any]]]
Show = Callable[[dict[str, Any], argparse.Namespace, bool], None]
Session = Callable[["SignerClient", argparse.Namespace], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class ClientCommand:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    build: Builder
    show: Show
    session: Session | None = None


COMMANDS: dict[str, ClientCommand] = {
    "health": ClientCommand(
        "ask the signer for its health", _no_arguments, _fixed("health"), _show_health
    ),
    "sign-x509": ClientCommand(
        "issue a certificate from a CSR", _sign_x509_arguments, _sign_x509_build, _sign_x509_show
    ),
    "revoke-x509": ClientCommand(
        "revoke a certificate", _revoke_x509_arguments, _revoke_x509_build, _show_plain
    ),
    "list-issuers": ClientCommand(
        "the signer's CA certificates", _no_arguments, _fixed("list_issuers"), _show_plain
    ),
    "list-profiles": ClientCommand(
        "the signer's certificate profiles", _no_arguments, _fixed("list_profiles"), _show_plain
    ),
    "sign-openpgp": ClientCommand(
        "certify user IDs of an OpenPGP key",
        _sign_openpgp_arguments,
        _sign_openpgp_build,
        _sign_openpgp_show,
    ),
    "fetch-crl": ClientCommand(
        "keep a local copy of an issuer's CRL fresh (deltas, resumable chunks)",
        _fetch_crl_arguments,
        _fetch_crl_build,
        _show_plain,
        _fetch_crl_session,
    ),
    "request-status": ClientCommand(
        "the outcome of an earlier request id",
        _request_status_arguments,
        lambda args: ("request_status", {"request_id": args.lookup}),
        _show_plain,
    ),
}
