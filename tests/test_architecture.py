"""The import graph of ``memreg/`` keeps the layers of ARCHITECTURE.md: no cycles, no module importing
a layer above its own, feature packages independent of each other, no private name imported across
modules. Read from the source (``ast``), so it needs no imports of torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "memreg"

# Bottom to top; a module is in the layer of the longest prefix that names it. ARCHITECTURE.md lists the same.
LAYERS: list[tuple[str, ...]] = [
    ("memreg.errors", "memreg.keys", "memreg.argtypes", "memreg.config_schema", "memreg.log_tags", "memreg.metrics",
     "memreg.image_io", "memreg.image_ops", "memreg.prompt_io", "memreg.imagefolder", "memreg.sharding",
     "memreg.models", "memreg.encoding", "memreg.families"),
    ("memreg.score", "memreg.duplicates", "memreg.copy_detect", "memreg.generation", "memreg.monitor_config",
     "memreg.testing", "memreg.arch"),
    ("memreg.guards", "memreg.detect", "memreg.mitigate", "memreg.monitor", "memreg.audit", "memreg.attack",
     "memreg.report"),
    ("memreg.training",),
    ("memreg.demo",),
    ("memreg.commands", "memreg.cli"),
]
FEATURES = LAYERS[2]   # each is used by training, demo and commands, and uses none of the others


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _owner(name: str, prefixes) -> str | None:
    hits = [p for p in prefixes if name == p or name.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def layer_of(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if _owner(name, prefixes):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_architecture.py (add it, and to ARCHITECTURE.md)")


def _resolve(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name: str) -> list[tuple[str, list[str], int]]:
    """(imported memreg module, names taken from it, line) for every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("memreg")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("memreg"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, [], node.lineno) if sub in MODULES else (base, [a.name], node.lineno))
    return [(r, names, line) for t, names, line in out if (r := _resolve(t)) and r != name]


EDGES = {name: imports_of(name) for name in MODULES}


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    bad = [f"{m}:{line} imports {t} (layer {layer_of(t)} > {layer_of(m)})"
           for m, edges in EDGES.items() for t, _, line in edges if layer_of(t) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_feature_packages_do_not_import_each_other():
    bad = []
    for m, edges in EDGES.items():
        mine = _owner(m, FEATURES)
        for t, _, line in edges:
            theirs = _owner(t, FEATURES)
            if mine and theirs and mine != theirs:
                bad.append(f"{m}:{line} imports {t}")
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    bad = [f"{m}:{line} imports {t}.{n}" for m, edges in EDGES.items() for t, names, line in edges
           for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def _cycles() -> list[list[str]]:
    graph = {m: sorted({t for t, _, _ in edges}) for m, edges in EDGES.items()}
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles() == []


@pytest.mark.parametrize("source, expected", [
    ("import memreg.score\n", ["memreg.score"]),
    ("from memreg.score import make_scorer\n", ["memreg.score"]),
    ("from memreg import score\n", ["memreg.score"]),
])
def test_imports_are_read_as_written(tmp_path, monkeypatch, source, expected):
    """The reader itself: each import form resolves to the module it names."""
    fake = PKG / "guards" / "_architecture_probe.py"
    monkeypatch.setitem(MODULES, "memreg.guards._architecture_probe", fake)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else Path.read_bytes(self).decode())
    assert [t for t, _, _ in imports_of("memreg.guards._architecture_probe")] == expected
