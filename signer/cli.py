"""The `signer` command line: every part of the system is a subcommand.

Exit codes: 0 success; 1 the signer refused or failed the request (the error code is printed);
2 usage or configuration error; 3 the signer could not be reached (timeout, line down).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from signer import __version__
from signer.client.config import ClientConfig
from signer.config import ConfigError, LinkConfig, load
from signer.server.config import SignerConfig

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATES:
        return DELEGATES[argv[0]][1](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signer", description="cacert-signer: the offline signer of a community CA"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_serve(sub)
    _add_client(sub)
    for name, (text, _run) in DELEGATES.items():
        sub.add_parser(name, help=text, add_help=False)  # listed here, parsed by its own module
    return parser


def _emulator(argv: list[str]) -> int:
    from signer.tools import line_emulator

    return line_emulator.main(argv)


def _ceremony(argv: list[str]) -> int:
    from signer.tools import ceremony

    return ceremony.main(argv)


def _demo(argv: list[str]) -> int:
    from signer.tools import demo

    return demo.main(argv)


def _webdb_client(argv: list[str]) -> int:
    from signer import cli_webdb

    return cli_webdb.main(argv)


def _openpgp_export(argv: list[str]) -> int:
    from signer import cli_openpgp

    return cli_openpgp.main(argv)


def _cluster(argv: list[str]) -> int:
    from signer import cli_cluster as control

    return control.main(argv)


DELEGATES: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "line-emulator": ("an emulated serial cable (two ptys, paced)", _emulator),
    "ceremony": ("generate CA keys in the HSM and make the CA", _ceremony),
    "demo": ("run a signer and a client on an emulated line", _demo),
    "openpgp-export": ("write the OpenPGP CA's public key for publication", _openpgp_export),
    "webdb-client": ("poll the WebDB database, drive the signer, write back", _webdb_client),
    "cluster": ("status and membership of the replicated pair (on the signer host)", _cluster),
}


# --- serve -----------------------------------------------------------------------------------


def _add_serve(sub: Any) -> None:
    parser = sub.add_parser("serve", help="run the signer on its serial line")
    parser.add_argument("--config", type=Path, required=True, help="signer YAML file")
    parser.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from signer.server.process import SignerServer

    config = load(args.config, SignerConfig)
    setup_logging(config.log_level)
    asyncio.run(SignerServer(config).serve_forever())
    return EXIT_OK


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


# --- client ----------------------------------------------------------------------------------


def _add_client(sub: Any) -> None:
    parser = sub.add_parser("client", help="send one command to a signer")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="client YAML file (link settings)")
    where.add_argument("--port", help="serial device of the line to the signer")
    parser.add_argument("--baud", type=int, default=115200, help="with --port (default 115200)")
    parser.add_argument("--timeout", type=float, help="seconds for the whole call")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--request-id", help="request id (retrying with the same id is safe)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the line's events")
    commands = parser.add_subparsers(title="signer commands", metavar="COMMAND", required=True)
    for name, spec in CLIENT_COMMANDS.items():
        command = commands.add_parser(name, help=spec.help, description=spec.help)
        spec.arguments(command)
        command.set_defaults(
            run=_client, build=spec.build, show=spec.show, session=spec.session, command=name
        )


def _client(args: argparse.Namespace) -> int:
    from signer.errors import ClientFailure, SignerError, Unreachable

    setup_logging("INFO" if args.verbose else "ERROR")
    config = _client_config(args)
    try:
        command, payload = args.build(args)
        result = asyncio.run(_call(config, command, payload, args))
    except Unreachable as exc:
        _print_error(exc.to_json(), args.json)
        return EXIT_UNREACHABLE
    except (SignerError, ClientFailure) as exc:
        _print_error(exc.to_wire() if isinstance(exc, SignerError) else exc.to_json(), args.json)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(result, default=_json_default, indent=2, sort_keys=True))
    else:
        args.show(result, args)
    if args.json and getattr(args, "out", None):
        args.show(result, args, quiet=True)
    return EXIT_OK


def _client_config(args: argparse.Namespace) -> ClientConfig:
    if args.config:
        config = load(args.config, ClientConfig)
    else:
        config = ClientConfig(link=LinkConfig(device=args.port, baudrate=args.baud))
    if args.timeout:
        config = config.model_copy(update={"timeout": args.timeout})
    return config


async def _call(
    config: ClientConfig, command: str, payload: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    from signer.client.library import SignerClient

    client = SignerClient(
        config.link.settings(),
        timeout=config.timeout,
        attempts=config.attempts,
        max_in_flight=config.max_in_flight,
    )
    async with client:
        if getattr(args, "session", None) is not None:  # a command that takes several calls
            return await args.session(client, args)
        return await client.call(command, payload, request_id=args.request_id)


def _print_error(error: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": error}, default=_json_default, indent=2))
    else:
        print(f"error: {error['code']}: {error['message']}", file=sys.stderr)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _show_health(result: dict[str, Any], _args: Any) -> None:
    print(f"status:  {result['status']}")
    print(f"version: {result['version']}")
    print(f"time:    {result['time'].isoformat()}")
    print(f"uptime:  {result['uptime_s']:.1f} s")
    for text in result.get("warnings", []):
        print(f"warning: {text}")
    for name, section in result.get("sections", {}).items():
        print(f"[{name}]")
        _show_mapping(section, "  ")


def _show_mapping(mapping: dict[str, Any], indent: str) -> None:
    for key, value in mapping.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _show_mapping(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}:")
            for item in value:
                _show_mapping(item, indent + "  - ")
        else:
            print(f"{indent}{key}: {value}")


def _show_plain(result: dict[str, Any], _args: Any) -> None:
    _show_mapping({k: v for k, v in result.items() if not isinstance(v, bytes)}, "")


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
            raise SystemExit(f"signer client: {what} {item!r}: expected NAME{separator}VALUE")
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
    parser.add_argument("--out", type=Path, help="write the certificate here (PEM)")


def _sign_x509_build(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    payload: dict[str, Any] = {
        "profile": args.profile,
        "csr": args.csr.read_bytes(),
        "digest": args.digest,
    }
    if subject := _pairs(args.subject, "=", "--subject"):
        payload["subject"] = subject
    if sans := _pairs(args.san, ":", "--san"):
        payload["sans"] = sans
    if args.days is not None:
        payload["validity_days"] = args.days
    return "sign_x509", payload


def _sign_x509_show(result: dict[str, Any], args: Any, quiet: bool = False) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = x509.load_der_x509_certificate(result["certificate"]).public_bytes(Encoding.PEM)
    if args.out:
        args.out.write_bytes(pem)
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
        metavar="EMAIL",
        help="e-mail address (or whole user ID) to certify (repeat)",
    )
    parser.add_argument("--out", type=Path, help="write the certified key here (binary)")


def _sign_openpgp_build(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    return "sign_openpgp", {"public_key": args.key.read_bytes(), "uids": args.uid}


def _sign_openpgp_show(result: dict[str, Any], args: Any, quiet: bool = False) -> None:
    if args.out:
        args.out.write_bytes(result["public_key"])
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


async def _fetch_crl_session(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    from signer.client.crl_refresh import refresh_file

    return await refresh_file(client, args.issuer, args.out, args.ca_cert, args.max_bytes)


def _fetch_crl_show(result: dict[str, Any], _args: Any, quiet: bool = False) -> None:
    if not quiet:
        _show_mapping(result, "")


@dataclass(frozen=True)
class ClientCommand:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    build: Callable[[argparse.Namespace], tuple[str, dict[str, Any]]]
    show: Callable[..., None]
    session: Callable[[Any, argparse.Namespace], Awaitable[dict[str, Any]]] | None = None


CLIENT_COMMANDS: dict[str, ClientCommand] = {
    "health": ClientCommand(
        "ask the signer for its health", _no_arguments, lambda _a: ("health", {}), _show_health
    ),
    "sign-x509": ClientCommand(
        "issue a certificate from a CSR", _sign_x509_arguments, _sign_x509_build, _sign_x509_show
    ),
    "revoke-x509": ClientCommand(
        "revoke a certificate", _revoke_x509_arguments, _revoke_x509_build, _show_plain
    ),
    "list-issuers": ClientCommand(
        "the signer's CA certificates", _no_arguments, lambda _a: ("list_issuers", {}), _show_plain
    ),
    "list-profiles": ClientCommand(
        "the signer's certificate profiles",
        _no_arguments,
        lambda _a: ("list_profiles", {}),
        _show_plain,
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
        lambda _a: ("fetch_crl", {}),
        _fetch_crl_show,
        _fetch_crl_session,
    ),
    "request-status": ClientCommand(
        "the outcome of an earlier request id",
        _request_status_arguments,
        lambda a: ("request_status", {"request_id": a.lookup}),
        _show_plain,
    ),
}
