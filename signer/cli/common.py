"""What every verb of the command line shares: exit codes from error types, one error printer,
one logging setup, JSON output, reading input files.

Light on purpose (standard library and signer.errors only): the parser tree imports every verb
module, and the WebDB host must be able to build it without the signer host's libraries.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from signer.errors import ClientFailure, ConfigError, SignerError, Unreachable

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers: time (UTC, ISO 8601), level, logger, message,
    and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


LOG_FORMATTERS: dict[str, Callable[[], logging.Formatter]] = {
    "text": lambda: logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"),
    "json": JsonFormatter,
}


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """`--log-format`, for the verbs that run as services."""
    parser.add_argument(
        "--log-format",
        choices=sorted(LOG_FORMATTERS),
        default="text",
        help="text (default; the journal adds the time too) or json (one object per line)",
    )


class UsageError(Exception):
    """The command line itself is wrong (an argument argparse cannot check); exit 2."""


class CommandFailed(Exception):
    """A verb ran and did not succeed for a reason with no family in signer.errors (a ceremony
    whose token and output disagree, a refusal from the control socket); exit 1."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def exit_code(error: BaseException) -> int | None:
    """The exit code an error family stands for; None for a bug (let it show its traceback)."""
    if isinstance(error, UsageError | ConfigError):
        return EXIT_USAGE
    if isinstance(error, Unreachable):
        return EXIT_UNREACHABLE
    if isinstance(error, SignerError | ClientFailure | CommandFailed):
        return EXIT_REFUSED
    return None


def describe(error: BaseException) -> dict[str, Any]:
    """An error as {code, message[, details]}: the signer's wire code when it has one."""
    if isinstance(error, SignerError):
        return error.to_wire()
    if isinstance(error, ClientFailure):
        return error.to_json()
    if isinstance(error, CommandFailed):
        return {"code": error.code, "message": error.message}
    code = "configuration_error" if isinstance(error, ConfigError) else "usage_error"
    return {"code": code, "message": str(error)}


def print_error(error: BaseException, as_json: bool) -> None:
    """One line (or block) on stderr for people; with --json also {"ok": false, "error"} on
    stdout, so a script reads one JSON document whatever happened."""
    described = describe(error)
    message = described["message"]
    separator = "\n" if "\n" in message else " "
    print(f"error: {described['code']}:{separator}{message}", file=sys.stderr)
    if as_json:
        print_json({"ok": False, "error": described})


def print_json(value: Any) -> None:
    print(json.dumps(value, default=json_default, indent=2, sort_keys=True))


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def setup_logging(level: str, log_format: LogFormat = "text") -> None:
    """Logging of every verb goes to stderr; the format is a parameter so that a structured one
    (`--log-format json`) is one more entry in LOG_FORMATTERS."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LOG_FORMATTERS[log_format]())
    logging.basicConfig(level=level, handlers=[handler])


def read_input(path: Path) -> bytes:
    """A file named on the command line; unreadable is a usage error naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None


def write_output(path: Path, data: bytes) -> None:
    """A file the command was asked to write; failing is the command failing, not a bug."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CommandFailed("cannot_write", f"{path}: cannot write: {exc.strerror}") from None


def show_mapping(mapping: dict[str, Any], indent: str = "") -> None:
    """Nested results as indented `key: value` lines (the human form of --json)."""
    for key, value in mapping.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            show_mapping(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}:")
            for item in value:
                show_mapping(item, indent + "  - ")
        else:
            print(f"{indent}{key}: {value}")
