"""The tree keeps its shape: data flows one way through the stages (no stage imports a
later one), storage and the SWSC codec stand alone, and every package is installed."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# earlier stages first; a module may import its own stage and earlier ones only
STAGES = [
    {"errors", "documents", "cache", "cache_inventory", "formats", "names", "modules", "progress", "sizes", "backend", "storage", "swsc", "data"},
    {"sources"},
    {"scoring"},
    {"planning"},
    {"convert", "gptq", "equalization", "quantizers"},  # the quantized model: how plans are written
    {"runtime", "evaluation", "doctor"},
    {"sweep", "serve"},
    {"cli"},
]


def stage_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(STAGES) if top in names)


def lsaq_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lsaq_mlx."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lsaq_mlx.")}
    return found


def test_no_stage_imports_a_later_one():
    wrong = []
    for path in sorted((ROOT / "lsaq_mlx").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if name in ("lsaq_mlx", "lsaq_mlx.__main__"):
            continue
        wrong += [f"{name} -> {m}" for m in lsaq_imports(path) if stage_of(m) > stage_of(name)]
    assert not wrong, wrong


def test_storage_and_swsc_import_neither_sources_nor_runtime():
    for folder in ("storage", "swsc"):
        for path in (ROOT / "lsaq_mlx" / folder).glob("*.py"):
            assert not [m for m in lsaq_imports(path) if m.startswith(("lsaq_mlx.sources", "lsaq_mlx.runtime"))], path


def test_every_package_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lsaq_mlx").rglob("__init__.py")}
    found |= {"lsaq_tui" + "".join("." + part for part in p.parent.relative_to(ROOT / "tui").parts)
              for p in (ROOT / "tui").rglob("__init__.py")}
    assert found == listed
