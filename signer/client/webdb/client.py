"""The WebDB client's loop: pending jobs to the signer and their outcomes back, CRLs, health.

A failing job never blocks the others, and trouble on the signer's side (line down, no quorum,
HSM away) is not the row's fault: such jobs wait for the next pass at no cost. After a restart,
a job an earlier process may have sent asks `request_status` first, so the CSR is not resent
and nothing is issued twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from signer.client.audit import AuditAlert, AuditMirror
from signer.client.crl_refresh import CrlRefresher
from signer.client.library import SignerClient
from signer.client.webdb.config import WebdbClientConfig
from signer.client.webdb.crl_publication import publish_crl
from signer.client.webdb.database import Database
from signer.client.webdb.failover import SignerLines
from signer.client.webdb.health import Alert, health_alerts, unanswered
from signer.client.webdb.metrics import Monitor, Observations, write
from signer.client.webdb.source import Failure, Job, RequestSource, WebdbSource
from signer.clock import utcnow
from signer.errors import ClientFailure, ErrorCode, SignerError, Unreachable

log = logging.getLogger(__name__)

# Not the row's fault: the row is tried again later at no cost to its warning count.
TRANSIENT = {
    ErrorCode.BUSY,
    ErrorCode.NO_QUORUM,
    ErrorCode.NOT_COMMITTED,
    ErrorCode.HSM_UNAVAILABLE,
    ErrorCode.HSM_LOGIN_FAILED,
    ErrorCode.CLOCK_BEHIND,  # the signer waits for its clock to pass the cluster's
    ErrorCode.IMPORT_CONFLICT,  # an operator is importing the issuer's history: wait for it
}
PROFILE_CACHE_S = 3600.0
HEALTH_TIMEOUT_S = 30.0

# Called with a job after the signer answered it and before the outcome is written back (tests
# stop the process there to show that a restart neither issues twice nor resends the CSR).
BeforeWriteBack = Callable[[Job], Awaitable[None]]
ProgressFactory = Callable[[str], Callable[[int, int], None]]


def failure_name(exc: Failure) -> str:
    """The name a failure is reported under: its wire code, or what the client saw."""
    return exc.code.value if isinstance(exc, SignerError) else exc.kind


def is_transient(exc: Failure) -> bool:
    """Not the row's fault: tried again later at no cost to its warning count."""
    return isinstance(exc, Unreachable) or (isinstance(exc, SignerError) and exc.code in TRANSIENT)


@dataclass
class PassReport:
    """What one pass over the pending requests did."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # request id → error code
    deferred: dict[str, str] = field(default_factory=dict)  # not the row's fault: next pass
    recovered: list[str] = field(default_factory=list)  # outcomes fetched by request_status


@dataclass
class RunReport:
    """What `run_once` did: requests, CRLs (issuer → outcome), operator alerts."""

    requests: PassReport
    crls: dict[str, str]
    alerts: list[Alert]

    @property
    def unanswered_lines(self) -> list[str]:
        """The lines whose signer gave no health report (`webdb-client --once` exits 3)."""
        return [alert.line for alert in self.alerts if alert.unanswered]


class WebdbClient:
    """Drives the signer from a request source; `run_once` and `run_forever` are the entries."""

    def __init__(
        self,
        config: WebdbClientConfig,
        source: RequestSource | None = None,
        lines: SignerLines | None = None,
        *,
        before_write_back: BeforeWriteBack | None = None,
        progress: ProgressFactory | None = None,
    ):
        self.config = config
        self.db: Database | None = None
        if source is None:
            self.db = Database(config.database)
            source = WebdbSource(self.db, config)
        self.source = source
        self.lines = lines or _lines(config)
        self._before_write_back = before_write_back
        self._uncertain: set[str] = set()  # sent, outcome unknown: ask request_status first
        self._profiles_at = 0.0
        self._issuers: dict[str, x509.Certificate] = {}
        self._refreshers: dict[str, CrlRefresher] = {}  # they keep a broken transfer's progress
        self.monitor = Monitor(self.lines.names, config.monitoring.line_error_window_s)
        self.progress = progress  # a long CRL transfer's progress (what -> callback)
        self.audit: AuditMirror | None = None
        self.audit_alert: Alert | None = None  # a rewritten history: stays until restarted

    async def start(self) -> None:
        await self.lines.start()

    async def close(self) -> None:
        await self.lines.close()
        if self.db is not None:
            await self.db.close()

    async def __aenter__(self) -> WebdbClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- requests -----------------------------------------------------------------------------

    async def process_pending(self) -> PassReport:
        """One poll: every pending job, concurrently (bounded); failures stay with their row."""
        report = PassReport()
        jobs = await self.source.pending()
        if not jobs:
            return report
        try:
            await self._refresh_profiles()
        except (SignerError, Unreachable) as exc:
            if not is_transient(exc):
                raise
            log.warning("signer not reachable (%s): %d requests wait", exc, len(jobs))
            report.deferred = {job.request_id: failure_name(exc) for job in jobs}
            return report
        slots = asyncio.Semaphore(self.config.max_in_flight * len(self.lines.clients))

        async def bounded(job: Job) -> None:
            async with slots:
                await self._process(job, report)

        await asyncio.gather(*(bounded(job) for job in jobs))
        return report

    async def _refresh_profiles(self) -> None:
        """The profiles' maximum validity, which caps the WebDB's (read hourly, or when stale)."""
        if not isinstance(self.source, WebdbSource):
            return
        if self.source.max_days and time.monotonic() - self._profiles_at < PROFILE_CACHE_S:
            return
        answer = await self.lines.call("list_profiles")
        self.source.max_days = {p["name"]: p["max_validity_days"] for p in answer["profiles"]}
        self._profiles_at = time.monotonic()

    async def _process(self, job: Job, report: PassReport) -> None:
        try:
            result = None
            if job.maybe_sent or job.request_id in self._uncertain:
                result = await self._earlier_outcome(job)
                if result is not None:
                    report.recovered.append(job.request_id)
            if result is None:
                args = await self.source.arguments(job)
                self._uncertain.add(job.request_id)
                result = await self.lines.call(job.command, args, request_id=job.request_id)
                if self._before_write_back is not None:
                    await self._before_write_back(job)
        except (SignerError, ClientFailure) as exc:
            await self._refused(job, exc, report)
            return
        try:
            await self.source.complete(job, result)
        except Exception as exc:  # the signer recorded it: written back on a later pass
            log.error("%s: done by the signer but not written back: %s", job.label, exc)
            report.deferred[job.request_id] = "write_back"
            return
        self._uncertain.discard(job.request_id)
        report.done.append(job.request_id)
        log.info("%s: done%s", job.label, _summary(result))

    async def _earlier_outcome(self, job: Job) -> dict[str, Any] | None:
        """The outcome the signer recorded under the job's id, if it ran it already."""
        status = await self.lines.call("request_status", {"request_id": job.request_id})
        if status["state"] != "done" or status.get("result") is None:
            return None
        if status.get("command") != job.command:
            raise SignerError(
                ErrorCode.REQUEST_ID_CONFLICT,
                f"request id {job.request_id!r} was used for {status.get('command')}",
            )
        result: dict[str, Any] = status["result"]
        return result

    async def _refused(self, job: Job, exc: Failure, report: PassReport) -> None:
        if is_transient(exc):
            log.warning("%s: waits for the signer: %s", job.label, exc)
            report.deferred[job.request_id] = failure_name(exc)
            return
        self._uncertain.discard(job.request_id)  # refusals are not recorded by the signer
        if isinstance(exc, SignerError) and exc.code is ErrorCode.VALIDITY_TOO_LONG:
            self._profiles_at = 0.0  # the profile's maximum changed: read it again
        report.failed[job.request_id] = failure_name(exc)
        log.warning("%s: refused: %s", job.label, exc)
        try:
            await self.source.fail(job, exc)
        except Exception as db_exc:
            log.error("%s: cannot record the failure: %s", job.label, db_exc)

    # -- CRLs and health ----------------------------------------------------------------------

    async def refresh_crls(self) -> dict[str, str]:
        """Fetch, verify and publish each configured issuer's CRL; one failure stays its own."""
        outcome: dict[str, str] = {}
        for name, path in self.config.crl.outputs.items():
            try:
                if name not in self._refreshers:
                    issuer = await self._issuer(name)
                    size = self.config.crl.chunk_bytes
                    self._refreshers[name] = CrlRefresher(self.lines.call, name, issuer, size)
                    if self.progress is not None:
                        self._refreshers[name].progress = self.progress(f"CRL of {name}")
                outcome[name] = await publish_crl(self._refreshers[name], path)
            except (SignerError, ClientFailure, OSError) as exc:  # OSError: cannot write it
                outcome[name] = f"failed: {exc}"
                log.error("operator: the CRL of %s was not published: %s", name, exc)
        return outcome

    async def _issuer(self, name: str) -> x509.Certificate:
        if name not in self._issuers:
            answer = await self.lines.call("list_issuers")
            self._issuers = {
                i["name"]: x509.load_der_x509_certificate(i["certificate"])
                for i in answer["issuers"]
            }
        if name not in self._issuers:
            raise SignerError(ErrorCode.UNKNOWN_ISSUER, f"the signer has no issuer {name!r}")
        return self._issuers[name]

    async def sync_audit(self) -> Alert | None:
        """Follow the signer's audit log on the web side; an alert if its history was
        rewritten (then never again until restarted: the operator must look)."""
        config = self.config.audit
        if config is None or self.audit_alert is not None:
            return self.audit_alert
        try:
            if self.audit is None:
                certificate = x509.load_pem_x509_certificate(config.certificate.read_bytes())
                self.audit = AuditMirror(config.directory, certificate, self.lines.call)
            report = await self.audit.sync()
            head_time = self.audit.head.timestamp if self.audit.head else 0
            if (
                config.sign_after is not None
                and report.signer_size > (report.head_size or 0)
                and time.time() - head_time > config.sign_after
            ):
                await self.lines.call("sign_tree_head")
                await self.audit.sync()
        except AuditAlert as exc:
            self.audit_alert = Alert("error", f"audit log: {exc.message}", "audit")
            log.error("operator: %s", self.audit_alert.text)
        except (SignerError, ClientFailure) as exc:
            log.warning("the audit log was not synced: %s", exc)
        return self.audit_alert

    async def check_health(self) -> list[Alert]:
        """Ask every line's signer for its health; log what needs an operator."""
        alerts: list[Alert] = [] if self.audit_alert is None else [self.audit_alert]
        for client, name in zip(self.lines.clients, self.lines.names, strict=True):
            try:
                timeout = min(self.config.timeout, HEALTH_TIMEOUT_S)
                report = await client.call("health", timeout=timeout)
            except (SignerError, Unreachable) as exc:
                alerts.append(unanswered(name, exc))
                self.monitor.health(name, None, str(exc))
                continue
            self.monitor.health(name, report)
            alerts += health_alerts(name, report, utcnow(), self.config.max_clock_skew_s)
        for alert in alerts:
            level = logging.ERROR if alert.level == "error" else logging.WARNING
            log.log(level, "operator: %s", alert.text)
        return alerts

    # -- loops --------------------------------------------------------------------------------

    async def run_once(self) -> RunReport:
        """One pass of everything: requests, CRLs, health (the demo and `--once`)."""
        requests = await self.process_pending()
        crls = await self.refresh_crls()
        await self.sync_audit()
        alerts = await self.check_health()
        await self.write_metrics()
        return RunReport(requests, crls, alerts)

    async def poll(self) -> PassReport:
        """One poll of the WebDB, then the metrics file (written after every poll)."""
        try:
            return await self.process_pending()
        finally:
            await self.write_metrics()

    async def write_metrics(self) -> None:
        """The metrics file (monitoring.metrics_file), atomically; its failure is only logged."""
        path = self.config.monitoring.metrics_file
        if path is None:
            return
        now = time.time()
        try:
            seen = Observations(
                lines=self.monitor.lines(self._client_errors()),
                crls=self.monitor.published(self.config.crl.outputs),
            )
            if isinstance(self.source, WebdbSource):
                try:
                    seen.rows = await self.source.row_stats(now)
                    seen.webdb_up = True
                except Exception as exc:
                    log.error("operator: the WebDB cannot be read for the metrics: %s", exc)
                    seen.webdb_up = False
            await asyncio.to_thread(write, path, seen, now)
        except Exception as exc:
            log.error("operator: the metrics file %s was not written: %s", path, exc)

    def _client_errors(self) -> dict[str, int]:
        return {
            name: client.stats.broken_frames_received + client.stats.timeouts
            for client, name in zip(self.lines.clients, self.lines.names, strict=True)
        }

    async def run_forever(self, stop: asyncio.Event) -> None:
        c = self.config
        await asyncio.gather(
            _every(c.poll_interval, self.poll, stop),
            _every(c.crl.interval, self.refresh_crls, stop),
            _every(c.health_interval, self.check_health, stop),
            _every(c.audit.interval if c.audit else 3600.0, self.sync_audit, stop),
        )


def _lines(config: WebdbClientConfig) -> SignerLines:
    clients = [
        SignerClient(
            line.settings(),
            max_in_flight=config.max_in_flight,
            timeout=config.timeout,
            attempts=config.attempts,
            name=f"webdb-line{number}",
        )
        for number, line in enumerate(config.lines, start=1)
    ]
    return SignerLines(clients, [line.device for line in config.lines])


async def _every(interval: float, job: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> None:
    """Run `job` every `interval` seconds until `stop`; a failure waits for the next turn."""
    while not stop.is_set():
        try:
            await job()
        except Exception:
            log.exception("%s failed; trying again in %.0f s", job.__name__, interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def _summary(result: dict[str, Any]) -> str:
    if "serial" in result:
        return f": serial {result['serial']}"
    if "fingerprint" in result:
        return f": key {result['fingerprint']}"
    return ""
