"""A test CA made by the real key ceremony on a SoftHSM2 token: the shape most tests need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from signer.tools.ceremony import run_ceremony


def make_ceremony_ca(
    token: Any,
    base: Path,
    *,
    root_kind: str = "rsa-2048",
    class3_kind: str = "ec-p256",
    openpgp_kind: str | None = None,
    audit: bool = True,
) -> Path:
    """Class 1 root (key `root`) and Class 3 subordinate (key `class3`), written to base/ca/
    as class1.crt and class3.crt; with `openpgp_kind`, also the OpenPGP key `openpgp`; the
    audit log's key `audit` (ca/audit.crt, issued by class 3) unless audit=False."""
    certificates = [
        {"name": name, "key": key, "issuer": issuer, "validity_days": days,
         "path_length": path_length, "subject": [["O", "Test CA"], ["CN", cn]],
         "crl": {"next_update_days": 7}}
        for name, key, issuer, days, path_length, cn in (
            ("class1", "root", "self", 7000, 1, "Test Class 1 Root"),
            ("class3", "class3", "class1", 3000, 0, "Test Class 3"),
        )
    ]  # fmt: skip
    ceremony: dict[str, Any] = {
        "hsm": {
            "module": token.store.module,
            "token_label": token.label,
            "pin_file": str(token.pin_file),
        },
        "output_dir": "ca",
        "keys": [{"label": "root", "kind": root_kind}, {"label": "class3", "kind": class3_kind}],
        "certificates": certificates,
    }
    if openpgp_kind is not None:
        ceremony["openpgp"] = {"label": "openpgp", "kind": openpgp_kind}
    if audit:
        ceremony["audit"] = {"label": "audit", "kind": "ec-p256", "issuer": "class3"}
    (base / "ceremony.yaml").write_text(yaml.safe_dump(ceremony))
    run_ceremony(base / "ceremony.yaml", progress=lambda *_: None)
    return base
