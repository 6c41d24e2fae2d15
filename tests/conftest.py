import os

import pytest

from lsaq_mlx.backend.blas import reexec_with_fast_blas


def pytest_configure(config):
    """Tests run models on the CPU backend too: give MLX the optimized BLAS, like the
    CLI does. pytest already captures the output descriptors, so release them first.
    convert rounds to nearest unless a test asks otherwise: ``--quantizer auto`` would
    calibrate the default model for minutes (its own tests unset this)."""
    os.environ.setdefault("LSAQ_MLX_QUANTIZER", "rtn")
    reexec_with_fast_blas(config.pluginmanager.getplugin("capturemanager").stop_global_capturing)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """One cache for the session, so the default model is imported once."""
    path = tmp_path_factory.mktemp("lsaq-cache")
    old = os.environ.get("LSAQ_MLX_CACHE")
    os.environ["LSAQ_MLX_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LSAQ_MLX_CACHE", None)
    else:
        os.environ["LSAQ_MLX_CACHE"] = old


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("LSAQ_MLX_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def default_source(session_cache):
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.resolve import default_gguf
    from lsaq_mlx.errors import UserError

    try:
        default_gguf()
    except UserError as e:
        pytest.skip(str(e))
    return resolve_model("default")


@pytest.fixture(scope="session")
def default_model(default_source):
    from lsaq_mlx.sources import load_model

    return load_model(default_source)


def shared_file(*parts) -> str:
    path = os.path.abspath(os.path.join(SHARED_DATA, *parts))
    if not os.path.exists(path):
        pytest.skip(f"{path} is not present (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def tiny_source(session_cache, tmp_path_factory):
    """``tiny_source(arch)``: a tiny random model of ``arch`` (llama, qwen2, qwen3, gemma3)
    written as llama.cpp would and imported once for the session. Shared: a test that
    changes its files works on a copy."""
    from lsaq_mlx.sources import resolve_model
    from tiny_models import tiny_model, write_gguf

    made = {}

    def make(arch: str = "llama"):
        if arch not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}") / f"tiny-{arch}.gguf"
            write_gguf(tiny_model(arch), arch, path)
            made[arch] = resolve_model(str(path))
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_source):
    return tiny_source("llama")
