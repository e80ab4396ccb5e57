"""The runbook table of docs/operations.md: every procedure the operations need is there, has
its commands in the doc, and names a test function that exists (the test walks them)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
PROCEDURES = {
    "First install",
    "Ceremony",
    "Start the pair",
    "Replace a failed signer",
    "Add and remove a signer",
    "Force-standalone and rejoin",
    "Backup and restore",
    "CA certificate nearing expiry",
    "CRL stale",
    "HSM PIN locked",
    "Line unplugged",
}
ROW = re.compile(r"^\| (?P<name>[^|]+?) \| `(?P<file>tests/[\w/]+\.py)::(?P<test>\w+)` \|$")


def section(text: str, title: str, level: str = "##") -> str:
    """The body of a section (up to the next heading of the same or a higher level)."""
    start = text.index(f"\n{level} {title}\n") + len(level) + len(title) + 3
    ends = [text.find(f"\n{mark} ", start) for mark in ("#", "##", "###")[: len(level)]]
    return text[start : min([e for e in ends if e != -1], default=len(text))]


def table() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in section(DOC.read_text(), "Runbooks").splitlines():
        match = ROW.match(line)
        if match:
            rows[match["name"]] = (match["file"], match["test"])
    return rows


def test_every_procedure_has_a_row() -> None:
    assert set(table()) == PROCEDURES


def test_every_named_test_exists() -> None:
    for name, (file, test) in table().items():
        path = ROOT / file
        assert path.is_file(), f"{name}: {file} does not exist"
        tree = ast.parse(path.read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert test in functions, f"{name}: no function {test} in {file}"


def test_every_procedure_lists_its_commands() -> None:
    text = section(DOC.read_text(), "Runbooks")
    for name in table():
        body = section("\n" + text, name, "###")
        commands = re.findall(r"^(?:root|a|b|c|web)# (\S+)", body, flags=re.MULTILINE)
        assert commands, f"{name}: no `host# command` lines"
