"""History imports on the signer host: the control-socket side of `signer import`.

`signer import` (signer/tools/history.py) reads and checks the earlier CA's state, decides every
record (CRL entries, which revocations the imported CRL lists) and sends finished log entries:
`begin_import` and `finish_import` one by one (`import_commit`), the batches on one connection
(`import_batches`), which this service commits through the signer's log, standalone or
replicated, with up to WINDOW batches in flight, answering each in order. Only import commands
of configured issuers pass; the repository validates them (storage/commands.py) and keeps the
import's progress, so a client that was cut off asks `import_status` and resumes. docs/migration.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgpack

from signer.errors import ErrorCode, SignerError
from signer.server.control import Command, Stream, error_answer
from signer.server.errors import rejection_error, wire_error
from storage import BeginImport, FinishImport, ImportX509, Rejected

if TYPE_CHECKING:
    from replication.log import Log
    from signer.server.ca import Issuer
    from signer.server.crl import CrlService
    from storage import Repository, Result

log = logging.getLogger(__name__)

WINDOW = 32  # batches committed at once: keeps the log busy without queueing much
STREAM_IDLE_SECONDS = 300
PROGRESS_SECONDS = 10


class ImportService:
    def __init__(
        self,
        issuers: Iterable[Issuer],
        repository: Repository,
        commit_log: Log[Result],
        crl: CrlService | None,
    ):
        self.issuers = {issuer.key_id: issuer for issuer in issuers}
        self.repository = repository
        self.log = commit_log
        self.crl = crl
        self._logged = 0.0

    def control(self) -> tuple[dict[str, Command], dict[str, Stream]]:
        commands: dict[str, Command] = {
            "import_status": self.status,
            "import_commit": self.commit,
        }
        if self.crl is not None:
            commands["publish_crl"] = self.publish_crl
        return commands, {"import_batches": self.stream}

    # --- one request each -----------------------------------------------------------------

    async def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Per issuer: counters, its import (None if none) and its last CRL number."""
        counts = await asyncio.to_thread(self.repository.counts)
        issuers = {}
        for key_id, issuer in self.issuers.items():
            state = self.repository.import_state(key_id)
            last = self.repository.last_crl_history(key_id)
            issuers[issuer.name] = {
                "key_id": key_id.hex(),
                **counts["issuers"].get(key_id, {"certificates": 0, "revoked": 0}),
                "import": None if state is None else _plain({**state.__dict__}),
                "crl_number": None if last is None else last["crl_number"],
                "crl_imported": bool(last and last.get("imported")),
            }
        return {"issuers": issuers, "applied_index": self.repository.last_applied_index()}

    async def commit(self, request: dict[str, Any]) -> dict[str, Any]:
        """`begin_import` or `finish_import`, committed; its result."""
        entry = _entry(request)
        self._check(entry, (BeginImport.op, FinishImport.op))
        return await self._committed(entry)

    async def publish_crl(self, request: dict[str, Any]) -> dict[str, Any]:
        """Publish the issuer's next CRL now (the first after an import); `der` (bool) adds it."""
        assert self.crl is not None
        name = str(request["issuer"])
        started = time.perf_counter()
        crl = await self.crl.publish(name)
        answer: dict[str, Any] = {
            "issuer": name,
            "crl_number": crl.number,
            "entries": crl.record["entries"],
            "size": len(crl.der),
            "sha256": crl.sha256.hex(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if request.get("der"):
            answer["der"] = base64.b64encode(crl.der).decode()
        return answer

    # --- the batches ----------------------------------------------------------------------

    async def stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One JSON line per batch in (`{"entry": base64}`), one answer per batch out, in the
        same order. After a refused batch nothing more is read; batches already in flight are
        still answered. A client that goes away leaves its batches to complete."""
        window = asyncio.Semaphore(WINDOW)
        pending: asyncio.Queue[asyncio.Task[dict[str, Any]] | None] = asyncio.Queue()
        failed = asyncio.Event()
        answers = asyncio.create_task(self._answer(pending, writer, window, failed))
        try:
            while not failed.is_set():
                line = await asyncio.wait_for(reader.readline(), STREAM_IDLE_SECONDS)
                if not line:
                    break
                await window.acquire()
                pending.put_nowait(asyncio.create_task(self._batch(line)))
        except (TimeoutError, ValueError, ConnectionError, asyncio.LimitOverrunError) as exc:
            log.warning("import stream ended: %s", exc)
        finally:
            pending.put_nowait(None)
            await answers
            writer.close()

    async def _answer(
        self,
        pending: asyncio.Queue[asyncio.Task[dict[str, Any]] | None],
        writer: asyncio.StreamWriter,
        window: asyncio.Semaphore,
        failed: asyncio.Event,
    ) -> None:
        connected = True
        while (task := await pending.get()) is not None:
            answer = await task
            window.release()
            if not answer["ok"]:
                failed.set()
            if connected:
                try:
                    writer.write(json.dumps(answer).encode() + b"\n")
                    await writer.drain()
                except ConnectionError:
                    connected = False  # the client went away; its batches still complete

    async def _batch(self, line: bytes) -> dict[str, Any]:
        try:
            entry = _entry(json.loads(line))
            issuer, batch = self._check(entry, (ImportX509.op,))
            answer = await self._committed(entry)
        except SignerError as exc:
            return error_answer(exc)
        except (ValueError, TypeError, KeyError) as exc:
            return error_answer(SignerError(ErrorCode.BAD_ARGUMENTS, f"bad batch: {exc}"))
        self._progress(issuer, batch, answer)
        return answer

    def _progress(self, issuer: bytes, batch: int, answer: dict[str, Any]) -> None:
        now = time.monotonic()
        result = answer.get("result") or {}
        if now - self._logged >= PROGRESS_SECONDS or result.get("applied_batches") == result.get(
            "batches"
        ):
            self._logged = now
            log.info(
                "import into %s: batch %s of %s, %s of %s certificates",
                self.issuers[issuer].name,
                batch,
                result.get("batches"),
                result.get("applied_certificates"),
                result.get("certificates"),
            )

    # --- helpers --------------------------------------------------------------------------

    def _check(self, entry: bytes, ops: tuple[str, ...]) -> tuple[bytes, int]:
        """Only import commands of configured issuers go through this socket (the repository
        validates the rest when it applies them): (issuer, batch number or 0)."""
        try:
            fields = msgpack.unpackb(entry, raw=False)
        except Exception:
            raise SignerError(ErrorCode.BAD_ARGUMENTS, "the entry is not msgpack") from None
        if not isinstance(fields, dict) or fields.get("op") not in ops:
            raise SignerError(ErrorCode.BAD_ARGUMENTS, f"only {', '.join(ops)} here")
        issuer = fields.get("issuer")
        if not isinstance(issuer, bytes) or issuer not in self.issuers:
            raise SignerError(ErrorCode.UNKNOWN_ISSUER, "the entry names no configured issuer")
        batch = fields.get("batch", 0)
        return issuer, batch if isinstance(batch, int) else 0

    async def _committed(self, entry: bytes) -> dict[str, Any]:
        try:
            result = await self.log.commit(entry)
        except Exception as exc:
            error = wire_error(exc)
            if error is None:
                raise
            raise error from exc
        if isinstance(result, Rejected):
            return error_answer(rejection_error(result))
        return {"ok": True, "result": {"status": result.status, **_plain(result.__dict__)}}


def _entry(request: Any) -> bytes:
    if not isinstance(request, dict) or not isinstance(request.get("entry"), str):
        raise SignerError(ErrorCode.BAD_ARGUMENTS, "a request carries `entry` (base64)")
    try:
        return base64.b64decode(request["entry"], validate=True)
    except (binascii.Error, ValueError):
        raise SignerError(ErrorCode.BAD_ARGUMENTS, "`entry` is not base64") from None


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready: bytes as hex."""
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in fields.items()}
