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
    from lsaq_mlx.quantizers import QUANTIZERS, Gptq

    monkeypatch.setitem(QUANTIZERS, "gptq-refit", Gptq("gptq-refit", "GPTQ, then refitted", refit=True))
    plan = plan_uniform(Planner(tiny_llama).context(), None, 4, 32)
    report = convert(tiny_llama, plan, tmp_path / "q", quantizer="gptq-refit", smoke_tokens=2)
    assert report.quantizer == "gptq-refit"
    weights = mx.load(str(next((tmp_path / "q").glob("*.safetensors"))))
    assert any(name.endswith(".scales") for name in weights)


def test_a_quantizer_with_its_own_step_is_one_class_and_one_row(tiny_llama, tmp_path, monkeypatch):
    """A quantizer is a strategy: this one sees every calibrated module's input Hessian
    (the LM head's too) and otherwise rounds to nearest, so it writes rtn's codes."""
    from dataclasses import dataclass

    import mlx.core as mx

    from lsaq_mlx.convert import convert
    from lsaq_mlx.planning.methods import plan_uniform
    from lsaq_mlx.planning.planner import Planner
    from lsaq_mlx.quantizers import QUANTIZERS, Quantizer

    seen = {}

    @dataclass(frozen=True)
    class Watching(Quantizer):
        uses_hessian = True

        def codes(self, weight, inputs, choice, clip):
            seen[weight.shape] = inputs.hessian.shape
            return super().codes(weight, inputs, choice, clip)

    monkeypatch.setitem(QUANTIZERS, "watching", Watching("watching", "rtn, watching"))
    plan = plan_uniform(Planner(tiny_llama).context(), None, 4, 32)
    convert(tiny_llama, plan, tmp_path / "w", quantizer="watching", smoke_tokens=2)
    convert(tiny_llama, plan, tmp_path / "r", quantizer="rtn", smoke_tokens=2)
    assert seen and all(h == (w[1], w[1]) for w, h in seen.items())
    written, rtn = (mx.load(str(next((tmp_path / d).glob("*.safetensors")))) for d in "wr")
    assert written.keys() == rtn.keys() and all(mx.array_equal(written[k], rtn[k]) for k in rtn)


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


def test_a_codec_is_one_class_and_one_entry(tiny_llama, monkeypatch):
    """``planning.choices.CODECS``: a codec (this one: drop the matrix, zero bytes) read
    from a plan file, priced for the cost table and built by a swap with nothing else
    changed."""
    from dataclasses import dataclass

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from lsaq_mlx.planning import choices
    from lsaq_mlx.planning.cost import module_errors
    from lsaq_mlx.planning.methods import plan_uniform
    from lsaq_mlx.planning.plan import QuantPlan
    from lsaq_mlx.planning.planner import Planner
    from lsaq_mlx.runtime.swap import quantized_module
    from lsaq_mlx.sources.tensors import source_tensors

    @dataclass(frozen=True)
    class Drop:
        key = label = "drop"

        def weight_bytes(self, rows, cols):
            return 0

        def config(self):
            return {"codec": "drop"}

        @classmethod
        def from_config(cls, value):
            return cls() if value == {"codec": "drop"} else None

        @staticmethod
        def errors(weight, fisher, group):
            return [(fisher * mx.square(weight)).sum().item()] * len(group)

        def module(self, float_module):
            float_module.weight = mx.zeros_like(float_module.weight)
            return float_module

    monkeypatch.setattr(choices, "CODECS", [*choices.CODECS, Drop])
    plan = plan_uniform(Planner(tiny_llama).context(), None, 4, 32)
    path = next(p for p in plan.modules if p.endswith("mlp.down_proj"))
    plan.modules[path] = Drop()
    assert QuantPlan.from_dict(plan.to_dict()).modules[path] == Drop()

    w = mx.random.normal((8, 64))
    errors = module_errors(w, mx.ones_like(w), [choices.Affine(4, 32), Drop()])
    assert errors["drop"] == pytest.approx(float(np.square(np.array(w)).sum()), rel=1e-5)
    assert errors["drop"] > errors["4/32"] > 0

    model = nn.Linear(1, 1)
    built = quantized_module(model, path, Drop(), source_tensors(tiny_llama))
    assert not np.array(built.weight).any()
