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

import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signer.errors import ErrorCode, SignerError
from signer.server.errors import wire_error

if TYPE_CHECKING:
    from replication.raft import RaftLog

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024


class ControlServer:
    """Serves the cluster commands of one RaftLog on a private UNIX socket."""

    def __init__(self, raft_log: RaftLog[Any], path: Path):
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
        except (ValueError, TypeError, KeyError) as exc:
            return _error(SignerError(ErrorCode.BAD_ARGUMENTS, f"bad request: {exc}"))
        except Exception as exc:
            error = wire_error(exc)  # replication's refusals and failures
            if error is None:
                log.exception("cluster command failed")
                error = SignerError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            return _error(error)
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
