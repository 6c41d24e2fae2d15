"""config.json as transformers 5 writes it (RoPE settings under ``rope_parameters``)
builds the same model as the older spelling, everywhere lsaq-mlx builds one."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lsaq_mlx.formats import config_fixes, normalized_config
from lsaq_mlx.sources import load_model, resolve_model
from lsaq_mlx.sources.load import skeleton_model

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_transformers5_config.json"


def test_a_transformers5_config_gets_its_rope_base_back():
    config = json.loads(FIXTURE.read_text())
    assert "rope_theta" not in config
    assert config_fixes(config) == {"rope_theta": 100000}
    assert config_fixes(normalized_config(config)) == {}


def test_scaling_and_per_attention_type_parameters():
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}}
    fixes = config_fixes(llama3)
    assert fixes["rope_theta"] == 500000.0
    assert fixes["rope_scaling"]["rope_type"] == "llama3" and fixes["rope_scaling"]["factor"] == 8.0
    gemma3 = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    assert config_fixes(gemma3) == {"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0}
    assert config_fixes({"rope_theta": 5.0, "rope_parameters": {"rope_theta": 7.0}}) == {}  # the old key wins


def test_a_folder_in_transformers5_spelling_computes_what_the_old_spelling_does(tiny_source, tmp_path):
    original = tiny_source("llama")
    config = json.loads((original.path / "config.json").read_text())
    folders = {}
    for name, rope in (("old", {"rope_theta": 50000.0}), ("new", {"rope_parameters": {"rope_theta": 50000.0,
                                                                                      "rope_type": "default"}})):
        folder = tmp_path / name
        shutil.copytree(original.path, folder)
        written = {k: v for k, v in config.items() if k not in ("rope_theta", "lsaq_source")} | rope
        (folder / "config.json").write_text(json.dumps(written))
        folders[name] = resolve_model(str(folder))
    tokens = mx.array([[3, 17, 250, 9, 41, 120, 7, 88, 199, 5, 64, 2] * 4])
    old, new = (np.array(load_model(folders[n])[0](tokens)) for n in ("old", "new"))
    np.testing.assert_allclose(new, old, atol=1e-5)
    base = np.array(load_model(original)[0](tokens))  # rope_theta 10,000: the difference is visible
    assert np.abs(base - old).max() > 1e-3
    assert skeleton_model(folders["new"])[1]["rope_theta"] == 50000.0


def test_convert_writes_a_config_stock_mlx_lm_reads_right(tiny_source, tmp_path):
    from lsaq_mlx.convert import convert
    from lsaq_mlx.planning.planner import Planner, PlanRequest

    original = tiny_source("llama")
    folder = tmp_path / "new"
    shutil.copytree(original.path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_theta": 50000.0, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(config))
    source = resolve_model(str(folder))
    convert(source, Planner(source).plan(PlanRequest(method="uniform", bits=8)), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_theta"] == 50000.0


@pytest.mark.skipif(not __import__("importlib").util.find_spec("transformers"), reason="needs transformers")
def test_the_config_transformers_itself_writes_gets_its_rope_base(tiny_source, tmp_path):
    import transformers

    folder = tmp_path / "hf"
    shutil.copytree(tiny_source("llama").path, folder)
    base = json.loads((folder / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "tie_word_embeddings")
    transformers.LlamaConfig(**{k: base[k] for k in keys}, rope_theta=50000.0).save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    assert normalized_config(written)["rope_theta"] == 50000.0
    model = load_model(resolve_model(str(folder)))[0]
    assert model["model"]["layers"][0]["self_attn"]["rope"].base == 50000.0
