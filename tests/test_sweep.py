import json
import os
import shutil
import subprocess
import sys

import pytest

from cli_run import assert_one_line_error, run_cli
from lsaq_mlx.backend.blas import find_fast_blas, local_rank_count
from lsaq_mlx.sweep.results import read_results
from lsaq_mlx.sweep.spec import Cell, SweepSpec
from lsaq_mlx.sweep.report import markdown_table
from tiny_models import tiny_model, write_gguf

TEXT = " ".join(f"the {w} sat on the mat and looked at the {v}." for w, v in
                [("cat", "dog"), ("dog", "bird"), ("bird", "cat"), ("fox", "hen")] * 30)


@pytest.fixture
def spec(tmp_path, empty_cache):
    write_gguf(tiny_model("llama"), "llama", tmp_path / "tiny.gguf")
    (tmp_path / "text.txt").write_text(TEXT)

    def write(grids: str, evals: str = ""):
        path = tmp_path / "spec.toml"
        path.write_text(f'out = "res"\n[eval]\nppl = "{tmp_path / "text.txt"}"\nmax_tokens = 256\nseq_len = 64\n'
                        f'{evals}\n{grids}')
        return path

    return write


GRID = """[[grid]]
models = ["{model}"]
methods = ["source", "uniform", "lsaq-tiers"]
budgets = [4.6, 1.5]
low_fractions = [0.5]
"""


def values(rows):
    return [(r["method"], r["budget"], r["low_fraction"], r["status"],
             r["eval"]["perplexity"]["perplexity"] if r["status"] == "ok" else None,
             r["eval"]["divergence"]["kl"] if r["status"] == "ok" else None) for r in rows]


def test_spec_expands_the_grid(spec, tmp_path):
    loaded = SweepSpec.load(spec(GRID.format(model=tmp_path / "tiny.gguf")))
    model = str(tmp_path / "tiny.gguf")
    assert loaded.cells == [Cell(model, "source"), Cell(model, "uniform", 4.6), Cell(model, "uniform", 1.5),
                            Cell(model, "lsaq-tiers", 4.6), Cell(model, "lsaq-tiers", 1.5),
                            Cell(model, "lsaq-tiers", None, 0.5)]
    assert loaded.out == tmp_path / "res" and loaded.eval["kl"] is True


def test_sweep_records_failures_resumes_and_counts_malformed_rows(spec, tmp_path):
    path = spec(GRID.format(model=tmp_path / "tiny.gguf"))
    first = run_cli("sweep", str(path), "--json")
    # 1.5 bits per weight is out of reach: those cells fail, the others are evaluated
    assert first.returncode == 1 and "Traceback" not in first.stderr
    assert first.stderr.strip().splitlines()[-1].startswith("error: 2 of 6 cells failed")
    summary = json.loads(first.stdout)
    assert (summary["evaluated"], summary["failed"]) == (6, 2)
    rows, malformed = read_results(tmp_path / "res" / "results.jsonl")
    assert malformed == 0 and len(rows) == 6
    by_method = {(r["method"], r["budget"], r["low_fraction"]): r for r in rows.values()}
    assert by_method["source", None, None]["eval"]["divergence"]["kl"] == pytest.approx(0, abs=1e-4)  # float16 reference
    assert "outside what uniform can do" in by_method["uniform", 1.5, None]["error"]
    tiers = by_method["lsaq-tiers", None, 0.5]
    assert sorted(set(tiers["layer_bits"])) == [pytest.approx(4.5), pytest.approx(8.5)]  # 4 and 8 bits, group 64
    assert tiers["eval"]["divergence"]["kl"] > 0
    for name in ("results.md", "quality.png", "layer_bits.png"):
        assert (tmp_path / "res" / name).stat().st_size > 0
    assert "failed: budget 1.5" in (tmp_path / "res" / "results.md").read_text()

    with open(tmp_path / "res" / "results.jsonl", "a") as f:
        f.write('{"key": 3\nnot json at all\n')
    again = run_cli("sweep", str(path), "--json")
    summary = json.loads(again.stdout)
    # only the failed cells are tried again; the bad rows are counted, not fatal
    assert (summary["evaluated"], summary["reused"], summary["malformed_rows"]) == (2, 4, 2)
    assert "2 malformed rows" in again.stderr
    assert values(summary["rows"]) == values(rows[k] for k in [r["key"] for r in summary["rows"]])


def test_two_ranks_under_mlx_launch_match_one_process(spec, tmp_path):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    grid = GRID.format(model=tmp_path / "tiny.gguf").replace("1.5", "8.5")
    path = spec(grid)
    one = run_cli("sweep", str(path), "--out", str(tmp_path / "one"), "--json")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([launcher, "-n", "2", sys.executable, "-m", "lsaq_mlx", "sweep", str(path), "--out",
                          str(tmp_path / "two"), "--json"], capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr
    one_rows, _ = read_results(tmp_path / "one" / "results.jsonl")
    two_rows, _ = read_results(tmp_path / "two" / "results.jsonl")
    assert list(one_rows) == list(two_rows)  # the same cells, in the same order, each once
    assert {r["rank"] for r in two_rows.values()} == {0, 1}
    for key, row in one_rows.items():
        (*same, ppl, kl), = values([row])
        (*same_two, ppl_two, kl_two), = values([two_rows[key]])
        # ranks split the cores, so BLAS sums in another order: equal up to rounding (the source's
        # KL to itself is ~3e-6, all rounding, hence the absolute tolerance)
        assert same == same_two and (ppl, kl) == pytest.approx((ppl_two, kl_two), rel=1e-5, abs=1e-7)
    assert (tmp_path / "one" / "results.md").read_text() == (tmp_path / "two" / "results.md").read_text()


RANK_REPORT = """
from lsaq_mlx.backend.blas import reexec_with_fast_blas
reexec_with_fast_blas()
import fcntl, json, os, struct, termios
from lsaq_mlx.backend.blas import preloaded_openblas
from lsaq_mlx.backend.ranks import Ranks
ranks = Ranks()
blas = preloaded_openblas()
unread = struct.unpack("i", fcntl.ioctl(0, termios.FIONREAD, b"0000"))[0]
print(json.dumps({"rank": ranks.rank, "size": ranks.size, "blas_threads": blas and blas.openblas_get_num_threads(),
                  "launcher_nice": os.getpriority(os.PRIO_PROCESS, os.getppid()), "stdin_unread": unread}))
"""


def json_objects(text: str) -> list[dict]:
    """Every JSON object printed in ``text``: the launcher relays the ranks' lines as they
    come, so two may share a line."""
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at >= 0:
        value, end = decoder.raw_decode(text, at)
        found.append(value)
        at = text.find("{", end)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the stdin pipe the Linux way")
def test_ranks_quiet_the_launcher_and_share_the_cores(tmp_path):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    (tmp_path / "report.py").write_text(RANK_REPORT)
    done = subprocess.run([launcher, "-n", "2", sys.executable, str(tmp_path / "report.py")], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    reports = sorted(json_objects(done.stdout), key=lambda r: r["rank"])
    assert [(r["rank"], r["size"]) for r in reports] == [(0, 2), (1, 2)]
    for r in reports:
        assert r["launcher_nice"] == 19
        assert r["stdin_unread"] >= 4096  # the relay's select no longer sees a writable pipe
        if find_fast_blas():
            assert r["blas_threads"] == max(1, os.cpu_count() // 2)


def test_local_rank_count_reads_the_ring_hostfile(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.1:5001"], ["10.0.0.2:5000"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hosts))
    for rank, expected in ((0, 2), (1, 2), (2, 1)):
        monkeypatch.setenv("MLX_RANK", str(rank))
        assert local_rank_count() == expected
    hosts.write_text("not json")
    assert local_rank_count() == 1
    monkeypatch.delenv("MLX_HOSTFILE")
    assert local_rank_count() == 1


def test_bad_specs_give_one_line_errors(spec, tmp_path):
    model = tmp_path / "tiny.gguf"
    assert_one_line_error(run_cli("sweep", str(spec(""))), "describes no cells")
    assert_one_line_error(run_cli("sweep", str(tmp_path / "nope.toml")), "sweep spec not found")
    assert_one_line_error(run_cli("sweep", str(spec(GRID.format(model=model).replace('"uniform"', '"fancy"')))),
                          "unknown method 'fancy'")
    missing = spec(GRID.format(model=model)).read_text().replace(str(tmp_path / "text.txt"), str(tmp_path / "gone.txt"))
    (tmp_path / "spec.toml").write_text(missing)
    missing = run_cli("sweep", str(tmp_path / "spec.toml"))
    assert_one_line_error(missing, "spec.toml [eval] ppl: perplexity text not found")
    assert "--ppl" not in missing.stderr  # a spec's user never typed that flag
    assert_one_line_error(run_cli("sweep", str(spec(GRID.format(model=model), 'tasks = ["piqa"]\ndata_dir = "/nope"'))),
                          "task folder not found")
    (tmp_path / "spec.toml").write_text("[[grid]\n")
    assert_one_line_error(run_cli("sweep", str(tmp_path / "spec.toml")), "is not valid TOML")


def test_markdown_table_shows_failures():
    rows = [{"model": "m", "method": "uniform", "budget": 1.5, "low_fraction": None, "status": "failed",
             "error": "no | way"}]
    assert "failed: no \\| way" in markdown_table(rows)


def test_eval_and_a_sweep_work_from_an_empty_folder_with_the_packaged_text(tmp_path, empty_cache, monkeypatch):
    import lsaq_mlx.evaluation.data_sources as eval_run

    write_gguf(tiny_model("llama"), "llama", tmp_path / "tiny.gguf")
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("LSAQ_MLX_DATA", raising=False)
    monkeypatch.setattr(eval_run, "data_roots", lambda: [])  # not even this checkout's ../shared/data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("eval", "-m", str(tmp_path / "tiny.gguf"), "--max-tokens", "128", "--seq-len", "64", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["perplexity"]["data"] == eval_run.PACKAGED_NAME
    (work / "spec.toml").write_text(f'out = "res"\n[eval]\nmax_tokens = 128\nseq_len = 64\n[[grid]]\n'
                                    f'models = ["{tmp_path / "tiny.gguf"}"]\nmethods = ["uniform"]\nbudgets = [4.6]\n')
    result = run_cli("sweep", "spec.toml")
    assert result.returncode == 0, result.stderr
    rows = list(read_results(work / "res" / "results.jsonl")[0].values())
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["eval"]["perplexity"]["data"] == eval_run.PACKAGED_NAME
