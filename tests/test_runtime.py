import shutil

import mlx.core as mx
import numpy as np
import pytest

from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.convert import quantized_model
from lsaq_mlx.planning.plan import PlanSet
from lsaq_mlx.runtime.events import EngineError, MemoryUpdate, Ready, ReplyDone, StateUpdate, Swapped, Token
from lsaq_mlx.planning.methods import plan_uniform
from lsaq_mlx.planning.planner import FixedPlans, Planner
from lsaq_mlx.runtime import Engine, Policy, ScriptedSampler
from lsaq_mlx.runtime.options import RuntimeOptions
from lsaq_mlx.runtime.memory import MemorySample
from lsaq_mlx.runtime.swap import swap_modules
from lsaq_mlx.sources.tensors import SourceTensors
from lsaq_mlx.sources import resolve_model
from tiny_models import tiny_model, write_gguf

MB = 1 << 20


def sample(available: int, t: float, pressure: str = "normal") -> MemorySample:
    return MemorySample(available, 16 << 30, pressure, 0, 0, 0, t)


def plan_set(sizes):
    """A PlanSet whose plans weigh ``sizes`` bytes (only sizes matter to the policy)."""
    from lsaq_mlx.planning.plan import QuantPlan

    return PlanSet([QuantPlan("fp", "test", {}, {}, s, 0.0, 1) for s in sizes])


def test_policy_downgrades_at_once_and_upgrades_after_the_window():
    policy = Policy(plan_set([100 * MB, 200 * MB, 300 * MB]), reserve=50 * MB, hysteresis=20 * MB, window=3,
                    min_interval=0, current=2)
    assert policy.decide(sample(100 * MB, 0)) is None  # 100 + 300 held - 50 reserve = 350 >= 300
    assert policy.decide(sample(20 * MB, 1)) == 1  # 20 + 300 - 50 = 270: only 200 fits
    assert policy.decide(sample(5 * MB, 2)) == 0
    ups = [policy.decide(sample(400 * MB, t)) for t in range(3, 6)]
    assert ups == [None, None, 2]  # three samples with room to spare, then the largest plan
    assert policy.decide(sample(1 << 30, 6, "critical")) == 1  # critical pressure: one step down


def test_policy_does_not_oscillate_on_a_noisy_trace():
    noisy = [int(rng * MB) for rng in np.random.default_rng(0).normal(75, 60, 300)]

    def changes(**options):
        policy = Policy(plan_set([100 * MB, 200 * MB]), reserve=0, current=1, **options)
        return sum(policy.decide(sample(a, t)) is not None for t, a in enumerate(noisy))

    assert changes(hysteresis=0, window=1, min_interval=0) > 30  # a naive policy flips back and forth
    assert 1 <= changes(hysteresis=50 * MB, window=3, min_interval=10) <= 6


def test_scripted_sampler_reads_traces(tmp_path):
    trace = tmp_path / "trace.txt"
    trace.write_text("# available,pressure\n2GB\n1.5GB,warn\n\n800MB,critical\n")
    sampler = ScriptedSampler(trace, total_bytes=8 << 30)
    got = [(s.available_bytes, s.pressure) for s in (sampler.sample() for _ in range(4))]
    assert got == [(2_000_000_000, "normal"), (1_500_000_000, "warn"), (800_000_000, "critical")] * 1 + [(800_000_000, "critical")]
    (tmp_path / "bad.txt").write_text("lots\n")
    from lsaq_mlx.errors import UserError

    with pytest.raises(UserError, match="bad.txt:1"):
        ScriptedSampler(tmp_path / "bad.txt")


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    ctx = Planner(tiny_llama).context()
    return tiny_llama, {b: plan_uniform(ctx, None, b, 32) for b in (3, 4, 8)}


def outputs(model):
    return np.array(model(mx.array([[1, 5, 9, 200, 42, 7]])))


def test_swapped_model_equals_a_model_quantized_directly(tiny):
    source, plans = tiny
    model, _ = quantized_model(source, plans[3])
    prepare_for_compute(model)
    report = swap_modules(model, plans[8].modules, SourceTensors(source.path), float32_compute=True)
    assert not report.failed and len(report.changed) == len(plans[8].modules)
    direct, _ = quantized_model(source, plans[8])
    prepare_for_compute(direct)
    np.testing.assert_allclose(outputs(model), outputs(direct), atol=1e-5)


def test_a_failed_swap_keeps_the_old_weights(tiny, tmp_path):
    shutil.copytree(tiny[0].path, tmp_path / "copy")  # its weights go missing below
    source, plans = resolve_model(str(tmp_path / "copy")), tiny[1]
    model, _ = quantized_model(source, plans[4])
    prepare_for_compute(model)
    before = outputs(model)
    weights = SourceTensors(source.path)
    for f in source.path.glob("*.safetensors"):
        f.rename(f.with_suffix(".moved"))
    report = swap_modules(model, plans[8].modules, weights, float32_compute=True)
    assert not report.changed and len(report.failed) == len(plans[8].modules)
    np.testing.assert_array_equal(outputs(model), before)


def engine_for(source, plans, **options):
    """A started engine on ``plans``; ``options``: RuntimeOptions' fields, and the
    engine's own (sampler, sample_every, policy_options, importance)."""
    own = {k: options.pop(k) for k in ("sampler", "sample_every", "policy_options", "importance") if k in options}
    return Engine(source, FixedPlans(plans), RuntimeOptions(**options), **own).start()


def events_until(engine, kind):
    """Events up to the first of class ``kind`` (or an error)."""
    seen = []
    while True:
        event = engine.events.get(timeout=120)
        seen.append(event)
        if isinstance(event, (kind, EngineError)):
            return seen


def test_engine_chats_swaps_and_keeps_the_conversation(tiny):
    source, plans = tiny
    engine = engine_for(source, plans, bits_budget=4)
    try:
        ready = events_until(engine, Ready)[-1]
        assert ready.state.bits_per_weight == pytest.approx(plans[4].predicted_bits_per_weight)
        engine.chat("hello", 6)
        first = events_until(engine, ReplyDone)[-1]
        assert isinstance(first, ReplyDone) and first.stats.generation_tokens >= 1
        engine.apply_budget(8)
        swapped = events_until(engine, Swapped)[-1]
        assert isinstance(swapped, Swapped) and swapped.changed == len(plans[8].modules)
        engine.chat("again", 6)
        second = events_until(engine, ReplyDone)[-1]
        assert second.stats.prompt_tokens < len(engine.cache_tokens)  # only the new turn was processed
        assert [m["role"] for m in engine.messages] == ["user", "assistant", "user", "assistant"]
    finally:
        engine.shutdown()


def test_stop_ends_a_reply_and_the_chat_goes_on(tiny):
    source, plans = tiny
    engine = engine_for(source, plans, bits_budget=4)
    try:
        events_until(engine, Ready)
        engine.chat("tell me everything", 400)
        assert isinstance(engine.events.get(timeout=120), Token)
        engine.stop()
        done = events_until(engine, ReplyDone)[-1]
        assert done.stats.stopped and done.stats.generation_tokens < 400
        engine.chat("and now?", 3)
        assert isinstance(events_until(engine, ReplyDone)[-1], ReplyDone)
    finally:
        engine.shutdown()


def test_engine_follows_a_memory_trace(tiny, tmp_path):
    source, plans = tiny
    sizes = {b: plans[b].predicted_bytes for b in (3, 4, 8)}
    trace = tmp_path / "trace.txt"
    reserve = sizes[8] - sizes[3]  # with nothing free, only the smallest plan fits
    plenty, tight = 10 * sizes[8] + reserve, 0
    trace.write_text("\n".join([str(plenty)] * 2 + [str(tight)] * 3 + [str(plenty)] * 10) + "\n")
    sampler = ScriptedSampler(trace, step=1.0)
    engine = engine_for(source, plans, auto=True, budgets=(3, 4, 8), sampler=sampler, sample_every=0.05,
                        policy_options={"reserve": reserve, "hysteresis": 0, "window": 2, "min_interval": 0})
    try:
        swaps = []
        while len(swaps) < 2:
            event = engine.events.get(timeout=120)
            assert not isinstance(event, EngineError), event
            if isinstance(event, Swapped):
                swaps.append(round(event.state.bits_per_weight, 3))
        assert swaps == [round(plans[3].predicted_bits_per_weight, 3), round(plans[8].predicted_bits_per_weight, 3)]
    finally:
        engine.shutdown()


def test_scripted_chat_cli(tmp_path, empty_cache):
    import os

    from cli_run import assert_one_line_error, run_cli

    write_gguf(tiny_model("qwen2"), "qwen2", tmp_path / "t.gguf")
    script = "hello there\n/plan 6\n/layers\nmore please\n/plan nonsense\n/save {}\n/stats\n/quit\nnever sent\n"
    saved = tmp_path / "conversation.json"
    out = run_cli("chat", "-m", str(tmp_path / "t.gguf"), "-b", "4", "-n", "5", input=script.format(saved), env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(" tok/s · prompt ") == 2 and " tok/s · prompt " not in out.stdout  # piped: statistics on stderr
    import re

    assert re.search(r"\[swapped \d+ modules in [\d.]+ s -> [\d.]+ bits/weight\]", out.stderr)
    assert "    0: " in out.stdout and "[usage: /plan" in out.stdout
    import json

    assert [m["role"] for m in json.loads(saved.read_text())] == ["user", "assistant", "user", "assistant"]
    assert_one_line_error(run_cli("chat", "-m", str(tmp_path / "t.gguf"), "--memory-trace", str(tmp_path / "none.txt"),
                                  input="", env=dict(os.environ)), "the memory trace")


def test_ctrl_c_stops_a_reply_in_the_terminal_chat(tmp_path, empty_cache):
    """On a terminal: Ctrl-C stops the reply being generated, the chat goes on; at the
    prompt one Ctrl-C says how to leave and a second one leaves."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time

    write_gguf(tiny_model("qwen2"), "qwen2", tmp_path / "t.gguf")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lsaq_mlx", "chat", "-m", str(tmp_path / "t.gguf"), "-n", "100000"],
                            stdin=follower, stdout=follower, stderr=follower, env=dict(os.environ))
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < end:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        assert marker in seen, seen[-500:]

    def at_prompt() -> None:
        nonlocal seen
        # a signal between readline printing the prompt and its select() waits for the
        # next key (CPython's readline loop): a person is never that fast, a loaded CI is
        end = time.monotonic() + 60
        while not seen.endswith(b"> ") and time.monotonic() < end:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
        time.sleep(0.5)

    try:
        read_until(b"> ")
        os.write(leader, b"tell me a very long story\n")
        streamed = len(seen)
        while len(seen) < streamed + 200:  # the reply streams (it stops at the context's end, 2048 tokens)
            read_until(seen[-1:])
            if select.select([leader], [], [], 1.0)[0]:
                seen += os.read(leader, 4096)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (the pty is not its controlling terminal)
        read_until(b"stopped]")
        at_prompt()
        proc.send_signal(signal.SIGINT)  # at the prompt: it says how to leave, and stays
        read_until(b"Ctrl-C again or Ctrl-D leaves")
        at_prompt()
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # a second one leaves
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)


def test_engine_reports_what_displays_need(tiny, tmp_path):
    """Per-layer bits, importance, the policy's thresholds, memory events, why and how a
    swap happened, and taking back a stopped turn (what the TUI shows and does)."""
    source, plans = tiny
    trace = tmp_path / "trace.txt"
    trace.write_text("64GB\n")
    engine = engine_for(source, plans, auto=True, budgets=(3, 4, 8), sampler=ScriptedSampler(trace), sample_every=0.05,
                        memory_events=True, importance=lambda: {"metric": "test", "scores": [0.5, 1.0]})
    try:
        ready = events_until(engine, Ready)[-1].state
        assert ready.plan_index == 2 and ready.weight_bytes == plans[8].predicted_bytes
        assert ready.layer_bits["layers"] == pytest.approx([8 + 32 / 32] * len(ready.layer_bits["layers"]))
        assert ready.importance["scores"] == [0.5, 1.0]
        policy = ready.policy
        assert [p["bytes"] for p in policy["plans"]] == [plans[b].predicted_bytes for b in (3, 4, 8)]
        assert policy["plans"][2]["min_available"] == policy["reserve"]  # the current plan's line
        memory = events_until(engine, MemoryUpdate)[-1]
        assert memory.sample["available_bytes"] == 64_000_000_000 and memory.sample["rss_bytes"] > 0 and memory.policy
        engine.set_auto(False)
        engine.apply_plan(0, "by hand")
        swapped = events_until(engine, Swapped)[-1]
        assert swapped.reason == "by hand" and swapped.state.plan_index == 0
        assert swapped.from_bits_per_weight == pytest.approx(plans[8].predicted_bits_per_weight)
        assert swapped.memory_before["rss_bytes"] > 0 and swapped.memory_after["mlx_active_bytes"] > 0
        assert swapped.state.layer_bits["layers"] == pytest.approx([3 + 32 / 32] * len(swapped.state.layer_bits["layers"]))
        assert swapped.state.policy["current"] == 0
        engine.chat("hello", 3)
        assert events_until(engine, ReplyDone)[-1].stats.first_token_seconds > 0
        engine.retract()
        events_until(engine, StateUpdate)
        assert engine.messages == []
    finally:
        engine.shutdown()


def test_a_chat_template_and_its_args_from_the_command_line_make_the_prompt():
    from lsaq_mlx.runtime.engine import build_engine
    from lsaq_mlx.runtime.options import RuntimeOptions
    from lsaq_mlx.sources import resolve_model

    options = RuntimeOptions(chat_template="{% if loud %}LOUD {% endif %}{{ messages[-1].content }}",
                             chat_template_args={"loud": True})
    engine = build_engine(resolve_model("default"), options).start()
    try:
        engine.chat("hi", max_tokens=2).result(120)
        assert engine.tokenizer.decode(engine.cache_tokens).startswith("LOUD hi")
    finally:
        engine.shutdown()


def test_chat_template_flags_that_are_not_a_template_or_an_object_are_one_line():
    from cli_run import run_cli

    for flag, value in (("--chat-template", "no braces here"), ("--chat-template-args", "[1, 2]"),
                        ("--chat-template-args", "{bad json")):
        done = run_cli("chat", flag, value, input="/quit\n")
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and flag in done.stderr, done.stderr


@pytest.mark.parametrize("model_type", ["qwen3_next", "nemotron_h", "lfm2"])
def test_a_swap_between_tokens_keeps_a_hybrid_models_recurrent_state(model_type, tmp_path):
    """A swap changes weights only: the recurrent (and KV) state of the tokens so far stays
    as it was, and the next token is what a model made at the new plan computes from it."""
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models.cache import make_prompt_cache

    from hf_models import write_hf_folder
    from lsaq_mlx.planning.planner import PlanRequest
    from lsaq_mlx.sources.tensors import source_tensors

    source = resolve_model(str(write_hf_folder(model_type, tmp_path / model_type, resolve_model("default").path)))
    planner = Planner(source)
    high, low = (planner.plan(PlanRequest(method="uniform", bits=b)) for b in (8, 3))
    model, _ = quantized_model(source, high)
    prepare_for_compute(model)
    cache = make_prompt_cache(model)
    assert any(not hasattr(c, "offset") or type(c).__name__ == "ArraysCache" for c in cache)  # a recurrent layer
    mx.eval(model(mx.array([list(range(100, 140))]), cache=cache))
    copy = lambda state: tree_map(lambda a: None if a is None else a * 1, state)  # noqa: E731
    arrays = lambda state: [np.array(a) for _, a in tree_flatten(state)]  # noqa: E731
    state = [copy(c.state) for c in cache]
    mx.eval(state)

    report = swap_modules(model, low.modules, source_tensors(source), float32_compute=True)
    assert not report.failed and report.changed
    for c, kept in zip(cache, state):
        assert all(np.array_equal(a, b) for a, b in zip(arrays(c.state), arrays(kept), strict=True))

    direct, _ = quantized_model(source, low)
    prepare_for_compute(direct)
    copied = make_prompt_cache(direct)
    for c, kept in zip(copied, state):
        c.state = copy(kept)
    token = mx.array([[7]])
    after_swap, fresh_low = model(token, cache=cache), direct(token, cache=copied)
    np.testing.assert_allclose(np.array(after_swap), np.array(fresh_low), atol=1e-4)
    forgotten = direct(token, cache=make_prompt_cache(direct))  # what a lost state would give
    assert np.abs(np.array(forgotten) - np.array(fresh_low)).max() > 1e-2


def test_a_hybrid_models_chat_keeps_its_recurrent_state_between_turns(tmp_path):
    """A recurrent layer's state cannot be trimmed, but a turn that extends the last one
    needs none trimmed: only the new turn is processed."""
    from hf_models import write_hf_folder
    from lsaq_mlx.planning.planner import PlanRequest

    source = resolve_model(str(write_hf_folder("qwen3_next", tmp_path / "m", resolve_model("default").path)))
    engine = engine_for(source, {8: Planner(source).plan(PlanRequest(method="uniform", bits=8))}, bits_budget=8)
    try:
        events_until(engine, Ready)
        engine.chat("hello", 6)
        first = events_until(engine, ReplyDone)[-1]
        held = len(engine.cache_tokens)
        engine.chat("again", 6)
        second = events_until(engine, ReplyDone)[-1]
        assert isinstance(second, ReplyDone) and held > 0
        assert second.stats.prompt_tokens < len(engine.cache_tokens) - first.stats.generation_tokens
    finally:
        engine.shutdown()
