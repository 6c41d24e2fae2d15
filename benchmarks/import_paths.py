"""The longest chain of lsaq_mlx modules importing one another, from a starting module.

Every ``import``/``from ... import`` of an ``lsaq_mlx`` module counts, at the top of a
module or inside a function (both run when the command does); a chain never visits a
module twice.

    python benchmarks/import_paths.py [lsaq_mlx.cli]
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(name: str) -> set[str]:
    path = module_file(name)
    if path is None:
        return set()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("lsaq_mlx") and module_file(m) and m != name}


def longest_chain(start: str) -> list[str]:
    graph = {}
    todo = [start]
    while todo:
        name = todo.pop()
        if name not in graph:
            graph[name] = sorted(imports_of(name))
            todo += graph[name]

    best: list[str] = []

    def walk(path: list[str]) -> None:
        nonlocal best
        if len(path) > len(best):
            best = list(path)
        for nxt in graph[path[-1]]:
            if nxt not in path:
                path.append(nxt)
                walk(path)
                path.pop()

    walk([start])
    return best


if __name__ == "__main__":
    chain = longest_chain(sys.argv[1] if len(sys.argv) > 1 else "lsaq_mlx.cli")
    print(f"{len(chain) - 1} imports: " + " -> ".join(m.removeprefix("lsaq_mlx.") for m in chain))
