"""The WebDB client: poll the web application's database, drive the signer, write the results
back where the web application reads them; publish the CRLs and watch the signers' health.

Why it is built this way (docs/webdb-client.md has the whole story):
- Request ids derive from table and row (`emailcerts:12:sign`), and the signer records writes
  under their id: a crash between sending and writing back never issues twice, and after a
  restart `request_status` collects the earlier outcome for a few bytes instead of a CSR.
- A failing row gets `warning = warning + 1` and never blocks the others; trouble on the signer's
  side (line down, no quorum, HSM away) is not the row's fault and costs it nothing.
- Two lines, one `SignerClient` each: a request that times out on one goes to the other with the
  same id, which is safe because ids are idempotent on the (replicated) repository.

Where things are:
  config            the configuration models (`WebdbClientConfig` and its sections)
  database          `Database`, SQLite or MariaDB/MySQL (`DIALECTS`), `db_time`
  rows              rows -> requests: tables, subjects and SANs, profiles, validity (pure)
  source            `RequestSource`, `Job`, `WebdbSource` (reads rows and CSRs, writes back)
  failover          `SignerLines`: one client per serial line, failover with the same id
  crl_publication   `publish_crl`: fetch, verify and atomically publish an issuer's CRL
  health            `Alert`, `health_alerts`: what a signer's health report asks of an operator
  client            `WebdbClient`: the loop (`run_once`, `run_forever`), `PassReport`, `RunReport`

The demo's and the tests' database helpers (schema, rows, CSRs) are in
signer/tools/webdb_fixture.py.
"""

from signer.client.crl_refresh import BadCrl, verify_crl
from signer.client.files import write_atomically
from signer.client.webdb.client import (
    TRANSIENT,
    BeforeWriteBack,
    PassReport,
    RunReport,
    WebdbClient,
    failure_name,
    is_transient,
)
from signer.client.webdb.config import (
    CrlConfig,
    DatabaseConfig,
    ValidityConfig,
    WebdbClientConfig,
)
from signer.client.webdb.crl_publication import publish_crl
from signer.client.webdb.database import DIALECTS, Database, Dialect, db_time
from signer.client.webdb.failover import SignerLines
from signer.client.webdb.health import Alert, health_alerts
from signer.client.webdb.rows import (
    GPG_PREFIX,
    ISSUER_BY_ROOTCERT,
    REVOCATION_SENTINEL,
    X509_TABLES,
    XMPP_OID,
    RowError,
    Table,
    X509Plan,
    armor_openpgp,
    crt_name,
    openpgp_uids,
    plan_x509,
    profile_for,
    spkac_subject,
    split_subject,
    validity_days,
)
from signer.client.webdb.source import Failure, Job, RequestSource, WebdbSource

__all__ = [
    "DIALECTS",
    "GPG_PREFIX",
    "ISSUER_BY_ROOTCERT",
    "REVOCATION_SENTINEL",
    "TRANSIENT",
    "X509_TABLES",
    "XMPP_OID",
    "Alert",
    "BadCrl",
    "BeforeWriteBack",
    "CrlConfig",
    "Database",
    "DatabaseConfig",
    "Dialect",
    "Failure",
    "Job",
    "PassReport",
    "RequestSource",
    "RowError",
    "RunReport",
    "SignerLines",
    "Table",
    "ValidityConfig",
    "WebdbClient",
    "WebdbClientConfig",
    "WebdbSource",
    "X509Plan",
    "armor_openpgp",
    "crt_name",
    "db_time",
    "failure_name",
    "health_alerts",
    "is_transient",
    "openpgp_uids",
    "plan_x509",
    "profile_for",
    "publish_crl",
    "spkac_subject",
    "split_subject",
    "validity_days",
    "verify_crl",
    "write_atomically",
]
