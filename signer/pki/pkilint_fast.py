"""pkilint, faster, with the same findings in the same order: a walk of the validator tree
that asks only the validators that can match, and a memory of decoded extension values.

The walk. pkilint's `ValidatorContainer` asks every validator of a container whether it
matches every node below it: ~4,000 `NodeVisitor.match` calls a certificate, a third of the
lint's time, nearly all of them answered by the node's path and ASN.1 class alone. This walk
answers that static part once per (path, class) and keeps it, so a certificate of a known shape
asks only the validators that can match; a validator whose match also looks at the node's value
(a predicate, a supertype, or its own `match`) is still asked on every node it may match.

The decoded values. About half of a lint is pyasn1 decoding the certificate's inner DER values
(extension values, algorithm parameters) into objects, and most of them are the same bytes in
every certificate of a profile (its CRL distribution point, policies, AIA, key usages...).
Decoding is a pure function of the bytes and the ASN.1 type, so a small bounded memory of
(type, bytes) → decoded object gives the same tree without decoding again.

Every pkilint detail this relies on is named in `CONTRACT` and checked by
`tests/unit/test_pkilint_fast.py`; if a pkilint release changes them, `speed_up` leaves pkilint
as it is (its own, slower code) and the test says which assumption broke.
"""

from __future__ import annotations

import logging
import re
import threading
import types
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

MAX_SHAPES = 4096  # (path, class) keys kept per container: bounded whatever the input
MAX_DECODED = 512  # decoded values kept (each from at most MAX_DECODED_BYTES of DER)
MAX_DECODED_BYTES = 1024  # larger values (the whole certificate, long SANs) are decoded each time
_ALWAYS_ASK = object()  # marker: the validator's match must run on the node itself

# pkilint names this module reads or replaces; the contract test checks each one.
CONTRACT = (
    "validation.ValidatorContainer._validate_rec(node, results)",
    "validation.ValidatorContainer.validators",
    "document.NodeVisitor._path, _path_re, _pdu_class, _pdu_supertype, _predicate",
    "document.PDUNode.path, pdu, children",
    "document.decode_der(substrate, asn1Spec=...), a pure function of its arguments",
    "every match() override starts with super().match(node)",
)


def contract_holds() -> bool:
    """Whether this pkilint still has what the fast walk assumes."""
    from pkilint import document, validation

    probe = document.NodeVisitor(path="x")
    visitor_fields = ("_path", "_path_re", "_pdu_class", "_pdu_supertype", "_predicate")
    return (
        callable(getattr(document, "decode_der", None))
        and all(hasattr(probe, name) for name in visitor_fields)
        and callable(getattr(validation.ValidatorContainer, "_validate_rec", None))
        and issubclass(validation.ValidatorContainer, document.NodeVisitor)
    )


def _own_match(validator: Any) -> bool:
    from pkilint import document

    return type(validator).match is not document.NodeVisitor.match


def _static_check(validator: Any) -> Any:
    """What `match` depends on besides path and class: `None` (nothing, the static answer is
    the answer) or `_ALWAYS_ASK`."""
    dynamic = validator._pdu_supertype is not None or validator._predicate is not None
    return _ALWAYS_ASK if _own_match(validator) or dynamic else None


def _may_match(validator: Any, path: str, pdu_class: type) -> bool:
    """NodeVisitor.match's path and class tests, which every `match` in pkilint runs first
    (its own `match` returns `super().match(node) and ...`; the contract test reads them)."""
    wanted_path: str | None = validator._path
    if wanted_path is not None and wanted_path != path:
        return False
    path_re: re.Pattern[str] | None = validator._path_re
    if path_re is not None and path_re.match(path) is None:
        return False
    wanted_class: type | None = validator._pdu_class
    return wanted_class is None or issubclass(pdu_class, wanted_class)


def _fast_validate_rec(self: Any, node: Any, results: list[Any]) -> None:
    """`ValidatorContainer._validate_rec`, asking only the validators that can match."""
    key = (node.path, type(node.pdu))
    shapes: dict[tuple[str, type], list[tuple[Any, Any]]] = self._cacert_shapes
    candidates = shapes.get(key)
    if candidates is None:
        if len(shapes) >= MAX_SHAPES:
            shapes.clear()
        candidates = [
            (v, _static_check(v)) for v in self.validators if _may_match(v, key[0], key[1])
        ]
        shapes[key] = candidates
    for validator, check in candidates:
        if check is _ALWAYS_ASK and not validator.match(node):
            continue
        result = validator.validate_wrapper(node)
        if isinstance(result, list):
            results += result
        else:
            results.append(result)
    for child in node.children.values():
        self._validate_rec(child, results)


class _DecodeMemory:
    """`decode_der` remembering small values it decoded (least recently used dropped)."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.kept: OrderedDict[tuple[int, bytes], tuple[Any, Any, Any]] = OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, substrate: Any, asn1Spec: Any = None) -> Any:
        if len(substrate) > MAX_DECODED_BYTES:
            return self.decode(substrate, asn1Spec=asn1Spec)
        data = bytes(substrate)
        key = (id(asn1Spec), data)
        with self.lock:
            found = self.kept.get(key)
            if found is not None and found[0] is asn1Spec:
                self.kept.move_to_end(key)
                return found[1], found[2]
        decoded, rest = self.decode(substrate, asn1Spec=asn1Spec)
        with self.lock:
            self.kept[key] = (asn1Spec, decoded, rest)  # the spec kept: its id stays its own
            while len(self.kept) > MAX_DECODED:
                self.kept.popitem(last=False)
        return decoded, rest


def remember_decoded_values() -> None:
    """Give pkilint's document decoder the memory (once per process)."""
    from pkilint import document

    if not isinstance(document.decode_der, _DecodeMemory):
        document.decode_der = _DecodeMemory(document.decode_der)


def speed_up(container: Any) -> Any:
    """Give this validator tree (built by us, never shared with other code) the fast walk, and
    pkilint the decoded-value memory; returns the container. Leaves pkilint as it is when the
    contract does not hold."""
    from pkilint import validation

    if not contract_holds():
        log.warning("pkilint changed: the lint runs pkilint's own (slower) code")
        return container
    remember_decoded_values()
    pending = [container]
    while pending:
        current = pending.pop()
        if isinstance(current, validation.ValidatorContainer) and not hasattr(
            current, "_cacert_shapes"
        ):
            current._cacert_shapes = {}
            current._validate_rec = types.MethodType(_fast_validate_rec, current)
            pending.extend(current.validators)
    return container
