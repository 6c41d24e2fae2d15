"""The chat's words: its banner, ``/stats`` as a summary (``/stats json`` in full), and
sampling settings that reach the engine."""

import io
import json

import pytest
from fake_engine import FakeEngine

from lsaq_mlx.cli.chat_session import ChatSession, banner, run_chat, stats_summary
from lsaq_mlx.errors import UserError
from lsaq_mlx.runtime.events import EngineState
from lsaq_mlx.runtime.sampling import Sampling

STATE = EngineState(method="lsaq", bits_per_weight=4.0123, weight_bytes=75_700_000, plan_index=2, auto=True,
                    messages=4, cached_tokens=130, mlx_active_bytes=458_000_000, mlx_peak_bytes=785_000_000,
                    memory={"available_bytes": 18_400_000_000, "total_bytes": 25_300_000_000, "pressure": "normal",
                            "rss_bytes": 732_000_000},
                    last_reply={"generation_tokens": 16, "generation_tps": 6.84, "prompt_tokens": 31, "prompt_tps": 40.2,
                                "first_token_seconds": 0.81})


def test_the_banner_names_the_model_its_precision_memory_and_sampling():
    assert banner(STATE, "SmolLM2-135M-Instruct (default)", Sampling(temp=0.7, top_p=0.9, seed=3).describe()) == (
        "lsaq-mlx chat · SmolLM2-135M-Instruct (default) · 4.01 bits/weight (lsaq) · weights 75.7 MB · "
        "temp 0.7, top-p 0.9, seed 3 · /help lists the commands")
    assert Sampling().describe() == "greedy"


def test_stats_is_a_short_summary():
    assert stats_summary(STATE).splitlines() == [
        "plan: lsaq, 4.01 bits/weight, weights 75.7 MB, plan 3 of the set; automatic mode on",
        "memory: 18.40 GB available of 25.30 GB (normal); this process 732.0 MB",
        "MLX: 458.0 MB active, peak 785.0 MB; conversation 4 messages, 130 tokens cached",
        "last reply: 16 tokens at 6.8 tok/s, prompt 31 at 40.2 tok/s, first token after 0.81 s",
    ]


def test_stats_json_and_the_banner_in_a_scripted_chat(capsys):
    engine, out = FakeEngine().start(), io.StringIO()
    try:
        session = ChatSession(engine, 8, out=out)
        run_chat(engine, 8, stdin=io.StringIO("/stats\n/stats json\n/quit\n"), title=lambda s: f"banner {s.method}")
    finally:
        engine.shutdown()
    printed = capsys.readouterr()
    assert "banner " in printed.err  # scripted: the banner stays off stdout
    lines = printed.out.splitlines()
    assert lines[0].startswith("plan: ")
    assert json.loads("\n".join(lines[lines.index("{"):]))["method"] == session.engine._state().method


@pytest.mark.parametrize("bad", [dict(temp=-1), dict(top_p=0), dict(min_p=1), dict(max_kv_size=0)])
def test_sampling_settings_out_of_range_are_one_line_errors(bad):
    with pytest.raises(UserError):
        Sampling(**bad).check()


def test_the_engine_samples_with_the_settings_and_keeps_the_kv_cache_bounded(tiny_source):
    from lsaq_mlx.planning.methods import plan_uniform
    from lsaq_mlx.planning.planner import FixedPlans, Planner
    from lsaq_mlx.runtime import Engine
    from lsaq_mlx.runtime.options import RuntimeOptions
    from lsaq_mlx.runtime.events import ReplyDone

    source = tiny_source("llama")
    plans = FixedPlans({4.0: plan_uniform(Planner(source).context(), None, 4, 32)})

    def reply(sampling):
        engine = Engine(source, plans, RuntimeOptions(bits_budget=4.0, sampling=sampling)).start()
        try:
            engine.chat("the cat sat on the mat", 12)
            while not isinstance(event := engine.events.get(), ReplyDone):
                pass
            return event.text, engine
        finally:
            engine.shutdown()

    a, _ = reply(Sampling(temp=1.5, seed=7))
    b, _ = reply(Sampling(temp=1.5, seed=7))
    c, engine = reply(Sampling(temp=1.5, seed=8, max_kv_size=8))
    assert a == b and a != c  # the seed repeats a sampled reply; another seed changes it
    assert all(getattr(layer, "max_size", 8) == 8 for layer in engine.cache)


def test_triple_quotes_make_one_message_of_several_lines():
    engine, out = FakeEngine(reply="ok").start(), io.StringIO()
    try:
        session = ChatSession(engine, 8, out=out)
        for line in ['"""', "first line", "  second line", 'last line"""', '"""one line"""', '"""start here', 'end"""']:
            assert session.handle(line + "\n")
    finally:
        engine.shutdown()
    chats = [c[1] for c in engine.received if c[0] == "chat"]
    assert chats == ["first line\n  second line\nlast line", "one line", "start here\nend"]


def test_chat_p_sends_a_first_message_before_the_piped_ones():
    from cli_run import run_cli

    both = run_cli("chat", "-p", "What is the capital of France?", "-n", "6", input="And of Spain?\n/quit\n")
    alone = run_cli("chat", "-n", "6", input="What is the capital of France?\nAnd of Spain?\n/quit\n")
    assert both.returncode == 0 and both.stdout == alone.stdout and both.stdout.count("\n") >= 2
