"""Adding a metric is one entry in one table: the trivial one below goes through
``score`` (whole and streamed), the cache and the checks with nothing else changed."""

import pytest

from lsaq_mlx.errors import UserError
from lsaq_mlx.scoring.registry import METRICS, Metric, layer_count
from lsaq_mlx.scoring.run import ScoreOptions, cached_score, score


def depth(model, sequences, opts, progress):
    n = layer_count(model)
    return [i / n for i in range(n)]


def tokens_seen(model, sequences, opts, progress):
    progress(opts.tokens)
    return [float(sum(len(s) for s in sequences))] * layer_count(model)


@pytest.mark.parametrize("stream", ["never", "always"])
def test_a_metric_added_as_one_entry_scores_and_caches(tiny_llama, empty_cache, monkeypatch, stream):
    monkeypatch.setenv("LSAQ_MLX_STREAM", stream)
    monkeypatch.setitem(METRICS, "depth", Metric("depth", "a layer's place in the stack", depth, depth,
                                                 calibrated=False))
    monkeypatch.setitem(METRICS, "tokens-seen", Metric("tokens-seen", "calibration tokens read", tokens_seen,
                                                       tokens_seen, params=lambda o: {"probe": 1}))
    result = score(tiny_llama, ScoreOptions(metric="depth"))
    assert result.scores[:2] == [0.0, pytest.approx(1 / len(result.scores))] and result.params == {}
    assert cached_score(tiny_llama, ScoreOptions(metric="depth")) == result
    seen = score(tiny_llama, ScoreOptions(metric="tokens-seen", tokens=64, seq_len=32))
    assert seen.scores[0] == 64 and seen.params["probe"] == 1 and seen.params["tokens"] == 64
    with pytest.raises(UserError, match="unknown metric 'nothing' .*depth"):
        ScoreOptions(metric="nothing").check()


def test_a_quantizer_made_of_known_steps_is_one_table_row(tiny_llama, tmp_path, monkeypatch):
    """``quantizers.QUANTIZERS`` is the whole of a quantizer that combines known steps:
    this one (GPTQ without equalization, refitted) converts with nothing else changed."""
    import mlx.core as mx

    from lsaq_mlx.convert import convert
    from lsaq_mlx.planning.methods import plan_uniform
    from lsaq_mlx.planning.planner import Planner
    from lsaq_mlx.quantizers import QUANTIZERS, Quantizer

    monkeypatch.setitem(QUANTIZERS, "gptq-refit", Quantizer("gptq-refit", False, True, "GPTQ, then refitted", True))
    plan = plan_uniform(Planner(tiny_llama).context(), None, 4, 32)
    report = convert(tiny_llama, plan, tmp_path / "q", quantizer="gptq-refit", smoke_tokens=2)
    assert report.quantizer == "gptq-refit"
    weights = mx.load(str(next((tmp_path / "q").glob("*.safetensors"))))
    assert any(name.endswith(".scales") for name in weights)


def test_a_planning_method_is_one_table_entry(tiny_llama, monkeypatch):
    from lsaq_mlx.planning.method_table import METHODS, PlanningMethod
    from lsaq_mlx.planning.methods import plan_uniform
    from lsaq_mlx.planning.planner import Planner, PlanRequest

    def smallest(planner, ctx, budgets, request):  # the smallest uniform plan, whatever the budget
        return [plan_uniform(ctx, None, 2, 128) for _ in budgets]

    monkeypatch.setitem(METHODS, "smallest", PlanningMethod("smallest", "2 bits everywhere", smallest))
    plans = Planner(tiny_llama).plans(PlanRequest(method="smallest", bits_budgets=[4.0, 6.0]))
    assert len(plans) == 2 and all(c.bits == 2 for c in plans[0].modules.values())
    with pytest.raises(UserError, match="unknown method 'largest' .*smallest"):
        PlanRequest(method="largest", bits_budgets=[4.0]).check()


def test_a_source_format_is_one_table_entry(tiny_llama, monkeypatch, tmp_path):
    """``sources.resolve.SOURCE_FORMATS``: a format recognised and resolved by its entry alone
    (this one: a text file naming a model folder)."""
    from lsaq_mlx.sources import resolve
    from lsaq_mlx.sources.resolve import SourceFormat, resolve_model

    pointer = tmp_path / "model.pointer"
    pointer.write_text(str(tiny_llama.path))
    entry = SourceFormat("pointer", "a .pointer file naming a model folder",
                         lambda spec, path: path.suffix == ".pointer",
                         lambda spec, path: resolve_model(path.read_text().strip()))
    monkeypatch.setattr(resolve, "SOURCE_FORMATS", [entry, *resolve.SOURCE_FORMATS])
    resolved = resolve_model(str(pointer))
    assert resolved.kind == "folder" and resolved.path == tiny_llama.path.resolve()
    assert "a .pointer file naming a model folder" in resolve.source_help()
