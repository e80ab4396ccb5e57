"""The Public Suffix List: which names are registries (`co.uk`, `github.io`), never owners.

A wildcard directly under a public suffix (`*.co.uk`) would cover every registrant's names, so
x509_signing.py refuses it (CA/B Forum BR 3.2.2.6). The list changes every few weeks and the
signer host is offline: the `publicsuffixlist` package ships a snapshot, and the operator can
point the signer at a newer `public_suffix_list.dat` (signer.yaml `public_suffix_list`,
docs/operations.md) without a code change. Parsing only: the caller reads the file.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import publicsuffixlist
from publicsuffixlist import PublicSuffixList

_VERSION_RE = re.compile(r"^// (VERSION|COMMIT): *(\S+)", re.MULTILINE)


class PublicSuffixes:
    """One edition of the list (ICANN and private sections, wildcard and exception rules)."""

    def __init__(self, psl: PublicSuffixList, source: str, version: str | None):
        self._psl = psl
        self.source = source
        self.version = version  # the list's `// VERSION:` header, when it has one

    @classmethod
    def parse(cls, text: str, source: str = "<memory>") -> PublicSuffixes:
        """A list in the publicsuffix.org format (`public_suffix_list.dat`)."""
        found = dict(_VERSION_RE.findall(text))
        psl = PublicSuffixList(text.splitlines(), accept_unknown=True)
        return cls(psl, source, found.get("VERSION") or found.get("COMMIT"))

    def is_public(self, name: str) -> bool:
        """Whether `name` (lower-case A-labels) is itself a public suffix. Unknown top-level
        domains count as public (the list's implicit `*` rule)."""
        return bool(self._psl.is_public(name.lower()))


@functools.cache
def shipped() -> PublicSuffixes:
    """The snapshot that comes with the installed publicsuffixlist package (read once)."""
    path = Path(publicsuffixlist.__file__).with_name("public_suffix_list.dat")
    return PublicSuffixes.parse(path.read_text(encoding="utf-8"), str(path))
