"""Package structure: no import cycle anywhere in harvest/, and no private attribute reached from outside.

Both checks read the source with ast (nothing is imported), so they see imports inside functions and
under `if TYPE_CHECKING:` too: a cycle hidden there still couples the modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import harvest

PKG = Path(harvest.__file__).parent  # .../harvest
READER = PKG / "store" / "reader.py"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The harvest modules `name` imports, anywhere in the file; `from pkg import mod` counts as mod."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring the nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_graph_sees_the_store_layers():
    g = import_graph()
    assert "harvest.store.reader" in g["harvest.store.chunks"]
    assert "harvest.store.stats" in g["harvest.store.loader"]
    assert {"harvest.store.loader", "harvest.store.stats", "harvest.store.reader"} <= g["harvest.store.api"]
    assert "harvest.store.api" in g["harvest.data"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_reader_imports_nothing_built_on_it():
    above = {f"harvest.store.{m}" for m in ("chunks", "stats", "loader", "api")}
    assert not import_graph()["harvest.store.reader"] & above
    for m in ("chunks", "stats", "loader"):
        assert "harvest.store.api" not in import_graph()[f"harvest.store.{m}"]


def private_accesses(source: str, label: str) -> list[str]:
    """`x._name` (not dunder) on anything but self/cls, as "label:line x._name"."""
    out = []
    for node in ast.walk(ast.parse(source, label)):
        if not isinstance(node, ast.Attribute):
            continue
        a = node.attr
        if not a.startswith("_") or (a.startswith("__") and a.endswith("__")):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue  # a class's own private state
        out.append(f"{label}:{node.lineno} {ast.unparse(node)}")
    return out


def test_private_check_flags_what_it_should():
    src = "store._tokens('x')\nself.store._array(0, 'h')\nself._x\ncls._y\nx.__dict__\nf()._z\n"
    assert sorted(private_accesses(src, "f")) == ["f:1 store._tokens", "f:2 self.store._array", "f:6 f()._z"]


def test_no_private_attribute_access_from_outside():
    # Anywhere in harvest/ but reader.py (whose ActivationView is the reader's own), nothing private is
    # reached on another object: the modules above the reader use its public methods.
    found = []
    for p in sorted(PKG.rglob("*.py")):
        if p != READER:
            found += private_accesses(p.read_text(), str(p.relative_to(PKG.parent)))
    assert found == []
