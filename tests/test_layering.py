"""singa_dist's modules import in one direction only: each layer uses the layers below it, never one above.

Every import statement counts, at any depth (inside functions too), and so does importlib.import_module of a
literal name. The layers, bottom to top, are those of docs/architecture.md. A new module must be placed in
a layer here; the test fails until it is.
"""
from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "singa_dist"

# Bottom to top. Modules of one layer may import each other (without cycles, checked below).
LAYERS = [
    ("foundation", ["topology", "environment", "compression", "shards", "checkpoint", "timeline", "metrics",
                    "rendezvous"]),
    ("runtime", ["runtime"]),
    ("primitives", ["primitives", "runner", "run_task"]),
    ("negotiation", ["shared_headers", "coordinator"]),
    ("collectives", ["collectives"]),
    ("model-level functions", ["functions", "partition", "sync_batch_norm"]),
    ("parameter server", ["ps", "ps.slicing", "ps.wire", "ps.sockets", "ps.transport", "ps.server", "ps.client", "ps.__main__"]),
    ("strategies", ["strategies", "strategies.base", "strategies.buckets", "strategies.allreduce",
                    "strategies.adasum", "strategies.partial_update", "strategies.sandblaster", "strategies.downpour",
                    "strategies.hybrid", "strategies.hogwild"]),
    ("optimizer", ["optimizer"]),
    ("elastic", ["elastic"]),
    ("horovod", ["horovod"]),
    ("package", [""]),  # singa_dist/__init__.py: the public names, gathered from every layer
]
LAYER_OF = {f"{PACKAGE}.{m}" if m else PACKAGE: i for i, (_, modules) in enumerate(LAYERS) for m in modules}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(target: str, modules: dict) -> str | None:
    """The singa_dist module that `target` names (a module, or a name inside one), or None if outside."""
    if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
        return None
    while target not in modules:
        target = target.rsplit(".", 1)[0]
    return target


def imports_of(module: str, modules: dict = MODULES) -> set[str]:
    """Every singa_dist module `module` imports, at any depth of its code."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            targets = [f"{prefix}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            targets = [node.args[0].value]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    unplaced = sorted(set(MODULES) - set(LAYER_OF))
    assert not unplaced, f"place these modules in a layer of tests/test_layering.py: {unplaced}"
    gone = sorted(set(LAYER_OF) - set(MODULES))
    assert not gone, f"LAYERS lists modules that do not exist: {gone}"


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} ({LAYERS[LAYER_OF[m]][0]}) imports {t} ({LAYERS[LAYER_OF[t]][0]})"
              for m, targets in GRAPH.items() for t in sorted(targets) if LAYER_OF[t] > LAYER_OF[m]]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_level_and_dynamic_imports(tmp_path):
    """The checker itself: a function-level import and an import_module call are both seen."""
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("import importlib\ndef f():\n    from . import high\n"
                                    "    importlib.import_module('singa_dist.other')\n")
    (package / "high.py").write_text("")
    (package / "other.py").write_text("")
    modules = {PACKAGE: package / "__init__.py", f"{PACKAGE}.low": package / "low.py",
               f"{PACKAGE}.high": package / "high.py", f"{PACKAGE}.other": package / "other.py"}
    assert imports_of(f"{PACKAGE}.low", modules) == {f"{PACKAGE}.high", f"{PACKAGE}.other"}


def test_strategy_table_names_classes_of_the_strategies_layer():
    from singa_dist.strategies import strategy_class
    from singa_dist.topology import STRATEGIES

    for name, kind in STRATEGIES.items():
        module = f"{PACKAGE}.strategies.{kind.cls.partition(':')[0]}"
        assert LAYERS[LAYER_OF[module]][0] == "strategies", module
        cls = strategy_class(name)
        assert cls.__name__ == kind.class_name and cls.name == name


@pytest.mark.parametrize("library, forbidden", [
    ("native_layers", ("singa_dist", "launchers", "examples", "benchmarks")),
    ("triton_kernels", ("singa_dist", "native_layers", "launchers", "examples", "benchmarks")),
    ("singa_dist", ("native_layers", "triton_kernels", "launchers", "examples", "benchmarks")),
])
def test_libraries_stay_apart(library, forbidden):
    """native_layers works without singa_dist and the other way round; no library imports an example."""
    bad = []
    for path in sorted((ROOT / library).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not bad, bad


def test_launchers_use_only_the_bottom_layer():
    allowed = {f"{PACKAGE}.topology", f"{PACKAGE}.environment", f"{PACKAGE}.timeline", f"{PACKAGE}.metrics",
               f"{PACKAGE}.rendezvous"}
    used = set()
    for path in sorted((ROOT / "launchers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used |= {a.name for a in node.names if a.name.startswith(PACKAGE)}
    assert used <= allowed, sorted(used - allowed)
    importlib.import_module("launchers.config")  # and they import cleanly
