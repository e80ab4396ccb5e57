"""The layers of docs/architecture.md, enforced: imports go one way, and never in a circle.

Read from the source (every `import`, also inside functions; `if TYPE_CHECKING:` blocks are
annotations only and do not count), so a new module is checked the day it appears.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("signer", "storage", "replication")

CORE = ("signer.errors", "signer.clock", "signer.wire", "signer.pki", "signer.__init__")
LINK = (*CORE, "signer.link")
SHARED = (*LINK, "signer.config")
# layer (module prefix) -> what it may import from this project (prefixes)
ALLOWED: dict[str, tuple[str, ...]] = {
    "signer.__init__": CORE,
    "signer.errors": CORE,
    "signer.clock": CORE,
    "signer.wire": CORE,
    "signer.pki": CORE,
    "signer.link": LINK,
    "signer.config": SHARED,
    "storage": ("storage",),
    "replication": ("replication",),
    "signer.server": (*SHARED, "signer.server", "storage", "replication"),
    "signer.client": (*SHARED, "signer.client"),
    "signer.tools": (*SHARED, "signer.server", "signer.client", "signer.tools", "storage",
                     "replication"),
    "signer.cli": ("signer", "storage", "replication"),
    "signer.__main__": ("signer.cli",),
}  # fmt: skip
# third-party modules a layer must never load (I/O, or what the other host does not install)
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "signer.errors": ("asyncio", "serial", "serial_asyncio", "lmdb", "pysyncobj", "pkcs11"),
    "signer.wire": ("asyncio", "serial", "serial_asyncio", "lmdb", "pysyncobj", "pkcs11"),
    "signer.pki": ("asyncio", "serial", "serial_asyncio", "lmdb", "pysyncobj", "pkcs11", "pgpy"),
    "signer.client": ("lmdb", "pysyncobj", "pkcs11", "pgpy"),
    "storage": ("pysyncobj", "pkcs11", "serial", "cryptography"),
    # replication seals its link (AES-GCM, HKDF) but never touches certificates or keys
    "replication": (
        "lmdb",
        "pkcs11",
        "serial",
        "cryptography.x509",
        "cryptography.hazmat.primitives.asymmetric",
        "cryptography.hazmat.primitives.serialization",
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        return ".".join(parts[:-1]) + ".__init__"
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _type_checking_block(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Name | ast.Attribute)
        and ast.unparse(node.test).endswith("TYPE_CHECKING")
    )


def imports_of(path: Path, name: str) -> Iterator[str]:
    """Every module named by an import statement of the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            skip.update(id(child) for child in ast.walk(node))
    package = name.rsplit(".", 1)[0] if not name.endswith(".__init__") else name[:-9]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def project_target(imported: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (a package resolves to its __init__)."""
    if imported in modules:
        return imported
    if f"{imported}.__init__" in modules:
        return f"{imported}.__init__"
    return None


def layer_of(name: str) -> str:
    return max((layer for layer in ALLOWED if _under(name, layer)), key=len)


def _under(name: str, prefix: str) -> bool:
    bare = prefix.removesuffix(".__init__")
    return name in (prefix, bare) or name.startswith(prefix + ".")


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {project_target(i, modules) for i in imports_of(path, name)}
        edges[name] = {t for t in targets if t is not None and t != name}
    return edges


def test_every_module_has_a_layer() -> None:
    for name in all_modules():
        assert any(_under(name, layer) for layer in ALLOWED), f"{name} belongs to no layer"


def test_imports_go_one_way() -> None:
    wrong = []
    for source, targets in graph().items():
        allowed = ALLOWED[layer_of(source)]
        for target in sorted(targets):
            if target == "signer.__init__" or any(_under(target, a) for a in allowed):
                continue
            wrong.append(f"{source} -> {target}")
    assert not wrong, "imports against the layers (docs/architecture.md):\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = [component for component in _components(edges) if len(component) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_layers_never_load_what_they_must_not() -> None:
    """Third-party modules, also reached through the project's own imports (transitively)."""
    modules, edges = all_modules(), graph()
    wrong = []
    for name in modules:
        layers = sorted(FORBIDDEN_THIRD_PARTY, key=len, reverse=True)
        banned = next((FORBIDDEN_THIRD_PARTY[x] for x in layers if _under(name, x)), None)
        if banned is None:
            continue
        for reached in _closure(name, edges):
            for imported in imports_of(modules[reached], reached):
                for ban in banned:  # a package, or a part of one
                    if imported == ban or imported.startswith(ban + "."):
                        wrong.append(f"{name} loads {ban} (via {reached})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def _closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_webdb_host_runs_without_lmdb_pysyncobj_and_pkcs11() -> None:
    """Import every WebDB-host module and the command line's client verbs with those libraries
    made unimportable: what the WebDB side installs is enough."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'lmdb', 'pysyncobj', 'pkcs11', 'pgpy'}:\n"
        "            raise ImportError(f'{name} is not installed on the WebDB host')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    client_modules = sorted(n for n in all_modules() if _under(n, "signer.client"))
    imports = "".join(f"import {n.removesuffix('.__init__')}\n" for n in client_modules)
    run = (
        "from signer.cli import main\n"
        "for verb in (['client', '--help'], ['webdb-client', '--help']):\n"
        "    try:\n"
        "        main(verb)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (verb, exc.code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocker + imports + run],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
