"""The signer process: one serial line, the protocol handler, and the command handlers.

Components are wired here and nowhere else, so each stays testable alone. A command whose
component is not configured (no HSM yet, say) is answered with `unknown_command`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from replication.errors import StartRefused
from replication.log import LocalLog, Log
from replication.raft import RaftLog
from signer.config import ConfigError
from signer.errors import SignerError
from signer.link.serial_link import LinkSettings, SerialLink
from signer.pki.profiles import load_profiles
from signer.pki.suffixes import PublicSuffixes, shipped
from signer.server.audit import AuditService, config_digest, file_digest, profile_files
from signer.server.ca import CertificateAuthority, Issuer, KeyMismatchError
from signer.server.config import SignerConfig
from signer.server.control import ControlServer
from signer.server.crl import CrlService
from signer.server.dispatch import Handler, ProtocolHandler, RequestContext
from signer.server.health import Health, Section, with_timestamps
from signer.server.hsm import Hsm
from signer.server.importer import ImportService
from signer.server.instance import InstanceLock
from signer.server.openpgp import OpenPgpService
from signer.server.operator import OperatorIssuance
from signer.server.reconcile import Reconciler
from signer.wire.protocol import COMMANDS, HealthArgs, RequestStatusArgs, RequestStatusResult
from storage import Repository, Result

log = logging.getLogger(__name__)


WATCHDOG_MARGIN = 2.0  # seconds past stop_timeout before the watchdog ends the process
EXIT_FORCED = 1  # the process had to be ended: something did not stop in time


def hard_exit(code: int) -> None:
    """End the process now, whatever its threads do (a PKCS#11 call that never returns would
    block the interpreter's exit); the repository and the journal are crash-safe by design."""
    logging.shutdown()
    os._exit(code)


def start_watchdog(seconds: float) -> threading.Timer:
    """After `seconds`, log and end the process (stopping is bounded whatever a task does)."""

    def expire() -> None:
        log.critical("the signer did not stop within %g s: exiting now", seconds)
        hard_exit(EXIT_FORCED)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


async def _bounded(step: Awaitable[Any], seconds: float, what: str) -> None:
    """One step of stopping, given at most `seconds`; its failure is logged, never raised."""
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.error("stopping: %s did not finish in %.1f s", what, seconds)
    except Exception:
        log.exception("stopping: %s failed", what)


def public_suffixes(path: Path | None) -> PublicSuffixes:
    """The operator's newer Public Suffix List, or the package's snapshot."""
    if path is None:
        suffixes = shipped()
    else:
        try:
            suffixes = PublicSuffixes.parse(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the public suffix list: {exc}") from None
    log.info("public suffix list %s (version %s)", suffixes.source, suffixes.version or "unknown")
    return suffixes


def as_dict(stats: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    return dict(stats)


def _open_repository(config: SignerConfig) -> Repository:
    """The repository; under the replicated log one fdatasync per commit (its journal
    replays a commit an OS crash undid: docs/repository.md §2)."""
    assert config.repository is not None
    size = config.repository.map_size_gb << 30
    return Repository(config.repository.path, size, metasync=config.replication is None)


class SignerServer:
    def __init__(self, config: SignerConfig):
        self.config = config
        self.instance_lock = InstanceLock()  # one signer per repository and per line
        try:
            if config.repository is not None:
                self.instance_lock.hold_directory(config.repository.path)
            for line in (config.link, *config.extra_links):
                self.instance_lock.check_device(line.device)
            self._wire(config)
        except BaseException:
            self.instance_lock.release()
            raise

    def _wire(self, config: SignerConfig) -> None:
        self.health = Health()
        self.handlers: dict[str, Handler] = {
            "health": self._health,
            "request_status": self._request_status,
        }
        self.link = SerialLink(config.link.settings(), self._on_event, "signer")
        self.protocol = ProtocolHandler(self.handlers, self.link.post, config.max_in_flight)
        self.health.add("link", self._link_section)
        self.lines: list[tuple[SerialLink, ProtocolHandler]] = []  # further serial lines
        for number, extra in enumerate(config.extra_links, start=2):
            self.add_line(extra.settings(), f"signer-line{number}")
        self.ca: CertificateAuthority | None = None
        self.crl: CrlService | None = None
        self._closers: list[Callable[[], None]] = []
        self._shared_parts: tuple[Repository, Log[Result], Hsm] | None = None
        self.cluster: RaftLog[Result] | None = None  # the replicated log, with `replication`
        self.control: ControlServer | None = None
        if config.issuing():
            self.ca = self._certificate_authority(config)
            self.handlers.update(self.ca.handlers())
            self.handlers.update(Reconciler(self.ca).handlers())
            self.health.add("hsm", self.ca.hsm_section)
            self.health.add("cas", self.ca.cas_section)
            self.health.add("repository", self.ca.repository_section)
            ca = self.ca
            self.crl = CrlService(
                ca.issuers.values(),
                ca.hsm,
                ca.repository,
                ca.log,
                config.crl,
                scheduling=self._schedules_crls,
            )
            self.handlers.update(self.crl.handlers())
            self.health.add("crls", self._crls_section)
        self.audit: AuditService | None = None
        if self.ca is not None and self.crl is not None:
            self.audit = self._audit_service(config, self.ca, self.crl)
        self.openpgp: OpenPgpService | None = None
        if config.openpgp is not None:
            repository, commit_log, hsm = self._shared(config)
            self.openpgp = OpenPgpService.from_config(config.openpgp, hsm, repository, commit_log)
            self.handlers.update(self.openpgp.handlers())
            self.health.add("openpgp", self.openpgp.health_section)
        if config.replication is not None and config.repository is not None and not self.cluster:
            self._replica_only(config)  # a voter without HSM (a third signer for failover)
        control_path = config.control_path()
        if self.control is None and control_path is not None and self.ca is not None:
            self.control = ControlServer(None, control_path)  # standalone: imports only
        self.importer: ImportService | None = None
        if self.ca is not None and self.control is not None:
            ca = self.ca
            self.importer = ImportService(ca.issuers.values(), ca.repository, ca.log, self.crl)
            self.control.add(*self.importer.control())
            barrier = self.cluster.barrier if self.cluster is not None else None
            self.control.add(OperatorIssuance(ca, barrier).control())
        if self.audit is not None and self.control is not None:
            self.control.on_action = self.audit.operator_action
        if self.cluster is not None:
            for name, command in COMMANDS.items():  # writers first catch up with the cluster
                if command.writes and name in self.handlers:
                    self.handlers[name] = self.cluster.guard(self.handlers[name])

    def _audit_service(
        self, config: SignerConfig, ca: CertificateAuthority, crl: CrlService
    ) -> AuditService:
        """The audit log's service: every error answer of every line, a tree head per CRL."""
        audit = AuditService(
            ca.repository,
            ca.log,
            ca.hsm,
            config.audit,
            ca.issuers.values(),
            COMMANDS,
        )
        self.handlers.update(audit.handlers())
        crl.published.append(audit.after_crl)
        for protocol in [self.protocol, *(p for _, p in self.lines)]:
            protocol.refused = audit.refused
        self.health.add("audit", audit.health_section)
        return audit

    def _schedules_crls(self) -> bool:
        """Standalone, or the leader of the pair: the follower applies what the leader made."""
        return self.cluster is None or self.cluster.view.role == "leader"

    def _shared(self, config: SignerConfig) -> tuple[Repository, Log[Result], Hsm]:
        """One repository, log and HSM session for the X.509 and OpenPGP services."""
        if self._shared_parts is None:
            assert config.repository and config.hsm
            repository = _open_repository(config)
            commit_log = self._commit_log(config, repository)
            hsm = Hsm(config.hsm)
            self._closers += [hsm.close, commit_log.close, repository.close]
            self._shared_parts = (repository, commit_log, hsm)
        return self._shared_parts

    def _commit_log(self, config: SignerConfig, repository: Repository) -> Log[Result]:
        """LocalLog alone; RaftLog (and its control socket and health section) in a cluster.

        A replicated log that refuses to start (fenced, not a member, a journal that does not
        match, no secret) stops the signer like a configuration mistake: the operator must act.
        """
        if config.replication is None:
            return LocalLog(repository)
        try:
            self.cluster = RaftLog(config.replication, repository).start()
        except StartRefused as exc:
            repository.close()
            raise ConfigError(str(exc)) from exc
        self.control = ControlServer(self.cluster, config.replication.socket_path)
        self.health.add("cluster", self._cluster_section)
        return self.cluster

    def _replica_only(self, config: SignerConfig) -> None:
        repository = _open_repository(config)
        commit_log = self._commit_log(config, repository)
        self._closers += [commit_log.close, repository.close]

    def _certificate_authority(self, config: SignerConfig) -> CertificateAuthority:
        assert config.profiles
        repository, commit_log, hsm = self._shared(config)
        issuers = [
            Issuer.load(name, issuer.certificate, issuer.key)
            for name, issuer in config.issuers.items()
        ]
        return CertificateAuthority(
            issuers,
            load_profiles(config.profiles),
            hsm,
            repository,
            commit_log,
            suffixes=public_suffixes(config.public_suffix_list),
        )

    def _on_event(self, event: Any) -> None:
        self.protocol.on_frame(event)

    def add_line(self, settings: LinkSettings, name: str) -> SerialLink:
        """Serve one more serial line (a second cable, for the client's failover); call before
        start(). Answers go back on the line the request came on; a request id sent on two
        lines at once may run twice, but the repository records it once, so it issues once."""
        protocol = ProtocolHandler(
            self.handlers, lambda message: link.post(message), self.config.max_in_flight
        )
        link = SerialLink(settings, protocol.on_frame, name)
        audit: AuditService | None = getattr(self, "audit", None)
        protocol.refused = None if audit is None else audit.refused
        self.lines.append((link, protocol))
        return link

    async def start(self) -> None:
        if self.control is not None:
            await self.control.start()
        if self.ca is not None:
            await self._check_ca_keys(self.ca)
        if self.openpgp is not None:
            await self.openpgp.warm_up()
        if self.audit is not None:
            await self._start_audit(self.audit)
        if self.crl is not None:
            await self.crl.start()  # CRLs that are due are made before the line is served
        await self.link.start()
        for link, _ in self.lines:
            await link.start()
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

    async def _start_audit(self, audit: AuditService) -> None:
        """The configuration, profile set and certificates in use enter the audit log when they
        changed since this signer's last start (in the background: the line is served)."""
        config = self.config
        node = config.replication.self_address if config.replication else "standalone"
        certificates = [i.certificate for i in config.issuers.values()] + [config.audit.certificate]
        digests = {
            "config_sha256": config_digest(config),
            "profiles_sha256": file_digest(profile_files(config.profiles)),
            "certificates_sha256": file_digest(certificates),
        }
        await audit.start(node, digests)
        if self.cluster is None:
            await audit.started()  # standalone: recorded before the line is served

    async def stop(self) -> None:
        """Stop in order and within `stop_timeout`: no new request (answered `shutting_down`);
        running ones finish within half of it or are answered `shutting_down`; queued answers
        go out; then the links, the control socket, the HSM, the log and the repository close.
        Every step is bounded; `serve_forever`'s watchdog ends the process whatever a step (or
        a thread stuck in the HSM) does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stop_timeout

        def left() -> float:
            return max(0.1, deadline - loop.time())

        protocols = [self.protocol, *(protocol for _, protocol in self.lines)]
        links = [self.link, *(link for link, _ in self.lines)]
        for protocol in protocols:
            protocol.begin_shutdown()
        grace = self.config.stop_timeout / 2
        await asyncio.gather(*(protocol.drain(grace) for protocol in protocols))
        await asyncio.gather(*(link.flush(min(1.0, left())) for link in links))
        if self.audit is not None:
            await _bounded(self.audit.stop(), left(), "the audit log")
        if self.crl is not None:
            await _bounded(self.crl.stop(), left(), "the CRL scheduler")
        for link in links:
            await _bounded(link.close(), left(), f"serial line {link.name}")
        if self.control is not None:
            await _bounded(self.control.close(), left(), "the control socket")
        for close in self._closers:
            await _bounded(asyncio.to_thread(close), left(), getattr(close, "__qualname__", ""))
        self._closers.clear()
        self.instance_lock.release()

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; then stop within `stop_timeout`, or be ended by the
        watchdog. A second signal ends the process at once."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def signalled(signum: int) -> None:
            if stop.is_set():
                log.warning("signal %d again: exiting now", signum)
                hard_exit(EXIT_FORCED)
            stop.set()
            start_watchdog(self.config.stop_timeout + WATCHDOG_MARGIN)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signalled, signum)
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("signer stopping (at most %g s)", self.config.stop_timeout)
            await self.stop()
            log.info("signer stopped")

    async def _health(self, _args: HealthArgs, _ctx: RequestContext) -> Any:
        return await self.health.report()

    async def _request_status(self, args: RequestStatusArgs, _ctx: RequestContext) -> Any:
        if any(p.running(args.request_id) for p in [self.protocol, *(p for _, p in self.lines)]):
            return RequestStatusResult(state="in_progress")
        if self.openpgp and (recorded := self.openpgp.request_status(args.request_id)):
            return recorded
        recorded = self.ca.request_status(args.request_id) if self.ca else None
        return recorded or RequestStatusResult(state="unknown")

    async def _cluster_section(self) -> Section:
        assert self.cluster is not None
        health = await self.cluster.health()
        data = with_timestamps(dict(health.data), "snapshot.created", "cluster.at")
        return Section(data, health.warnings, health.errors)

    async def _crls_section(self) -> Section:
        assert self.crl is not None
        section = await self.crl.health_section()
        with_timestamps(section.data, "*.this_update", "*.next_update")
        return section

    async def _link_section(self) -> Section:
        link = with_timestamps(as_dict(self.link.stats), "since")
        link["handler"] = as_dict(self.protocol.stats)
        link["in_flight"] = self.protocol.in_flight
        warnings = [] if self.link.connected else ["the serial line is down"]
        if self.lines:
            link["extra_lines"] = {
                extra.name: with_timestamps(as_dict(extra.stats), "since")
                for extra, _ in self.lines
            }
            warnings += [f"{x.name} is down" for x, _ in self.lines if not x.connected]
        return Section(link, warnings)
