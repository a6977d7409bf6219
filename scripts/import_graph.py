"""The import graph of a package, drawn from the source with ``ast`` (nothing is imported).

    python scripts/import_graph.py [regrad_engine]

Prints each module's layer (0 = imports nothing of the package; otherwise one more than the
highest layer it imports), then any cycle. Every ``import`` counts, also those inside
functions: a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "regrad_engine", root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package's ``__init__`` excluded as a target
    when a submodule is named: ``from a.b import c`` names ``a.b.c`` if that is a module)."""
    package_dir = root / package
    files = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def layers(graph: dict[str, set[str]]) -> tuple[dict[str, int], list[list[str]]]:
    """Layer of every module and the cycles found (a module on a cycle gets no layer)."""
    layer: dict[str, int] = {}
    cycles: list[list[str]] = []
    visiting: list[str] = []

    def visit(node: str) -> int:
        if node in layer:
            return layer[node]
        if node in visiting:
            cycles.append(visiting[visiting.index(node):] + [node])
            return 0
        visiting.append(node)
        value = 1 + max((visit(t) for t in graph[node]), default=-1)
        visiting.pop()
        layer[node] = value
        return value

    for node in sorted(graph):
        visit(node)
    return layer, cycles


def main(argv: list[str]) -> int:
    package = argv[0] if argv else "regrad_engine"
    graph = import_graph(package)
    layer, cycles = layers(graph)
    for depth in range(max(layer.values()) + 1):
        print(f"layer {depth}: {', '.join(sorted(m for m, d in layer.items() if d == depth))}")
    print(f"{max(layer.values()) + 1} layers, {len(graph)} modules, {sum(map(len, graph.values()))} edges")
    for cycle in cycles:
        print("cycle: " + " -> ".join(cycle))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
