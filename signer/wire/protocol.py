"""The signer's message protocol, as a pure codec: decoded frames in, typed events out.

Every message is a msgpack map (see docs/protocol.md, which this module must match):

    request  {"v": 1, "id": str, "cmd": str, "args": map}
    response {"v": 1, "id": str | nil, "ok": true,  "result": map}
             {"v": 1, "id": str | nil, "ok": false, "error": {"code": str, "message": str,
                                                             "details"?: map}}

Arguments and results are pydantic models in strict mode with unknown fields refused, so a
wrong type is an error, never a silent coercion. No I/O here: the protocol handler and the client
drive it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from signer.errors import MAX_MESSAGE_CHARS, ErrorCode, ProtocolError, SignerError
from signer.wire.framing import pack_message

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_REQUEST_ID = 128
MAX_CSR = 64 * 1024
MAX_OPENPGP_KEY = 1024 * 1024
MAX_PROBLEMS = 10  # `details.problems` of one refusal
MAX_DETAILS_BYTES = 1024  # an error answer's `details`, msgpack-encoded

Bin = bytes
Name = str
# A [type or attribute, value] pair, as msgpack gives it (an array of two strings)
Pair = Annotated[list[Annotated[str, Field(max_length=1024)]], Field(min_length=2, max_length=2)]


class Args(BaseModel):
    """Base of every command's arguments: strict types, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Result(BaseModel):
    """Base of every command's result."""

    model_config = ConfigDict(extra="forbid")


# --- health -------------------------------------------------------------------------------------


class HealthArgs(Args):
    pass


class HealthResult(Result):
    version: str
    time: datetime
    uptime_s: float
    status: Literal["ok", "warning", "error"]
    warnings: list[str] = Field(default_factory=list)
    sections: dict[str, Any] = Field(default_factory=dict)


# --- describe: what a signer offers ---------------------------------------------------------


class ListIssuersArgs(Args):
    pass


class IssuerInfo(Result):
    name: str
    key_id: Bin
    subject: str
    certificate: Bin
    not_after: datetime


class ListIssuersResult(Result):
    issuers: list[IssuerInfo]


class ListProfilesArgs(Args):
    pass


class ProfileInfo(Result):
    name: str
    issuer: str
    default_validity_days: int
    max_validity_days: int
    digests: list[str]
    subject_attributes: list[str]
    san_types: list[str]
    rules: dict[str, Any] = Field(default_factory=dict)  # every rule that can refuse a request


class ListProfilesResult(Result):
    profiles: list[ProfileInfo]


# --- X.509 -----------------------------------------------------------------------------------


class SignX509Args(Args):
    profile: Name = Field(min_length=1, max_length=64)
    csr: Bin = Field(min_length=1, max_length=MAX_CSR)
    subject: list[Pair] | None = Field(default=None, max_length=64)
    sans: list[Pair] | None = Field(default=None, max_length=1000)
    validity_days: int | None = Field(default=None, ge=1, le=36500)
    digest: str = Field(default="sha256", max_length=16)
    challenge: str | None = Field(default=None, max_length=256)


class SignX509Result(Result):
    certificate: Bin
    serial: str
    issuer: str
    not_before: datetime
    not_after: datetime


class RevokeX509Args(Args):
    issuer: str = Field(min_length=1, max_length=1024)
    serial: str = Field(min_length=1, max_length=42, pattern=r"^[0-9A-Fa-f]+$")
    reason: str | None = Field(default=None, max_length=32)
    revoked_at: datetime | None = None
    invalidity_date: datetime | None = None


class RevokeX509Result(Result):
    status: Literal["revoked", "already_revoked"]
    issuer: str
    serial: str
    revoked_at: datetime
    reason: str | None


class RecordX509Args(Args):
    """A certificate this signer issued that its repository lost (restored from an older copy):
    recorded under the request id, never issued again (`signer webdb-client --reconcile`)."""

    certificate: Bin = Field(min_length=1, max_length=MAX_CSR)


class RecordX509Result(Result):
    status: Literal["recorded", "already_recorded"]
    issuer: str
    serial: str


# --- CRL -------------------------------------------------------------------------------------


class FetchCrlArgs(Args):
    issuer: str = Field(min_length=1, max_length=1024)
    have_number: int | None = Field(default=None, ge=0, lt=2**64)
    want: Literal["auto", "full"] = "auto"
    crl_number: int | None = Field(default=None, ge=0, lt=2**64)
    offset: int = Field(default=0, ge=0, lt=2**63)
    max_bytes: int = Field(default=65536, ge=1024, le=1024 * 1024)


class FetchCrlResult(Result):
    kind: Literal["unchanged", "delta", "full"]
    crl_number: int
    this_update: datetime
    next_update: datetime
    added: list[Bin] | None = None
    removed: list[str] | None = None
    expired_certs_on_crl: datetime | None = None
    signature_algorithm: Bin | None = None
    signature: Bin | None = None
    total_size: int | None = None
    offset: int | None = None
    chunk: Bin | None = None
    sha256: Bin | None = None


# --- audit log (docs/audit.md) -----------------------------------------------------------------


class FetchAuditArgs(Args):
    start: int = Field(default=0, ge=0, lt=2**63)
    max_records: int = Field(default=1024, ge=1, le=65536)
    max_bytes: int = Field(default=65536, ge=1024, le=1024 * 1024)
    have_size: int | None = Field(default=None, ge=0, lt=2**63)


class FetchAuditResult(Result):
    size: int
    start: int
    records: list[Bin]
    head: dict[str, Any] | None = None
    consistency: list[Bin] | None = None


class ProveInclusionArgs(Args):
    issuer: str = Field(min_length=1, max_length=1024)
    serial: str = Field(min_length=1, max_length=42, pattern=r"^[0-9A-Fa-f]+$")
    size: int | None = Field(default=None, ge=1, lt=2**63)


class ProveInclusionResult(Result):
    index: int
    size: int
    record: Bin
    proof: list[Bin]
    head: dict[str, Any] | None = None


class SignTreeHeadArgs(Args):
    pass


class SignTreeHeadResult(Result):
    head: dict[str, Any]


# --- OpenPGP ---------------------------------------------------------------------------------


class SignOpenpgpArgs(Args):
    public_key: Bin = Field(min_length=1, max_length=MAX_OPENPGP_KEY)
    uids: list[str] = Field(min_length=1, max_length=64)


class SignOpenpgpResult(Result):
    public_key: Bin
    fingerprint: str
    certified_uids: list[str]
    expires: datetime


# --- earlier outcomes ------------------------------------------------------------------------


class RequestStatusArgs(Args):
    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID)


class RequestStatusResult(Result):
    state: Literal["done", "in_progress", "unknown"]
    command: str | None = None
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class Command:
    """A command of the protocol: its argument and result schemas, and whether it writes."""

    name: str
    args: type[Args]
    result: type[Result]
    writes: bool
    summary: str


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("health", HealthArgs, HealthResult, False, "state of the signer"),
        Command("list_issuers", ListIssuersArgs, ListIssuersResult, False, "CA certificates"),
        Command("list_profiles", ListProfilesArgs, ListProfilesResult, False, "profiles"),
        Command("sign_x509", SignX509Args, SignX509Result, True, "issue a certificate"),
        Command("revoke_x509", RevokeX509Args, RevokeX509Result, True, "revoke a certificate"),
        Command("fetch_crl", FetchCrlArgs, FetchCrlResult, False, "an issuer's CRL"),
        Command("sign_openpgp", SignOpenpgpArgs, SignOpenpgpResult, True, "certify user IDs"),
        Command("request_status", RequestStatusArgs, RequestStatusResult, False, "outcome"),
        Command("record_x509", RecordX509Args, RecordX509Result, True, "record a lost issuance"),
        Command("fetch_audit", FetchAuditArgs, FetchAuditResult, False, "audit log records"),
        Command("prove_inclusion", ProveInclusionArgs, ProveInclusionResult, False, "proof"),
        Command("sign_tree_head", SignTreeHeadArgs, SignTreeHeadResult, True, "sign a head"),
    )
}


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A valid request: its command is known and its arguments passed their schema."""

    request_id: str
    command: Command
    args: Args
    digest: bytes  # SHA-256 over the command and canonical arguments: same id, same digest


@dataclass(frozen=True)
class Response:
    request_id: str | None
    result: dict[str, Any]


@dataclass(frozen=True)
class ErrorResponse:
    request_id: str | None
    error: SignerError


# --- requests (signer side) ------------------------------------------------------------------


ENVELOPE_FIELDS = ("v", "id", "cmd", "args")
# pydantic's error types for a value over its size bound: `field_too_large`, not `bad_arguments`
_TOO_LARGE = frozenset({"string_too_long", "bytes_too_long", "too_long"})


def decode_request(message: Any) -> Request:
    """Check one decoded frame as a request; raise `SignerError` carrying what is wrong.

    The error's details hold the request id when it could be read, so the answer can carry it.
    """
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, "a request must be a msgpack map")
    request_id = _request_id(message)
    if unknown := [k for k in message if k not in ENVELOPE_FIELDS]:
        shown = ", ".join(repr(k)[:40] for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise _with_id(
            ErrorCode.BAD_ENVELOPE, f"unknown envelope fields: {shown}{more}", request_id
        )
    if missing := [k for k in ENVELOPE_FIELDS if k not in message]:
        text = f"the envelope lacks {', '.join(missing)}"
        raise _with_id(ErrorCode.BAD_ENVELOPE, text, request_id)
    version = message["v"]
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise _with_id(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {_shown(version)} is not supported",
            request_id,
            supported=list(SUPPORTED_VERSIONS),
        )
    if request_id is None:
        raise ProtocolError(
            ErrorCode.BAD_ENVELOPE, f"id must be a string of 1 to {MAX_REQUEST_ID} characters"
        )
    name = message["cmd"]
    if not isinstance(name, str):
        raise _with_id(ErrorCode.BAD_ENVELOPE, "cmd must be a string", request_id)
    command = COMMANDS.get(name)
    if command is None:
        raise _with_id(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {_shown(name)}",
            request_id,
            known=list(COMMANDS),
        )
    raw_args = message["args"]
    if not isinstance(raw_args, dict):
        raise _with_id(
            ErrorCode.BAD_ARGUMENTS,
            "args must be a map",
            request_id,
            problems=[{"field": "args", "problem": "must be a map"}],
        )
    raw_args = _without_nil(command, raw_args)
    args = _validate_args(command, raw_args, request_id)
    return Request(request_id, command, args, request_digest(command.name, raw_args))


def _without_nil(command: Command, raw: dict[Any, Any]) -> dict[Any, Any]:
    """nil for an optional argument is the same as leaving it out (also for the digest)."""
    fields = command.args.model_fields
    return {
        k: v for k, v in raw.items() if v is not None or k not in fields or fields[k].is_required()
    }


def _shown(value: Any) -> str:
    """A bounded rendering of a value from the line, for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def request_digest(command: str, args: dict[str, Any]) -> bytes:
    """A digest of what was asked, independent of map order, to detect a reused request id."""
    return hashlib.sha256(pack_message([command, _canonical(args)])).digest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return sorted((str(k), _canonical(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _request_id(message: dict[Any, Any]) -> str | None:
    request_id = message.get("id")
    if isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID:
        return request_id
    return None


def _with_id(code: ErrorCode, text: str, request_id: str | None, **details: Any) -> SignerError:
    if request_id is not None:
        details["id"] = request_id
    return ProtocolError(code, text, details)


def _validate_args(command: Command, raw: dict[str, Any], request_id: str) -> Args:
    try:
        return command.args.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = [
            {"field": ".".join(str(p) for p in err["loc"])[:100] or "args", "problem": err["msg"]}
            for err in errors[:MAX_PROBLEMS]
        ]
        too_large = all(err["type"] in _TOO_LARGE for err in errors)
        first = problems[0]
        raise _with_id(
            ErrorCode.FIELD_TOO_LARGE if too_large else ErrorCode.BAD_ARGUMENTS,
            f"{command.name}: {first['field']}: {first['problem']}",
            request_id,
            problems=problems,
        ) from None


def encode_response(event: Response | ErrorResponse) -> dict[str, Any]:
    """The msgpack-ready map for an answer. An error is bounded whatever raised it: its
    message to MAX_MESSAGE_CHARS, its details to MAX_DETAILS_BYTES (else `{"truncated": true}`),
    and `bad_arguments` / `field_too_large` always carry `details.problems`."""
    if isinstance(event, Response):
        return {"v": PROTOCOL_VERSION, "id": event.request_id, "ok": True, "result": event.result}
    return {
        "v": PROTOCOL_VERSION,
        "id": event.request_id,
        "ok": False,
        "error": bounded_error(event.error),
    }


def bounded_error(error: SignerError) -> dict[str, Any]:
    """An error as the line carries it (see `encode_response`)."""
    message = error.message
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    details = {k: v for k, v in error.details.items() if k != "id"}
    if error.code in (ErrorCode.BAD_ARGUMENTS, ErrorCode.FIELD_TOO_LARGE):
        problems = details.get("problems")
        if not isinstance(problems, list) or not problems:
            field = details.get("field")
            where = field if isinstance(field, str) else "args"
            details["problems"] = [{"field": where, "problem": message}]
        else:
            details["problems"] = problems[:MAX_PROBLEMS]
    wire: dict[str, Any] = {"code": error.code.value, "message": message}
    if details:
        wire["details"] = _bounded_details(details)
    return wire


def _bounded_details(details: dict[str, Any]) -> dict[str, Any]:
    """Details within MAX_DETAILS_BYTES: long strings and lists cut first, then everything."""
    if len(pack_message(details)) <= MAX_DETAILS_BYTES:
        return details
    cut = _cut(details, depth=0)
    if isinstance(cut, dict) and len(pack_message(cut)) <= MAX_DETAILS_BYTES:
        return {**cut, "truncated": True}
    return {"truncated": True}


def _cut(value: Any, depth: int) -> Any:
    if depth > 3:
        return None
    if isinstance(value, str | bytes):
        return value[:120]
    if isinstance(value, list | tuple):
        return [_cut(v, depth + 1) for v in value[:MAX_PROBLEMS]]
    if isinstance(value, dict):
        return {str(k)[:40]: _cut(v, depth + 1) for k, v in list(value.items())[:MAX_PROBLEMS]}
    return value


def error_response_for(exc: SignerError) -> ErrorResponse:
    """An error answer, addressed to the request id the error carries (if any)."""
    return ErrorResponse(exc.details.get("id"), exc)


def dump_result(result: Result | dict[str, Any]) -> dict[str, Any]:
    """A handler's result as a msgpack-ready map (bytes stay bytes, datetimes stay datetimes)."""
    if isinstance(result, BaseModel):
        return result.model_dump(mode="python", exclude_none=True)
    return result


# --- requests and responses (client side) ----------------------------------------------------


def encode_request(request_id: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "cmd": command, "args": args}


def decode_response(message: Any) -> Response | ErrorResponse:
    """Check one decoded frame as a response; a malformed one raises BAD_ENVELOPE."""
    if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, "not a version 1 response")
    request_id = message.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, "response id must be a string or nil")
    if message.get("ok") is True and isinstance(message.get("result"), dict):
        return Response(request_id, message["result"])
    error = message.get("error")
    if message.get("ok") is False and isinstance(error, dict):
        return ErrorResponse(request_id, _wire_error(error))
    raise ProtocolError(ErrorCode.BAD_ENVELOPE, "response has neither a result nor an error")


def _wire_error(error: dict[str, Any]) -> SignerError:
    code, text = error.get("code"), error.get("message")
    details = error.get("details") if isinstance(error.get("details"), dict) else None
    try:
        return SignerError(ErrorCode(str(code)), str(text), details)
    except ValueError:
        return ProtocolError(ErrorCode.INTERNAL_ERROR, f"unknown error code {code!r}: {text}")
