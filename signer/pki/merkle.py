"""The Merkle tree of the audit log, exactly as RFC 9162 §2.1 (Certificate Transparency v2).

Leaf hash = SHA-256(0x00 || record), node hash = SHA-256(0x01 || left || right); a tree of n
leaves splits at k, the largest power of two below n. Proofs are built from a `Perfect` getter,
the hash of the perfect subtree (level, index) covering leaves [index * 2**level, (index + 1) *
2**level): the repository stores exactly those, so a proof is O(log n) lookups and an append one
hash per completed level. Pure code, shared by the signer, the WebDB client and the verifier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
Perfect = Callable[[int, int], bytes]  # (level, index) -> hash of that perfect subtree


class ProofError(ValueError):
    """A proof that does not verify, or a question without an answer (an index past the end)."""


def leaf_hash(record: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + record).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) = SHA-256()


def split(n: int) -> int:
    """k: the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_hash(perfect: Perfect, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range the RFC's recursion reaches (start aligned on a power of
    two at least as large as the range): its left parts are perfect subtrees."""
    size = end - start
    if size == 0:
        return EMPTY_ROOT
    if size & (size - 1) == 0:
        level = size.bit_length() - 1
        return perfect(level, start >> level)
    k = split(size)
    return node_hash(range_hash(perfect, start, start + k), range_hash(perfect, start + k, end))


def root(perfect: Perfect, size: int) -> bytes:
    return range_hash(perfect, 0, size)


def inclusion_proof(perfect: Perfect, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 §2.1.3.1, leaf to root."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of {size}")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = split(end - start)
        if index < start + k:
            path.append(range_hash(perfect, start + k, end))
            end = start + k
        else:
            path.append(range_hash(perfect, start, start + k))
            start += k
    path.reverse()
    return path


def consistency_proof(perfect: Perfect, first: int, second: int) -> list[bytes]:
    """PROOF(first, D[0:second]) of RFC 9162 §2.1.4.1 (empty when first is 0 or second)."""
    if not 0 <= first <= second:
        raise ProofError(f"no consistency proof from {first} to {second}")
    if first in (0, second):
        return []
    proof: list[bytes] = []
    start, end, whole = 0, second, True
    while True:
        m = first - start
        if m == end - start:
            if not whole:
                proof.append(range_hash(perfect, start, end))
            break
        k = split(end - start)
        if m <= k:
            proof.append(range_hash(perfect, start + k, end))
            end = start + k
        else:
            proof.append(range_hash(perfect, start, start + k))
            start, whole = start + k, False
    proof.reverse()
    return proof


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root_hash: bytes
) -> None:
    """RFC 9162 §2.1.3.2; raises ProofError unless `leaf` is at `index` of the tree `root_hash`."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or r != root_hash:
        raise ProofError(f"leaf {index} is not in the tree of {size} with this root")


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2; raises ProofError unless the tree `first_root` of `first` leaves is a
    prefix of the tree `second_root` of `second` leaves (its history was not rewritten)."""
    if not 0 <= first <= second:
        raise ProofError(f"a tree of {second} cannot extend a tree of {first}")
    if first == 0 or first == second:
        if proof:
            raise ProofError("a consistency proof where none is needed")
        if first == second and first_root != second_root:
            raise ProofError(f"two different roots for the same size {first}")
        return
    path = list(proof)
    if not path:
        raise ProofError("an empty consistency proof")
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != first_root or sr != second_root:
        raise ProofError(f"the tree of {second} does not extend the tree of {first}")


class Frontier:
    """The right edge of a growing tree: one hash per level, so appending a leaf costs one hash
    per completed level and the root is O(log n) — what a verifier keeps, not every node."""

    def __init__(self) -> None:
        self.size = 0
        self._edge: list[bytes] = []  # hashes of the perfect subtrees of the right edge, big first

    def append(self, leaf: bytes) -> None:
        node, size = leaf, self.size
        while size & 1:
            node = node_hash(self._edge.pop(), node)
            size >>= 1
        self._edge.append(node)
        self.size += 1

    def extend(self, records: Iterable[bytes]) -> None:
        for record in records:
            self.append(leaf_hash(record))

    def root(self) -> bytes:
        if not self._edge:
            return EMPTY_ROOT
        node = self._edge[-1]
        for left in reversed(self._edge[:-1]):
            node = node_hash(left, node)
        return node


def tree_root(records: Iterable[bytes]) -> bytes:
    """MTH of a whole list of records (a verifier's one pass)."""
    frontier = Frontier()
    frontier.extend(records)
    return frontier.root()
