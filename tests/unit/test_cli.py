"""The `signer` command line itself: one parser tree, exit codes from error types, one error form.

Fast: verbs are run up to the point where they fail (a missing file, a socket that refuses),
in-process where no logging is set up, otherwise as `python -m signer`.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signer.cli import VERBS, build_parser, main
from signer.cli.common import CommandFailed, UsageError, exit_code
from signer.errors import (
    ClientFailure,
    ConfigError,
    ErrorCode,
    HsmError,
    LinkDown,
    ProtocolError,
    RequestTimeout,
    SignerError,
    Unreachable,
)

ROOT = Path(__file__).resolve().parents[2]

# every verb (and sub-command) with the options it offers today
OPTIONS: dict[tuple[str, ...], list[str]] = {
    ("serve",): ["--config", "--log-format"],
    ("audit",): ["verify"],
    ("audit", "verify"): ["--log", "--head", "--cert", "--json", "--quiet"],
    ("client",): ["--config", "--port", "--baud", "--timeout", "--json", "--request-id",
                  "--verbose", "health", "sign-x509", "revoke-x509", "list-issuers",
                  "list-profiles", "sign-openpgp", "fetch-crl", "request-status"],
    ("client", "health"): [],
    ("client", "sign-x509"): ["--csr", "--profile", "--subject", "--san", "--days", "--digest",
                              "--challenge", "--out"],
    ("client", "revoke-x509"): ["--issuer", "--serial", "--reason"],
    ("client", "list-issuers"): [],
    ("client", "list-profiles"): [],
    ("client", "sign-openpgp"): ["--key", "--uid", "--out"],
    ("client", "fetch-crl"): ["--issuer", "--out", "--ca-cert", "--max-bytes"],
    ("client", "request-status"): ["REQUEST_ID"],
    ("line-emulator",): ["--dir", "--baud", "--seed", "--corrupt", "--drop", "--duplicate",
                         "--delay"],
    ("ceremony",): ["--config", "--json"],
    ("ceremony-issue",): ["--config", "--socket", "REQUEST.yaml", "--yes", "--dry-run", "--json"],
    ("demo",): ["--dir", "--baud", "--json"],
    ("openpgp-export",): ["--config", "--out", "--armor"],
    ("webdb-client",): ["--config", "--once", "--log-format"],
    ("cluster",): ["--config", "--socket", "--json", "status", "add", "remove",
                   "force-standalone", "recover"],
    ("cluster", "add"): ["address"],
    ("cluster", "remove"): ["address"],
    ("cluster", "force-standalone"): ["--fenced"],
    ("import",): ["--config", "--history", "--webdb-rows", "--rootcert", "--dry-run", "--no-crl",
                  "--json"],
    ("export",): ["--config", "--out", "--issuer", "--json"],
    ("replication-secret",): ["--out"],
    ("backup",): ["--config", "--out", "--json", "verify"],
    ("backup", "verify"): ["FILE", "--json"],
    ("check",): ["--config", "--metrics"],
    ("restore",): ["FILE", "--config", "--replace", "--crl-number", "--json"],
}  # fmt: skip


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signer", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def run_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the parser tree -------------------------------------------------------------------------


def test_every_verb_is_in_the_one_tree(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(VERBS) == {command[0] for command in OPTIONS}
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    assert all(verb in listed for verb in VERBS)


@pytest.mark.parametrize("command", sorted(OPTIONS), ids=" ".join)
def test_help_of_every_verb_lists_its_options(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: signer {' '.join(command)}")
    missing = [option for option in OPTIONS[command] if option not in text]
    assert not missing, f"signer {' '.join(command)} --help lacks {missing}"


def test_no_verb_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_in_process(capsys)
    assert code == 2 and "commands:" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["launch"],  # no such verb
        ["serve"],  # --config is required
        ["client", "--port", "/dev/null"],  # no signer command
        ["client", "--port", "/dev/null", "--config", "c.yaml", "health"],  # one or the other
        ["client", "--port", "/dev/null", "sign-x509", "--profile", "server"],  # no --csr
        ["cluster", "--socket", "s", "force-standalone"],  # --fenced is required
        ["line-emulator", "--dir", "d", "--baud", "fast"],
    ],
    ids=" ".join,
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert "usage: signer" in capsys.readouterr().err


def test_arguments_argparse_cannot_check_are_usage_errors_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "req.csr").write_bytes(b"-")
    client = ["client", "--port", str(tmp_path / "none"), "--timeout", "0.1"]
    code, _, err = run_in_process(
        capsys, *client, "sign-x509", "--csr", str(tmp_path / "req.csr"), "--profile", "server",
        "--san", "www.example.org",
    )  # fmt: skip
    assert code == 2 and "--san 'www.example.org': expected NAME:VALUE" in err
    code, out, err = run_in_process(
        capsys, *client, "--json", "sign-openpgp", "--key", str(tmp_path / "no.asc"),
        "--uid", "a@example.org",
    )  # fmt: skip
    assert code == 2 and f"{tmp_path / 'no.asc'}: cannot read" in err
    assert json.loads(out)["error"]["code"] == "usage_error"


# --- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "verb",
    [
        ["serve"],
        ["webdb-client"],
        ["webdb-client", "--once"],
        ["openpgp-export"],
        ["ceremony"],
        ["cluster", "status"],
        ["cluster", "recover"],
    ],
    ids=" ".join,
)
def test_a_missing_config_file_exits_2_naming_it(
    verb: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.yaml"
    argv = [verb[0], "--config", str(missing), *verb[1:]]
    code, _, err = run_in_process(capsys, *argv)
    assert code == 2, err
    assert f"{missing}: cannot read" in err and "configuration_error" in err


@pytest.mark.parametrize("verb", ["serve", "openpgp-export", "webdb-client"])
def test_a_wrong_config_file_exits_2_naming_file_and_key(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "wrong.yaml"
    config.write_text("link: {device: /dev/null}\ncolour: blue\n")
    code, _, err = run_in_process(capsys, verb, "--config", str(config))
    assert code == 2
    assert f"{config}: colour: unknown key" in err


def test_config_errors_in_json_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("link: {device: /dev/null, stopbits: 3}\n")
    code, out, err = run_in_process(capsys, "client", "--config", str(config), "--json", "health")
    assert code == 2
    error = json.loads(out)
    assert error["ok"] is False and error["error"]["code"] == "configuration_error"
    assert f"{config}: link.stopbits: " in error["error"]["message"]
    assert f"{config}: link.stopbits: " in err  # people read stderr, scripts read stdout


def test_cluster_recover_needs_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_in_process(capsys, "cluster", "--socket", "s", "recover")
    assert code == 2 and "recover needs --config" in err


def test_cluster_without_replication_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "signer.yaml"
    config.write_text("link: {device: /dev/null}\n")
    code, _, err = run_in_process(capsys, "cluster", "--config", str(config), "status")
    assert code == 2 and "no replication section" in err


# --- the signer out of reach, or refusing ----------------------------------------------------


def test_client_on_a_port_that_does_not_exist_exits_3(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyNONE")
    done = run("client", "--port", port, "--timeout", "0.5", "health")
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("error: link_down: ") and done.stdout == ""  # no log lines
    done = run("client", "--port", port, "--timeout", "0.5", "--verbose", "health")
    assert done.returncode == 3
    assert re.search(r"^\S+ \S+ WARNING signer\.link\.serial_link: .*ttyNONE", done.stderr, re.M)
    done = run("client", "--port", port, "--timeout", "0.5", "--json", "list-issuers")
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout) == {
        "ok": False,
        "error": {"code": "link_down", "message": "the serial line to the signer is down"},
    }


def test_cluster_socket_that_does_not_answer_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "control.sock"
    code, out, err = run_in_process(capsys, "cluster", "--socket", str(path), "--json", "status")
    assert code == 3 and f"cannot reach the signer on {path}" in err
    assert json.loads(out)["error"]["code"] == "unreachable"


@pytest.fixture
def control_socket(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """A control socket answering like a signer: `status` is fine, anything else refused."""
    path, seen = tmp_path / "control.sock", []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def answer() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                request = json.loads(connection.makefile("rb").readline())
                seen.append(request)
                if request["cmd"] == "status":
                    reply = {"ok": True, "result": {"role": "leader", "peers": {"b": {"lag": 0}}}}
                else:
                    reply = {"ok": False, "error": {"code": "no_quorum", "message": "alone"}}
                connection.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield path, seen
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        server.close()
        thread.join(5)
        assert not thread.is_alive()


def test_cluster_answers_and_refusals(
    control_socket: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, seen = control_socket
    code, out, _ = run_in_process(capsys, "cluster", "--socket", str(path), "status")
    assert code == 0 and out == "role: leader\npeers:\n  b:\n    lag: 0\n"
    code, out, _ = run_in_process(capsys, "cluster", "--socket", str(path), "--json", "status")
    assert code == 0 and json.loads(out)["result"]["role"] == "leader"
    argv = ["cluster", "--socket", str(path), "force-standalone", "--fenced", "10.0.0.2:1"]
    code, out, err = run_in_process(capsys, *argv)
    assert code == 1 and out == "" and err == "error: no_quorum: alone\n"
    code, out, _ = run_in_process(capsys, *argv[:3], "--json", *argv[3:])
    assert code == 1
    assert json.loads(out) == {"ok": False, "error": {"code": "no_quorum", "message": "alone"}}
    assert seen[2] == {"cmd": "force_standalone", "fenced": ["10.0.0.2:1"]}


# --- exit codes from types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SignerError(ErrorCode.BAD_CSR, "x"), 1),
        (ProtocolError(ErrorCode.BAD_ARGUMENTS, "x"), 1),
        (HsmError(ErrorCode.HSM_UNAVAILABLE, "x"), 1),
        (ClientFailure("a bad WebDB row"), 1),
        (CommandFailed("ceremony_failed", "x"), 1),
        (ConfigError("x"), 2),
        (UsageError("x"), 2),
        (Unreachable("x"), 3),
        (LinkDown("x"), 3),
        (RequestTimeout("x"), 3),
        (RuntimeError("not answering"), None),  # a bug, whatever its text says
        (KeyError("timeout"), None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_exit_codes_come_from_error_types(error: Exception, code: int | None) -> None:
    assert exit_code(error) == code


def test_a_bug_is_not_turned_into_an_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_args: object) -> int:
        raise RuntimeError("the signer is not answering")

    parser = build_parser()
    monkeypatch.setattr("signer.cli.build_parser", lambda: parser)
    parser.set_defaults(run=broken)
    with pytest.raises(RuntimeError):
        main([])


def test_webdb_client_once_with_a_signer_out_of_reach_exits_3(tmp_path: Path) -> None:
    import asyncio

    import yaml

    from signer.client.webdb import WebdbClient, WebdbClientConfig
    from signer.config import load
    from signer.tools.webdb_fixture import create_schema

    (tmp_path / "www").mkdir()
    config = tmp_path / "webdb-client.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"driver": "sqlite", "path": "webdb.sqlite"},
        "base_dir": "www",
        "lines": [{"device": str(tmp_path / "ttyNONE"), "reopen_interval": 0.1}],
        "timeout": 1, "attempts": 1, "crl": {"outputs": {}},
    }))  # fmt: skip

    async def schema() -> None:
        async with WebdbClient(load(config, WebdbClientConfig)) as client:
            assert client.db is not None
            await create_schema(client.db)

    asyncio.run(schema())
    done = run("webdb-client", "--once", "--config", str(config))
    assert done.returncode == 3, done.stderr
    assert "error: unreachable: no health report from the signer on line(s)" in done.stderr


# --- the WebDB host --------------------------------------------------------------------------


def test_client_verbs_load_nothing_of_the_signer_host() -> None:
    """Lazy verbs: the help of the WebDB host's verbs imports no signer-host module."""
    check = (
        "import sys\n"
        "from signer.cli import main\n"
        "for verb in (['client', '--help'], ['webdb-client', '--help'], ['--help']):\n"
        "    try:\n"
        "        main(verb)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (verb, exc.code)\n"
        "roots = {'signer.server', 'storage', 'replication', 'lmdb', 'pysyncobj', 'pkcs11', 'pgpy',"
        " 'signer.tools'}\n"
        "loaded = sorted(m for m in sys.modules if any(m == r or m.startswith(r + '.')"
        " for r in roots))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`--log-format json` for log shippers: time, level, logger, message, traceback."""
    import logging

    from signer.cli.common import LOG_FORMATTERS

    formatter = LOG_FORMATTERS["json"]()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("signer.x").makeRecord(
            "signer.x", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info()
        )
    entry = json.loads(formatter.format(record))
    assert entry["level"] == "ERROR" and entry["logger"] == "signer.x"
    assert entry["message"] == "failed: a\nb" and "ValueError: boom" in entry["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])
    assert "\n" not in formatter.format(record)
