"""Message codec and protocol handler, without a line: frames in, answers out."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication.errors import (
    ApplyFailed,
    ClockBehind,
    Fenced,
    MembershipConflict,
    MembershipRefused,
    NoQuorum,
    NotCommitted,
    QueueFull,
    StartRefused,
)
from signer.errors import ErrorCode, SignerError
from signer.server.dispatch import ProtocolHandler
from signer.server.errors import REJECTION_CODES, rejection_error, wire_error
from signer.wire.framing import Frame, FrameDecoder, encode_frame
from signer.wire.protocol import (
    COMMANDS,
    ErrorResponse,
    Response,
    decode_request,
    decode_response,
    encode_response,
    request_digest,
)
from storage import InvalidArgument, Reason, Rejected, RepositoryError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def request(cmd="health", args=None, rid="r1", v=1):
    return {"v": v, "id": rid, "cmd": cmd, "args": {} if args is None else args}


def code_of(message) -> ErrorCode:
    with pytest.raises(SignerError) as caught:
        decode_request(message)
    return caught.value.code


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not a map", ErrorCode.BAD_ENVELOPE),
        ({**request(), "extra": 1}, ErrorCode.BAD_ENVELOPE),
        (request(v=2), ErrorCode.UNSUPPORTED_VERSION),
        (request(v="1"), ErrorCode.UNSUPPORTED_VERSION),
        ({"id": "r1", "cmd": "health", "args": {}}, ErrorCode.UNSUPPORTED_VERSION),
        (request(rid=""), ErrorCode.BAD_ENVELOPE),
        (request(rid=7), ErrorCode.BAD_ENVELOPE),
        (request(rid="x" * 129), ErrorCode.BAD_ENVELOPE),
        (request(cmd="format_disk"), ErrorCode.UNKNOWN_COMMAND),
        (request(cmd=None), ErrorCode.UNKNOWN_COMMAND),
        ({**request(), "args": []}, ErrorCode.BAD_ARGUMENTS),
        (request("health", {"x": 1}), ErrorCode.BAD_ARGUMENTS),
        (
            request("sign_x509", {"profile": "server", "csr": "text, not bin"}),
            ErrorCode.BAD_ARGUMENTS,
        ),
        (request("sign_x509", {"profile": "server"}), ErrorCode.BAD_ARGUMENTS),
        (
            request("sign_x509", {"profile": "s", "csr": b"x", "validity_days": 0}),
            ErrorCode.BAD_ARGUMENTS,
        ),
        (request("sign_x509", {"profile": "s", "csr": b"x" * 70000}), ErrorCode.BAD_ARGUMENTS),
        (
            request("sign_x509", {"profile": "s", "csr": b"x", "sans": [["dns"]]}),
            ErrorCode.BAD_ARGUMENTS,
        ),
        (request("revoke_x509", {"issuer": "class3", "serial": "XYZ"}), ErrorCode.BAD_ARGUMENTS),
        (
            request("revoke_x509", {"issuer": "c", "serial": "0A", "revoked_at": 5}),
            ErrorCode.BAD_ARGUMENTS,
        ),
        (request("sign_openpgp", {"public_key": b"k", "uids": []}), ErrorCode.BAD_ARGUMENTS),
    ],
)
def test_bad_requests_have_specific_codes(message, code):
    assert code_of(message) is code


def test_version_error_names_supported_versions_and_keeps_id():
    with pytest.raises(SignerError) as caught:
        decode_request(request(v=9, rid="abc"))
    assert caught.value.details["supported"] == [1]
    answer = encode_response(ErrorResponse("abc", caught.value))
    assert answer["id"] == "abc" and answer["error"]["code"] == "unsupported_version"


def test_valid_request_decodes_to_typed_args():
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    req = decode_request(
        request("revoke_x509", {"issuer": "class3", "serial": "0AFF", "revoked_at": when})
    )
    assert req.command.name == "revoke_x509"
    assert req.args.revoked_at == when
    assert req.args.reason is None


def test_digest_ignores_map_order_but_not_content():
    a = request_digest("sign_x509", {"profile": "p", "csr": b"x"})
    b = request_digest("sign_x509", {"csr": b"x", "profile": "p"})
    c = request_digest("sign_x509", {"csr": b"y", "profile": "p"})
    assert a == b != c


def test_response_round_trip():
    ok = decode_response(encode_response(Response("r", {"x": b"\x00\x01"})))
    assert isinstance(ok, Response) and ok.result == {"x": b"\x00\x01"}
    err = decode_response(encode_response(ErrorResponse(None, SignerError("busy", "later"))))
    assert isinstance(err, ErrorResponse) and err.error.code is ErrorCode.BUSY
    assert err.request_id is None


def test_every_command_field_and_error_code_is_documented():
    text = DOCS.read_text()
    for name, command in COMMANDS.items():
        assert f"`{name}`" in text, name
        for field in list(command.args.model_fields) + list(command.result.model_fields):
            assert f"`{field}`" in text, f"{name}.{field}"
    for code in ErrorCode:
        assert f"`{code.value}`" in text, code.value


# --- the handler --------------------------------------------------------------------------------


class Harness:
    """A ProtocolHandler whose answers are collected instead of written to a line."""

    def __init__(self, handlers, max_in_flight=4):
        self.sent: list[dict] = []
        self.handler = ProtocolHandler(handlers, self._send, max_in_flight)

    async def _send(self, message):
        # Through the real codec, so everything answered is encodable.
        [frame] = FrameDecoder().feed(encode_frame(message))
        assert isinstance(frame, Frame)
        self.sent.append(frame.message)

    def feed(self, raw: bytes):
        for event in FrameDecoder().feed(raw):
            self.handler.on_frame(event)

    async def settle(self, count, timeout=5.0):
        async with asyncio.timeout(timeout):
            while len(self.sent) < count:
                await asyncio.sleep(0.001)
        return self.sent


async def echo(args, ctx):
    return {"request": ctx.request_id}


async def test_slow_handler_does_not_hold_back_other_answers():
    release = asyncio.Event()

    async def slow(args, ctx):
        await release.wait()
        return {"slow": True}

    h = Harness({"sign_openpgp": slow, "health": echo})
    h.feed(encode_frame(request("sign_openpgp", {"public_key": b"k", "uids": ["a@b"]}, "slow")))
    h.feed(encode_frame(request("health", rid="fast")))
    sent = await h.settle(1)
    assert sent[0]["id"] == "fast"
    release.set()
    sent = await h.settle(2)
    assert sent[1] == {"v": 1, "id": "slow", "ok": True, "result": {"slow": True}}


async def test_handler_failures_become_error_answers(caplog):
    async def broken(args, ctx):
        raise RuntimeError("boom")

    async def refusing(args, ctx):
        raise SignerError(ErrorCode.UNKNOWN_PROFILE, "no such profile")

    h = Harness({"health": broken, "list_profiles": refusing})
    h.feed(
        encode_frame(request("health", rid="a")) + encode_frame(request("list_profiles", rid="b"))
    )
    h.feed(encode_frame(request("list_issuers", rid="c")))  # known command, no handler here
    sent = {m["id"]: m for m in await h.settle(3)}
    assert sent["a"]["error"]["code"] == "internal_error"
    assert "boom" not in sent["a"]["error"]["message"]  # internals stay in the log
    assert "request a" in caplog.text and "boom" in caplog.text
    assert sent["b"]["error"] == {"code": "unknown_profile", "message": "no such profile"}
    assert sent["c"]["error"]["code"] == "unknown_command"


FAILURES_BELOW = [
    (NoQuorum("no quorum: this signer reaches too few of the voters"), "no_quorum"),
    (Fenced("this signer is fenced: removed"), "no_quorum"),
    (NotCommitted("the commit was not confirmed"), "not_committed"),
    (ClockBehind("this signer's clock is 9.0 s behind"), "clock_behind"),
    (QueueFull("the replication queue is full"), "busy"),
    (ApplyFailed("applying failed: disk full"), "repository_error"),
    (MembershipRefused("10.0.0.1:1 is already a member"), "bad_arguments"),
    (MembershipConflict("the membership record changed meanwhile"), "repository_error"),
    (StartRefused("no secret"), "internal_error"),
    (RepositoryError("applying commands failed: the LMDB map is full"), "repository_error"),
    (InvalidArgument("issuer must be 20 bytes"), "bad_arguments"),
]


async def test_failures_of_storage_and_replication_get_their_wire_codes():
    """signer/server/errors.py: one mapping, whatever layer failed; the message is kept."""
    handlers = {}
    for number, (failure, _) in enumerate(FAILURES_BELOW):

        async def failing(args, ctx, failure=failure):
            raise failure

        handlers[f"h{number}"] = failing
    h = Harness(
        {"health": lambda args, ctx: handlers[ctx.request_id](args, ctx)},
        max_in_flight=len(FAILURES_BELOW),
    )
    for number in range(len(FAILURES_BELOW)):
        h.feed(encode_frame(request(rid=f"h{number}")))
    sent = {m["id"]: m for m in await h.settle(len(FAILURES_BELOW))}
    for number, (failure, code) in enumerate(FAILURES_BELOW):
        assert sent[f"h{number}"]["error"] == {"code": code, "message": str(failure)}


def test_every_rejection_reason_has_its_documented_wire_code():
    assert set(REJECTION_CODES) == set(Reason)
    codes = {reason: rejection_error(Rejected(reason, "why")).code for reason in Reason}
    assert codes == {
        Reason.MALFORMED: ErrorCode.BAD_ARGUMENTS,
        Reason.UNKNOWN_OP: ErrorCode.UNKNOWN_COMMAND,
        Reason.BAD_REASON: ErrorCode.BAD_REASON,
        Reason.REQUEST_ID_CONFLICT: ErrorCode.REQUEST_ID_CONFLICT,
        Reason.UNKNOWN_CERTIFICATE: ErrorCode.UNKNOWN_CERTIFICATE,
        Reason.SERIAL_TAKEN: ErrorCode.REPOSITORY_ERROR,
        Reason.CRL_NUMBER_NOT_NEWER: ErrorCode.REPOSITORY_ERROR,
        Reason.CRL_MISMATCH: ErrorCode.REPOSITORY_ERROR,
        Reason.META_CONFLICT: ErrorCode.REPOSITORY_ERROR,
        Reason.IMPORT_CONFLICT: ErrorCode.IMPORT_CONFLICT,
        Reason.AUDIT_MISMATCH: ErrorCode.REPOSITORY_ERROR,
    }
    assert wire_error(RuntimeError("a bug")) is None  # answered internal_error, and logged


async def test_in_flight_bound_answers_busy():
    gate = asyncio.Event()

    async def wait(args, ctx):
        await gate.wait()
        return {}

    h = Harness({"health": wait}, max_in_flight=2)
    h.feed(b"".join(encode_frame(request(rid=f"r{i}")) for i in range(3)))
    sent = await h.settle(1)
    assert sent[0]["id"] == "r2" and sent[0]["error"]["code"] == "busy"
    gate.set()
    await h.settle(3)


async def test_same_id_while_running_runs_once_and_both_get_the_answer():
    runs = 0
    gate = asyncio.Event()

    async def once(args, ctx):
        nonlocal runs
        runs += 1
        await gate.wait()
        return {"run": runs}

    h = Harness({"health": once})
    h.feed(encode_frame(request(rid="same")) * 2)
    await asyncio.sleep(0.01)
    gate.set()
    sent = await h.settle(2)
    assert runs == 1
    assert sent[0] == sent[1] == {"v": 1, "id": "same", "ok": True, "result": {"run": 1}}


async def test_same_id_other_arguments_is_a_conflict():
    gate = asyncio.Event()

    async def wait(args, ctx):
        await gate.wait()
        return {}

    h = Harness({"sign_openpgp": wait})
    h.feed(encode_frame(request("sign_openpgp", {"public_key": b"1", "uids": ["a"]}, "x")))
    h.feed(encode_frame(request("sign_openpgp", {"public_key": b"2", "uids": ["a"]}, "x")))
    sent = await h.settle(1)
    assert sent[0]["error"]["code"] == "request_id_conflict"
    gate.set()
    await h.settle(2)


ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
frames = st.one_of(
    st.binary(max_size=200),
    st.builds(
        encode_frame,
        st.dictionaries(
            st.sampled_from(["v", "id", "cmd", "args", "x"]),
            st.one_of(
                st.none(),
                ints,
                st.text(max_size=10),
                st.binary(max_size=10),
                st.dictionaries(st.text(max_size=5), ints, max_size=3),
            ),
            max_size=5,
        ),
    ),
    st.builds(
        lambda c, a: encode_frame(request(c, a)),
        st.sampled_from(sorted(COMMANDS)),
        st.dictionaries(
            st.text(max_size=12),
            st.one_of(
                ints,
                st.text(max_size=5),
                st.binary(max_size=5),
                st.lists(st.text(max_size=3), max_size=3),
            ),
            max_size=4,
        ),
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(frames, max_size=6))
def test_fuzzed_input_never_crashes_and_a_valid_request_after_it_is_answered(chunks):
    async def scenario():
        handlers = {name: echo for name in COMMANDS}
        h = Harness(handlers, max_in_flight=64)
        h.feed(b"".join(chunks) + b"\x00")
        h.feed(encode_frame(request(rid="final")))
        async with asyncio.timeout(5):
            while not any(m.get("id") == "final" for m in h.sent):
                await asyncio.sleep(0.001)
        await asyncio.sleep(0)
        assert all(m["v"] == 1 and isinstance(m["ok"], bool) for m in h.sent)
        assert all(m["ok"] or m["error"]["code"] in set(ErrorCode) for m in h.sent)
        await h.handler.close()

    asyncio.run(scenario())


async def test_every_broken_frame_gets_an_error_frame():
    h = Harness({"health": echo})
    bad = bytearray(encode_frame(request()))
    bad[3] ^= 0x10
    h.feed(bytes(bad) + b"\x07\x07\x00" + encode_frame(request(rid="ok")))
    sent = await h.settle(3)
    errors = [m for m in sent if not m["ok"]]
    assert [m["id"] for m in errors] == [None, None]
    assert {m["error"]["code"] for m in errors} <= {"bad_crc", "bad_frame", "bad_msgpack"}
    assert any(m["id"] == "ok" and m["ok"] for m in sent)
