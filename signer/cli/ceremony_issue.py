"""`signer ceremony-issue`: an operator at the signer orders a CA, OCSP-signing or time-stamping
certificate (a profile with `channel: operator`), which the serial line may never ask for."""

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
    read_input,
    write_output,
)
from signer.errors import ConfigError, Unreachable

HELP = "issue a CA, OCSP or time-stamping certificate at the signer (operator only)"
DESCRIPTION = (
    "Read REQUEST.yaml (profile, csr, optional subject, sans, validity_days, digest, request_id, "
    "output), show what the running signer would sign, ask for confirmation, then have it sign "
    "and record the certificate. Talks to the signer's control socket, on the signer host only. "
    "The same request file issues once: running it again returns the first certificate. "
    "See docs/operations.md, 'Operator issuance'."
)

REQUEST_FIELDS = {
    "profile",
    "csr",
    "subject",
    "sans",
    "validity_days",
    "digest",
    "challenge",
    "request_id",
    "output",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the running signer's YAML file")
    where.add_argument("--socket", type=Path, help="the signer's control socket")
    parser.add_argument("request", type=Path, metavar="REQUEST.yaml", help="what to issue")
    parser.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (scripted ceremonies)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="show what would be signed; sign nothing"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    socket = _socket(args)
    request, output = read_request(args.request)
    preview = _call(socket, {"cmd": "issue_preview", "request": request})
    if "already_issued" in preview:
        return _done(preview["already_issued"], output, args.json, already=True)
    if args.json and not (args.yes or args.dry_run):
        raise UsageError("--json needs --yes or --dry-run: a script cannot answer the prompt")
    if not args.json:
        _show_preview(preview)
    if args.dry_run:
        if args.json:
            print_json({"ok": True, "dry_run": True, "preview": preview})
        else:
            print("dry run: nothing was signed")
        return EXIT_OK
    if not args.yes and not _confirmed(preview):
        print("error: not_confirmed: nothing was signed", file=sys.stderr)
        return EXIT_REFUSED
    issued = _call(socket, {"cmd": "issue", "request": request})
    return _done(issued, output, args.json, already=False)


def read_request(path: Path) -> tuple[dict[str, Any], Path | None]:
    """The request file as control-socket arguments (csr as PEM text), and where the
    certificate goes (None: standard output). Paths in it are relative to the file."""
    import yaml

    try:
        loaded = yaml.safe_load(read_input(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping with at least profile and csr")
    unknown = sorted(set(map(str, loaded)) - REQUEST_FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown fields {unknown}; known: {sorted(REQUEST_FIELDS)}")
    for required in ("profile", "csr"):
        if not loaded.get(required):
            raise ConfigError(f"{path}: {required} is required")
    request = dict(loaded)
    output = request.pop("output", None)
    request["csr"] = _csr_text(str(request["csr"]), path.parent)
    if isinstance(request.get("subject"), dict):
        request["subject"] = [[str(k), str(v)] for k, v in request["subject"].items()]
    return request, None if output is None else path.parent / str(output)


def _csr_text(value: str, base: Path) -> str:
    if "-----BEGIN" in value:
        return value
    data = read_input(base / value)
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{base / value}: expected a PEM certificate request")
    return data.decode("ascii", "replace")


def _socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    from signer.config import load
    from signer.server.config import SignerConfig

    config = load(args.config, SignerConfig)
    socket = config.control_path()
    if socket is None:
        raise ConfigError(f"{args.config}: no repository: no control socket to issue through")
    return socket


def _call(socket: Path, request: dict[str, Any]) -> dict[str, Any]:
    from signer.tools.history import ControlFailed, ControlUnreachable, control_call

    try:
        return control_call(socket, request, timeout=120)
    except ControlFailed as exc:
        raise CommandFailed(exc.code, exc.message) from None
    except ControlUnreachable as exc:
        raise Unreachable(str(exc)) from None


def _show_preview(preview: dict[str, Any]) -> None:
    print("The signer would issue:")
    for key, value in preview.items():
        if isinstance(value, list):
            print(f"  {key}:" + ("" if value else " none"))
            for item in value:
                print(f"    - {item}")
        else:
            print(f"  {key}: {value}")


def _confirmed(preview: dict[str, Any]) -> bool:
    print(f"Type 'yes' to have {preview['issuer']} sign this {preview['kind']} certificate: ")
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() == "yes"


def _done(issued: dict[str, Any], output: Path | None, as_json: bool, already: bool) -> int:
    if output is not None:
        write_output(output, issued["certificate"].encode())
    if as_json:
        print_json({"ok": True, "already_issued": already, "output": output, **issued})
        return EXIT_OK
    state = "was already issued for this request" if already else "issued"
    print(f"{issued['subject']}: serial {issued['serial']} {state} by {issued['issuer']}")
    if output is None:
        sys.stdout.write(issued["certificate"])
    else:
        print(f"certificate written to {output}")
    return EXIT_OK
