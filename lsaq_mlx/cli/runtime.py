"""``chat`` and ``tui``: a model that adapts its precision to memory while you talk to it."""

from pathlib import Path
from typing import Annotated

import typer

from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import (
    AutoOption,
    MaxTokensOption,
    MethodOption,
    ModelOption,
    PlanBudgetsOption,
    ReserveOption,
    StartBudgetOption,
    SystemOption,
    TraceOption,
)
from lsaq_mlx.errors import UserError


def _options(bits_budget, auto, memory_trace, budgets, method, reserve, **more):
    from lsaq_mlx.runtime.options import RuntimeOptions, parse_budgets
    from lsaq_mlx.sizes import parse_size

    return RuntimeOptions(bits_budget=bits_budget, auto=auto, memory_trace=memory_trace, budgets=parse_budgets(budgets),
                          method=method, reserve_bytes=parse_size(reserve), **more)


@app.command()
def chat(
    model: ModelOption = None,
    bits_budget: StartBudgetOption = None,
    auto: AutoOption = False,
    memory_trace: TraceOption = None,
    budgets: PlanBudgetsOption = "3,3.5,4,4.5,5,6",
    method: MethodOption = "lsaq",
    reserve: ReserveOption = "512MB",
    max_tokens: MaxTokensOption = 512,
    system: SystemOption = None,
    layer_store: Annotated[bool, typer.Option("--layer-store", help="Keep every layer at every setting of the plans on disk, compressed (built once, cached), so swaps read them instead of re-quantizing.")] = False,
) -> None:
    """Chat with a model that adapts its precision to memory; /help lists the commands.

    With standard input not a terminal, reads one message or /command per line (scripted)."""
    from lsaq_mlx.cli.chat_session import run_chat
    from lsaq_mlx.runtime.options import build_engine
    from lsaq_mlx.sources import resolve_model

    options = _options(bits_budget, auto, memory_trace, budgets, method, reserve, layer_store=layer_store)
    engine = build_engine(resolve_model(model), options).start()
    try:
        if system:
            engine.set_system(system)
        run_chat(engine, max_tokens)
    finally:
        engine.shutdown()


@app.command()
def tui(
    model: ModelOption = None,
    bits_budget: StartBudgetOption = None,
    auto: AutoOption = False,
    memory_trace: TraceOption = None,
    budgets: PlanBudgetsOption = "3,3.5,4,4.5,5,6",
    method: MethodOption = "lsaq",
    reserve: ReserveOption = "512MB",
    max_tokens: MaxTokensOption = 512,
    system: SystemOption = None,
    importance: Annotated[str, typer.Option(help="Layer importance the layers panel shows: jaccard | cosine | zscore | none (cached after the first run).")] = "jaccard",
) -> None:
    """A terminal UI: memory, the per-layer plan, chat, and live precision swaps (F2 plan, F3 auto, Ctrl+P commands)."""
    from lsaq_mlx.runtime.options import build_engine
    from lsaq_mlx.sources import resolve_model
    from lsaq_tui.app import LsaqApp

    options = _options(bits_budget, auto, memory_trace, budgets, method, reserve, memory_events=True,
                       importance=None if importance == "none" else importance)
    options.check()
    source = resolve_model(model)
    engine = build_engine(source, options)
    name = "SmolLM2-135M-Instruct (default)" if source.kind == "default" else Path(source.origin).name
    ui = LsaqApp(engine.start(), name, max_tokens)
    try:
        if system:
            engine.set_system(system)
        ui.run()
    finally:
        engine.shutdown()
    if ui.error:
        raise UserError(ui.error)
