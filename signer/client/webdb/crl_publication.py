"""Publishing each issuer's CRL where the web server serves it: fetched as cheaply as the CRL
already published allows (`CrlRefresher`: deltas, resumable chunked transfers), verified again
here, never older than the published one, and replaced atomically."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from cryptography import x509

from signer.client.crl_refresh import CrlRefresher, crl_number_of, held_crl, verify_crl
from signer.client.files import write_atomically
from signer.clock import utcnow

log = logging.getLogger(__name__)


async def publish_crl(refresher: CrlRefresher, path: Path) -> str:
    """Refresh one issuer's CRL and publish it at `path`; what happened, for the operator.
    A CRL that does not verify raises `BadCrl` and the published one stays."""
    have = held_crl(path, refresher.certificate)
    refreshed = await refresher.refresh(have)
    if refreshed.kind == "unchanged" and have is not None:
        return "unchanged"
    number = verify_crl(refreshed.der, refresher.certificate, not_older_than=crl_number_of(have))
    await asyncio.to_thread(write_atomically, path, refreshed.der)
    crl = x509.load_der_x509_crl(refreshed.der)
    log.info(
        "published CRL %s of %s (%s, %d entries, %d bytes over the line) at %s",
        number,
        refresher.issuer,
        refreshed.kind,
        len(crl),
        refreshed.received,
        path,
    )
    next_update = crl.next_update_utc
    if next_update is not None and next_update < utcnow():
        log.error(
            "operator: the CRL of %s expired at %s (nextUpdate)", refresher.issuer, next_update
        )
    return f"published {number} ({refreshed.kind})"
