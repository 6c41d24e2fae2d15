import json
import os

import pytest

from cli_run import assert_one_line_error, run_cli
from lsaq_mlx.errors import UserError
from lsaq_mlx.scoring.scores import DEFAULT_STRIDE, LayerScores, spearman
from lsaq_mlx.scoring.run import ScoreOptions, score
from tiny_models import tiny_model, write_gguf


@pytest.fixture
def tiny(tiny_llama, empty_cache):
    """The session's tiny llama, scored into an empty cache."""
    return tiny_llama


def test_scores_are_cached_and_round_trip(tiny, tmp_path, empty_cache):
    opts = ScoreOptions(tokens=200, seq_len=64, top_k=5)
    first = score(tiny, opts)
    assert len(first.scores) == 2 and all(0.0 <= s <= 1.0 for s in first.scores)
    assert first.params["top_k"] == 5 and first.params["tokens"] == 200
    cached = list((empty_cache / "scores").glob("*.json"))
    assert len(cached) == 1
    assert score(tiny, opts).wall_seconds == first.wall_seconds  # read back, not recomputed
    first.save(tmp_path / "s.json")
    assert LayerScores.load(tmp_path / "s.json") == first
    other = score(tiny, ScoreOptions(tokens=200, seq_len=64, top_k=6))
    assert other.key != first.key


def test_stride_is_part_of_the_cache_key(tiny, empty_cache):
    default = score(tiny, ScoreOptions(tokens=100, seq_len=50, top_k=5))
    assert default.params["stride"] == DEFAULT_STRIDE
    every = score(tiny, ScoreOptions(tokens=100, seq_len=50, top_k=5, stride=1))
    assert every.params["stride"] == 1 and every.key != default.key
    assert len(list((empty_cache / "scores").glob("*.json"))) == 2
    assert ScoreOptions("cosine").stride == 1


@pytest.mark.parametrize("metric", ["cosine", "zscore", "random", "sensitivity"])
def test_every_metric(tiny, metric):
    result = score(tiny, ScoreOptions(metric=metric, tokens=100, seq_len=50), use_cache=False)
    assert result.metric == metric and len(result.scores) == 2


def test_bad_options(tiny):
    with pytest.raises(UserError, match="unknown metric"):
        score(tiny, ScoreOptions(metric="magic"))
    with pytest.raises(UserError, match="calibration tokens"):
        score(tiny, ScoreOptions(tokens=0))
    with pytest.raises(UserError, match="top-k"):
        score(tiny, ScoreOptions(top_k=301, tokens=50, seq_len=50), use_cache=False)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)


def test_score_cli(tmp_path):
    env = dict(os.environ, LSAQ_MLX_CACHE=str(tmp_path / "cache"))
    write_gguf(tiny_model("qwen3"), "qwen3", tmp_path / "q.gguf")
    model = ["-m", str(tmp_path / "q.gguf")]
    out = run_cli("score", *model, "--tokens", "120", "--seq-len", "60", "--json", "--plot", str(tmp_path / "s.png"),
                  "--out", str(tmp_path / "s.json"), env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["metric"] == "jaccard" and len(data["scores"]) == 2
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    human = run_cli("score", *model, "--metric", "zscore", env=env)
    assert human.returncode == 0 and "layer   1" in human.stdout
    run_cli("score", *model, "--metric", "random", "--out", str(tmp_path / "r.json"), env=env)
    plot = run_cli("plot-scores", str(tmp_path / "s.json"), str(tmp_path / "r.json"), "-o", str(tmp_path / "p.png"), env=env)
    assert plot.returncode == 0 and (tmp_path / "p.png").exists()
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(run_cli("score", *model, "--calib", str(tmp_path / "empty.txt"), env=env), "empty")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    assert_one_line_error(run_cli("score", *model, "--calib", str(tmp_path / "bad.txt"), env=env), "UTF-8")
    assert_one_line_error(run_cli("score", *model, "--top-k", "100000", env=env), "top-k")
    assert_one_line_error(run_cli("score", *model, "--tokens", "0", env=env), "--tokens")
    assert_one_line_error(run_cli("plot-scores", str(tmp_path / "nope.json"), env=env), "not found")
