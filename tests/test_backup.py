"""Backups: a consistent copy taken while commands are applied, its manifest, its verification
(storage/backup.py), and the `signer backup` command line over it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from raft_cluster import issue, revoke

from storage import Repository
from storage.backup import BackupError, make_backup, read_manifest, verify_backup

ROOT = Path(__file__).resolve().parent.parent


def commands(count: int) -> list:
    """Issuances with a revocation every tenth: the same list makes the same states."""
    made = []
    for number in range(count):
        made.append(replace(issue(number), der=b"certificate %d" % number))  # not random
        if number % 10 == 9:
            made.append(revoke(number, 2**140 + number))
    return made


WRITER = """
import sys
sys.path.insert(0, sys.argv[2])
from test_backup import commands
from storage import Repository
work = commands(3000)
with Repository(sys.argv[1]) as repository:
    print("started", flush=True)
    for index in range(501, len(work) + 1):
        repository.apply(index, work[index - 1])
"""


def test_a_backup_taken_while_another_process_writes_is_one_consistent_state(tmp_path):
    work = commands(3000)
    with Repository(tmp_path / "repo") as repository:
        repository.apply_batch([(i + 1, c) for i, c in enumerate(work[:500])])
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "repo"), str(Path(__file__).parent)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "started\n"
        seen: list[tuple[int, int]] = []
        manifest = make_backup(
            tmp_path / "repo", tmp_path / "b.tar", now=1, progress=lambda *p: seen.append(p)
        )
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert seen and seen[-1][0] == seen[-1][1] == manifest.data_bytes  # progress to the end
    assert 500 <= manifest.applied_index <= len(work)
    assert verify_backup(tmp_path / "b.tar") == manifest
    # The copy is exactly the state after its applied index: replaying as far gives its digest.
    with Repository(tmp_path / "replay") as replay:
        replay.apply_batch([(i + 1, c) for i, c in enumerate(work[: manifest.applied_index])])
        assert replay.content_digest().hex() == manifest.content_digest
    assert not list(tmp_path.glob(".backup-*")) and not list(tmp_path.glob("*.partial"))
    assert (tmp_path / "b.tar").stat().st_mode & 0o077 == 0


def rewrite(path: Path, data: bytes | None = None, manifest: bytes | None = None) -> None:
    """The archive with one member replaced (a damaged or forged backup)."""
    with tarfile.open(path) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    members["data.mdb"] = data if data is not None else members["data.mdb"]
    members["manifest.json"] = manifest if manifest is not None else members["manifest.json"]
    with tarfile.open(path, "w") as archive:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))


def test_verification_names_what_differs(tmp_path):
    with Repository(tmp_path / "repo") as repository:
        repository.apply_batch([(i + 1, c) for i, c in enumerate(commands(50))])
    good = make_backup(tmp_path / "repo", tmp_path / "b.tar", now=1)
    with tarfile.open(tmp_path / "b.tar") as archive:
        data = archive.extractfile("data.mdb").read()
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    rewrite(tmp_path / "b.tar", data=bytes(damaged))
    with pytest.raises(BackupError, match=r"data\.mdb differs from the manifest"):
        verify_backup(tmp_path / "b.tar")
    # A manifest that lies about the copy (its file digest made to agree).
    forged = json.loads(good.to_json())
    forged["applied_index"] = 49
    forged["crls"] = {"00" * 20: {"crl_number": 9, "this_update": 1, "next_update": 2}}
    rewrite(tmp_path / "b.tar", data=data, manifest=json.dumps(forged).encode())
    with pytest.raises(BackupError) as raised:
        verify_backup(tmp_path / "b.tar")
    problems = raised.value.problems
    assert any(
        p.startswith("applied_index: the copy has 55, the manifest says 49") for p in problems
    )
    assert any(p.startswith("crls: the copy has {}") for p in problems)
    assert read_manifest(tmp_path / "b.tar").applied_index == 49
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(BackupError, match="not a readable backup"):
        verify_backup(tmp_path / "junk.tar")
    rewrite(tmp_path / "b.tar", data=data, manifest=b'{"format": "something else"}')
    with pytest.raises(BackupError, match="bad manifest"):
        verify_backup(tmp_path / "b.tar")


def signer(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signer", *argv], capture_output=True, text=True, cwd=ROOT,
        timeout=120, check=False,
    )  # fmt: skip


def test_the_command_line_writes_and_verifies_a_backup(tmp_path):
    with Repository(tmp_path / "repo") as repository:
        repository.apply_batch([(i + 1, c) for i, c in enumerate(commands(100))])
        digest = repository.content_digest().hex()
    config = tmp_path / "signer.yaml"
    config.write_text("link: {device: /dev/null}\nrepository: {path: repo}\n")
    done = signer("backup", "--config", str(config), "--out", str(tmp_path / "b.tar"))
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path / 'b.tar'}: written" in done.stdout
    assert "applied_index: 110" in done.stdout and f"content_digest: {digest}" in done.stdout
    assert "backup: 100%" in done.stderr  # progress lines (not a terminal)
    done = signer("backup", "verify", str(tmp_path / "b.tar"), "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] and answer["manifest"]["content_digest"] == digest
    (tmp_path / "junk.tar").write_bytes(b"junk")
    done = signer("backup", "verify", str(tmp_path / "junk.tar"), "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["error"]["code"] == "bad_backup"
    done = signer("backup", "--config", str(config))
    assert done.returncode == 2 and "needs --config and --out" in done.stderr


def test_the_command_line_restores_a_backup_standalone_or_replicated(tmp_path):
    with Repository(tmp_path / "repo") as repository:
        repository.apply_batch([(i + 1, c) for i, c in enumerate(commands(100))])
        digest = repository.content_digest().hex()
    make_backup(tmp_path / "repo", tmp_path / "b.tar", now=1)
    config = tmp_path / "signer.yaml"
    config.write_text("link: {device: /dev/null}\nrepository: {path: repo}\n")
    done = signer("restore", str(tmp_path / "b.tar"), "--config", str(config))
    assert done.returncode == 1 and "give --replace" in done.stderr  # a repository is there
    (tmp_path / "junk.tar").write_bytes(b"junk")
    done = signer("restore", str(tmp_path / "junk.tar"), "--config", str(config), "--replace")
    assert done.returncode == 1 and "bad_backup" in done.stderr
    shutil.rmtree(tmp_path / "repo")
    done = signer("restore", str(tmp_path / "b.tar"), "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["manifest"]["content_digest"] == digest and answer["generation"] is None
    assert "verify: 100%" in done.stderr  # progress lines (not a terminal)
    # A replicated signer: never beside an old journal; then a new generation, alone.
    secret = tmp_path / "replication.secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    config.write_text(
        "link: {device: /dev/null}\nrepository: {path: repo}\nreplication: {self_address: "
        "'127.0.0.1:4999', peers: [], secret_file: replication.secret, journal_dir: raft}\n"
    )
    (tmp_path / "raft").mkdir()
    (tmp_path / "raft" / "journal").write_bytes(b"old")
    done = signer("restore", str(tmp_path / "b.tar"), "--config", str(config), "--replace")
    assert done.returncode == 1 and "raft is not empty" in done.stderr
    (tmp_path / "raft" / "journal").unlink()
    done = signer("restore", str(tmp_path / "b.tar"), "--config", str(config), "--replace")
    assert done.returncode == 0, done.stderr
    assert "this signer alone, generation" in done.stdout
    with Repository(tmp_path / "repo") as repository:
        assert repository.last_applied_index() > 110  # the recovery's record follows the copy
