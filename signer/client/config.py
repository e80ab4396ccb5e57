"""The WebDB host's configuration for talking to a signer (`signer client --config`)."""

from __future__ import annotations

from pydantic import Field

from signer.config import LinkConfig, Section


class ClientConfig(Section):
    """`signer client --config`: how the WebDB side reaches a signer."""

    link: LinkConfig
    timeout: float = Field(default=30.0, gt=0)
    attempts: int = Field(default=3, ge=1, le=20)
    max_in_flight: int = Field(default=8, ge=1, le=256)
