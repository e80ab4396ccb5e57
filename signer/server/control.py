"""The operator's UNIX socket: `signer cluster`, `import` and `ceremony-issue` talk to the signer.

The socket lives on the signer host only (mode 0600; in the journal directory with replication,
else in the repository directory): not on the serial line (the WebDB side must never change the
cluster or import history) and not on the network. One request per connection, one JSON line
each way:

    {"cmd": "status"}                                   -> {"ok": true, "result": {...}}
    {"cmd": "add", "address": "10.0.0.3:4321"}
    {"cmd": "remove", "address": "10.0.0.2:4321"}
    {"cmd": "force_standalone", "fenced": ["10.0.0.2:4321"]}
    {"cmd": "import_status"} / {"cmd": "import_commit", ...} / {"cmd": "publish_crl", ...}
    {"cmd": "issue_preview", "request": {...}} / {"cmd": "issue", ...}  (signer/server/operator.py)

except for a stream (`import_batches`, signer/server/importer.py): after its first line the
connection carries one JSON line per item each way until the client closes it.

A refusal is {"ok": false, "error": {"code": ..., "message": ...}} with a protocol error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from signer.errors import ErrorCode, SignerError
from signer.server.errors import wire_error
from storage import Repository, crl_number_floors, encode

if TYPE_CHECKING:
    from replication.raft import RaftLog

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
FIRST_LINE_SECONDS = 10

Command = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Stream = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ControlServer:
    """Serves the operator's commands on a private UNIX socket: the cluster commands of a
    RaftLog (when replicated) and whatever other components add (`add`)."""

    def __init__(self, raft_log: RaftLog[Any] | None, path: Path):
        self.log = raft_log
        self.path = Path(path)
        self._server: asyncio.AbstractServer | None = None
        self.commands: dict[str, Command] = {}
        self.streams: dict[str, Stream] = {}
        self.on_action: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None  # audit
        if raft_log is not None:
            self.commands.update(
                status=self._status,
                add=self._add,
                remove=self._remove,
                force_standalone=self._force_standalone,
            )

    def add(self, commands: dict[str, Command], streams: dict[str, Stream] | None = None) -> None:
        self.commands.update(commands)
        self.streams.update(streams or {})

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
        log.info("control socket %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), FIRST_LINE_SECONDS)
            except (TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
                answer = _error(SignerError(ErrorCode.BAD_ARGUMENTS, f"bad request: {exc}"))
            else:
                stream = self._stream_of(line)
                if stream is not None:
                    await stream(reader, writer)
                    return
                answer = await self.handle(line)
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass  # the operator's command went away: nothing to answer
        finally:
            writer.close()

    def _stream_of(self, line: bytes) -> Stream | None:
        try:
            request = json.loads(line)
        except ValueError:
            return None
        command = request.get("cmd") if isinstance(request, dict) else None
        return self.streams.get(command) if isinstance(command, str) else None

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
                log.exception("control command failed")
                error = SignerError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            return error_answer(error)
        return {"ok": True, "result": result}

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("cmd")
        log.info("control command: %s", command)
        handler = self.commands.get(command) if isinstance(command, str) else None
        if handler is None:
            raise SignerError(ErrorCode.UNKNOWN_COMMAND, f"unknown control command {command!r}")
        result = await handler(request)
        if self.on_action is not None and not str(command).endswith("status"):
            await self._audited(str(command), request)
        return result

    async def _audited(self, command: str, request: dict[str, Any]) -> None:
        """An operator's action goes to the audit log: its short scalar arguments only."""
        assert self.on_action is not None
        detail: dict[str, Any] = {}
        for key, value in list(request.items())[:12]:
            if key != "cmd" and isinstance(value, int | str) and len(str(value)) <= 128:
                detail[key[:32]] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                detail[key[:32]] = ",".join(value)[:512]
        try:
            await self.on_action(command, detail)
        except Exception as exc:
            log.warning("control command %s not audited: %s", command, exc)

    # --- the cluster (replicated signers only) -------------------------------------------

    def _raft(self) -> RaftLog[Any]:
        assert self.log is not None
        return self.log

    async def _status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._raft().status())

    async def _add(self, request: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._raft().add_member(str(request["address"])))

    async def _remove(self, request: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._raft().remove_member(str(request["address"])))

    async def _force_standalone(self, request: dict[str, Any]) -> dict[str, Any]:
        fenced = request["fenced"]
        if not isinstance(fenced, list) or not all(isinstance(x, str) for x in fenced):
            raise ValueError("fenced must be a list of addresses")
        raft = self._raft()
        answer = dict(await raft.force_standalone(fenced))
        if len(fenced) > 1:  # of three or more, the fenced ones may have committed without us
            answer["crl_floors"] = await self._restore_rule(raft)
        return answer

    @staticmethod
    async def _restore_rule(raft: RaftLog[Any]) -> dict[str, int]:
        """Raise each issuer's next CRL number past what may have been published without this
        signer (storage/restore.py), through the log."""
        repository = cast(Repository, raft.machine)
        floors = await asyncio.to_thread(crl_number_floors, repository, int(time.time()))
        for command in floors:
            await raft.commit(encode(command))
        return {command.issuer.hex(): command.at_least for command in floors}


def error_answer(exc: SignerError) -> dict[str, Any]:
    """A refusal as the socket answers it."""
    return {"ok": False, "error": {"code": exc.code.value, "message": exc.message}}


_error = error_answer


def call(path: Path, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to a signer's control socket (blocking); the decoded answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = bytearray()  # an answer may carry a CRL of tens of megabytes
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    return answer
