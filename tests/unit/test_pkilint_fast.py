"""The pkilint details signer/pki/pkilint_fast.py relies on (its CONTRACT), one check each, so
that a pkilint upgrade fails here instead of changing what the lint finds, and its memories stay
bounded. That the fast lint finds exactly what pkilint's own code finds is tested on every
profile of both sets in test_profile_sets.py."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from typing import Any

import pkilint
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from pkilint import document, validation

from signer.pki import lint, pkilint_fast


def test_the_contract_holds_for_the_installed_pkilint() -> None:
    assert pkilint_fast.contract_holds()
    visitor = document.NodeVisitor(path="a.b", path_re=re.compile("a"), pdu_class=int)
    assert (visitor._path, visitor._path_re.pattern, visitor._pdu_class) == ("a.b", "a", int)
    assert (visitor._pdu_supertype, visitor._predicate) == (None, None)
    parameters = list(inspect.signature(validation.ValidatorContainer._validate_rec).parameters)
    assert parameters == ["self", "node", "results"]
    assert "validators" in inspect.signature(validation.ValidatorContainer.__init__).parameters


def _subclasses(cls: type) -> set[type]:
    found: set[type] = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_every_match_override_in_pkilint_starts_with_the_static_match() -> None:
    """The walk skips a validator whose path or class cannot match; that is only right while
    every `match` override is `super().match(node) and ...` (or returns early without it)."""
    for module in pkgutil.walk_packages(pkilint.__path__, "pkilint."):
        if ".bin" in module.name or module.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError:  # an optional extra (the REST server's fastapi)
            continue
    overrides = [c for c in _subclasses(document.NodeVisitor) if "match" in vars(c)]
    assert len(overrides) >= 5
    for cls in overrides:
        source = inspect.getsource(vars(cls)["match"])
        body = [line.strip() for line in source.splitlines()[1:] if line.strip()]
        first = " ".join(body[:3])
        assert first.startswith(("if not super().match(node):", "return super().match(node)",
                                 "return ( super().match(node)", "# ")), (cls, first)  # fmt: skip
        assert "super().match(node)" in source, cls


def test_the_walk_falls_back_to_pkilint_when_the_contract_breaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pkilint_fast, "contract_holds", lambda: False)
    stock = lint._stock_validator("pkix", None)
    assert pkilint_fast.speed_up(stock) is stock
    assert "_validate_rec" not in vars(stock)


def test_the_decode_contract() -> None:
    """decode_der(substrate, asn1Spec=spec) -> (decoded, rest) is what pkilint's decoder calls."""
    from pyasn1.type import univ

    decode = getattr(document.decode_der, "decode", document.decode_der)
    decoded, rest = decode(b"\x02\x01\x05", asn1Spec=univ.Integer())
    assert (int(decoded), rest) == (5, b"")
    source = inspect.getsource(document.decode_substrate)
    assert "decode_der(substrate, asn1Spec=pdu_instance)" in source


def test_the_decode_memory_is_bounded_and_keyed_by_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyasn1.type import univ

    calls: list[bytes] = []

    def decode(substrate: bytes, asn1Spec: Any = None) -> Any:
        calls.append(substrate)
        return asn1Spec.clone(len(calls)), b""

    monkeypatch.setattr(pkilint_fast, "MAX_DECODED", 4)
    memory = pkilint_fast._DecodeMemory(decode)
    integer, other_integer = univ.Integer(), univ.Integer()
    assert memory(b"\x02\x01\x01", asn1Spec=integer) == memory(b"\x02\x01\x01", asn1Spec=integer)
    assert len(calls) == 1  # remembered
    memory(b"\x02\x01\x01", asn1Spec=other_integer)
    assert len(calls) == 2  # another type: decoded again
    for n in range(10):
        memory(bytes([2, 1, n + 2]), asn1Spec=integer)
    assert len(memory.kept) == 4
    memory(b"\x04" + b"\x00" * (pkilint_fast.MAX_DECODED_BYTES + 1), asn1Spec=univ.OctetString())
    assert len(memory.kept) == 4  # big values are never kept


def test_the_shape_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from x509_helpers import make_ca, rsa_key

    monkeypatch.setattr(pkilint_fast, "MAX_SHAPES", 8)
    tree: Any = pkilint_fast.speed_up(lint._stock_validator("pkix", None))
    der = make_ca("Bounded", rsa_key(2048)).cert.public_bytes(Encoding.DER)
    findings = lint._lint(der, "ca", lambda _kind, _variant: tree)
    assert findings == lint._lint(der, "ca", lint._stock_validator)
    assert 0 < len(tree._cacert_shapes) <= 8
