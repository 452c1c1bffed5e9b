"""The package's layering: every module imports, lower layers never import upper ones, and no cycles.

Reads every import statement with ``ast`` -- module-level and function-local alike, so a local import can
no longer hide a cycle -- and checks it against ``LAYERS``. A new module or room must be placed there.
Rooms of the same layer may import each other, but never in a cycle (between rooms or between modules).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "fedsafe"

# Lowest first. A room is a top-level module or subpackage of fedsafe.
LAYERS: list[set[str]] = [
    {"errors"},
    {"io", "assets", "statefile"},
    # pure tensor math over client updates: the registries ``config`` validates rule and attack names against
    {"aggregators", "attack"},
    {"config", "data"},
    {"rundir"},
    {"models", "lm", "runtime", "llm"},
    {"fl", "eval"},
    # the paper's attack-data pipeline (an LLM writes harmful pairs, the refusal judge filters them)
    {"defense", "report", "attack_data"},
    {"pipeline"},
    {"flower", "cli", "demo", "sweep", "forensic_pass"},
]
# Rooms of one layer that must not know each other at all (the engine never evaluates or defends).
INDEPENDENT = [("fl", "eval")]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / PKG).rglob("*.py")):
        mod = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[mod.removesuffix(".__init__")] = p
    return out


MODS = _modules()


def _imports(mod: str, path: Path) -> list[tuple[str, int]]:
    """(imported fedsafe module, line) for every import in ``path``, wherever it stands."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODS else target for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in MODS:
                n = n.rpartition(".")[0]
            if n and n != mod:
                out.append((n, node.lineno))
    return out


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank() -> dict[str, int]:
    return {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_room_is_placed_in_a_layer():
    rooms = {_room(m) for m in MODS} - {""}
    assert rooms <= set(_rank()), f"place these in LAYERS: {sorted(rooms - set(_rank()))}"


def test_lower_layers_never_import_upper_ones():
    rank = _rank()
    bad = []
    for mod, path in MODS.items():
        src = _room(mod)
        for target, line in _imports(mod, path):
            dst = _room(target)
            if src and dst and src != dst:
                if rank[dst] > rank[src] or (src, dst) in INDEPENDENT or (dst, src) in INDEPENDENT:
                    bad.append(
                        f"{path.relative_to(SRC)}:{line}: {src} (layer {rank[src]}) imports {target} "
                        f"(layer {rank[dst]})"
                    )
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_rooms_or_modules():
    rooms: dict[str, set[str]] = {}
    mods: dict[str, set[str]] = {}
    for mod, path in MODS.items():
        for target, _ in _imports(mod, path):
            if MODS[target].name == "__init__.py" and _room(target) == _room(mod):
                continue  # a module reading its own package's namespace is not a dependency
            mods.setdefault(mod, set()).add(target)
            if _room(mod) != _room(target) and _room(mod) and _room(target):
                rooms.setdefault(_room(mod), set()).add(_room(target))
    assert not _cycles(rooms), f"import cycles between rooms: {_cycles(rooms)}"
    assert not _cycles(mods), f"import cycles between modules: {_cycles(mods)}"


def test_the_cycle_check_sees_a_new_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    "mod", sorted(m for m in MODS if not m.startswith(f"{PKG}.flower.") or m.removeprefix(f"{PKG}.flower.") == "sim")
)
def test_every_module_imports(mod):
    importlib.import_module(mod)


def test_flower_app_modules_import():
    pytest.importorskip("flwr")
    for mod in sorted(m for m in MODS if m.startswith(f"{PKG}.flower.")):
        importlib.import_module(mod)


def test_each_room_imports_on_its_own():
    """Import order cannot hide a cycle: every room imports first, in a fresh interpreter."""
    rooms = sorted({f"{PKG}.{_room(m)}" for m in MODS if _room(m) and _room(m) != "flower"})
    code = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n"
        "    for k in [k for k in sys.modules if k == 'fedsafe' or k.startswith('fedsafe.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(m)\n"
    )
    subprocess.run([sys.executable, "-c", code, *rooms], check=True, timeout=300)


# modules written since ruff was adopted are kept formatted; older hand-wrapped ones join when reformatted
FORMATTED = [
    "src/fedsafe/rundir.py",
    "src/fedsafe/lm.py",
    "src/fedsafe/pipeline.py",
    "src/fedsafe/eval/judges",
    "src/fedsafe/fl/seeds.py",
    "src/fedsafe/fl/precompute.py",
    "tests/test_prefix_precompute.py",
    "tests/test_layering.py",
    "tests/test_merged_start.py",
    "src/fedsafe/aggregators/_native.py",
    "tests/test_coordinatewise_kernels.py",
    "benchmarks/bench_coordinatewise.py",
]


def test_ruff_lint_and_format():
    """The linter is part of the suite, so the README's one test command is also the lint gate."""
    import subprocess
    import sys

    pytest.importorskip("ruff")
    repo = SRC.parent
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=repo, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *FORMATTED], cwd=repo, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
