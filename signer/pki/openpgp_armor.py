"""OpenPGP ASCII armor (RFC 4880 §6), apart from the OpenPGP library: the WebDB client writes
armored keys and must not need PGPy for it."""

from __future__ import annotations

import base64


def crc24(data: bytes) -> int:
    """RFC 4880 §6.1."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def armor(data: bytes) -> bytes:
    """ASCII armor (RFC 4880 §6.2) of a public key block."""
    text = base64.b64encode(data).decode()
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    checksum = base64.b64encode(crc24(data).to_bytes(3, "big")).decode()
    block = ["-----BEGIN PGP PUBLIC KEY BLOCK-----", "", *lines, f"={checksum}"]
    return ("\n".join([*block, "-----END PGP PUBLIC KEY BLOCK-----"]) + "\n").encode()
