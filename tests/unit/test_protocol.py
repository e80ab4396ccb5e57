"""Message codec and protocol handler, without a line: frames in, answers out."""

from __future__ import annotations

import asyncio
import contextlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from signer.errors import MAX_MESSAGE_CHARS, ErrorCode, SignerError
from signer.pki.profiles import (
    AttributeRule,
    KeyRules,
    RsaRule,
    SanRules,
    SanTypeRule,
    SubjectRules,
    ValidityRules,
)
from signer.server.dispatch import ProtocolHandler
from signer.server.errors import REJECTION_CODES, rejection_error, wire_error
from signer.wire.framing import Frame, FrameDecoder, encode_frame
from signer.wire.protocol import (
    COMMANDS,
    MAX_CSR,
    MAX_DETAILS_BYTES,
    MAX_PROBLEMS,
    ErrorResponse,
    Response,
    decode_request,
    decode_response,
    encode_response,
    request_digest,
)
from storage import InvalidArgument, Reason, Rejected, RepositoryError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
# The profile rules that can refuse a request: `list_profiles` exposes every field of each.
RULE_MODELS = (SubjectRules, AttributeRule, SanRules, SanTypeRule, KeyRules, RsaRule, ValidityRules)


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
        ({"id": "r1", "cmd": "health", "args": {}}, ErrorCode.BAD_ENVELOPE),
        (request(rid=""), ErrorCode.BAD_ENVELOPE),
        (request(rid=7), ErrorCode.BAD_ENVELOPE),
        (request(rid="x" * 129), ErrorCode.BAD_ENVELOPE),
        (request(cmd="format_disk"), ErrorCode.UNKNOWN_COMMAND),
        (request(cmd=None), ErrorCode.BAD_ENVELOPE),
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
        (request("sign_x509", {"profile": "s", "csr": b"x" * 70000}), ErrorCode.FIELD_TOO_LARGE),
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


def doc_sections() -> dict[str, str]:
    r"""Each command's section (`### \`name\``) of docs/protocol.md, by command name."""
    parts = re.split(r"^### `(\w+)`$", DOCS.read_text(), flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def table_rows(section: str, header: str) -> dict[str, tuple[str, str]]:
    """name -> (type, meaning) of a section's table whose first column is `header`."""
    rows: dict[str, tuple[str, str]] = {}
    inside = False
    for line in section.splitlines():
        if line.startswith(f"| {header} |"):
            inside = True
        elif inside and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if found := re.fullmatch(r"`([\w.\[\]]+)`", cells[0]):
                rows[found.group(1)] = (cells[1], cells[2])
        elif inside:
            inside = False
    return rows


def upper_bounds(info: Any) -> list[int]:
    """The caps a field's schema puts on its size or value."""
    bounds = []
    for rule in info.metadata:
        for name in ("max_length", "le", "lt"):
            if isinstance(getattr(rule, name, None), int):
                bounds.append(getattr(rule, name))
    return bounds


def number_forms(n: int) -> set[str]:
    """How the document may write a cap: 36500, 36,500, 64 KiB, 1 MiB, 2^64."""
    forms = {str(n), f"{n:,}"}
    if n >= 1024 and n % 1024 == 0:
        forms.add(f"{n // 1024} KiB")
    if n >= 2**20 and n % 2**20 == 0:
        forms.add(f"{n // 2**20} MiB")
    if n > 2 and n & (n - 1) == 0:
        forms.add(f"2^{n.bit_length() - 1}")
    return forms


def test_every_command_field_and_error_code_is_documented():
    """docs/protocol.md is normative: every command, argument, result field and error code of the
    code is in it; each optional argument (nil = absent) is marked `?` and each required one is
    not; every cap of an argument's schema is written in its row; the error-shape bounds and the
    rules `list_profiles` exposes are documented."""
    text = DOCS.read_text()
    sections = doc_sections()
    for name, command in COMMANDS.items():
        assert f"`{name}`" in text and name in sections, name
        arguments = table_rows(sections[name], "argument")
        for field, info in command.args.model_fields.items():
            assert field in arguments, f"{name}.{field}: no row in the argument table"
            kind, meaning = arguments[field]
            assert kind.endswith("?") != info.is_required(), f"{name}.{field}: `?` is {kind}"
            for bound in upper_bounds(info):
                assert number_forms(bound) & set(
                    re.findall(r"\d+(?:,\d{3})*(?:\^\d+)?(?: [KM]iB)?", meaning)
                ), f"{name}.{field}: the cap {bound} is not in the document"
        results = table_rows(sections[name], "result field")
        for field in command.result.model_fields:
            assert f"`{field}`" in sections[name], f"{name} result field {field}"
            assert field in results or f"`{field}`" in text, f"{name}.{field}"
    for code in ErrorCode:
        assert f"`{code.value}`" in text, code.value
    for phrase in (
        f"at most {MAX_PROBLEMS} problems",
        f"at most {MAX_MESSAGE_CHARS} characters",
        f"at most {MAX_DETAILS_BYTES} bytes",
    ):
        assert phrase in text, phrase
    for model in RULE_MODELS:
        for field in model.model_fields:
            assert f"`{field}`" in sections["list_profiles"], f"{model.__name__}.{field}"


# --- docs/protocol.md against behaviour (issue 11, item 11) -------------------------------


SAMPLE_ARGS: dict[str, dict[str, Any]] = {
    "health": {},
    "list_issuers": {},
    "list_profiles": {},
    "sign_x509": {"profile": "server", "csr": b"x"},
    "revoke_x509": {"issuer": "class3", "serial": "0A"},
    "fetch_crl": {"issuer": "class3"},
    "sign_openpgp": {"public_key": b"k", "uids": ["Alice <a@example.org>"]},
    "request_status": {"request_id": "r"},
    "record_x509": {"certificate": b"c"},
    "fetch_audit": {},
    "prove_inclusion": {"issuer": "class3", "serial": "0A"},
    "sign_tree_head": {},
}


def test_nil_is_the_same_as_absent_for_every_optional_argument():
    """`digest: nil` was refused although the document says nil equals absent."""
    assert set(SAMPLE_ARGS) == set(COMMANDS)
    for name, command in COMMANDS.items():
        absent = decode_request(request(name, SAMPLE_ARGS[name]))
        for field, info in command.args.model_fields.items():
            if info.is_required():
                with pytest.raises(SignerError) as caught:
                    decode_request(request(name, {**SAMPLE_ARGS[name], field: None}))
                assert caught.value.code is ErrorCode.BAD_ARGUMENTS
                assert caught.value.details["problems"][0]["field"] == field
                continue
            with_nil = decode_request(request(name, {**SAMPLE_ARGS[name], field: None}))
            assert with_nil.args == absent.args, f"{name}.{field}"
            assert with_nil.digest == absent.digest, f"{name}.{field}"


@pytest.mark.parametrize("missing", ["v", "id", "cmd", "args"])
def test_a_request_without_an_envelope_field_is_a_bad_envelope(missing):
    message = request()
    del message[missing]
    with pytest.raises(SignerError) as caught:
        decode_request(message)
    assert caught.value.code is ErrorCode.BAD_ENVELOPE
    if missing != "id":  # the answer still reaches the request that could be named
        assert caught.value.details["id"] == "r1"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"profile": "server", "csr": b"x" * (MAX_CSR + 1)}, "csr"),
        ({"profile": "p" * 65, "csr": b"x"}, "profile"),
        ({"profile": "server", "csr": b"x", "sans": [["dns", "a.example"]] * 1001}, "sans"),
        ({"profile": "server", "csr": b"x", "subject": [["CN", "x" * 1025]]}, "subject.0.1"),
    ],
)
def test_an_oversized_field_is_field_too_large_with_its_problems(args, field):
    with pytest.raises(SignerError) as caught:
        decode_request(request("sign_x509", args))
    assert caught.value.code is ErrorCode.FIELD_TOO_LARGE
    assert caught.value.details["problems"][0]["field"] == field


async def test_bad_arguments_always_carries_its_problems():
    """A refusal raised anywhere with bad_arguments or field_too_large reaches the line with
    `details.problems`, even when whoever raised it gave only a message."""

    async def refusing(args, ctx):
        raise SignerError(ErrorCode.BAD_ARGUMENTS, "offset 9 lies beyond the CRL")

    h = Harness({"fetch_crl": refusing, "health": echo})
    h.feed(encode_frame(request("fetch_crl", {"issuer": "class3"}, "a")))
    h.feed(encode_frame(request("health", {"x": 1}, "b")))
    h.feed(encode_frame({**request(rid="c"), "args": []}))
    sent = {m["id"]: m for m in await h.settle(3)}
    for rid in "abc":
        problems = sent[rid]["error"]["details"]["problems"]
        assert problems and all(set(p) == {"field", "problem"} for p in problems), sent[rid]
    assert sent["a"]["error"]["details"]["problems"] == [
        {"field": "args", "problem": "offset 9 lies beyond the CRL"}
    ]


async def test_error_answers_stay_small_whatever_the_request():
    """10,000 unknown envelope fields made an 89 KB answer, bigger than max_frame."""
    h = Harness({"health": echo})
    envelope = {**request(rid="wide"), **{f"field{i}": i for i in range(10_000)}}
    h.feed(encode_frame(envelope))
    h.feed(encode_frame(request("health", {f"a{i}": i for i in range(10_000)}, "args")))
    h.feed(encode_frame({**request(rid="cmd"), "cmd": "x" * 100_000}))
    sent = await h.settle(3)
    for answer in sent:
        assert len(encode_frame(answer)) <= 2048, answer["id"]
        assert len(answer["error"]["message"]) <= MAX_MESSAGE_CHARS
    problems = next(m for m in sent if m["id"] == "args")["error"]["details"]["problems"]
    assert len(problems) == MAX_PROBLEMS


def test_the_size_bound_is_on_the_payload_as_documented():
    """The bound was on the encoded frame: a payload over max_frame that COBS encodes compactly
    (zeros cost nothing extra) got through."""
    payload_bound = 1000
    message = b"\x00" * 997  # msgpack: bin16 header (3 bytes) + 997 zero bytes = 1000
    [fits] = FrameDecoder(payload_bound).feed(encode_frame(message))
    assert isinstance(fits, Frame)
    [over] = FrameDecoder(payload_bound).feed(encode_frame(b"\x00" * 1000))  # 1003 bytes
    assert not isinstance(over, Frame) and over.code is ErrorCode.FRAME_TOO_LARGE


# --- the handler --------------------------------------------------------------------------------


class Harness:
    """A ProtocolHandler whose answers are collected instead of written to a line."""

    def __init__(self, handlers, max_in_flight=4, report_interval=0.05):
        self.sent: list[dict] = []
        self.handler = ProtocolHandler(handlers, self._post, max_in_flight, report_interval)

    def _post(self, message) -> bool:
        # Through the real codec, so everything answered is encodable.
        [frame] = FrameDecoder().feed(encode_frame(message))
        assert isinstance(frame, Frame)
        self.sent.append(frame.message)
        return True

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
        expected = {"code": code, "message": str(failure)}
        if code == "bad_arguments":  # the one shape of a refused argument (docs/protocol.md)
            expected["details"] = {"problems": [{"field": "args", "problem": str(failure)}]}
        assert sent[f"h{number}"]["error"] == expected


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


async def test_every_broken_frame_is_reported():
    """The first broken frame of a quiet interval is answered at once (the client re-sends what
    it waits for); the ones after it in the interval once, with their count, at its end."""
    h = Harness({"health": echo})
    bad = bytearray(encode_frame(request()))
    bad[3] ^= 0x10
    h.feed(bytes(bad) + b"\x07\x07\x00" + b"\x01\x00" + encode_frame(request(rid="ok")))
    sent = await h.settle(3)
    errors = [m for m in sent if not m["ok"]]
    assert [m["id"] for m in errors] == [None, None]
    assert {m["error"]["code"] for m in errors} <= {"bad_crc", "bad_frame", "bad_msgpack"}
    assert "details" not in errors[0]["error"]  # the first: as it came
    assert errors[1]["error"]["details"]["count"] == 2  # the rest of the interval: counted
    assert any(m["id"] == "ok" and m["ok"] for m in sent)


async def test_a_flood_of_broken_frames_costs_one_answer_and_one_line_per_interval(caplog):
    """Issue 11, item 2: 50,000 broken frames made 50,000 answers and 50,000 WARNING lines."""
    h = Harness({"health": echo}, report_interval=0.2)
    with caplog.at_level("WARNING"):
        for _ in range(50):
            h.feed(b"\x01\x00" * 1000)
        h.feed(encode_frame({"v": 1, "cmd": "health", "args": {}}) * 1000)  # no id to answer
        sent = await h.settle(2)
        await asyncio.sleep(0.5)
    assert [m["id"] for m in h.sent] == [None, None]
    assert h.sent[1]["error"]["details"]["count"] == 50_999
    assert h.sent[1]["error"]["details"]["by_code"] == {"bad_frame": 49_999, "bad_envelope": 1000}
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]
    del sent


async def test_stopping_answers_new_and_unfinished_requests_shutting_down():
    """Issue 11, item 10: after SIGTERM no new request runs, and a request that does not end
    (or ignores its cancellation) neither holds the stop nor goes unanswered."""
    started, released = asyncio.Event(), asyncio.Event()

    async def stubborn(args, ctx):
        started.set()
        while not released.is_set():  # ignores every cancellation until the test ends
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()
        return {"late": True}

    h = Harness({"sign_openpgp": stubborn, "health": echo})
    h.feed(encode_frame(request("sign_openpgp", {"public_key": b"k", "uids": ["a"]}, "slow")))
    await started.wait()
    h.handler.begin_shutdown()
    h.feed(encode_frame(request(rid="late")))
    loop = asyncio.get_running_loop()
    began = loop.time()
    await h.handler.drain(0.2)
    assert loop.time() - began < 2.0  # 0.2 s of grace, 1 s for a cancellation to be heard
    sent = {m["id"]: m for m in h.sent}
    assert sent["late"]["error"]["code"] == "shutting_down"
    assert sent["slow"]["error"]["code"] == "shutting_down"
    released.set()
    await asyncio.sleep(0.05)
    assert [m["id"] for m in h.sent].count("slow") == 1  # its late result is never sent
