import json
import shutil

import mlx.core as mx
import pytest

from lsaq_mlx.errors import UserError
from lsaq_mlx.sources import load_model, resolve_model
from tiny_models import tiny_model, write_gguf


def cached_models(cache):
    folder = cache / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_gguf_is_imported_once_by_content(tmp_path, empty_cache):
    write_gguf(tiny_model("qwen3"), "qwen3", tmp_path / "a.gguf")
    first = resolve_model(str(tmp_path / "a.gguf"))
    shutil.copy(tmp_path / "a.gguf", tmp_path / "b.gguf")
    second = resolve_model(str(tmp_path / "b.gguf"))
    assert first.kind == second.kind == "gguf"
    assert first.fingerprint == second.fingerprint and first.path == second.path
    assert cached_models(empty_cache) == [first.fingerprint]
    model, tokenizer, config = load_model(first)
    assert config["model_type"] == "qwen3"


def _hf_folder(tmp_path, empty_cache):
    """A Hugging Face style folder: config.json, model.safetensors, tokenizer files."""
    write_gguf(tiny_model("llama"), "llama", tmp_path / "m.gguf")
    imported = resolve_model(str(tmp_path / "m.gguf")).path
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in imported.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith("index.json"):
            shutil.copy(f, folder / f.name)
    weights = {}
    for f in imported.glob("*.safetensors"):
        weights |= mx.load(str(f))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


def test_local_folder(tmp_path, empty_cache):
    folder = _hf_folder(tmp_path, empty_cache)
    source = resolve_model(str(folder))
    assert source.kind == "folder" and source.path == folder.resolve()
    model, _, _ = load_model(source)
    out = model(mx.array([[1, 2, 3]]))
    assert out.dtype == mx.float32 and out.shape == (1, 3, 300)
    assert resolve_model(str(folder)).fingerprint == source.fingerprint


def test_folder_errors(tmp_path, empty_cache):
    folder = _hf_folder(tmp_path, empty_cache)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match="truncated"):
        resolve_model(str(folder))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match="corrupt"):
        resolve_model(str(folder))
    weights.write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "no_such_arch"}))
    with pytest.raises(UserError, match="no_such_arch"):
        resolve_model(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="config.json is missing"):
        resolve_model(str(folder))


def test_missing_and_corrupt_gguf_leave_cache_empty(tmp_path, empty_cache):
    with pytest.raises(UserError, match="not found"):
        resolve_model(str(tmp_path / "nope.gguf"))
    write_gguf(tiny_model("qwen2"), "qwen2", tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match="truncated"):
        resolve_model(str(tmp_path / "cut.gguf"))
    assert cached_models(empty_cache) == []


def test_unknown_spec(tmp_path, empty_cache):
    with pytest.raises(UserError, match="model not found"):
        resolve_model("certainly not a model")
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(UserError, match="neither"):
        resolve_model(str(tmp_path / "file.txt"))


def test_hub_id_offline(tmp_path, empty_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match="cannot download 'someone/some-model'"):
        resolve_model("someone/some-model")
    assert cached_models(empty_cache) == []


def test_default_model(default_source):
    assert default_source.kind == "default"
    config = json.loads((default_source.path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["lsaq_source"]["dtype"] == "float32"
    assert (default_source.path / "tokenizer.json").is_file()
