"""The engine's seams: every command has its own reply, a stop reaches a queued reply,
shutdown ends a busy engine at once, and ``Engine`` and the tests' ``FakeEngine`` keep one
contract (the same suite runs against both)."""

import inspect
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from fake_engine import FakeEngine

from lsaq_mlx.planning.methods import plan_uniform
from lsaq_mlx.planning.planner import FixedPlans, Planner
from lsaq_mlx.runtime import Engine, ScriptedSampler
from lsaq_mlx.runtime.commands import EngineCommands, EngineStopped
from lsaq_mlx.runtime.completion import Completion
from lsaq_mlx.runtime.events import EngineProtocol, ReplyDone, StateUpdate, Swapped
from lsaq_mlx.runtime.options import RuntimeOptions


@pytest.fixture(scope="module")
def plans(tiny_llama):
    ctx = Planner(tiny_llama).context()
    return {b: plan_uniform(ctx, None, b, 32) for b in (3, 8)}


@pytest.fixture(params=["engine", "fake"])
def engine(request, tiny_llama, plans):
    made = (Engine(tiny_llama, FixedPlans(plans), RuntimeOptions(bits_budget=8)) if request.param == "engine"
            else FakeEngine(token_delay=0.01))
    made.start()
    yield made
    made.shutdown()


def test_both_engines_have_the_whole_protocol():
    surface = {name for name, _ in inspect.getmembers(EngineProtocol, inspect.isfunction) if not name.startswith("_")}
    for cls in (Engine, FakeEngine):
        missing = {name for name in surface if not callable(getattr(cls, name, None))}
        assert not missing, (cls, missing)
        assert issubclass(cls, EngineCommands)  # the commands are written once
        for name in surface & {n for n, _ in inspect.getmembers(EngineCommands, inspect.isfunction)}:
            assert getattr(cls, name) is getattr(EngineCommands, name), (cls, name)


def test_each_command_gets_its_own_answer(engine):
    done = engine.chat("hello", 4).result(120)
    assert isinstance(done, ReplyDone)
    assert isinstance(engine.request_state().result(30), StateUpdate)
    assert isinstance(engine.set_system("be brief").result(30), StateUpdate)
    assert engine.messages[0] == {"role": "system", "content": "be brief"}
    assert isinstance(engine.retract().result(30), StateUpdate)
    assert [m["role"] for m in engine.messages] == ["system"]
    assert isinstance(engine.reset().result(30), StateUpdate)


def test_a_stop_sent_while_a_chat_is_queued_stops_it(engine):
    first = engine.chat("tell me everything", 400)
    queued = engine.chat("and then?", 400)
    engine.stop()
    assert first.result(120).stats.stopped
    second = queued.result(120)
    assert second.stats.stopped and second.stats.generation_tokens <= 1
    assert not engine.chat("still there?", 2).result(120).stats.stopped  # a later reply runs


def test_shutdown_fails_what_is_queued():
    engine = FakeEngine(token_delay=0.05).start()
    running, queued = engine.chat("long", 400), engine.request_state()
    time.sleep(0.1)
    engine.shutdown()
    assert running.result(5).stats.stopped
    with pytest.raises(EngineStopped):
        queued.result(5)
    with pytest.raises(EngineStopped):
        engine.request_state().result(5)


def test_shutdown_under_a_steady_stream_of_completions_returns_at_once(tiny_llama, plans):
    engine = Engine(tiny_llama, FixedPlans(plans), RuntimeOptions(bits_budget=8)).start()
    feeding, jobs = threading.Event(), []

    def feed():
        while not feeding.is_set():
            job = Completion([], 64, prompt=f"story {len(jobs) % 7}")
            jobs.append(job)
            engine.complete(job)
            time.sleep(0.01)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        assert jobs and jobs[0].events.get(timeout=120).kind == "started"  # the engine is busy
        time.sleep(1.0)
        started = time.perf_counter()
        engine.shutdown()
        took = time.perf_counter() - started
    finally:
        feeding.set()
        feeder.join()
    assert took < 2.0, took
    assert not engine.running()


def test_a_plan_reply_is_the_swap_it_asked_for_even_when_an_automatic_swap_lands_first(tiny_llama, plans, tmp_path):
    sizes = {b: p.predicted_bytes for b, p in plans.items()}
    trace = tmp_path / "trace.txt"
    trace.write_text("0\n" * 50)  # nothing free: automatic mode moves down at once
    engine = Engine(tiny_llama, FixedPlans(plans), RuntimeOptions(bits_budget=8, auto=True, budgets=(3, 8)),
                    sampler=ScriptedSampler(trace), sample_every=0.02,
                    policy_options={"reserve": sizes[8] - sizes[3], "hysteresis": 0, "window": 1, "min_interval": 0})
    engine.start()
    try:
        automatic = engine.events.get(timeout=120)
        while not isinstance(automatic, Swapped):
            automatic = engine.events.get(timeout=120)
        assert automatic.reason.startswith("auto down")
        engine.set_auto(False).result(30)
        asked = engine.apply_budget(8).result(120)
        assert isinstance(asked, Swapped) and asked.reason == "budget 8 bits/weight"
        assert asked.state.bits_per_weight == pytest.approx(plans[8].predicted_bits_per_weight)
    finally:
        engine.shutdown()


def test_eight_concurrent_clients_twenty_rounds_each_reply_as_alone(tiny_llama, plans):
    from test_serve import start_server, stop_server

    server = start_server(tiny_llama, plans, budget=8)
    try:
        def ask(prompt: str) -> str:
            body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                               "logit_bias": {str(t): -100 for t in server.info.eos_token_ids}}).encode()
            request = urllib.request.Request(server.url + "/chat/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as reply:
                return json.load(reply)["choices"][0]["message"]["content"]

        prompts = [f"client {i} says {word}" for i, word in enumerate("red blue green gold iron salt moss tide".split())]
        alone = {p: ask(p) for p in prompts}
        with ThreadPoolExecutor(8) as pool:
            for _ in range(20):
                assert list(pool.map(ask, prompts)) == [alone[p] for p in prompts]
        assert json.load(urllib.request.urlopen(server.url + "/status", timeout=30))["requests"]["failed"] == 0
    finally:
        stop_server(server)


def test_a_plan_chosen_by_hand_ends_automatic_mode_and_auto_on_resumes_it(tiny_llama, plans, tmp_path):
    from lsaq_mlx.runtime.events import Note

    sizes = {b: p.predicted_bytes for b, p in plans.items()}
    trace = tmp_path / "trace.txt"
    trace.write_text(f"{10 * sizes[8]}\n" * 500)  # plenty: automatic mode wants the largest plan
    engine = Engine(tiny_llama, FixedPlans(plans), RuntimeOptions(bits_budget=8, auto=True, budgets=(3, 8)),
                    sampler=ScriptedSampler(trace), sample_every=0.02,
                    policy_options={"reserve": 0, "hysteresis": 0, "window": 1, "min_interval": 0})
    engine.start()
    try:
        by_hand = engine.apply_budget(3).result(120)
        assert by_hand.state.auto is False
        assert by_hand.state.bits_per_weight == pytest.approx(plans[3].predicted_bits_per_weight)
        time.sleep(0.3)  # samples come and go: nothing moves the plan chosen by hand
        assert engine.request_state().result(30).state.plan_index == 0
        assert engine.set_auto(True).result(30).state.auto
        deadline = time.monotonic() + 60
        while engine.request_state().result(30).state.plan_index != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.request_state().result(30).state.plan_index == 1  # plenty of memory: back up
        notes = []
        while not engine.events.empty():
            event = engine.events.get()
            notes += [event.message] if isinstance(event, Note) else []
        assert any("chosen by hand" in n for n in notes)
    finally:
        engine.shutdown()


def test_every_completion_command_is_answered_batched_or_not(tiny_llama, plans):
    engine = Engine(tiny_llama, FixedPlans(plans), RuntimeOptions(bits_budget=8)).start()
    try:
        jobs = [Completion([], 4, prompt=f"story {i}") for i in range(6)]
        replies = [engine.complete(job) for job in jobs]
        assert all(r.result(120) is None for r in replies)  # batched ones too
        assert all(job.events.get(timeout=120).kind == "started" for job in jobs)
    finally:
        engine.shutdown()
