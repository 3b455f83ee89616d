#!/usr/bin/env python3
"""Draw meshd's layers from its imports: a mermaid graph for docs/architecture.md.

    python docs/gen_layers.py            # print the mermaid block
    python docs/gen_layers.py --write    # put it between the markers in docs/architecture.md
    python docs/gen_layers.py --check    # exit 1 if docs/architecture.md's block is stale

Every `import` and `from ... import` in meshd/ and sdk/sessions/ is read with `ast`, as
../shared/tools/layers.py does (function-local and TYPE_CHECKING imports included:
they are dependencies too). Each module belongs to one layer: in meshd, wire, state,
mesh, ipc and the daemon (daemon.py, main.py, __main__.py, sdnotify.py), and the leaves
any layer may import (config, errors, and meshd/__init__, which holds __version__); in
sdk/sessions, the CLI (cli/ and __main__.py), the MCP server (mcp/) and the SDK (the
rest). A package or top-level module of meshd
that is none of these gets a node of its own, so nothing new goes undrawn. An edge A --> B
means that modules of A import B; its label is how many modules of A do. Imports within
one layer and imports of anything outside the project are not drawn. Only the standard
library is used.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- layers:begin -->", "<!-- layers:end -->"
REGENERATE = "python docs/gen_layers.py --write"

# Drawn top to bottom; (node id, label). The order fixes where mermaid puts each node.
DAEMON_SIDE = [("daemon", "daemon<br/>daemon.py, main.py"), ("ipc", "ipc<br/>local API server"),
               ("mesh", "mesh<br/>peers, SWIM, replicator, router"),
               ("state", "state<br/>SQLite store, journal"),
               ("wire", "wire<br/>codecs, schemas, protocols")]
SDK_SIDE = [("cli", "sessions CLI<br/>sessions/cli"), ("mcp", "sessions MCP<br/>sessions/mcp"),
            ("sdk", "sessions SDK<br/>sessions/")]
LEAVES = ("leaves", "leaves: config, errors,<br/>meshd/__init__ (__version__)")
DAEMON_MODULES = {"daemon", "main", "__main__", "sdnotify"}
LEAF_MODULES = {"config", "errors"}


def modules(root: Path) -> dict[str, Path]:
    """Every module of meshd/ and sdk/sessions/, by dotted name."""
    found: dict[str, Path] = {}
    for pkg, src in (("meshd", root / "meshd"), ("sessions", root / "sdk" / "sessions")):
        for path in sorted(src.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = [pkg, *path.relative_to(src).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str | None:
    """The layer (node id) a module belongs to; None outside the project."""
    parts = module.split(".")
    if parts[0] == "sessions":
        if len(parts) > 1 and parts[1] in ("cli", "__main__"):
            return "cli"
        if len(parts) > 1 and parts[1] == "mcp":
            return "mcp"
        return "sdk"
    if parts[0] != "meshd":
        return None
    if len(parts) == 1 or parts[1] in LEAF_MODULES:   # `meshd` itself holds only __version__
        return "leaves"
    if parts[1] in DAEMON_MODULES:
        return "daemon"
    return parts[1]                                  # wire, state, mesh, ipc, or a new one


def imported(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules (or packages) a module imports, absolute dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:                           # relative: against the module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from meshd.state import db` imports the module meshd.state.db
            subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known]
            out.update(subs or [name])
            if subs and len(subs) < len(node.names):
                out.add(name)                        # and names of the package itself
    return out


def edges(root: Path) -> tuple[dict[str, int], dict[tuple[str, str], set[str]]]:
    """Modules per layer, and for each pair of layers the modules of the first that import
    the second."""
    mods = modules(root)
    known = set(mods)
    count: dict[str, int] = defaultdict(int)
    importers: dict[tuple[str, str], set[str]] = defaultdict(set)
    for module, path in mods.items():
        me = layer_of(module)
        assert me is not None
        count[me] += 1
        for name in imported(path, module, known):
            target = layer_of(name)
            if target is not None and target != me:
                importers[(me, target)].add(module)
    return dict(count), dict(importers)


def render(root: Path = ROOT) -> str:
    """The mermaid block (with its ``` fences), the same for the same code."""
    count, importers = edges(root)
    known = {n for n, _ in DAEMON_SIDE + SDK_SIDE} | {LEAVES[0]}
    extra = sorted(set(count) - known)
    plural = lambda n: f"{n} module{'s' if n != 1 else ''}"  # noqa: E731

    def node(ident: str, label: str, indent: str = "    ") -> str:
        return f'{indent}{ident}["{label}<br/>({plural(count.get(ident, 0))})"]'

    lines = ["```mermaid", "graph TD"]
    lines.append('  subgraph meshd["meshd: the daemon"]')
    lines += [node(i, label) for i, label in DAEMON_SIDE if i in count]
    lines += [node(i, f"meshd.{i}") for i in extra]
    lines.append("  end")
    lines.append('  subgraph sessions["sessions: the SDK and its front ends"]')
    lines += [node(i, label) for i, label in SDK_SIDE if i in count]
    lines.append("  end")
    if LEAVES[0] in count:
        lines.append(node(*LEAVES, indent="  "))
    order = [i for i, _ in DAEMON_SIDE + SDK_SIDE] + extra + [LEAVES[0]]
    rank = {i: k for k, i in enumerate(order)}
    for (a, b), who in sorted(importers.items(), key=lambda e: (rank[e[0][0]], rank[e[0][1]])):
        arrow = "-.->" if b == LEAVES[0] else "-->"   # the leaves: dotted, to keep it legible
        lines.append(f"  {a} {arrow}|{len(who)}| {b}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def splice(doc: str, block: str) -> str:
    """The document with `block` between the markers (which must be there, once each)."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"{DOC.relative_to(ROOT)} needs one {BEGIN} and, after it, one {END}")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def current_block(doc: str) -> str:
    """What is between the markers now."""
    return doc.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true",
                      help=f"replace the block in {DOC.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true",
                      help=f"exit 1 when {DOC.relative_to(ROOT)}'s block differs from the code")
    args = ap.parse_args()
    block = render(ROOT)
    if args.write:
        doc = DOC.read_text(encoding="utf-8")
        new = splice(doc, block)
        if new != doc:
            DOC.write_text(new, encoding="utf-8")
            print(f"{DOC.relative_to(ROOT)}: layers block updated")
        else:
            print(f"{DOC.relative_to(ROOT)}: layers block already up to date")
        return 0
    if args.check:
        if current_block(DOC.read_text(encoding="utf-8")) != block:
            print(f"{DOC.relative_to(ROOT)}: the layers picture is stale; run: {REGENERATE}")
            return 1
        return 0
    sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
