"""Configuration files: the shipped examples load; mistakes name file, key path and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from signer import errors
from signer.client.config import ClientConfig
from signer.config import ConfigError, check_secret_file, load
from signer.server.config import SignerConfig

CONFIG = Path(__file__).resolve().parents[2] / "config"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "signer.yaml"
    path.write_text(text)
    return path


def test_shipped_examples_load():
    signer = load(CONFIG / "signer.yaml", SignerConfig)
    assert signer.link.baudrate == 115200 and signer.link.parity == "N"
    client = load(CONFIG / "client.yaml", ClientConfig)
    assert client.attempts == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("link: {device: /dev/x, baudrat: 9600}", "link.baudrat: unknown key"),
        ("link: {device: /dev/x, parity: X}", "link.parity: Input should be"),
        ("link: {device: /dev/x, stopbits: 3}", "link.stopbits: Value error, Input should be 1"),
        (
            "link: {device: /dev/x, baudrate: fast}",
            "link.baudrate: Input should be a valid int",
        ),
        ("link: {}", "link.device: Field required"),
        ("max_in_flight: 5", "link: Field required"),
        ("link: {device: /dev/x}\nmax_in_flight: 0", "max_in_flight: Input should be greater"),
        ("- a list", "expected a mapping at the top level"),
        ("link: [unclosed", "not valid YAML"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path, SignerConfig)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.yaml", SignerConfig)


def test_one_configuration_error_type():
    """The loader's error is the error family the command line turns into exit 2."""
    assert ConfigError is errors.ConfigError


@pytest.mark.parametrize(("stopbits", "settings"), [(1, 1), (1.5, 1.5), (2, 2)])
def test_stopbits_as_pyserial_takes_them(tmp_path, stopbits, settings):
    path = write(tmp_path, f"link: {{device: /dev/x, stopbits: {stopbits}}}")
    link = load(path, SignerConfig).link.settings()
    assert link.stopbits == settings and type(link.stopbits) is type(settings)


def test_relative_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "signer.yaml"
    path.write_text("link: {device: /dev/x}\nrepository: {path: data/repo}\n")
    config = load(path, SignerConfig)
    assert config.repository.path == (tmp_path / "etc" / "data" / "repo").resolve()


def test_secret_files_must_be_private(tmp_path):
    secret = tmp_path / "pin"
    secret.write_text("1234")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        check_secret_file(secret)
    secret.chmod(0o600)
    check_secret_file(secret)
