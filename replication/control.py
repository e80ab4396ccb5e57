"""`signer cluster ...`: the operator's commands, sent to the running signer on its UNIX socket.

The socket lives on the signer host only (mode 0600, in the journal directory by default): not
on the serial line (the WebDB side must never change the cluster) and not on the network.
One request per connection, one JSON line each way:

    {"cmd": "status"}                                   -> {"ok": true, "result": {...}}
    {"cmd": "add", "address": "10.0.0.3:4321"}
    {"cmd": "remove", "address": "10.0.0.2:4321"}
    {"cmd": "force_standalone", "fenced": ["10.0.0.2:4321"]}

A refusal is {"ok": false, "error": {"code": ..., "message": ...}} with a protocol error code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from signer.errors import ErrorCode, SignerError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class ControlServer:
    """Serves the cluster commands of one RaftLog on a private UNIX socket."""

    def __init__(self, raft_log: Any, path: Path):
        self.log = raft_log
        self.path = Path(path)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a signer that was killed
        old = os.umask(0o177)  # never world-accessible, not even between bind and chmod
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.info("cluster control socket %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            answer = await self.handle(line)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            answer = _error(SignerError(ErrorCode.BAD_ARGUMENTS, f"bad request: {exc}"))
        try:
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            result = await self._dispatch(request)
        except SignerError as exc:
            return _error(exc)
        except (ValueError, TypeError, KeyError) as exc:
            return _error(SignerError(ErrorCode.BAD_ARGUMENTS, f"bad request: {exc}"))
        except Exception as exc:
            log.exception("cluster command failed")
            return _error(SignerError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
        return {"ok": True, "result": result}

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("cmd")
        log.info("cluster command: %s", command)
        if command == "status":
            return dict(await self.log.status())
        if command == "add":
            return dict(await self.log.add_member(str(request["address"])))
        if command == "remove":
            return dict(await self.log.remove_member(str(request["address"])))
        if command == "force_standalone":
            fenced = request["fenced"]
            if not isinstance(fenced, list) or not all(isinstance(x, str) for x in fenced):
                raise ValueError("fenced must be a list of addresses")
            return dict(await self.log.force_standalone(fenced))
        raise SignerError(ErrorCode.UNKNOWN_COMMAND, f"unknown cluster command {command!r}")


def _error(exc: SignerError) -> dict[str, Any]:
    return {"ok": False, "error": {"code": exc.code.value, "message": exc.message}}


def call(path: Path, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to a signer's control socket (blocking); the decoded answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    return answer


# --- the command line: `signer cluster ...` ----------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signer cluster",
        description="inspect and change the replicated cluster of the signer running on this host",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the signer's YAML file (finds the socket)")
    where.add_argument("--socket", type=Path, help="the signer's control socket")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="role, leader, peers, lag, quorum, snapshot, clocks")
    add = sub.add_parser("add", help="add a new (empty) signer as a voter; then start it")
    add.add_argument("address", help="the new signer's IP:port on the replication link")
    remove = sub.add_parser("remove", help="remove a voter while the cluster has quorum")
    remove.add_argument("address", help="the voter's IP:port")
    force = sub.add_parser(
        "force-standalone",
        help="continue alone after the other signer was fenced (powered off, unplugged)",
    )
    sub.add_parser(
        "recover",
        help="signer stopped, every signer lost: restart replication from this repository "
        "(restored from a backup) with this signer alone",
    )
    force.add_argument(
        "--fenced",
        action="append",
        required=True,
        metavar="ADDRESS",
        help="each other voter, confirming it is fenced and can never run again as is",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "recover":
        return _recover(args)
    try:
        path = args.socket or _socket_from_config(args.config)
    except Exception as exc:  # ConfigError and friends
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, Any] = {"cmd": args.command.replace("-", "_")}
    if args.command in ("add", "remove"):
        request["address"] = args.address
    if args.command == "force-standalone":
        request["fenced"] = args.fenced
    try:
        answer = call(path, request)
    except (OSError, ValueError) as exc:
        print(f"error: cannot reach the signer on {path}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif answer.get("ok"):
        _show(answer["result"], "")
    else:
        error = answer.get("error", {})
        print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
    return EXIT_OK if answer.get("ok") else EXIT_REFUSED


def _recover(args: argparse.Namespace) -> int:
    """Offline: the signer must not run (its socket must not answer)."""
    from replication.raft import RaftLog
    from signer.config import ConfigError, SignerConfig, load
    from storage.repository import Repository

    try:
        if args.config is None:
            raise ConfigError("recover needs --config (the signer's YAML file)")
        config = load(args.config, SignerConfig)
        if config.replication is None or config.repository is None:
            raise ConfigError(f"{args.config}: needs the replication and repository sections")
        try:
            call(config.replication.socket_path, {"cmd": "status"}, timeout=2)
        except (OSError, ValueError):
            pass
        else:
            raise ConfigError("the signer is running: stop it before recovering")
        repository = Repository(config.repository.path, config.repository.map_size_gb << 30)
        try:
            generation = RaftLog(config.replication, repository).recover_standalone()
        finally:
            repository.close()
    except (ConfigError, SignerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"recovered: this signer alone, generation {generation}; start it, then add the others")
    return EXIT_OK


def _socket_from_config(path: Path) -> Path:
    from signer.config import ConfigError, SignerConfig, load

    config = load(path, SignerConfig)
    if config.replication is None:
        raise ConfigError(f"{path}: no replication section: this signer is not in a cluster")
    return config.replication.socket_path


def _show(value: Any, indent: str) -> None:
    for key, item in value.items():
        if isinstance(item, dict):
            print(f"{indent}{key}:")
            _show(item, indent + "  ")
        else:
            print(f"{indent}{key}: {item}")
