"""``lsaq-mlx cache``: it lists what a model's commands cached, removes one model's
entries and no other's, prunes by age, and leaves names it did not make alone."""

import json
import os
import time

from cli_run import assert_one_line_error, run_cli
from tiny_models import tiny_model, write_gguf


def test_cache_list_rm_and_prune(tmp_path, empty_cache):
    for name, seed in (("a", 0), ("b", 1)):
        write_gguf(tiny_model("llama", seed=seed), "llama", tmp_path / f"{name}.gguf")
        assert run_cli("plan", "-m", str(tmp_path / f"{name}.gguf"), "-b", "5.0", "--json").returncode == 0
    assert run_cli("score", "-m", str(tmp_path / "a.gguf"), "--tokens", "64", "--json").returncode == 0
    (empty_cache / "errors" / "not-ours.txt").write_text("left alone")

    listed = json.loads(run_cli("cache", "list", "--json").stdout)["entries"]
    kinds = {(e["kind"], e["model"]) for e in listed}
    assert {("models", "a.gguf"), ("errors", "a.gguf"), ("scores", "a.gguf"), ("models", "b.gguf"),
            ("errors", "b.gguf")} <= kinds
    assert "a.gguf" in run_cli("cache", "list").stdout

    would = json.loads(run_cli("cache", "rm", "-m", str(tmp_path / "a.gguf"), "--dry-run", "--json").stdout)
    assert would["dry_run"] and would["bytes"] > 0 and {e["model"] for e in would["removed"]} == {"a.gguf"}
    assert json.loads(run_cli("cache", "list", "--json").stdout)["entries"] == listed  # nothing removed
    shown = run_cli("cache", "prune", "--older-than", "0s", "--dry-run")
    assert "would remove" in shown.stderr and all(e["path"] in shown.stdout for e in listed)
    removed = json.loads(run_cli("cache", "rm", "-m", str(tmp_path / "a.gguf"), "--json").stdout)["removed"]
    assert removed and {e["model"] for e in removed} == {"a.gguf"}
    left = json.loads(run_cli("cache", "list", "--json").stdout)["entries"]
    assert left and all(e["model"] == "b.gguf" for e in left)
    assert (empty_cache / "errors" / "not-ours.txt").exists()

    assert json.loads(run_cli("cache", "prune", "--older-than", "1d", "--json").stdout)["removed"] == []
    old = time.time() - 3 * 86400
    for e in left:
        for root, _, files in os.walk(e["path"]):
            for f in files:
                os.utime(os.path.join(root, f), (old, old))
        if os.path.isfile(e["path"]):
            os.utime(e["path"], (old, old))
    assert len(json.loads(run_cli("cache", "prune", "--older-than", "2d", "--json").stdout)["removed"]) == len(left)
    assert json.loads(run_cli("cache", "list", "--json").stdout)["entries"] == []


def test_cache_rm_says_what_it_needs(empty_cache):
    assert_one_line_error(run_cli("cache", "rm"), "say which: --model M, or --all")
    assert_one_line_error(run_cli("cache", "prune", "--older-than", "soon"), "cannot read the age 'soon'")


def test_list_shows_converted_folders_and_imports(tmp_path, empty_cache):
    import shutil

    write_gguf(tiny_model("llama"), "llama", tmp_path / "a.gguf")
    for name in ("kept", "moved"):
        done = run_cli("convert", "-m", str(tmp_path / "a.gguf"), "-b", "6", "-o", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
    shutil.rmtree(tmp_path / "moved")
    listed = json.loads(run_cli("list", "--json").stdout)
    converted = {os.path.basename(m["path"]): m for m in listed["converted"]}
    assert converted["kept"]["present"] and not converted["moved"]["present"]
    assert converted["kept"]["source"].endswith("a.gguf") and 5.5 < converted["kept"]["bits_per_weight"] <= 6.0
    assert [e["model"] for e in listed["imported"]] == ["a.gguf"]
    text = run_cli("list").stdout
    assert "(gone)" in text and "a.gguf" in text

    hostile = {k: v for k, v in listed["converted"][0].items() if k != "present"} | {"path": "/tmp/\x1b]0;owned\x07"}
    (empty_cache / "converted.json").write_text('[{"path": 1}, "x", ' + json.dumps(listed["converted"][0] | {"present": None})
                                                 + ", " + json.dumps(hostile) + "]")
    assert json.loads(run_cli("list", "--json").stdout)["converted"] == []  # malformed records are left out
    (empty_cache / "converted.json").write_text("{not json")
    done = run_cli("list", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["converted"] == []
