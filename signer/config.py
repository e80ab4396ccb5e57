"""YAML configuration, validated on load: the loader both hosts share, and the serial line.

Every part of the system is a process with its own YAML file. A mistake is reported with the file,
the key path and what was expected; unknown keys are refused, so a typo never silently falls
back to a default. Relative paths resolve against the directory of the file that names them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from signer.errors import ConfigError
from signer.link.serial_link import LinkSettings
from signer.wire.framing import DEFAULT_MAX_FRAME

__all__ = [
    "ConfigError",
    "LinkConfig",
    "Section",
    "check_secret_file",
    "load",
    "resolve",
    "validate",
]

Model = TypeVar("Model", bound=BaseModel)
STOPBITS = (1, 1.5, 2)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the config file, not to the working directory."""
    base = (info.context or {}).get("base_dir")
    return value if value.is_absolute() or base is None else Path(base) / value


class LinkConfig(Section):
    device: str = Field(description="serial device path, e.g. /dev/ttyUSB0")
    baudrate: int = Field(default=115200, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = 1
    rtscts: bool = False
    xonxoff: bool = False
    reopen_interval: float = Field(default=1.0, gt=0, le=60)
    max_frame: int = Field(default=DEFAULT_MAX_FRAME, ge=4096, le=16 * 1024 * 1024)

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, value: float) -> float:
        if value not in STOPBITS:
            raise ValueError("Input should be 1, 1.5 or 2")
        return int(value) if value.is_integer() else value  # pyserial's constants: 1, 1.5, 2

    def settings(self) -> LinkSettings:
        return LinkSettings(**self.model_dump())


def load(path: Path, model: type[Model]) -> Model:
    """Read and validate one YAML file into `model`; any problem raises `ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate(data, model, path)


def validate(data: dict[str, Any], model: type[Model], path: Path) -> Model:
    try:
        return model.model_validate(data, context={"base_dir": path.parent.resolve()})
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(path, err) for err in exc.errors())) from None


def _describe(path: Path, error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{path}: {where}: unknown key"
    return f"{path}: {where}: {error['msg']}"


def check_secret_file(path: Path) -> None:
    """Refuse a file holding a secret that others can read (like ssh does for its keys)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: holds a secret but is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    if hasattr(os, "getuid") and path.stat().st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{path}: holds a secret but belongs to another user")
