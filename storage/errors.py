"""The repository's own exceptions. A bad *command* is never raised: `apply` rejects it as data
(storage/results.py). These are for a storage that cannot do its job and for callers that pass
arguments no repository could take; the signer host maps them to wire codes
(signer/server/errors.py)."""

from __future__ import annotations


class RepositoryError(Exception):
    """The repository cannot read or write: I/O, a full map, a refused schema or snapshot, a
    closed repository, damaged data. The message says what failed and what to do."""


class InvalidArgument(Exception):
    """A read or apply call with an argument no repository can take (a caller's bug): an apply
    index outside [1, 2**63), an issuer key id that is not 20 bytes, a serial out of range."""
