"""The tree keeps its shape: data flows one way through the stages (no stage imports a
later one), storage and the SWSC codec stand alone, and every package is installed."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# earlier stages first; a module may import its own stage and earlier ones only
STAGES = [
    {"errors", "settings", "documents", "cache", "cache_inventory", "model_index", "formats", "names", "modules", "progress",
     "sizes", "backend", "storage", "swsc", "data"},
    {"sources"},
    {"scoring"},
    {"planning"},
    {"convert", "gptq", "equalization", "quantizers"},  # the quantized model: how plans are written
    {"runtime", "evaluation", "doctor", "adaptive"},  # adaptive: folders the runtime moves through
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


def import_graph() -> dict[str, set[str]]:
    """Module -> the lsaq_mlx modules it imports anywhere in it (function-local imports too);
    ``from package import module`` counts as importing both."""
    graph = {}
    for path in sorted((ROOT / "lsaq_mlx").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lsaq_mlx"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names
                         if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists()}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("lsaq_mlx")}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles_even_through_function_local_imports():
    graph, done, cycles = import_graph(), set(), []

    def visit(module, path):
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done or module not in graph:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not cycles, cycles[:3]


def test_the_environment_is_read_in_settings_only():
    """``LSAQ_MLX_*`` settings are read by ``settings.py`` alone (once per command by the
    CLI); the rest of the package asks ``settings()``."""
    import re

    readers = [str(p.relative_to(ROOT)) for p in (ROOT / "lsaq_mlx").rglob("*.py")
               if p.name != "settings.py" and re.search(r"environ[^\n]*LSAQ_MLX_|getenv\([^)]*LSAQ_MLX_", p.read_text())]
    assert not readers, readers


def test_settings_are_read_once_per_command(monkeypatch, tmp_path):
    from cli_run import assert_one_line_error, run_cli

    from lsaq_mlx.settings import Settings, settings, use_settings

    monkeypatch.setenv("LSAQ_MLX_CACHE", str(tmp_path / "one"))
    with use_settings(Settings.from_environment()):
        monkeypatch.setenv("LSAQ_MLX_CACHE", str(tmp_path / "two"))
        assert settings().cache == tmp_path / "one"  # what the command started with
    assert settings().cache == tmp_path / "two"
    assert_one_line_error(run_cli("doctor", env={"LSAQ_MLX_COMPUTE": "fast", "PATH": "/usr/bin:/bin"}),
                          "LSAQ_MLX_COMPUTE is 'fast': one of float32, quantized")
