"""A signer's replication as a process of its own, for the kill -9 tests: RaftLog + Repository,
driven by JSON lines on stdin, answering JSON lines on stdout.

    python tests/raft_node.py SETTINGS_JSON REPOSITORY_DIR
    stdin:  {"id": 1, "command": {...}}   (bytes as {"hex": ...}; big ints are plain JSON ints)
    stdout: {"id": 1, "ok": true, "result": {...}} | {"id": 1, "ok": false, "code": "no_quorum"}
            {"ready": true} once started
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replication.raft import RaftLog
from replication.settings import ReplicationSettings
from signer.errors import SignerError
from storage.repository import Repository


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


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def handle(raft: RaftLog, line: bytes) -> None:
    request = json.loads(line)
    if "status" in request:
        view = raft.view
        result = {
            "role": view.role,
            "term": view.term,
            "applied_index": view.applied_index,
            "repository_index": raft.machine.last_applied_index() if not raft._restoring else -1,
            "max_loop_ms": raft.max_loop * 1000,
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
        result = await raft.commit(decode(request["command"]))
        emit({"id": request["id"], "ok": True, "result": encode(result)})
    except SignerError as exc:
        emit({"id": request["id"], "ok": False, "code": exc.code.value, "message": exc.message})


async def main(settings_json: str, repository_dir: str) -> None:
    settings = ReplicationSettings.model_validate_json(settings_json)
    repository = Repository(Path(repository_dir), 1 << 30)
    raft = RaftLog(settings, repository, secret=b"test replication secret 0123456789").start()
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
