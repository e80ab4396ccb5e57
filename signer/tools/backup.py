"""`signer backup` and `signer restore` on the signer host: the repository's copy (storage/
backup.py) with what the configuration adds (issuer names, the cluster record), and the safe
way back from a copy.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from replication.cluster import CLUSTER_META, ClusterRecord
from replication.raft import RaftLog
from signer import __version__
from signer.errors import ConfigError
from signer.server.config import SignerConfig
from signer.tools.history import issuer_cas
from signer.tools.progress import Progress
from storage import Repository, apply_restore_rule, crl_number_floors, encode
from storage.backup import Manifest, extract, make_backup, verify_backup
from storage.layout import DATA_FILE
from storage.results import CrlNumberRaised


def repository_path(config: SignerConfig, source: Path) -> Path:
    if config.repository is None:
        raise ConfigError(f"{source}: no repository section: nothing to back up")
    return config.repository.path


def backup(config: SignerConfig, source: Path, out: Path, progress_out: TextIO | None) -> Manifest:
    """A consistent copy of the running (or stopped) signer's repository into `out`."""
    path = repository_path(config, source)
    names = {}  # a third voter has no issuers: its manifest shows key ids
    if config.issuers:
        names = {ca.key_id.hex(): name for name, ca in issuer_cas(config).items()}
    extra: dict[str, Any] = {
        "software": __version__,
        "host": socket.gethostname(),
        "repository": str(path),
        "issuers": names,
    }
    with Repository(path, readonly=True) as repository:
        record = repository.meta(CLUSTER_META)
    if record is not None:
        extra["cluster"] = ClusterRecord.unpack(record).summary()
    progress = Progress("backup", "bytes", out=progress_out)
    manifest = make_backup(path, out, int(time.time()), extra, progress)
    progress.finish(f"written {out}")
    return manifest


def verify(path: Path, progress_out: TextIO | None) -> Manifest:
    progress = Progress("verify", "bytes", out=progress_out)
    manifest = verify_backup(path, progress)
    progress.finish("the copy matches its manifest")
    return manifest


def summary(manifest: Manifest) -> dict[str, Any]:
    """What an operator reads (and `--json` prints) of a manifest."""
    names = manifest.extra.get("issuers", {})
    crls = {
        names.get(key_id, key_id): {
            "crl_number": crl["crl_number"],
            "next_update": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(crl["next_update"])),
        }
        for key_id, crl in manifest.crls.items()
    }
    facts: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest.created)),
        "applied_index": manifest.applied_index,
        "content_digest": manifest.content_digest,
        "schema_version": manifest.schema_version,
        "bytes": manifest.data_bytes,
        "counts": manifest.counts,
        "crls": crls,
    }
    if "cluster" in manifest.extra:
        cluster = manifest.extra["cluster"]
        facts["cluster"] = {"id": cluster["id"], "generation": cluster["generation"]}
    return facts


@dataclass(frozen=True)
class Restored:
    """What `restore` did: the copy's manifest, each issuer's new lowest next CRL number (key
    id -> number), and for a replicated signer the new generation it starts alone in."""

    manifest: Manifest
    floors: dict[bytes, int]
    generation: int | None


def restore(
    config: SignerConfig,
    source: Path,
    backup_file: Path,
    published: Mapping[bytes, int],
    progress_out: TextIO | None,
    replace: bool = False,
) -> Restored:
    """Put a verified copy in place of the stopped signer's repository and apply the restore
    rule (storage/restore.py): standalone, offline; replicated, as the first entries of the new
    log that `recover_standalone` starts (a new generation: the old signers are refused)."""
    path = repository_path(config, source)
    _refuse_unsafe(config, path, replace)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(prefix=".restore-", dir=path.parent))
    try:
        progress = Progress("verify", "bytes", out=progress_out)
        manifest = extract(backup_file, work, progress)
        progress.finish("the copy matches its manifest")
        assert config.repository is not None
        with Repository(path, config.repository.map_size_gb << 30) as repository:
            repository.restore(work)
            now = int(time.time())
            if config.replication is None:
                results = apply_restore_rule(repository, now, published)
                floors = {r.issuer: r.floor for r in results if isinstance(r, CrlNumberRaised)}
                return Restored(manifest, floors, None)
            commands = crl_number_floors(repository, now, published)
            log = RaftLog(config.replication, repository)
            generation = log.recover_standalone([encode(command) for command in commands])
            return Restored(manifest, {c.issuer: c.at_least for c in commands}, generation)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _refuse_unsafe(config: SignerConfig, path: Path, replace: bool) -> None:
    """Before anything is written: not while the signer runs, not over a repository unless
    asked, not beside a Raft journal (the new log must start from the copy alone)."""
    socket_path = config.control_path()
    if socket_path is not None and _answers(socket_path):
        raise RestoreRefused(f"the signer is running ({socket_path} answers): stop it first")
    if (path / DATA_FILE).exists() and not replace:
        raise RestoreRefused(
            f"{path} holds a repository: give --replace to put the copy in its place"
        )
    journal = config.replication.journal_dir if config.replication is not None else None
    if journal is not None and journal.exists() and any(journal.iterdir()):
        raise RestoreRefused(
            f"{journal} is not empty: a restore starts a new log from the copy alone; move "
            "the old journal directory away first (docs/operations.md, Backup and restore)"
        )


def _answers(socket_path: Path) -> bool:
    from signer.server.control import call

    try:
        call(socket_path, {"cmd": "health"}, timeout=2)
    except (OSError, ValueError):
        return False
    return True


class RestoreRefused(Exception):
    """The situation does not allow a restore (the message says why and what to do)."""
