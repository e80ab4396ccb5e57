"""Issue 11, item 9: two `signer serve` on one repository both ran and both issued. The second
now refuses at start (exit code 2), naming the process that holds the repository or the line."""

from __future__ import annotations

import subprocess
import sys

from signer.tools.flood import call_health, signer_on_pty, wait_open


def serve(config) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "signer", "serve", "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_second_signer_on_the_same_repository_or_line_refuses(tmp_path):
    repository = tmp_path / "repository"
    extra = f"repository:\n  path: {repository}\n"
    with signer_on_pty(tmp_path, extra) as (first, fd, _log):
        wait_open(fd)
        assert call_health(fd, "first").message["ok"]
        second = serve(tmp_path / "signer.yaml")  # same repository, same line
        assert second.returncode == 2, second.stderr
        assert str(first.pid) in second.stderr, second.stderr
        assert "in use" in second.stderr
        other = tmp_path / "other.yaml"  # another repository, the same line
        device = (tmp_path / "signer.yaml").read_text().splitlines()[1].split()[-1]
        other.write_text(f"link:\n  device: {device}\nrepository:\n  path: {tmp_path / 'r2'}\n")
        third = serve(other)
        assert third.returncode == 2, third.stderr
        assert str(first.pid) in third.stderr and device in third.stderr, third.stderr
        assert first.poll() is None  # the first one runs on, undisturbed
        assert call_health(fd, "still-first").message["ok"]
    assert "signer.pid" in {p.name for p in repository.iterdir()}
