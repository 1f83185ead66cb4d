"""Imports point only downward through the layers of DESIGN.md, and runtime/worker stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cluster"

# module prefix -> layer number (longest prefix wins)
LAYERS = {
    "cluster": 0,  # the package's own __init__
    "cluster.errors": 1,
    "cluster.wire": 1,
    "cluster.transforms": 1,
    "cluster.key_exchange": 1,
    "cluster.ike": 2,
    "cluster.ikev1": 2,
    "cluster.esp": 2,
    "cluster.store": 3,
    "cluster.metrics": 3,
    "cluster.config": 3,
    "cluster.relay": 3,
    "cluster.rendezvous": 3,
    "cluster.relay_socket": 3,
    "cluster.ip_options": 3,
    "cluster.runtime": 4,
    "cluster.worker": 4,
    "cluster.cli": 5,
    "cluster.ops": 5,  # the operations commands of the CLI
    "cluster.control": 5,  # a running node's control socket (ops' way to a single node)
    "cluster.single_node": 5,
    "cluster.roles": 5,
    "cluster.__main__": 5,
}
SANS_IO = ("cluster.ike", "cluster.ikev1", "cluster.esp")
FORBIDDEN_IN_SANS_IO = {"trio", "socket", "time", "asyncio", "select", "selectors"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer_of(module: str) -> tuple[str, int]:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return best, LAYERS[best]


def _imports(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_downward(path: Path) -> None:
    module = _module_name(path)
    own_prefix, own_layer = _layer_of(module)
    for target in _imports(path, module):
        if target.split(".")[0] != "cluster":
            if module.startswith(SANS_IO):
                assert target.split(".")[0] not in FORBIDDEN_IN_SANS_IO, (
                    f"{module} is sans-IO but imports {target}")
            continue
        prefix, layer = _layer_of(target)
        if prefix == own_prefix or target == "cluster":
            continue
        assert layer <= own_layer, f"{module} (layer {own_layer}) imports {target} (layer {layer})"
        # side by side within a layer is allowed, except between these pairs
        assert {own_prefix, prefix} != {"cluster.runtime", "cluster.worker"}, module
        sans_io = {own_prefix, prefix} <= set(SANS_IO)
        assert not sans_io, f"{module} imports another sans-IO core: {target}"


def test_every_module_has_a_layer() -> None:
    for path in MODULES:
        prefix, _ = _layer_of(_module_name(path))
        assert prefix != "cluster" or path.parent == PACKAGE, path
