"""The README's screenshot of ``lsaq-mlx tui``, mid-conversation with a swap in the log,
and the longest UI-loop stall measured during that swap.

    python scripts/tui_screenshot.py [--model default] [--budgets 4,5,6] [-o docs/tui.svg]

The real engine on the model, a PlanSet of lsaq plans over --budgets, and a replayed
memory trace: plenty of memory for a few seconds, then less than the largest plan needs,
so the policy swaps down to the next plan while the conversation goes on. Textual's Pilot
types two prompts and saves an SVG screenshot when both replies and the swap are shown.
"""

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path

from lsaq_mlx.backend.blas import reexec_with_fast_blas

PROMPTS = ["What is the capital of France?", "Name three rivers in Europe."]


async def drive(app, max_tokens: int, timeout: float, size: tuple[int, int], out: Path) -> None:
    from lsaq_tui.widgets.chat_panel import Reply
    from lsaq_tui.widgets.prompt_input import PromptInput

    async with app.run_test(size=size) as pilot:
        app.query_one(PromptInput).cursor_blink = False

        async def until(condition) -> None:
            end = time.monotonic() + timeout
            while not condition():
                if time.monotonic() > end:
                    sys.exit("timed out waiting for the app")
                await pilot.pause(0.05)

        async def ask(prompt: str, replies: int) -> None:
            for key in prompt:
                await pilot.press("space" if key == " " else key)
            await pilot.press("enter")
            await until(lambda: not app.generating and len(app.query(Reply)) == replies)

        await ask(PROMPTS[0], 1)
        await until(lambda: app.stalls)  # the memory drop's swap, measured once it settled
        await ask(PROMPTS[1], 2)
        await pilot.pause(1.0)  # a few more memory samples after the swap
        out.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(str(out))
        await pilot.press("ctrl+q")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--budgets", default="4,5,6")
    parser.add_argument("--importance", default="jaccard")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--size", default="120x36", help="terminal columns x rows")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("-o", "--out", type=Path, default=Path("docs/tui.svg"))
    args = parser.parse_args()
    reexec_with_fast_blas()

    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.runtime import Engine, ScriptedSampler
    from lsaq_mlx.runtime.options import RuntimeOptions
    from lsaq_mlx.scoring.run import ScoreOptions, score
    from lsaq_mlx.sources import resolve_model
    from lsaq_tui.app import LsaqApp

    source = resolve_model(args.model)
    budgets = [float(b) for b in args.budgets.split(",")]
    planner = Planner(source)
    plans = sorted(planner.plans(PlanRequest(method="lsaq", bits_budgets=budgets)), key=lambda p: p.predicted_bytes)
    reserve = 512 << 20
    mid, large = plans[-2].predicted_bytes, plans[-1].predicted_bytes
    # the largest plan fits; after 20 samples (10 s) only the one below it does (reserve + mid - large <= available
    # < reserve); then the memory the swap gave back is available again, and the smaller plan still fits
    plenty, tight = reserve + (256 << 20), reserve - (large - mid) // 2
    trace = Path(tempfile.mkdtemp()) / "trace.txt"
    trace.write_text(f"{plenty}\n" * 20 + f"{tight}\n" + f"{tight + large - mid}\n")
    scores = score(source, ScoreOptions(args.importance))
    engine = Engine(source, planner, RuntimeOptions(auto=True, budgets=tuple(budgets), memory_events=True),
                    sampler=ScriptedSampler(trace, step=0.5), sample_every=0.5, policy_options={"reserve": reserve},
                    importance=lambda: {"metric": scores.metric, "scores": scores.scores}).start()
    columns, rows = (int(v) for v in args.size.split("x"))
    app = LsaqApp(engine, "SmolLM2-135M-Instruct (default)" if args.model == "default" else args.model, args.max_tokens)
    try:
        asyncio.run(drive(app, args.max_tokens, args.timeout, (columns, rows), args.out))
    finally:
        engine.shutdown()
    swap, stall = app.stalls[0]
    print(f"machine: {platform.system()} {platform.machine()}, MLX CPU backend" if platform.system() == "Linux"
          else f"machine: {platform.system()} {platform.machine()}")
    print(f"swap {swap.from_bits_per_weight:.2f} -> {swap.state.bits_per_weight:.2f} bits/weight ({swap.reason}): "
          f"{swap.changed} modules in {swap.seconds:.2f} s")
    print(f"longest UI-loop stall during the swap: {stall * 1000:.0f} ms (a UI timer ticks every "
          f"{app.meter.interval * 1000:.0f} ms; a blocked UI would stall for the whole swap)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
