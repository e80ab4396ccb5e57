"""After a restore from an older copy: the rule that keeps CRL numbers from being used twice.

A repository restored from a backup (`signer cluster recover`, a standalone signer started on a
copy, a survivor forced standalone that missed the last commits of the others) lacks what was
committed after the copy was taken, CRLs included: its next CRL number may already have been
published, with other contents. Relying parties must never see two CRLs with one number, so
before the restored repository publishes anything, each issuer's next number is raised to

    last number in the copy + 1 + (now - that CRL's thisUpdate, in seconds) + MARGIN_SECONDS

because the signer's scheduler publishes at most one CRL of an issuer per second (a CRL is
never due in the second of the last one, signer/server/crl.py), so at most one number per
second can have been published since the copy's last CRL; the margin covers clocks that ran
ahead and CRLs made outside the scheduler (an import's first, one made on the request path).
An operator who knows the highest number published (from the CRL distribution point) may give
it instead, and `signer webdb-client --reconcile` raises the floor past the highest number the
WebDB side holds (the CRLs the world got came through it).

`crl_number_floors` decides (reads only) and returns `raise_crl_number` commands; the caller
commits them through its log or, offline, applies them (`apply_restore_rule`). The command
never lowers a floor, so running the rule twice is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping

from storage.commands import RaiseCrlNumber
from storage.repository import Repository
from storage.results import Result

MARGIN_SECONDS = 86_400  # clocks ahead, CRLs published by hand: a day's worth of numbers


def crl_number_floors(
    repository: Repository, now: int, published: Mapping[bytes, int] | None = None
) -> list[RaiseCrlNumber]:
    """For each issuer with a CRL in `repository`, the command raising its next CRL number
    past anything that can have been published since (`published`: issuer key id -> the
    highest number the operator knows was published, used instead of the estimate)."""
    commands = []
    given = dict(published or {})
    for issuer in repository.crl_issuers():
        last = repository.last_crl_number(issuer)
        if issuer in given:
            floor = max(last, given.pop(issuer)) + 1
            why = "restored from a copy: above the highest number published"
        else:
            since = repository.last_crl_time(issuer)
            floor = last + 1 + max(0, now - since) + MARGIN_SECONDS
            why = f"restored from a copy: one number per second since thisUpdate {since}, + margin"
        commands.append(RaiseCrlNumber(issuer=issuer, at_least=floor, reason=why))
    for issuer, number in sorted(given.items()):  # an issuer without a CRL in the copy
        commands.append(
            RaiseCrlNumber(issuer=issuer, at_least=number + 1, reason="given by the operator")
        )
    return commands


def apply_restore_rule(
    repository: Repository, now: int, published: Mapping[bytes, int] | None = None
) -> list[Result]:
    """Offline (nothing else writes): apply the rule's commands after the applied index."""
    commands = crl_number_floors(repository, now, published)
    start = repository.last_applied_index() + 1
    return repository.apply_batch([(start + i, c) for i, c in enumerate(commands)])
