"""Adaptive folders (``convert --adaptive``): stock mlx-lm opens them at their largest
plan; lsaq-mlx moves between every plan of the set without the float source, reading
the smaller settings the converter stored and rounding the others from the stored
weights; damaged side data costs a warning, never the model."""

import json
import shutil
import threading
import time
import urllib.request

import mlx.core as mx
import numpy as np
import pytest
from cli_run import assert_one_line_error, run_cli
from converted_models import assert_loads_with_only_mlx_lm
from mlx.utils import tree_flatten

from lsaq_mlx.adaptive.folder import PLANS_FILE, SIDE_FOLDER, AdaptiveFolder, AdaptivePlans, planner_for
from lsaq_mlx.adaptive.side import AdaptiveSide, SideSetting
from lsaq_mlx.adaptive.steps import CHANGED
from lsaq_mlx.errors import UserError
from lsaq_mlx.gptq.packing import pack_codes, unpack_codes
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.runtime import Engine
from lsaq_mlx.runtime.options import RuntimeOptions
from lsaq_mlx.sources import resolve_model

TOKENS = mx.array([[1, 5, 9, 42, 7]])


def _convert(source, out, *args):
    done = run_cli("convert", "-m", source.path, "--adaptive", "3,4,6", "-o", out, *args)
    assert done.returncode == 0, done.stderr
    return resolve_model(str(out))


@pytest.fixture(scope="module")
def adaptive(tiny_llama, tmp_path_factory):
    """The tiny model as an adaptive folder from awq-gptq, with room for every setting."""
    return _convert(tiny_llama, tmp_path_factory.mktemp("adaptive") / "a", "--quantizer", "awq-gptq",
                    "--adaptive-size", "10")


@pytest.fixture(scope="module")
def derived(tiny_llama, tmp_path_factory):
    """The same from rtn with no room: every smaller setting rounded from the stored weights."""
    return _convert(tiny_llama, tmp_path_factory.mktemp("adaptive") / "d", "--adaptive-size", "1")


def _params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_the_folder_opens_with_only_mlx_lm_at_its_largest_plan(adaptive):
    assert_loads_with_only_mlx_lm(adaptive.path)
    folder = AdaptiveFolder.open(adaptive.path)
    report = json.loads((adaptive.path / "lsaq_report.json").read_text())
    assert folder.budgets() == [3.0, 4.0, 6.0] and report["adaptive"]["budgets"] == [3.0, 4.0, 6.0]
    assert report["bits_per_weight"] == pytest.approx(folder.top.predicted_bits_per_weight, abs=1e-3)
    assert report["adaptive"]["settings_kept"] == report["adaptive"]["settings_made"] > 0
    assert folder.side_bytes() == report["adaptive"]["side_bytes"] > 0


def test_smaller_plans_give_no_module_more_bits_than_the_stored_one(adaptive):
    folder = AdaptiveFolder.open(adaptive.path)
    for plan in folder.plans.plans:
        for path, choice in plan.modules.items():
            assert getattr(choice, "bits", 16) <= getattr(folder.top.modules[path], "bits", 16)


def test_a_swap_down_and_back_up_gives_the_stored_tensors_exactly(adaptive):
    engine = Engine(adaptive, planner_for(adaptive), RuntimeOptions()).start()
    try:
        before, logits = _params(engine.model), np.array(engine.model(TOKENS))
        down = engine.apply_budget(3).result(120)
        assert down.changed > 0 and not down.failed and down.state.bits_per_weight < 3.1
        assert engine.chat("hello", 3).result(120).stats.generation_tokens >= 1
        assert not np.array_equal(np.array(engine.model(TOKENS)), logits)
        back = engine.apply_budget(6).result(120)
        assert not back.failed
        after = _params(engine.model)
        assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
        with pytest.raises(UserError, match=r"serves 3 to 6 bits per weight \(plans: 3, 4, 6\), not 8"):
            engine.apply_budget(8).result(120)
    finally:
        engine.shutdown()


def test_an_engine_started_below_the_stored_plan_swaps_before_it_reads_the_stored_model(derived, monkeypatch):
    """Started at 3 bits per weight from a folder stored at 6, the engine builds the
    starting plan's modules while the stored model is still unread (loaded lazily) and
    only then evaluates the model: the stored modules the start replaces are never in
    memory (at the 1.1B shape: 0.92 GB instead of 1.19 GB; a folder stored at 6 bits
    starts at 3 on a Mac that holds only 3)."""
    import lsaq_mlx.runtime.engine as engine_module

    prepare, seen = engine_module.prepare_for_compute, []

    def recording(model, **kwargs):
        seen.append({p: getattr(m, "bits", None) for p, m in model.named_modules()})
        return prepare(model, **kwargs)

    monkeypatch.setattr(engine_module, "prepare_for_compute", recording)
    folder = AdaptiveFolder.open(derived.path)
    start = folder.plan_for(3)
    engine = Engine(derived, planner_for(derived), RuntimeOptions(bits_budget=3)).start()
    engine.shutdown()
    lowered = [p for p, c in start.modules.items() if c.bits < folder.top.modules[p].bits]
    assert len(seen) == 1 and lowered
    assert all(seen[0][p] != folder.top.modules[p].bits for p in lowered)


def test_a_swap_gives_freed_memory_back_after_every_layer_group(derived, monkeypatch):
    """The heap pages of a layer group's reads and decodes go back to the system before
    the next group is built, not at the swap's end (at the 8B shape glibc kept 0.6 GB of
    them through a swap down)."""
    import lsaq_mlx.runtime.precision as precision
    from lsaq_mlx.runtime.swap import layer_groups

    calls = []
    monkeypatch.setattr(precision, "return_freed_memory", lambda: calls.append(1))
    folder = AdaptiveFolder.open(derived.path)
    plan = folder.plan_for(3)
    changes = {p: c for p, c in plan.modules.items() if c != folder.top.modules[p]}
    engine = Engine(derived, planner_for(derived), RuntimeOptions()).start()
    try:
        before = len(calls)
        assert not engine.apply_budget(3).result(120).failed
        assert len(calls) - before == len(layer_groups(changes)) > 1
    finally:
        engine.shutdown()


def test_a_live_plan_is_the_stored_setting_the_converter_made(adaptive, derived):
    """With room for every setting, the plan reached live holds the quantizer's codes
    (calibrated on the largest plan's activations, with its equalization: a stored
    smaller setting differs from rounding); with none, the stored weights rounded."""
    for source in (adaptive, derived):
        folder = AdaptiveFolder.open(source.path)
        plan = folder.plan_for(3)
        model, _ = folder.model_at(source, plan)
        params = _params(model)
        for path, choice in plan.modules.items():
            if choice == folder.top.modules[path]:
                continue
            stored = folder.store.module(path, choice) if folder.store else None
            assert (stored is not None) == (source is adaptive)
            if stored is not None:
                assert np.array_equal(params[f"{path}.weight"], np.array(stored.weight))


def test_eval_with_a_budget_builds_the_plan_chat_serves(adaptive):
    out = run_cli("eval", "-m", adaptive.path, "-b", "4", "--ppl", "packaged", "--max-tokens", "96", "--seq-len", "48",
                  "--json")
    assert out.returncode == 0, out.stderr
    assert "evaluating the lsaq plan of" in out.stderr and json.loads(out.stdout)["divergence"]["kl"] > 0


def test_chat_moves_down_and_up_in_a_piped_session(derived):
    done = run_cli("chat", "-m", derived.path, "--max-tokens", "3", input="hi\n/plan 3\nhi\n/plan 6\n/plan 2\n")
    assert done.returncode == 0, done.stderr
    assert "-> 2.99 bits/weight" in done.stderr and "-> 5.99 bits/weight" in done.stderr
    assert "serves 3 to 6 bits per weight" in done.stderr


def _copy(source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(source.path, copy)
    return copy


def test_a_damaged_plan_set_opens_the_stored_plan_with_a_warning(adaptive, tmp_path, caplog):
    copy = _copy(adaptive, tmp_path)
    data = json.loads((copy / PLANS_FILE).read_text())
    path, choice = next((p, c) for p, c in data["plans"][0]["modules"].items() if c)
    data["plans"][0]["modules"][path] = {"bits": 8, "group_size": choice["group_size"], "mode": "affine"}
    (copy / PLANS_FILE).write_text(json.dumps(data))
    assert AdaptiveFolder.open(copy) is None and "more bits than the folder stores" in caplog.text
    (copy / PLANS_FILE).write_text("{not json")
    assert not isinstance(planner_for(resolve_model(str(copy))), AdaptivePlans)
    (copy / PLANS_FILE).write_text(json.dumps(data))
    (copy / "config.json").write_text("[]")
    assert AdaptiveFolder.open(copy) is None and "does not describe this folder" in caplog.text


def test_damaged_side_data_falls_back_to_rounding(adaptive, tmp_path, caplog):
    copy = _copy(adaptive, tmp_path)
    files = sorted((copy / SIDE_FOLDER).iterdir())
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    source = resolve_model(str(copy))
    folder = AdaptiveFolder.open(copy)
    model, _ = folder.model_at(source, folder.plan_for(3))
    assert "layer store" in caplog.text
    assert np.isfinite(np.array(model(TOKENS))).all()
    shutil.rmtree(copy / SIDE_FOLDER)
    assert AdaptiveFolder.open(copy).store is None and "no lsaq_adaptive" in caplog.text


def test_a_stored_setting_that_does_not_fit_is_refused(adaptive, tmp_path, caplog):
    """Whole modules of the wrong shape or kind, steps whose counts do not add up or
    that lead out of the codes' range, and steps of the format before bands: each costs a
    warning, and the weights are rounded."""
    from lsaq_mlx.storage.layer_store import LayerStore

    copy = _copy(adaptive, tmp_path)
    folder = AdaptiveFolder.open(copy)
    plan = folder.plan_for(3)
    path, choice = next((p, c) for p, c in plan.modules.items() if c != folder.top.modules[p] and "layers.0." in p)
    store = LayerStore(copy / SIDE_FOLDER)
    steps = store.arrays(path, choice)[1]
    assert "changed_0" in steps and "weight" not in steps  # stored as steps from the stored codes
    good = dict(tree_flatten(folder.store.module(path, choice).parameters()))
    count = sum(steps[name].size for name in CHANGED)
    everywhere = steps | {name: mx.full(steps[name].shape, 255, mx.uint8) for name in CHANGED} | {
        "away": mx.zeros((count,), mx.uint8), "far": mx.full((count,), 255, mx.uint8),
        "distances": mx.full((8 * count,), 255, mx.uint8)}
    for bad, why in ((good | {"scales": mx.zeros((1, 1), mx.float16)}, "does not fit it"),
                     (good | {"weight": good["weight"].astype(mx.float32)}, "does not fit it"),
                     (steps | {"changed_0": steps["changed_0"][:-1]}, "changed"),
                     (steps | {"distances": mx.concatenate([steps["distances"], mx.ones((1,), mx.uint8)])}, "distances"),
                     (steps | {"scale_steps": steps["scale_steps"][:-2]}, "scale and bias steps"),
                     (everywhere, "out of"),
                     ({k: v for k, v in steps.items() if k not in (*CHANGED, "away")}  # as written before bands
                      | {"changed": steps["changed_0"], "lowered": steps["away"]}, "steps need")):
        store.add({(path, choice): ("QuantizedLinear", bad)})
        store.close()
        caplog.clear()
        model, _ = AdaptiveFolder.open(copy).model_at(resolve_model(str(copy)), plan)
        assert "does not fit it" in caplog.text and why in caplog.text
        assert np.isfinite(np.array(model(TOKENS))).all()


def test_the_store_keeps_the_best_gain_per_byte_within_its_share():
    def setting(name, size, gain):
        return SideSetting(name, Affine(3, 64), size, gain, {})

    side = AdaptiveSide.__new__(AdaptiveSide)
    side.size, side.candidates = 1.3, [setting("a", 20, 1.0), setting("b", 10, 1.0), setting("c", 10, -1.0),
                                       setting("d", 15, 0.9)]
    assert [c.path for c in side.choose(30)] == ["b", "d"]  # then a no longer fits; c gains nothing


def test_a_settings_gain_counts_as_a_share_of_each_plans_error_it_lowers():
    from types import SimpleNamespace

    from lsaq_mlx.planning.cost import CostTable

    plans = SimpleNamespace(plans=[SimpleNamespace(modules={"a": Affine(a, 64), "b": Affine(b, 64)})
                                   for a, b in ((3, 4), (4, 4), (6, 6))])
    side = AdaptiveSide.__new__(AdaptiveSide)
    side.plans, side.costs = plans, CostTable({"a": {"3/64": 8.0, "4/64": 2.0}, "b": {"4/64": 2.0}})
    assert side.shares == pytest.approx({("a", Affine(3, 64)): 1 / 10, ("a", Affine(4, 64)): 1 / 4,
                                         ("b", Affine(4, 64)): 1 / 10 + 1 / 4})  # b's 4 bits: both plans


def test_each_smaller_plan_is_a_track_unless_turned_off():
    from types import SimpleNamespace

    plans = SimpleNamespace(plans=[SimpleNamespace(modules={"a": Affine(b, 64), "b": Affine(8, 64)}) for b in (3, 4, 6)])
    side = AdaptiveSide.__new__(AdaptiveSide)
    side.plans, side.own_tracks = plans, True
    assert side.tracks == [{"a": Affine(3, 64), "b": Affine(8, 64)}, {"a": Affine(4, 64), "b": Affine(8, 64)}]
    side.own_tracks = False  # convert --no-adaptive-tracks
    assert side.tracks == []


def test_rounded_smaller_settings_are_made_one_at_a_time(tmp_path, monkeypatch):
    """Rounding's gains need no codes, so each smaller setting is made only when it is
    put on disk: one setting's codes in memory beside the stored ones (an 8B model's LM
    head has 0.3 GB of codes a setting), and what is stored is the weight rounded."""
    import weakref
    from types import SimpleNamespace

    import lsaq_mlx.adaptive.side as side_module

    live, most = [0], [0]
    rounded_codes = side_module.rounded_codes

    def counted(weight, choice):
        codes = rounded_codes(weight, choice)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(codes, lambda: live.__setitem__(0, live[0] - 1))
        return codes

    monkeypatch.setattr(side_module, "rounded_codes", counted)
    lower = [Affine(2, 64), Affine(3, 64), Affine(4, 64)]
    side = AdaptiveSide.__new__(AdaptiveSide)
    side.lower, side.scratch, side.candidates, side.collected = {"m": lower}, tmp_path, [], set()
    side.costs, side.shares = SimpleNamespace(cost=lambda path, choice: 1.0), {("m", c): 1.0 for c in lower}
    weight = mx.random.normal((256, 512))
    side.collect_rounded("m", weight, None, Affine(6, 64))
    assert most[0] == 2  # the stored (6-bit) codes and one smaller setting's
    assert [c.choice for c in side.candidates] == lower
    for c in side.candidates:
        assert mx.array_equal(c.arrays["weight"], mx.quantize(weight, 64, c.choice.bits)[0])


@pytest.mark.parametrize("args, match", [
    (("--adaptive", "4"), "at least two budgets"),
    (("--adaptive", "3-6", "-b", "4"), "leave out -b"),
    (("--adaptive", "three"), "budgets as 3-6 or 3,4,5,6"),
    (("--adaptive", "3-6", "--adaptive-size", "0.5"), "at least 1.0"),
    (("--adaptive", "3-6", "--codecs", "affine,swsc"), "affine settings only"),
])
def test_bad_adaptive_options_are_one_line(args, match):
    assert_one_line_error(run_cli("convert", *args), match)


def test_inspect_lists_the_plans_a_folder_serves(adaptive):
    out = run_cli("inspect", "-m", adaptive.path, "--json")
    assert out.returncode == 0, out.stderr
    plans = json.loads(out.stdout)["adaptive"]["plans"]
    assert [p["budget"] for p in plans] == [3.0, 4.0, 6.0] and plans[-1]["settings_rounded"] == 0
    assert plans[0]["settings_stored"] > 0 and plans[0]["bytes"] < plans[-1]["bytes"]
    assert "plans this adaptive folder serves" in run_cli("inspect", "-m", adaptive.path).stdout


class SetMemory:
    """A memory sampler whose available bytes the test sets while a reply streams; each
    sample takes a few milliseconds, so the engine, sampling between tokens, streams
    slowly enough for the test to change memory twice within one reply."""

    def __init__(self, available: int):
        self.available = available

    def sample(self):
        from lsaq_mlx.runtime.memory import MemorySample

        time.sleep(0.02)
        return MemorySample(self.available, 64 << 30, "normal", 0, 0, 0, time.monotonic())


def test_serve_auto_streams_on_across_a_swap_down_and_back_up(adaptive):
    openai = pytest.importorskip("openai")
    from lsaq_mlx.serve.server import ApiServer

    plans = AdaptiveFolder.open(adaptive.path).plans.plans
    reserve = plans[-1].predicted_bytes - plans[0].predicted_bytes  # with nothing available only the smallest fits
    plenty = 2 * plans[-1].predicted_bytes
    memory = SetMemory(plenty)
    engine = Engine(adaptive, planner_for(adaptive), RuntimeOptions(auto=True, budgets=(3, 4, 6), reserve_bytes=reserve),
                    sampler=memory, sample_every=0, policy_options={"min_interval": 0, "window": 1, "hysteresis": 0}).start()
    server = ApiServer(("127.0.0.1", 0), engine, "tiny", None, max_tokens=8)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def swaps() -> list:
        return json.load(urllib.request.urlopen(server.url + "/status", timeout=30))["swaps"]

    def wait_for_swaps(n: int) -> list:
        end = time.monotonic() + 120
        while len(swaps()) < n and time.monotonic() < end:
            time.sleep(0.01)
        return swaps()

    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
        ban = {str(t): -100 for t in server.info.eos_token_ids}
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a long one"}],
                                                max_tokens=3000, stream=True, logit_bias=ban)
        chunks, seen, after_swaps = [], [], 0
        for chunk in stream:
            chunks.append(chunk)
            after_swaps += bool(seen and chunk.choices[0].delta.content)
            if len(chunks) == 3:
                memory.available = 0  # only the smallest plan fits
                seen = wait_for_swaps(1)
                memory.available = plenty  # room for the stored plan again
                seen = wait_for_swaps(2)
        assert chunks[-1].choices[0].finish_reason == "length"
        info = chunks[-1].model_dump()["lsaq_mlx"]
        assert info["swaps"] == 2 and info["bits_per_weight_start"] == info["bits_per_weight_end"]
        assert seen[0]["reason"].startswith("auto down") and seen[1]["reason"].startswith("auto up")
        assert after_swaps > 10  # the same reply went on streaming after both
        assert seen[0]["to_bits_per_weight"] == pytest.approx(plans[0].predicted_bits_per_weight)
        assert seen[1]["to_bits_per_weight"] == pytest.approx(plans[-1].predicted_bits_per_weight)
    finally:
        server.shutdown()
        server.server_close()
        engine.shutdown()


def test_planning_on_the_folder_adopts_the_cost_table_it_carries(adaptive, tmp_path, monkeypatch, caplog):
    """convert leaves the cost table its plans were priced by (on the float source) in
    the folder: planning on the folder (ranks, live plans) reads it instead of a Fisher
    pass over the stored weights; a damaged copy is one warning and that pass."""
    from lsaq_mlx.planning import cost_table
    from lsaq_mlx.planning.planner import Planner, PlanRequest

    carried = json.loads((adaptive.path / cost_table.CARRIED_FILE).read_text())["errors"]
    fisher_passes = []
    real_fisher = cost_table.streamed_fisher
    monkeypatch.setattr(cost_table, "streamed_fisher", lambda *a, **k: fisher_passes.append(1) or real_fisher(*a, **k))
    monkeypatch.setenv("LSAQ_MLX_CACHE", str(tmp_path / "cache"))
    planner = Planner(adaptive)
    table = planner.cost_table(planner.context())
    assert fisher_passes == [] and table.errors and all(
        errs == {k: carried[p][k] for k in errs} for p, errs in table.errors.items())
    assert planner.plan(PlanRequest(bits_budgets=[4.0])).predicted_bits_per_weight <= 4.0

    damaged = tmp_path / "damaged"
    shutil.copytree(adaptive.path, damaged)
    (damaged / cost_table.CARRIED_FILE).write_text('{"errors": [1, 2]}')
    monkeypatch.setenv("LSAQ_MLX_CACHE", str(tmp_path / "cache2"))
    planner = Planner(resolve_model(str(damaged)))
    planner.cost_table(planner.context())
    assert fisher_passes == [1] and "damaged" in caplog.text


def _near_rounding(weight: mx.array, choice: Affine, seed: int):
    """A setting of ``weight`` at ``choice`` as a calibrated quantizer leaves it: rounding,
    with one code in eight a step away and a few far away, one group constant and one
    in eight clipped (its scale shrunk)."""
    weight = weight.at[..., 0, : choice.group_size].add(-weight[..., 0, : choice.group_size] + 0.5)
    codes, scales, biases = mx.quantize(weight, choice.group_size, choice.bits)
    rng = np.random.default_rng(seed)
    levels = unpack_codes(np.array(codes).reshape(-1, codes.shape[-1]), choice.bits).astype(np.int16)
    levels += rng.choice([0, 1, -1, 3, -5], size=levels.shape, p=[0.875, 0.06, 0.06, 0.0025, 0.0025]).astype(np.int16)
    levels = np.clip(levels, 0, (1 << choice.bits) - 1).astype(np.uint8)
    packed = pack_codes(levels, choice.bits).reshape(codes.shape)
    scales = np.array(scales.astype(mx.float16))
    scales[rng.random(scales.shape) < 0.125] *= np.float16(0.9)
    return packed, scales, np.array(biases.astype(mx.float16))


@pytest.mark.parametrize("bits,top_bits,shape", [(2, 4, (256, 512)), (3, 6, (256, 512)), (4, 6, (3, 128, 256)),
                                                 (5, 8, (256, 512)), (6, 6, (64, 512)), (8, 8, (64, 512))])
def test_steps_from_the_stored_codes_give_the_setting_back_exactly_in_fewer_bytes(bits, top_bits, shape, monkeypatch):
    import lsaq_mlx.adaptive.steps as module
    from lsaq_mlx.adaptive.steps import setting_from_steps, setting_steps
    from lsaq_mlx.storage.layer_store import encoded_bytes

    weight = mx.random.normal(shape, key=mx.random.key(bits))
    choice, top_choice = Affine(bits, 64), Affine(top_bits, 32)
    top = dict(zip(("weight", "scales", "biases"),
                   (np.array(a.astype(mx.float16) if a.dtype != mx.uint32 else a)
                    for a in mx.quantize(weight, top_choice.group_size, top_bits))))
    made = _near_rounding(weight, choice, bits)
    steps = setting_steps(*made, choice, top, top_choice)
    assert all(np.array_equal(a, b) for a, b in zip(setting_from_steps(steps, choice, top, top_choice), made))
    monkeypatch.setattr(module, "ROW_BLOCK_WEIGHTS", 5000)  # blocks of 8 or 16 rows: flags cut mid-byte
    assert all(np.array_equal(a, b) for a, b in zip(setting_steps(*made, choice, top, top_choice).values(),
                                                    steps.values()))
    assert all(np.array_equal(a, b) for a, b in zip(setting_from_steps(steps, choice, top, top_choice), made))
    whole = encoded_bytes(dict(zip(("weight", "scales", "biases"), map(mx.array, made))), choice)
    assert encoded_bytes({p: mx.array(a) for p, a in steps.items()}, choice) < 0.6 * whole


def test_the_side_store_keeps_a_setting_as_steps_and_reads_it_back_as_made(tmp_path):
    from types import SimpleNamespace

    from lsaq_mlx.adaptive.store import SideStore

    path, choice, top_choice = "model.layers.0.mlp.down_proj", Affine(3, 64), Affine(6, 64)
    weight = mx.random.normal((64, 256), key=mx.random.key(0))
    top = dict(zip(("weight", "scales", "biases"), mx.quantize(weight, 64, 6)))
    bias = mx.arange(64).astype(mx.float16)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {f"{path}.{p}": a for p, a in top.items()})
    codes, scales, biases = _near_rounding(weight, choice, 0)
    made = {"weight": mx.array(codes), "scales": mx.array(scales), "biases": mx.array(biases), "bias": bias}
    plan = SimpleNamespace(modules={path: top_choice})
    handed = {(path, choice): ("QuantizedLinear", dict(made))}
    SideStore(tmp_path, "side", plan).add(handed)
    assert not handed  # let go once written: nothing keeps a written setting's arrays in memory
    store = SideStore(tmp_path, "side", plan)
    assert "changed_0" in store.store.arrays(path, choice)[1]
    read = dict(tree_flatten(store.module(path, choice).parameters()))
    assert set(read) == set(made) and all(mx.array_equal(read[p], made[p]) for p in made)
    assert store.bytes_read > 0
    kept = SimpleNamespace(modules={path: None})  # a module the folder keeps in float: its setting is kept whole
    SideStore(tmp_path, "whole", kept).add({(path, choice): ("QuantizedLinear", dict(made))})
    assert "weight" in SideStore(tmp_path, "whole", kept).store.arrays(path, choice)[1]


def test_a_setting_rebuilt_from_steps_is_made_in_mlx_memory_not_copied_from_numpy(monkeypatch):
    """A swap holds the rebuilt module once: numpy's own allocations while it is
    rebuilt (traced by tracemalloc) stay far below its codes, which go straight into
    the MLX arrays the module is made of."""
    import tracemalloc

    import lsaq_mlx.adaptive.steps as module
    from lsaq_mlx.adaptive.steps import setting_from_steps, setting_steps
    from lsaq_mlx.adaptive.store import MLXArrays

    weight = mx.random.normal((4096, 2048), key=mx.random.key(1))
    choice, top_choice = Affine(4, 64), Affine(6, 64)
    top = dict(zip(("weight", "scales", "biases"),
                   (np.array(a.astype(mx.float16) if a.dtype != mx.uint32 else a) for a in mx.quantize(weight, 64, 6))))
    made = _near_rounding(weight, choice, 4)
    steps = setting_steps(*made, choice, top, top_choice)
    monkeypatch.setattr(module, "ROW_BLOCK_WEIGHTS", 1 << 14)  # small blocks: what numpy holds is the setting's
    for empty, whole in ((np.empty, True), (MLXArrays().empty, False)):
        tracemalloc.start()
        rebuilt = setting_from_steps(steps, choice, top, top_choice, empty)
        numpy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert all(np.array_equal(a, b) for a, b in zip(rebuilt, made))
        assert (numpy_peak > made[0].nbytes) == whole, numpy_peak


def test_the_whole_folder_stays_within_its_size(tiny_llama, derived, tmp_path):
    """``--adaptive-size``: every file of the folder (tokenizer, configs, plans, store)
    within that multiple of the largest plan's folder as ``convert -b`` writes it."""
    top = tmp_path / "top"
    assert run_cli("convert", "-m", tiny_llama.path, "-b", "6", "-o", top).returncode == 0
    top_bytes = sum(f.stat().st_size for f in top.rglob("*") if f.is_file())
    base = sum(f.stat().st_size for f in derived.path.rglob("*") if f.is_file())
    size = (base + 40_000) / top_bytes
    made = _convert(tiny_llama, tmp_path / "c", "--adaptive-size", f"{size:.6f}")
    report = json.loads((made.path / "lsaq_report.json").read_text())["adaptive"]
    assert 0 < report["settings_kept"] < report["settings_made"]
    assert sum(f.stat().st_size for f in made.path.rglob("*") if f.is_file()) <= size * top_bytes
