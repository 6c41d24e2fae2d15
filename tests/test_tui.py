"""The terminal UI, driven with Textual's Pilot: on a fake engine where speed matters, on
the real engine and the default model for a conversation and a memory-driven swap."""

import asyncio
import os
import time

import pytest
from fake_engine import FakeEngine

from lsaq_tui.app import LsaqApp
from lsaq_tui.widgets.chat_panel import Reply
from lsaq_tui.widgets.layers_panel import LayersPanel
from lsaq_tui.widgets.memory_chart import Threshold, memory_chart, policy_thresholds
from lsaq_tui.widgets.memory_panel import MemoryPanel
from lsaq_tui.widgets.plan_picker import PlanPicker
from lsaq_tui.widgets.prompt_input import PromptInput
from lsaq_tui.widgets.swap_log import SwapLog

GB = 1_000_000_000
# available memory, one sample a second: plenty, then a drop that forces a smaller plan
MEMORY_DROP = [9.1, 9.0, 8.7, 8.8, 8.2, 6.0, 3.1, 1.2, 0.9, 0.6, 0.45, 0.4]


async def until(pilot, condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the app"
        await pilot.pause(0.02)


def replies(app) -> list[Reply]:
    return list(app.query(Reply))


async def type_prompt(pilot, text: str) -> None:
    for key in text:
        await pilot.press("space" if key == " " else key)


def test_typing_a_prompt_streams_a_reply():
    async def run():
        fake = FakeEngine(reply="The capital of France is **Paris**, on the Seine, and it has been the capital "
                                "for a very long time.", token_delay=0.1).start()
        app = LsaqApp(fake, "fake", max_tokens=64)
        async with app.run_test(size=(80, 24)) as pilot:
            await type_prompt(pilot, "hello")
            await pilot.press("enter")
            # the first words are shown while the rest streams
            await until(pilot, lambda: replies(app) and 0 < len(replies(app)[0].text) < len(fake.reply))
            await until(pilot, lambda: not app.generating)
            reply = replies(app)[0]
            assert reply.text == fake.reply
            stats = str(reply.stats.render())
            assert "21.5 tok/s" in stats and "first token 0.08 s" in stats
            assert app.query_one(PromptInput).text == ""
            assert ("chat", "hello", 64) in fake.received
        assert fake.shut_down

    asyncio.run(run())


async def start_a_long_reply(pilot, app) -> None:
    """Send a prompt and wait until the first words of its long reply are shown."""
    await type_prompt(pilot, "tell me a story")
    await pilot.press("enter")
    await until(pilot, lambda: replies(app) and replies(app)[0].text)


@pytest.mark.parametrize("key", ["escape", "ctrl+c"])
def test_esc_or_ctrl_c_stops_a_reply_and_keeps_it(key):
    async def run():
        fake = FakeEngine(reply=" ".join(["word"] * 200), token_delay=0.05).start()
        app = LsaqApp(fake, "fake")
        async with app.run_test(size=(80, 24)) as pilot:
            await start_a_long_reply(pilot, app)
            await pilot.press(key)
            await until(pilot, lambda: not app.generating)
            kept = replies(app)[0].text
            assert kept and len(kept) < len(fake.reply) and ("retract",) not in fake.received
            assert app.is_running  # a Ctrl+C that stopped a reply does not quit
            await pilot.press("ctrl+c")  # nothing streams: the first one says how to leave...
            assert app.is_running
            await pilot.press("ctrl+c")  # ...a second one leaves
            await until(pilot, lambda: not app.is_running)

    asyncio.run(run())


def test_ctrl_r_stops_a_reply_and_puts_the_prompt_back():
    async def run():
        fake = FakeEngine(reply=" ".join(["word"] * 200), token_delay=0.05).start()
        app = LsaqApp(fake, "fake")
        async with app.run_test(size=(80, 24)) as pilot:
            await start_a_long_reply(pilot, app)
            await pilot.press("ctrl+r")
            await until(pilot, lambda: not app.generating)
            await until(pilot, lambda: ("retract",) in fake.received)
            assert app.query_one(PromptInput).text == "tell me a story"
            assert not replies(app) and not list(app.query(".user-message"))
            await until(pilot, lambda: fake.messages == [])  # the engine forgot the stopped turn
            await pilot.press("enter")  # sent again, as edited
            await until(pilot, lambda: len([c for c in fake.received if c[0] == "chat"]) == 2)
            await pilot.press("escape")
            await until(pilot, lambda: not app.generating)

    asyncio.run(run())


def test_multi_line_input_and_history():
    async def run():
        fake = FakeEngine().start()
        app = LsaqApp(fake, "fake")
        async with app.run_test(size=(80, 24)) as pilot:
            prompt = app.query_one(PromptInput)
            await type_prompt(pilot, "one")
            await pilot.press("shift+enter")
            await type_prompt(pilot, "two")
            assert prompt.text == "one\ntwo"
            await pilot.press("enter")
            await until(pilot, lambda: not app.generating and replies(app))
            await type_prompt(pilot, "three")
            await pilot.press("enter")
            await until(pilot, lambda: not app.generating and len(replies(app)) == 2)
            await type_prompt(pilot, "draft")
            await pilot.press("up")
            assert prompt.text == "three"
            await pilot.press("up")
            assert prompt.text == "one\ntwo" and prompt.cursor_location == (1, 3)
            await pilot.press("up")  # inside a multi-line prompt, Up moves the cursor
            assert prompt.text == "one\ntwo" and prompt.cursor_location[0] == 0
            await pilot.press("down", "down")
            assert prompt.text == "three"
            await pilot.press("down")
            assert prompt.text == "draft"
            assert [c[1] for c in fake.received if c[0] == "chat"] == ["one\ntwo", "three"]

    asyncio.run(run())


def test_controls_send_auto_plan_and_budget_commands():
    async def run():
        fake = FakeEngine().start()
        app = LsaqApp(fake, "fake")
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.plans)
            assert app.auto and app.plan_index == 2
            await pilot.press("f3")
            await until(pilot, lambda: not app.auto)
            assert "auto off" in app.sub_title
            await pilot.press("f4")  # force one plan smaller
            await until(pilot, lambda: app.plan_index == 1)
            assert ("apply_plan", 1, "chosen by hand") in fake.received
            await pilot.press("f2")
            await until(pilot, lambda: isinstance(app.screen, PlanPicker))
            await pilot.press("up", "enter")  # the picker opens on the current plan
            await until(pilot, lambda: app.plan_index == 0)
            await pilot.press("f2")
            await until(pilot, lambda: isinstance(app.screen, PlanPicker))
            await pilot.press("tab")
            await type_prompt(pilot, "5.9")
            await pilot.press("enter")
            await until(pilot, lambda: app.plan_index == 2)
            assert ("apply_budget", 5.9) in fake.received
            log = app.query_one(SwapLog)
            assert [e.state.bits_per_weight for e in log.entries] == [4.5, 3.0, 6.0]
            assert log.entries[-1].reason == "budget 5.9 bits/weight"
            await pilot.press("f5")
            await pilot.pause(0.1)
            assert app.plan_index == 2  # already the largest: nothing sent
            assert len([c for c in fake.received if c[0].startswith("apply")]) == 3

    asyncio.run(run())


def test_command_palette_forces_a_swap():
    async def run():
        fake = FakeEngine().start()
        app = LsaqApp(fake, "fake")
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.plans)
            await pilot.press("ctrl+p")
            await pilot.pause(0.2)
            await type_prompt(pilot, "plan 1")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await until(pilot, lambda: app.plan_index == 0)
            assert app.query_one(LayersPanel).plan["bits_per_weight"] == 3.0

    asyncio.run(run())


@pytest.mark.parametrize("key", ["ctrl+q"])  # Ctrl+C mid-reply stops the reply (test above)
def test_quit_keys_stop_the_engine(key):
    async def run():
        fake = FakeEngine(reply=" ".join(["word"] * 500), token_delay=0.02).start()
        app = LsaqApp(fake, "fake")
        async with app.run_test(size=(80, 24)) as pilot:
            await type_prompt(pilot, "go")
            await pilot.press("enter")
            await until(pilot, lambda: replies(app) and replies(app)[0].text)
            await pilot.press(key)  # in the middle of a reply
            await until(pilot, lambda: not app.is_running)
        assert app.return_code == 0 and app.error is None
        assert fake.shut_down

    asyncio.run(run())


def test_an_engine_error_is_shown_and_a_fatal_one_quits():
    async def run():
        fake = FakeEngine().start()
        app = LsaqApp(fake, "fake")
        async with app.run_test(size=(80, 24)) as pilot:
            fake.fail("there is no plan 9 (this session has 3)")
            await until(pilot, lambda: list(app.query(".note")))
            assert app.is_running
            fake.fail("the engine stopped: RuntimeError: out of memory", fatal=True)
            await until(pilot, lambda: not app.is_running)
        assert app.return_code == 1
        assert app.error == "the engine stopped: RuntimeError: out of memory"
        assert fake.shut_down

    asyncio.run(run())


def test_memory_chart_draws_the_policy_thresholds():
    policy = {"current": 1, "reserve": 500, "hysteresis": 100,
              "plans": [{"bits_per_weight": 3.0, "bytes": 800, "min_available": 300},
                        {"bits_per_weight": 4.5, "bytes": 1000, "min_available": 500},
                        {"bits_per_weight": 6.0, "bytes": 1400, "min_available": 900}]}
    lines = policy_thresholds(policy)
    assert [(t.available, t.label) for t in lines] == [(500, "↓4.50"), (1000, "↑6.00")]
    chart = memory_chart([600e6] * 5 + [200e6] * 5, [Threshold(400e6, "↓4.50b", "red")], 30, 6).plain.split("\n")
    assert len(chart) == 6 and all(len(row) == 30 for row in chart)
    marked = [i for i, row in enumerate(chart) if "↓4.50b" in row]
    assert len(marked) == 1 and 0 < marked[0] < 5
    row = chart[marked[0]]
    assert row[:5] == "█████" and row[5:10] == "╌" * 5  # the line runs where the bars are below it


def _conversation_with_a_swap(fake: FakeEngine):
    async def run_before(pilot):
        app = pilot.app
        app.query_one(PromptInput).cursor_blink = False
        for second, available in enumerate(MEMORY_DROP):
            fake.memory(int(available * GB), "warn" if available < 1 else "normal", second)
        await type_prompt(pilot, "What is the capital of France?")
        await pilot.press("enter")
        await until(pilot, lambda: not app.generating and replies(app) and "tok/s" in str(replies(app)[0].stats.render()))
        fake.apply_plan(1, "auto down: 0.40 GB available, warn pressure")
        await until(pilot, lambda: app.query_one(SwapLog).entries and len(app.query_one(MemoryPanel).history) == len(MEMORY_DROP))
        await pilot.pause(0.2)

    return run_before


def test_snapshot_main_screen(snap_compare):
    fake = FakeEngine().start()
    assert snap_compare(LsaqApp(fake, "SmolLM2-135M-Instruct"), terminal_size=(80, 24),
                        run_before=_conversation_with_a_swap(fake))


def test_snapshot_main_screen_large(snap_compare):
    fake = FakeEngine().start()
    assert snap_compare(LsaqApp(fake, "SmolLM2-135M-Instruct"), terminal_size=(130, 42),
                        run_before=_conversation_with_a_swap(fake))


def test_snapshot_plan_picker(snap_compare):
    fake = FakeEngine().start()

    async def run_before(pilot):
        pilot.app.query_one(PromptInput).cursor_blink = False
        await until(pilot, lambda: pilot.app.plans)
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(pilot.app.screen, PlanPicker))
        await pilot.pause(0.1)

    assert snap_compare(LsaqApp(fake, "SmolLM2-135M-Instruct"), terminal_size=(80, 24), run_before=run_before)


@pytest.mark.slow
def test_real_engine_chats_and_swaps_down_when_memory_drops(default_source, tmp_path):
    """The default model on the engine thread: a reply streams into the chat; a replayed
    memory drop makes the policy swap to the smaller plan; the layers panel shows its bits;
    the UI loop never stalls for long during the swap; Ctrl+Q stops the engine."""
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.planning.planner import FixedPlans
    from lsaq_mlx.runtime import Engine, ScriptedSampler
    from lsaq_mlx.runtime.options import RuntimeOptions

    small, large = Planner(default_source).plans(PlanRequest(method="uniform", bits_budgets=[4.0, 8.5]))
    planner = FixedPlans({4.0: small, 8.5: large})
    trace = tmp_path / "trace.txt"
    # 1 s of plenty, then nothing: the policy keeps only the smaller plan (reserve = the difference)
    trace.write_text("8GB\n" * 4 + "0\n")
    engine = Engine(default_source, planner, RuntimeOptions(auto=True, budgets=(4.0, 8.5), memory_events=True),
                    sampler=ScriptedSampler(trace, step=0.25), sample_every=0.25,
                    policy_options={"reserve": large.predicted_bytes - small.predicted_bytes, "hysteresis": 0,
                                    "window": 1, "min_interval": 0},
                    importance=lambda: {"metric": "test", "scores": [float(i) for i in range(30)]})

    async def run():
        app = LsaqApp(engine.start(), "default", max_tokens=6)
        async with app.run_test(size=(100, 30)) as pilot:
            layers = app.query_one(LayersPanel)
            await until(pilot, lambda: layers.bits, timeout=60)
            await type_prompt(pilot, "What is the capital of France?")
            await pilot.press("enter")
            await until(pilot, lambda: not app.generating and replies(app), timeout=120)
            assert replies(app)[0].text.strip(), [str(n.render()) for n in app.query(".note")]
            assert "tok/s" in str(replies(app)[0].stats.render()), [str(n.render()) for n in app.query(".note")]
            await until(pilot, lambda: app.stalls, timeout=120)  # the swap, measured once it settled
            swap, stall = app.stalls[0]
            assert swap.reason.startswith("auto down") and swap.state.bits_per_weight == small.predicted_bits_per_weight
            assert swap.changed == len(small.modules) and not swap.failed
            (choice,) = {(c.bits, c.group_size) for c in small.modules.values()}  # uniform: one setting
            assert layers.bits == pytest.approx([choice[0] + 32 / choice[1]] * 30)  # scales and biases included
            assert app.query_one(SwapLog).entries[0].from_bits_per_weight == large.predicted_bits_per_weight
            print(f"swap of {swap.changed} modules in {swap.seconds:.2f} s; longest UI-loop stall {stall * 1000:.0f} ms")
            assert stall < min(0.5, swap.seconds / 2)  # a frozen UI would stall for the whole swap
            await pilot.press("f5")  # force the larger plan back: automatic mode goes off
            await until(pilot, lambda: len(app.stalls) == 2, timeout=120)
            assert not app.auto and app.plan_index == 1 and app.stalls[1][0].reason == "chosen by hand"
            assert layers.bits == app.stalls[1][0].state.layer_bits["layers"]
            assert all(b > choice[0] + 32 / choice[1] for b in layers.bits)
            await pilot.press("ctrl+q")
            await until(pilot, lambda: not app.is_running)
        assert not engine._thread.is_alive()

    asyncio.run(run())


def test_tui_command_line_errors(tmp_path):
    from cli_run import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("tui", "--importance", "loud", env=dict(os.environ)), "layer importance must be")


def test_ctrl_c_in_a_terminal_quits_and_restores_it(tmp_path, empty_cache):
    """``lsaq-mlx tui`` on a pseudo-terminal: Ctrl-C (a key in the app's raw mode) quits
    with status 0 and leaves the alternate screen."""
    from terminal import Terminal
    from tiny_models import tiny_model, write_gguf

    write_gguf(tiny_model("qwen2"), "qwen2", tmp_path / "t.gguf")
    term = Terminal(["tui", "-m", str(tmp_path / "t.gguf"), "--importance", "none"])
    try:
        term.read_until(lambda: b"Chat" in term.seen)  # the app has drawn its panels
        assert b"Chat" in term.seen, term.seen[-500:]
        term.read_until(lambda: False, timeout=1)
        term.type(b"\x03")  # no reply streams: the first Ctrl-C says how to leave
        term.read_until(lambda: False, timeout=0.5)
        assert term.proc.poll() is None
        term.type(b"\x03")  # the second quits
        assert term.wait_exit() == 0
        assert b"\x1b[?1049l" in term.seen[-2000:]  # back from the alternate screen
        assert b"Traceback" not in term.seen
    finally:
        term.close()


def test_the_screenshot_command_saves_in_the_working_folder_and_says_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "no-home"))  # no Downloads folder anywhere

    async def run():
        fake = FakeEngine().start()
        app = LsaqApp(fake, "fake")
        notes = []
        async with app.run_test(size=(80, 24)) as pilot:
            app.notify = lambda message, **kw: notes.append(message)
            app.action_screenshot()
            await pilot.pause(0.1)
        return notes

    notes = asyncio.run(run())
    saved = list(tmp_path.glob("lsaq-mlx-*.svg"))
    assert len(saved) == 1 and saved[0].read_text().startswith("<svg")
    assert notes == [f"screenshot saved: {saved[0]}"]


def test_at_80_by_24_the_header_keeps_the_precision_and_auto_state_and_the_input_hint_fits():
    async def run():
        fake = FakeEngine().start()
        app = LsaqApp(fake, "SmolLM2-135M-Instruct (default), a long model name")
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.plans and app.bits_per_weight)
            shown = app.export_screenshot().replace("&#160;", " ")
            assert f"{app.bits_per_weight:.2f} bits/weight · auto on" in shown
            prompt = app.query_one(PromptInput)
            assert len(prompt.placeholder) <= prompt.content_size.width  # the hint is not cut
            assert "swap ↓/↑" in shown  # what the memory chart's lines mean
            await pilot.press("ctrl+q")
        fake.shutdown()

    asyncio.run(run())
