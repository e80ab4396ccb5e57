"""The audit log's Merkle tree against RFC 9162's definitions and the CT reference vectors."""

from __future__ import annotations

import hashlib

import pytest

from signer.pki.merkle import (
    EMPTY_ROOT,
    Frontier,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

# The leaves and roots of the Certificate Transparency reference tests (RFC 6962's tree, kept
# by RFC 9162 §2.1): a second implementation must reproduce these.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1, written as the RFC writes it (the reference for everything else)."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*subproof(m, leaves[:k], whole), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def perfect_of(leaves: list[bytes]):  # type: ignore[no-untyped-def]
    def perfect(level: int, index: int) -> bytes:
        return mth(leaves[index << level : (index + 1) << level])

    return perfect


def test_ct_reference_roots() -> None:
    for n in range(1, len(CT_LEAVES) + 1):
        assert mth(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]
        assert tree_root(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]
        assert root(perfect_of(CT_LEAVES), n).hex() == CT_ROOTS[n - 1]
    assert tree_root([]) == EMPTY_ROOT


LEAVES = [b"record %d" % i for i in range(40)]


@pytest.mark.parametrize("n", range(1, 40))
def test_proofs_are_the_rfc_ones_and_verify(n: int) -> None:
    leaves, perfect = LEAVES[:n], perfect_of(LEAVES)
    head = mth(leaves)
    for m in range(n):
        proof = inclusion_proof(perfect, m, n)
        assert proof == path(m, leaves)
        verify_inclusion(m, n, leaf_hash(leaves[m]), proof, head)
        with pytest.raises(ProofError):
            verify_inclusion(m, n, leaf_hash(b"another record"), proof, head)
        if n > 1:
            with pytest.raises(ProofError):
                verify_inclusion((m + 1) % n, n, leaf_hash(leaves[m]), proof, head)
    for m in range(1, n + 1):
        proof = consistency_proof(perfect, m, n)
        assert proof == ([] if m == n else subproof(m, leaves, True))
        verify_consistency(m, n, mth(leaves[:m]), head, proof)
        if m < n:
            forged = mth([b"rewritten", *leaves[1:m]])
            with pytest.raises(ProofError):
                verify_consistency(m, n, forged, head, proof)
            with pytest.raises(ProofError):
                verify_consistency(m, n, mth(leaves[:m]), head, proof[:-1])


def test_frontier_grows_one_leaf_at_a_time() -> None:
    frontier = Frontier()
    for n, record in enumerate(LEAVES, start=1):
        frontier.append(leaf_hash(record))
        assert frontier.root() == mth(LEAVES[:n])


def test_questions_without_answers() -> None:
    perfect = perfect_of(LEAVES)
    with pytest.raises(ProofError):
        inclusion_proof(perfect, 5, 5)
    with pytest.raises(ProofError):
        consistency_proof(perfect, 6, 5)
    with pytest.raises(ProofError):
        verify_consistency(3, 3, mth(LEAVES[:3]), mth(LEAVES[:2]), [])
    with pytest.raises(ProofError):
        verify_inclusion(0, 1, leaf_hash(LEAVES[0]), [b"x" * 32], leaf_hash(LEAVES[0]))
