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
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from signer import __version__
from signer.config import ClientConfig, ConfigError, LinkConfig, SignerConfig, load

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
    from signer import line_emulator

    return line_emulator.main(argv)


def _ceremony(argv: list[str]) -> int:
    from signer import ceremony

    return ceremony.main(argv)


def _demo(argv: list[str]) -> int:
    from signer import demo

    return demo.main(argv)


DELEGATES: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "line-emulator": ("an emulated serial cable (two ptys, paced)", _emulator),
    "ceremony": ("generate CA keys in the HSM and make the CA", _ceremony),
    "demo": ("run a signer and a client on an emulated line", _demo),
}


# --- serve -----------------------------------------------------------------------------------


def _add_serve(sub: Any) -> None:
    parser = sub.add_parser("serve", help="run the signer on its serial line")
    parser.add_argument("--config", type=Path, required=True, help="signer YAML file")
    parser.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from signer.server import SignerServer

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
    for name, (text, build, show) in CLIENT_COMMANDS.items():
        command = commands.add_parser(name, help=text)
        command.set_defaults(run=_client, build=build, show=show, command=name)


def _client(args: argparse.Namespace) -> int:
    from signer.errors import ErrorCode, SignerError

    setup_logging("INFO" if args.verbose else "ERROR")
    config = _client_config(args)
    try:
        command, payload = args.build(args)
        result = asyncio.run(_call(config, command, payload, args))
    except SignerError as exc:
        unreachable = exc.code in (ErrorCode.TIMEOUT, ErrorCode.LINK_DOWN)
        _print_error(exc, args.json)
        return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
    if args.json:
        print(json.dumps(result, default=_json_default, indent=2, sort_keys=True))
    else:
        args.show(result)
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
    from signer.client import SignerClient

    client = SignerClient(
        config.link.settings(),
        timeout=config.timeout,
        attempts=config.attempts,
        max_in_flight=config.max_in_flight,
    )
    async with client:
        return await client.call(command, payload, request_id=args.request_id)


def _print_error(exc: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": exc.to_wire()}, default=_json_default, indent=2))
    else:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _show_health(result: dict[str, Any]) -> None:
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
        else:
            print(f"{indent}{key}: {value}")


CLIENT_COMMANDS: dict[str, tuple[str, Callable[..., Any], Callable[[dict[str, Any]], None]]] = {
    "health": ("ask the signer for its health", lambda _a: ("health", {}), _show_health),
}
