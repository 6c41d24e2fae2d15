import json
import os

from cli_run import assert_one_line_error, run_cli, run_cli_process
from tiny_models import tiny_model, write_gguf

from lsaq_mlx import __version__


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"lsaq-mlx {__version__}"
    for flag in ("-h", "--help"):
        out = run_cli(flag)
        assert out.returncode == 0 and "inspect" in out.stdout and "generate" in out.stdout
    assert run_cli("no-such-command").returncode == 2


def test_doctor_json():
    report = json.loads(run_cli("doctor", "--json").stdout)
    assert report["backend"] in ("cpu", "gpu")
    assert report["compute_mode"] in ("float32", "quantized")
    assert report["float32_gemm_gflops"] > 0


def test_doctor_reports_reference_blas_when_asked():
    env = dict(os.environ, LSAQ_MLX_BLAS="reference")
    env.pop("LD_PRELOAD", None)
    env.pop("LSAQ_MLX_BLAS_REEXEC", None)
    report = json.loads(run_cli_process("doctor", "--json", env=env).stdout)
    assert report["blas"].startswith("reference") or report["platform"] == "darwin"


def test_user_errors_are_one_line(tmp_path):
    env = dict(os.environ, LSAQ_MLX_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert_one_line_error(run_cli("inspect", "--model", str(tmp_path / "missing.gguf"), env=env), "not found")
    write_gguf(tiny_model("qwen2"), "qwen2", tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:1000])
    assert_one_line_error(run_cli("inspect", "-m", str(tmp_path / "cut.gguf"), env=env), "cut.gguf")
    assert_one_line_error(run_cli("inspect", "-m", "someone/some-model", env=env), "someone/some-model")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_inspect_and_generate_on_a_gguf(tmp_path):
    env = dict(os.environ, LSAQ_MLX_CACHE=str(tmp_path / "cache"))
    write_gguf(tiny_model("gemma3"), "gemma3", tmp_path / "g.gguf")
    info = json.loads(run_cli("inspect", "--json", "-m", str(tmp_path / "g.gguf"), env=env).stdout)
    assert info["model_type"] == "gemma3_text" and info["layers"] == 6
    assert abs(info["bits_per_weight"] - 32.0) < 1e-6  # float32 source weights
    q_proj = next(m for m in info["modules"] if m["path"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["dtype"] == "float32" and q_proj["parameters"] == 64 * 128
    human = run_cli("inspect", "-m", str(tmp_path / "g.gguf"), env=env)
    assert human.returncode == 0 and "gemma3_text" in human.stdout and "q_proj" in human.stdout
    out = json.loads(run_cli("generate", "-p", "hello", "-n", "5", "--json", "-m", str(tmp_path / "g.gguf"), env=env).stdout)
    assert out["generation_tokens"] >= 1 and out["peak_memory_bytes"] > 0


def test_json_says_which_model_and_whether_it_came_from_the_cache(tmp_path, empty_cache):
    write_gguf(tiny_model("llama"), "llama", tmp_path / "tiny.gguf")
    model = str(tmp_path / "tiny.gguf")
    first = json.loads(run_cli("score", "-m", model, "--tokens", "64", "--json").stdout)
    again = json.loads(run_cli("score", "-m", model, "--tokens", "64", "--json").stdout)
    assert (first["cached"], again["cached"]) == (False, True) and again["scores"] == first["scores"]
    plan = json.loads(run_cli("plan", "-m", model, "--method", "uniform", "--bits", "4", "--json").stdout)
    assert plan["model"] == model


def _keys(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}{k}", v
            yield from _keys(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v, prefix)


def test_json_sizes_are_bytes_everywhere(tmp_path, empty_cache):
    write_gguf(tiny_model("llama"), "llama", tmp_path / "tiny.gguf")
    model = str(tmp_path / "tiny.gguf")
    outputs = [run_cli(*args, "--json") for args in (
        ("inspect", "-m", model), ("generate", "-m", model, "-p", "hi", "-n", "3"), ("doctor",),
        ("plan", "-m", model, "--method", "uniform", "--bits", "4"),
        ("convert", "-m", model, "-b", "4.5", "--method", "uniform", "-o", str(tmp_path / "out")), ("cache", "list"))]
    report = json.loads(outputs[4].stdout)
    assert report["plan_seconds"] > 0 and report["wall_seconds"] > 0
    keys = [(k, v) for o in outputs for k, v in _keys(json.loads(o.stdout))]
    assert not [k for k, _ in keys if k.rsplit(".", 1)[-1].endswith(("_gb", "_mb", "_kb", "_gib", "_mib"))]
    sizes = [(k, v) for k, v in keys if k.endswith("bytes")]
    assert len(sizes) >= 6 and all(isinstance(v, int) or v is None for _, v in sizes), sizes


def test_generate_takes_mlx_lm_generates_flags_and_reads_the_prompt_from_stdin():
    piped = run_cli("generate", "-p", "-", "-n", "4", "--json", input="The capital of France is")
    typed = run_cli("generate", "-p", "The capital of France is", "-n", "4", "--json")
    assert piped.returncode == 0 and json.loads(piped.stdout)["text"] == json.loads(typed.stdout)["text"]
    sampled = run_cli("generate", "-p", "Hi", "-n", "4", "--chat", "--system-prompt", "Be brief.", "--temp", "0.7",
                      "--top-p", "0.9", "--top-k", "20", "--min-p", "0.05", "--seed", "3", "--json")
    again = run_cli("generate", "-p", "Hi", "-n", "4", "--chat", "--system-prompt", "Be brief.", "--temp", "0.7",
                    "--top-p", "0.9", "--top-k", "20", "--min-p", "0.05", "--seed", "3", "--json")
    assert sampled.returncode == 0 and json.loads(sampled.stdout)["text"] == json.loads(again.stdout)["text"]
    lone = run_cli("generate", "-p", "Hi", "--system-prompt", "Be brief.")
    assert lone.returncode == 1 and "--chat" in lone.stderr
    bad = run_cli("generate", "-p", "Hi", "--top-p", "0")
    assert bad.returncode == 1 and "top-p" in bad.stderr
