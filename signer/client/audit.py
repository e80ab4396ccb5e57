"""The audit log on the web side (docs/audit.md §6): an append-only file of the signer's records
and the last tree head verified, kept by the WebDB client.

Every head is checked (the audit key's signature, and the RFC 9162 consistency proof from the
head held before), and the file only ever grows to a verified head: the records it appends must
make that head's root. Anything else is a rewritten history: `AuditAlert`, which the WebDB
client raises to its operator and after which it stops following the log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from signer.errors import ClientFailure
from signer.pki.audit import (
    AuditFormatError,
    TreeHead,
    frame,
    head_from_wire,
    iter_frames,
    verify_tree_head,
)
from signer.pki.merkle import Frontier, ProofError, leaf_hash, verify_consistency

Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
LOG_FILE = "audit.log"
HEAD_FILE = "audit-head.json"


class AuditAlert(ClientFailure):
    """The signer's audit log does not extend what the web side holds (or the file here was
    changed): someone rewrote history. The operator must look."""

    kind = "audit_mismatch"


@dataclass
class SyncReport:
    records: int  # appended by this sync
    size: int  # records held on the web side
    head_size: int | None  # the head verified last
    signer_size: int  # records the signer holds (beyond the head: not signed yet)


class AuditMirror:
    """The web side's copy of the audit log in `directory` (audit.log, audit-head.json)."""

    def __init__(self, directory: Path, certificate: x509.Certificate, call: Call):
        self.directory = Path(directory)
        self.certificate = certificate
        self.call = call
        self.log_path = self.directory / LOG_FILE
        self.head_path = self.directory / HEAD_FILE
        self.frontier = Frontier()
        self.head: TreeHead | None = None
        self.failed: str | None = None  # once rewritten, always: until the operator acts
        self._open()

    def _open(self) -> None:
        """Read back what is held, and check it against the head held (a changed file here)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.head_path.exists():
            self.head = TreeHead.from_json(json.loads(self.head_path.read_text("utf-8")))
        if self.log_path.exists():
            data = self.log_path.read_bytes()
            try:
                for record in iter_frames(data):
                    assert isinstance(record, bytes)
                    self.frontier.append(leaf_hash(record))
            except AuditFormatError as exc:
                self._fail(f"the audit log file {self.log_path} is damaged: {exc}")
        if self.head is not None:
            if self.frontier.size > self.head.size:
                self._fail(f"{self.log_path} holds more records than its verified head")
            if self.frontier.size == self.head.size and self.frontier.root() != self.head.root:
                self._fail(f"{self.log_path} does not make its verified head: it was changed")

    def _fail(self, message: str) -> None:
        self.failed = message
        raise AuditAlert(message)

    async def sync(self, max_rounds: int = 1000) -> SyncReport:
        """Fetch records up to the signer's latest head, checking everything on the way."""
        if self.failed is not None:
            raise AuditAlert(self.failed)
        appended, signer_size = 0, 0
        for _ in range(max_rounds):
            args: dict[str, Any] = {"start": self.frontier.size}
            if self.head is not None:
                args["have_size"] = self.head.size
            answer = await self.call("fetch_audit", args)
            signer_size = int(answer["size"])
            if answer.get("head") is None:
                break
            head = self._accept(answer)
            records = answer["records"][: max(head.size - self.frontier.size, 0)]
            appended += self._append(records, head)
            self._keep(head)
            if self.frontier.size >= head.size or not records:
                break
        return SyncReport(
            appended,
            self.frontier.size,
            None if self.head is None else self.head.size,
            signer_size,
        )

    def _accept(self, answer: dict[str, Any]) -> TreeHead:
        """The answer's head, if the audit key signed it and it extends the head held."""
        try:
            head = head_from_wire(answer["head"])
            verify_tree_head(head, self.certificate)
        except (AuditFormatError, ProofError) as exc:
            self._fail(f"the signer's tree head is not the audit key's: {exc}")
        if int(answer.get("start", -1)) != self.frontier.size:
            raise ClientFailure("fetch_audit answered from another position")
        held = self.head
        if held is not None:
            if head.size < held.size:
                self._fail(
                    f"the signer's log has {head.size} records signed, after it signed "
                    f"{held.size}: its history was cut (a restore?)"
                )
            try:
                proof = [bytes(p) for p in answer.get("consistency") or []]
                verify_consistency(held.size, head.size, held.root, head.root, proof)
            except ProofError as exc:
                self._fail(f"the signer's log does not extend the one signed before: {exc}")
        return head

    def _append(self, records: list[bytes], head: TreeHead) -> int:
        """Append records to the file (each frame written whole, then fsynced), checking the
        root when the file reaches the head."""
        if not records:
            return 0
        trial = self.frontier.size
        data = bytearray()
        for record in records:
            self.frontier.append(leaf_hash(bytes(record)))
            data += frame(bytes(record))
            trial += 1
            if trial == head.size and self.frontier.root() != head.root:
                self._fail(f"the records served do not make the signed head of {head.size}")
        with self.log_path.open("ab") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        return len(records)

    def _keep(self, head: TreeHead) -> None:
        """The head becomes the one held (written aside, then renamed over)."""
        temp = self.head_path.with_suffix(".tmp")
        temp.write_text(json.dumps(head.to_json()), encoding="utf-8")
        os.replace(temp, self.head_path)
        self.head = head
