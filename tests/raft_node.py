"""A signer's replication as a process of its own, for the kill -9 tests: RaftLog + Repository,
driven by JSON lines on stdin, answering JSON lines on stdout.

    python tests/raft_node.py SETTINGS_JSON REPOSITORY_DIR
    stdin:  {"id": 1, "command": {"op": ..., fields}}   (bytes as {"hex": ...}; big ints are
            plain JSON ints): committed as the signer does, encoded by storage's codec
    stdout: {"id": 1, "ok": true, "result": {"status": ..., fields}}
            | {"id": 1, "ok": false, "code": "no_quorum"}   (the wire code of the failure)
            {"ready": true} once started
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replication.raft import RaftLog
from replication.settings import ReplicationSettings
from signer.server.errors import wire_error
from storage import COMMAND_TYPES, Command, Duplicate, Repository, Result
from storage import encode as encode_entry


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"hex"}:
            return bytes.fromhex(value["hex"])
        return {key: decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode(item) for item in value]
    return value


def encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encode(item) for item in value]
    return value


def command_of(fields: dict[str, Any]) -> Command:
    values = decode(fields)
    cls = COMMAND_TYPES[values.pop("op")]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def result_map(result: Result) -> dict[str, Any]:
    """A result as a map, `status` first; a duplicate is its first result with that status."""
    if isinstance(result, Duplicate):
        return {**dataclasses.asdict(result.original), "status": result.status}
    return {"status": result.status, **dataclasses.asdict(result)}


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def handle(raft: RaftLog[Result], line: bytes) -> None:
    request = json.loads(line)
    if "status" in request:
        view = raft.view
        result = {
            "role": view.role,
            "term": view.term,
            "applied_index": view.applied_index,
            "repository_index": raft.machine.last_applied_index() if not raft._restoring else -1,
            "max_loop_ms": raft.max_loop * 1000,
            "journal_failure": raft.journal_failure(),
            "apply_error": raft._apply_error,
        }
        if request.get("digest") and not raft._restoring:
            result["digest"] = raft.machine.content_digest().hex()
        emit({"id": request["id"], "ok": True, "result": result})
        return
    if "transfer" in request:
        await raft.transfer_leadership()
        emit({"id": request["id"], "ok": True, "result": {}})
        return
    try:
        result = await raft.commit(encode_entry(command_of(request["command"])))
        emit({"id": request["id"], "ok": True, "result": encode(result_map(result))})
    except Exception as exc:
        error = wire_error(exc)
        if error is None:
            raise
        emit({"id": request["id"], "ok": False, "code": error.code.value, "message": error.message})


async def main(settings_json: str, repository_dir: str) -> None:
    settings = ReplicationSettings.model_validate_json(settings_json)
    # As bench/replication.py's own signer: its 1M catch-up needs more than 1 GiB of map.
    repository = Repository(Path(repository_dir), 8 << 30, metasync=False)
    raft: RaftLog[Result] = RaftLog(
        settings, repository, secret=b"test replication secret 0123456789"
    ).start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit({"ready": True})
    tasks: set[asyncio.Task[None]] = set()

    async def read() -> None:
        while line := await reader.readline():
            task = asyncio.create_task(handle(raft, line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        stop.set()

    reading = asyncio.create_task(read())
    await stop.wait()
    reading.cancel()
    raft.close()
    repository.close()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    asyncio.run(main(sys.argv[1], sys.argv[2]))
