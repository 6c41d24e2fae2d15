"""Mixture-of-experts models through every stage, from Hugging Face checkpoints (each
expert's matrices apart, as the hub's folders hold them; ``hf_models``): layers read
one at a time through mlx-lm's own ``sanitize``, experts planned as one module of their
copies (what a stock ``SwitchLinear`` stores), routers at the model's floor, GPTQ per
expert on its routed tokens, swaps while a chat runs."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from converted_models import assert_loads_with_only_mlx_lm, smaller_plan_direct_and_as_track
from hf_models import CONFIGS, write_hf_folder

from lsaq_mlx.modules import layer_index

MOE_TYPES = list(CONFIGS)


@pytest.fixture(scope="module")
def hf_moe(session_cache, tmp_path_factory):
    """``hf_moe(model_type)``: a resolved tiny HF-layout checkpoint, made once."""
    from lsaq_mlx.sources import resolve_model

    default = resolve_model("default").path
    made = {}

    def make(model_type):
        if model_type not in made:
            folder = write_hf_folder(model_type, tmp_path_factory.mktemp(model_type) / model_type, default)
            made[model_type] = resolve_model(str(folder))
        return made[model_type]

    return make


def _experts(model_type):
    return CONFIGS[model_type].get("num_experts") or CONFIGS[model_type]["num_local_experts"]


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_experts_are_one_module_of_their_copies_and_routers_keep_the_models_floor(hf_moe, model_type):
    from lsaq_mlx.planning.methods import PlanningContext
    from lsaq_mlx.sources.load import skeleton_model

    model = skeleton_model(hf_moe(model_type))[0]
    ctx = PlanningContext(model, "fingerprint")
    experts = [q for q in ctx.modules if "switch_mlp" in q.path]
    assert experts and all(q.copies == _experts(model_type) for q in experts)
    stacked = dict(tree_flatten(model.parameters()))
    assert all(q.params == stacked[f"{q.path}.weight"].size for q in experts)
    assert ctx.parameters == sum(v.size for v in stacked.values())
    routers = [q for q in ctx.modules if q.path.endswith((".gate", ".router"))]
    floor = getattr(model, "quant_predicate", None)
    assert routers
    for q in routers:  # the model's own floor, else 8 bits
        wanted = floor(q.path, None) if floor else None
        bits = [getattr(c, "bits", 16) for c in ctx.candidates(q)]
        assert min(bits) >= (wanted["bits"] if isinstance(wanted, dict) else 8), (q.path, bits)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_a_checkpoint_with_experts_apart_or_fused_is_read_a_layer_at_a_time(hf_moe, model_type):
    from mlx_lm import load

    from lsaq_mlx.sources.streaming import StreamedModel

    source = hf_moe(model_type)
    streamed = StreamedModel(source)
    loaded = dict(tree_flatten(load(str(source.path), lazy=True)[0].parameters()))
    assert streamed.tensors.sanitizers  # the experts are stacked by sanitize, one layer at a time
    for i in range(len(streamed.layers)):
        params = streamed.layer_parameters(i)
        held = {streamed.prefixes[i] + n.removesuffix(".weight") for n in params}
        assert not held & set(streamed.expert_stacks)  # the experts are read by blocks, never held
        for name, value in params.items():
            expected = loaded[streamed.prefixes[i] + name].astype(value.dtype)
            assert mx.array_equal(value, expected), name
    stacks = streamed.expert_stacks
    assert {layer_index(p) for p in stacks} == set(range(len(streamed.layers)))
    for path, stack in stacks.items():
        expected = loaded[f"{path}.weight"].astype(mx.float32)
        first, last = 1, stack.shape[0] - 1
        assert mx.array_equal(stack.block(first, last), expected[first:last]), path


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_a_quantized_folders_experts_are_read_a_block_of_experts_at_a_time_as_exact_floats(hf_moe, model_type,
                                                                                           tmp_path):
    """A folder of mlx-lm's quantized experts (how the hub holds MoE models): the streamed
    model holds none of them; each block read is the stored codes dequantized exactly."""
    from mlx_lm import convert, load
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from lsaq_mlx.backend.expert_blocks import experts_of
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.streaming import StreamedModel

    convert(str(hf_moe(model_type).path), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    streamed = StreamedModel(resolve_model(str(tmp_path / "q4")))
    stored = dict(load(str(tmp_path / "q4"))[0].named_modules())
    expected = {p: m for p, m in stored.items() if isinstance(m, QuantizedSwitchLinear)}
    assert expected and set(streamed.expert_stacks) == set(expected)
    modules = dict(streamed.model.named_modules())
    for path, m in expected.items():
        assert "weight" not in modules[path]
        whole = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), 32, 4)
        first, last = 1, m.weight.shape[0] - 1
        assert mx.array_equal(experts_of(modules[path]).block(first, last), whole[first:last]), path


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_streamed_scores_equal_whole_model_scores(hf_moe, model_type, monkeypatch):
    from lsaq_mlx.scoring.run import ScoreOptions, score

    results = {}
    for stream in ("always", "never"):
        monkeypatch.setenv("LSAQ_MLX_STREAM", stream)
        results[stream] = score(hf_moe(model_type), ScoreOptions(tokens=128, seq_len=64)).scores
    np.testing.assert_allclose(results["always"], results["never"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_moe_converts_with_gptq_per_expert_and_loads_in_stock_mlx_lm(hf_moe, model_type, tmp_path):
    from lsaq_mlx.convert import convert
    from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
    from lsaq_mlx.gptq import hessians
    from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.sources import load_model

    source = hf_moe(model_type)
    budget = 3.0 if model_type == "qwen3_5_moe" else 4.0  # at 4.0 its tiny layers all stay float16
    plan = Planner(source).plan(PlanRequest(bits_budgets=[budget]))
    assert any("switch_mlp" in p for p in plan.modules)
    for quantizer in ("rtn", "gptq"):
        convert(source, plan, tmp_path / quantizer, quantizer=quantizer, smoke_tokens=2)
    assert_loads_with_only_mlx_lm(tmp_path / "gptq")
    rtn, gptq = ({k: v for f in (tmp_path / q).glob("*.safetensors") for k, v in mx.load(str(f)).items()}
                 for q in ("rtn", "gptq"))
    expert = next(n for n in rtn if "switch_mlp" in n and n.endswith(".weight") and rtn[n].dtype == mx.uint32)
    assert not mx.array_equal(rtn[expert], gptq[expert])  # GPTQ reached the experts

    model, tokenizer = load_model(source, compute=True)[:2]
    held_out = token_sequences(tokenizer, load_calibration(None), 512, 128, skip_tokens=hessians.TOKENS)
    reference = ReferenceDistributions.compute(model, [t for s in held_out for t in s], 128)
    kl = {q: compare_to_reference(load_model(_source(tmp_path / q), compute=True)[0], reference).kl for q in ("rtn", "gptq")}
    assert 0 < kl["gptq"] < kl["rtn"]


def _source(folder):
    from lsaq_mlx.sources import resolve_model

    return resolve_model(str(folder))


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_a_swap_builds_stacked_experts_from_the_checkpoint(hf_moe, model_type):
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    from lsaq_mlx.planning.choices import Affine
    from lsaq_mlx.runtime.swap import quantized_module
    from lsaq_mlx.sources import load_model
    from lsaq_mlx.sources.model_tensors import ModelTensors
    from lsaq_mlx.sources.tensors import source_tensors

    source = hf_moe(model_type)
    model = load_model(source, compute=False, lazy=True)[0]
    path, old = next((p, m) for p, m in model.named_modules() if isinstance(m, SwitchLinear))
    built = quantized_module(old, path, Affine(4, 32), ModelTensors(source_tensors(source), model))
    assert isinstance(built, QuantizedSwitchLinear)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p == path)
    expected = dict(model.named_modules())[path]
    assert mx.array_equal(built.weight, expected.weight)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_the_experts_fisher_one_expert_at_a_time_equals_the_whole_models(hf_moe, model_type, monkeypatch):
    from test_streaming import TOKENS, fisher_collector, whole_model_fisher

    import lsaq_mlx.backend.expert_blocks as blocks

    from lsaq_mlx.modules import module_at
    from lsaq_mlx.planning.cost import module_errors
    from lsaq_mlx.planning.fisher import streamed_fisher
    from lsaq_mlx.planning.planner import Planner
    from lsaq_mlx.sources import load_model
    from lsaq_mlx.sources.streaming import StreamedModel

    source = hf_moe(model_type)
    modules = [q for q in Planner(source).context().modules if q.layer is not None]
    model = load_model(source)[0]
    reference = whole_model_fisher(model, [q.path for q in modules], TOKENS)
    fisher, errors, collect = fisher_collector(modules)
    monkeypatch.setattr(blocks, "EXPERT_BLOCK_BYTES", 1)  # the streamed layer's experts computed one at a time
    streamed_fisher(StreamedModel(source), TOKENS, modules, collect)
    for q in modules:
        expected = np.array(reference[q.path])
        got = np.stack([np.array(b) for b in fisher[q.path]]) if q.copies > 1 else np.array(fisher[q.path][0])
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-6 * float(np.abs(expected).max()))
        direct = module_errors(module_at(model, q.path).weight, reference[q.path], q.choices())
        for key, value in direct.items():
            assert errors[q.path][key] == pytest.approx(value, rel=2e-3), (q.path, key)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_streamed_experts_read_by_blocks_compute_what_float32_computes(hf_moe, model_type, monkeypatch):
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import SwitchLinear

    import lsaq_mlx.backend.expert_blocks as blocks
    from lsaq_mlx.sources.streaming import StreamedModel

    streamed = StreamedModel(hf_moe(model_type))
    x = mx.random.normal((2, 70, 64), key=mx.random.key(1))  # 140 tokens: mlx-lm sorts them by expert
    cotangent = mx.random.normal(x.shape, key=mx.random.key(2))
    with streamed.layer(1) as layer:
        experts = {p: m for p, m in layer.named_modules() if isinstance(m, SwitchLinear)}
        assert experts and not any("weight" in m for m in experts.values())  # read from the file, not held
        stacks = {p: blocks.experts_of(m) for p, m in experts.items()}
        one_expert = 4 * math.prod(next(iter(stacks.values())).shape[1:])
        monkeypatch.setattr(blocks, "EXPERT_BLOCK_BYTES", one_expert)
        (out,), (grad,) = mx.vjp(lambda h: (layer(h),), [x], [cotangent])
        for m in experts.values():
            m.__class__ = SwitchLinear
            m["weight"] = mx.zeros(())
        layer.update(tree_unflatten([(f"{p}.weight", s.block(0, s.shape[0])) for p, s in stacks.items()]))
        (expected,), (expected_grad,) = mx.vjp(lambda h: (layer(h),), [x], [cotangent])
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(grad), np.array(expected_grad), rtol=1e-5, atol=1e-5)


def test_blocked_experts_hold_one_block_of_float32_weights_forward_and_back(monkeypatch):
    """Peak memory of a product and its gradient through stacked float16 experts stays
    below a quarter of their float32 weights: while the vjp's graph held each evaluated
    block's product, every block's upcast experts stayed alive with it (twice the
    float32 weights, 5.2 GB for a Qwen3-30B-A3B layer)."""
    from mlx_lm.models.switch_layers import SwitchLinear

    import lsaq_mlx.backend.expert_blocks as blocks

    experts, out_dims, in_dims = 32, 512, 256
    monkeypatch.setattr(blocks, "EXPERT_BLOCK_BYTES", 4 * out_dims * in_dims)  # one expert a block
    layer = SwitchLinear(in_dims, out_dims, experts, bias=False)
    layer.set_dtype(mx.float16)
    blocks.make_blocked(layer)
    x = mx.random.normal((64, 1, 1, in_dims))
    indices = mx.random.randint(0, experts, (64, 4)).astype(mx.uint32)
    cotangent = mx.ones((64, 4, 1, out_dims))
    mx.eval(layer.parameters(), x, indices, cotangent)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(mx.vjp(lambda h: (layer(h, indices),), [x], [cotangent]))
    assert mx.get_peak_memory() - before < 4 * experts * out_dims * in_dims / 4


def test_experts_hessians_are_fitted_only_and_kept_one_per_expert(hf_moe):
    """Held-out inputs check the rows of matrices, never experts: a layer's expert
    Hessians (8.6 GB at Qwen3-235B-A22B) are made once, not again for held-out text; an
    expert that fewer tokens than inputs reached keeps its rows (smaller)."""
    from lsaq_mlx.gptq.hessians import each_layer_hessians
    from lsaq_mlx.gptq.solver import ExpertHessians
    from lsaq_mlx.sources.streaming import StreamedModel

    streamed = StreamedModel(hf_moe("qwen3_moe"))
    paths = {p for p, m in streamed.model.named_modules() if isinstance(m, nn.Linear) or "switch_mlp." in p}
    seen, kinds = [], set()

    def on_modules(modules, hessians, layer):
        if layer is not None:
            seen.append((dict(hessians), dict(hessians.held_out)))

    for sequences in (3, 12):  # 16 and 176 routed rows per expert on average; 64 inputs
        tokens = mx.random.randint(0, 1000, (sequences, 32), key=mx.random.key(3))
        each_layer_hessians(streamed, tokens, paths, on_modules, held_out=1)
    assert seen
    for fitted, held_out in seen:
        experts = [p for p, h in fitted.items() if isinstance(h, ExpertHessians)]
        assert experts and held_out and not set(experts) & set(held_out)
        for p in experts:
            h = fitted[p]
            assert all((g is None) == (n == 0) for g, n in zip(h.hessians, h.tokens))
            kinds |= {(g.shape[0] < g.shape[1], g.shape[0] == n) for g, n in zip(h.hessians, h.tokens) if n}
    assert kinds == {(True, True), (False, False)}, kinds  # rows while fewer than the inputs, else a Hessian


@pytest.mark.parametrize("quantizer", ["rtn", pytest.param("awq-gptq", marks=pytest.mark.slow)])
def test_an_adaptive_folder_stores_its_experts_smaller_settings_and_swaps_to_them(hf_moe, quantizer, tmp_path):
    """The smaller settings of stacked experts are made by the quantizer (GPTQ per expert
    on its routed tokens, or rounding the float experts an expert at a time) and stored;
    a plan built live holds them, and a swap down and back up gives the stored tensors."""
    from cli_run import run_cli

    from lsaq_mlx.adaptive.folder import AdaptiveFolder, planner_for
    from lsaq_mlx.runtime import Engine
    from lsaq_mlx.runtime.options import RuntimeOptions

    done = run_cli("convert", "-m", hf_moe("qwen3_moe").path, "--adaptive", "3,4,6", "--quantizer", quantizer,
                   "--adaptive-size", "10", "-o", tmp_path / "a")
    assert done.returncode == 0, done.stderr
    source = _source(tmp_path / "a")
    folder = AdaptiveFolder.open(source.path)
    assert any("switch_mlp" in path for path, _ in folder.store.settings())
    built = 0
    for plan in folder.plans.plans[:-1]:
        params = dict(tree_flatten(folder.model_at(source, plan)[0].parameters()))
        for path, choice in plan.modules.items():
            if "switch_mlp" in path and choice != folder.top.modules[path]:
                stored = folder.store.module(path, choice)
                assert stored.weight.ndim == 3 and mx.array_equal(params[f"{path}.weight"], stored.weight)
                built += 1
    assert built
    engine = Engine(source, planner_for(source), RuntimeOptions()).start()
    try:
        before = dict(tree_flatten(engine.model.parameters()))
        assert not engine.apply_budget(3).result(120).failed
        assert engine.chat("hello", 3).result(120).stats.generation_tokens >= 1
        assert not engine.apply_budget(6).result(120).failed
        after = dict(tree_flatten(engine.model.parameters()))
        assert after.keys() == before.keys() and all(mx.array_equal(after[k], before[k]) for k in before)
    finally:
        engine.shutdown()


def test_an_adaptive_folders_smaller_expert_settings_are_fitted_on_their_own_plans_routed_tokens(hf_moe, tmp_path,
                                                                                                  monkeypatch):
    """Each smaller plan's experts are fitted on the tokens routed to them in that plan's
    own activation track, so its codes equal a direct convert's, layer 1 on too."""
    monkeypatch.setattr("lsaq_mlx.gptq.solver.MIN_EXPERT_TOKENS", 1)  # every expert calibrated
    direct, made = smaller_plan_direct_and_as_track(hf_moe("qwen3_moe"), tmp_path, monkeypatch)
    experts = [p for p in made if "switch_mlp" in p and layer_index(p) >= 1]
    assert set(made) == set(direct) and experts
    for path in experts:
        assert np.array_equal(made[path].weight, np.array(direct[path]["weight"])), path


def test_a_tracks_hessians_wait_on_disk_and_read_back_as_they_were(tmp_path):
    from lsaq_mlx.gptq.hessians import SpilledHessians
    from lsaq_mlx.gptq.solver import ExpertHessians

    rng = np.random.default_rng(1)
    matrix, experts = rng.normal(size=(8, 8)).astype(np.float32), [rng.normal(size=(3, 8)).astype(np.float32), None]
    found = {"a.qkv": matrix, "a.experts": ExpertHessians(list(experts), np.array([3, 0]))}
    spilled = SpilledHessians.saved(found, tmp_path / "0-1").renamed({"a.q_proj": "a.qkv", "a.k_proj": "a.qkv",
                                                                     "a.switch": "a.experts"})
    assert not found and len(list((tmp_path / "0-1").glob("*.npy"))) == 2  # nothing left in memory; None not saved
    assert all(np.array_equal(spilled[p], matrix) for p in ("a.q_proj", "a.k_proj")) and spilled.held_out == {}
    read = spilled.get("a.switch")
    assert np.array_equal(read.hessians[0], experts[0]) and read.hessians[1] is None and list(read.tokens) == [3, 0]
    assert spilled.get("a.o_proj") is None


def test_equalization_scales_the_tracks_hessians_that_wait_on_disk_as_those_in_memory(tmp_path):
    """Equalization divides each input channel of a group by its scale, so every ``H``
    of that input, of every track, is scaled with it; a track's ``H`` on disk too (read
    anew each time, it was once scaled and dropped, and the smaller settings were fitted
    on inputs that were not equalized)."""
    from lsaq_mlx.gptq.hessians import LayerHessians, SpilledHessians
    from lsaq_mlx.gptq.writer import _scale_inputs

    rng = np.random.default_rng(2)
    fitted, held = (rng.normal(size=(2, 6, 6)).astype(np.float32) for _ in range(2))
    factors = rng.uniform(0.5, 2.0, size=6).astype(np.float32)

    def hessians(spill: bool) -> LayerHessians:
        tracks = []
        for c in range(2):
            on, off = {"l.qkv": fitted[c].copy()}, {"l.qkv": held[c].copy()}
            if spill:
                on = SpilledHessians.saved(on, tmp_path / f"{c}").renamed({"l.q_proj": "l.qkv", "l.k_proj": "l.qkv"})
                on.held_out = SpilledHessians.saved(off, tmp_path / f"{c}-held").renamed({"l.q_proj": "l.qkv"})
            else:
                on = LayerHessians({"l.q_proj": on["l.qkv"], "l.k_proj": on["l.qkv"]}, {"l.q_proj": off["l.qkv"]})
            tracks.append(on)
        planned = fitted[0].copy()
        return LayerHessians({"l.q_proj": planned, "l.k_proj": planned}, {}, tracks)

    in_memory, on_disk = hessians(False), hessians(True)
    for each in (in_memory, on_disk):
        _scale_inputs(each, "l.q_proj", factors)
    scaled = lambda h: h * factors[:, None] * factors[None, :]  # noqa: E731
    np.testing.assert_allclose(on_disk["l.k_proj"], scaled(fitted[0]), rtol=1e-6)
    for c, (memory, disk) in enumerate(zip(in_memory.tracks, on_disk.tracks)):
        for path in ("l.q_proj", "l.k_proj"):  # one file, scaled once
            np.testing.assert_allclose(disk[path], scaled(fitted[c]), rtol=1e-6)
            np.testing.assert_allclose(memory[path], disk[path], rtol=1e-6)
        np.testing.assert_allclose(disk.held_out["l.q_proj"], scaled(held[c]), rtol=1e-6)
        np.testing.assert_allclose(memory.held_out["l.q_proj"], disk.held_out["l.q_proj"], rtol=1e-6)
    _scale_inputs(on_disk, "l.k_proj", 1.0 / factors)  # a refused fold is undone
    np.testing.assert_allclose(on_disk.tracks[1]["l.q_proj"], fitted[1], rtol=1e-5)


def test_expert_inputs_of_several_tracks_add_up_to_those_of_all_their_tokens():
    from lsaq_mlx.gptq.solver import ExpertHessians

    rng = np.random.default_rng(0)
    rows = [[rng.normal(size=(n, 8)).astype(np.float32) if n else None for n in counts]
            for counts in ((3, 10, 0, 0), (4, 2, 9, 0))]
    held = lambda r: None if r is None else r if r.shape[0] < 8 else r.T @ r  # noqa: E731  (as recorded)
    tracks = [ExpertHessians([held(r) for r in t], np.array([0 if r is None else r.shape[0] for r in t])) for t in rows]
    summed = ExpertHessians.summed(tracks)
    assert list(summed.tokens) == [7, 12, 9, 0] and summed.hessians[3] is None
    assert summed.hessians[0].shape == (7, 8)  # still fewer rows than inputs: kept as rows
    for e in range(3):
        every = np.concatenate([t[e] for t in rows if t[e] is not None])
        h = summed.hessians[e]
        np.testing.assert_allclose(h if h.shape[0] == 8 else h.T @ h, every.T @ every, rtol=1e-5, atol=1e-5)
