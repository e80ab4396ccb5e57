"""`signer backup` and `signer restore` on the signer host: the repository's copy (storage/
backup.py) with what the configuration adds (issuer names, the cluster record), and the safe
way back from a copy.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, TextIO

from replication.cluster import CLUSTER_META, ClusterRecord
from signer import __version__
from signer.errors import ConfigError
from signer.server.config import SignerConfig
from signer.tools.history import issuer_cas
from signer.tools.progress import Progress
from storage import Repository
from storage.backup import Manifest, make_backup, verify_backup


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
