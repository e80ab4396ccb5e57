"""The signer process: one serial line, the protocol handler, and the command handlers.

Components are wired here and nowhere else, so each stays testable alone. A command whose
component is not configured (no HSM yet, say) is answered with `unknown_command`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable
from typing import Any

from replication.log import LocalLog
from signer.ca import CertificateAuthority, Issuer, KeyMismatchError
from signer.config import SignerConfig
from signer.errors import SignerError
from signer.health import Health, Section
from signer.hsm import Hsm
from signer.profiles import load_profiles
from signer.protocol import HealthArgs, RequestStatusArgs, RequestStatusResult
from signer.protocol_handler import Handler, ProtocolHandler, RequestContext
from signer.serial_link import SerialLink
from storage.repository import Repository

log = logging.getLogger(__name__)


def as_dict(stats: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    return dict(stats)


class SignerServer:
    def __init__(self, config: SignerConfig):
        self.config = config
        self.health = Health()
        self.handlers: dict[str, Handler] = {
            "health": self._health,
            "request_status": self._request_status,
        }
        self.link = SerialLink(config.link.settings(), self._on_event, "signer")
        self.protocol = ProtocolHandler(self.handlers, self.link.send, config.max_in_flight)
        self.health.add("link", self._link_section)
        self.ca: CertificateAuthority | None = None
        self._closers: list[Callable[[], None]] = []
        if config.issuing():
            self.ca = self._certificate_authority(config)
            self.handlers.update(self.ca.handlers())
            self.health.add("hsm", self.ca.hsm_section)
            self.health.add("cas", self.ca.cas_section)
            self.health.add("repository", self.ca.repository_section)

    def _certificate_authority(self, config: SignerConfig) -> CertificateAuthority:
        assert config.repository and config.hsm and config.profiles
        repository = Repository(config.repository.path, config.repository.map_size_gb << 30)
        commit_log = LocalLog(repository)
        hsm = Hsm(config.hsm)
        self._closers += [hsm.close, commit_log.close, repository.close]
        issuers = [
            Issuer.load(name, issuer.certificate, issuer.key)
            for name, issuer in config.issuers.items()
        ]
        return CertificateAuthority(
            issuers, load_profiles(config.profiles), hsm, repository, commit_log
        )

    def _on_event(self, event: Any) -> None:
        self.protocol.on_frame(event)

    async def start(self) -> None:
        if self.ca is not None:
            await self._check_ca_keys(self.ca)
        await self.link.start()
        log.info("signer serving on %s", self.config.link.device)

    @staticmethod
    async def _check_ca_keys(ca: CertificateAuthority) -> None:
        """A key that does not match its certificate is fatal; an HSM not reachable yet is not."""
        try:
            await ca.hsm.run(ca.check_keys)
        except KeyMismatchError:
            raise
        except SignerError as exc:
            log.warning("cannot check the CA keys now (%s); the HSM is retried per request", exc)

    async def stop(self) -> None:
        await self.protocol.close()
        await self.link.close()
        for close in self._closers:
            close()

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("signer stopping")
            await self.stop()

    async def _health(self, _args: HealthArgs, _ctx: RequestContext) -> Any:
        return await self.health.report()

    async def _request_status(self, args: RequestStatusArgs, _ctx: RequestContext) -> Any:
        if self.protocol.running(args.request_id):
            return RequestStatusResult(state="in_progress")
        recorded = self.ca.request_status(args.request_id) if self.ca else None
        return recorded or RequestStatusResult(state="unknown")

    async def _link_section(self) -> Section:
        link = as_dict(self.link.stats)
        link["handler"] = as_dict(self.protocol.stats)
        link["in_flight"] = self.protocol.in_flight
        warnings = [] if self.link.connected else ["the serial line is down"]
        return Section(link, warnings)
