"""docs/architecture.md's picture of the layers is the one the imports give now."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from support import ROOT

GENERATOR = ROOT / "docs" / "gen_layers.py"
DOC = ROOT / "docs" / "architecture.md"
REGENERATE = "python docs/gen_layers.py --write"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_layers", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_picture_matches_the_code():
    gen = load_generator()
    doc = DOC.read_text(encoding="utf-8")
    assert doc.count(gen.BEGIN) == 1 and doc.count(gen.END) == 1, (
        f"docs/architecture.md must hold one {gen.BEGIN} ... {gen.END} block; "
        f"put the markers back and run: {REGENERATE}")
    now = gen.render(ROOT)
    written = gen.current_block(doc)
    assert written == now, (
        "docs/architecture.md: the picture of the layers no longer matches the imports of "
        f"meshd/ and sdk/sessions/. Regenerate it with: {REGENERATE}\n"
        f"--- in the doc ---\n{written}--- from the code ---\n{now}")


def test_layers_picture_has_every_layer_and_no_upward_arrow():
    gen = load_generator()
    block = gen.render(ROOT)
    for layer in ("wire", "state", "mesh", "ipc", "daemon", "sdk", "cli", "mcp"):
        assert f'    {layer}["' in block, f"layer {layer} missing from the picture"
    order = ["wire", "state", "mesh", "ipc", "daemon"]
    _, importers = gen.edges(ROOT)
    for (a, b), who in importers.items():
        if a in order and b in order:
            assert order.index(b) < order.index(a), f"{a} imports {b}: {sorted(who)}"
        assert not (a in order + ["leaves"] and b in ("sdk", "cli", "mcp")), (
            f"the daemon side imports the SDK: {sorted(who)}")


def test_check_mode_runs():
    """The command line works as the failure message says (exit 0 or 1, never a crash)."""
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True,
                            text=True, timeout=60, cwd=str(ROOT))
    assert result.returncode in (0, 1), result.stdout + result.stderr
    if result.returncode:
        assert REGENERATE in result.stdout


def _module_imports() -> dict[str, set[str]]:
    """Each module of meshd and the SDK -> the project modules it imports at run time
    (function-local imports included; `if TYPE_CHECKING:` blocks and `from pkg import
    submodule`'s package left out, as Python resolves them without a circle)."""
    import ast

    root = Path(ROOT)
    modules: dict[str, Path] = {}
    for base, pkg in ((root / "meshd", "meshd"), (root / "sdk" / "sessions", "sessions")):
        for path in base.rglob("*.py"):
            name = ".".join([pkg, *path.relative_to(base).with_suffix("").parts])
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", "") == "TYPE_CHECKING"
                       for sub in ast.walk(node)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                deps |= subs or ({node.module} & set(modules))
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & set(modules)
        deps.discard(name)
        graph[name] = {d for d in deps if not name.startswith(d + ".")}   # (own package)
    return graph


def test_no_module_imports_itself_through_others():
    """No import circle: a module that needs one above it takes it as an argument."""
    graph = _module_imports()
    assert "meshd.state.store" in graph and "meshd.mesh.router" in graph
    done: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)
