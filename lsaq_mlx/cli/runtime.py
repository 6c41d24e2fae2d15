"""``chat`` and ``tui``: a model that adapts its precision to memory while you talk to it."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import (
    AutoOption,
    MaxTokensOption,
    MethodOption,
    ModelOption,
    PlanBudgetsOption,
    PlanFileOption,
    RankTimeoutOption,
    ChatTemplateOption,
    ChatTemplateArgsOption,
    ReserveOption,
    StartBudgetOption,
    MaxKVOption,
    MinPOption,
    SeedOption,
    SystemOption,
    TempOption,
    TopKOption,
    TopPOption,
    TraceOption,
)
from lsaq_mlx.errors import UserError
from lsaq_mlx.scoring.registry import METRICS


def _options(bits_budget, auto, memory_trace, budgets, method, reserve, sampling: dict, chat_template=None,
             chat_template_args=None, **more):
    from lsaq_mlx.runtime.options import RuntimeOptions, parse_budgets
    from lsaq_mlx.runtime.sampling import Sampling
    from lsaq_mlx.sizes import parse_size

    return RuntimeOptions(bits_budget=bits_budget, auto=auto, memory_trace=memory_trace, budgets=parse_budgets(budgets),
                          method=method, reserve_bytes=parse_size(reserve), sampling=Sampling(**sampling),
                          chat_template=_template(chat_template), chat_template_args=_template_args(chat_template_args),
                          **more)


def _template(value: str | None) -> str | None:
    """``--chat-template``: the template itself, or a file that holds one."""
    from lsaq_mlx.documents import read_text

    if value is None:
        return None
    path = Path(value).expanduser()
    template = read_text(path, "the chat template") if "{" not in value and path.is_file() else value
    if "{" not in template:
        raise UserError(f"--chat-template takes a Jinja template or a file holding one, not {value[:60]!r}",
                        setting="chat_template")
    return template


def _template_args(value: str | None) -> dict:
    from lsaq_mlx.documents import parse_json

    if not value:
        return {}
    args = parse_json(value, "--chat-template-args")
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise UserError("--chat-template-args takes a JSON object of names, e.g. '{\"enable_thinking\": false}'",
                        setting="chat_template_args")
    return args


def session_engine(source, options, plan_file: Path | None, rank_timeout: float = 60.0):
    """The engine (not started) of a chat, TUI or server session; with ``--plan`` under
    mlx.launch, None on the ranks after 0, which follow rank 0 until it stops."""
    from lsaq_mlx.runtime.engine import Engine, build_engine

    if plan_file is None:
        return build_engine(source, options)
    from lsaq_mlx.runtime.pipeline import PlannedRun

    if options.bits_budget is not None:
        raise UserError("--plan sets the precision: leave out -b (--auto moves each rank through its own plans)",
                        setting="plan")
    options.check()
    trace = str(options.memory_trace) if options.memory_trace is not None else None
    planned = PlannedRun.open(plan_file, source, rank_timeout, options.auto, trace)
    if planned.ranks.rank != 0:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches every rank: rank 0 decides, then stops them
        stage, config = planned.load(source)
        planned.adaptation(source, stage, config)
        stage.follow()
        return None
    options.planned = planned
    return Engine(source, None, options, planned.sampler())


def end_session(engine) -> None:
    """Stop ``engine``; a pipeline's rank 0 then stops the ranks that follow it."""
    engine.shutdown()
    release = getattr(getattr(engine, "model", None), "release_followers", None)
    if release:
        release()


def _model_name(source) -> str:
    return "SmolLM2-135M-Instruct (default)" if source.kind == "default" else Path(source.origin).name


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
    temp: TempOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    min_p: MinPOption = 0.0,
    seed: SeedOption = None,
    max_kv_size: MaxKVOption = None,
    layer_store: Annotated[bool, typer.Option("--layer-store", metavar="", help="Keep every layer at every setting of the plans on disk, compressed (built once, cached), so swaps read them instead of re-quantizing.")] = False,
    plan_file: PlanFileOption = None,
    rank_timeout: RankTimeoutOption = 60.0,
    chat_template: ChatTemplateOption = None,
    chat_template_args: ChatTemplateArgsOption = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", metavar="TEXT", help="Send this message first, then go on with the chat (standard input's lines, or the terminal).")] = None,
) -> None:
    """Chat with a model that adapts its precision to memory; /help lists the commands.

    With standard input not a terminal, reads one message or /command per line (scripted).

    Examples: lsaq-mlx chat -m ./my-model -b 4 · lsaq-mlx chat -b 3.5 --auto --temp 0.7 --seed 1 ·
    printf "Hello\\n/plan 3\\nAnd now?\\n" | lsaq-mlx chat -b 4 ·
    mlx.launch -n 2 -- lsaq-mlx chat --plan pipe.json (a model over two ranks, from plan --ranks)"""
    from lsaq_mlx.cli.chat_session import banner, run_chat
    from lsaq_mlx.sources import resolve_model

    sampling = dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_kv_size=max_kv_size)
    options = _options(bits_budget, auto, memory_trace, budgets, method, reserve, sampling, chat_template,
                       chat_template_args, layer_store=layer_store)
    source = resolve_model(model)
    engine = session_engine(source, options, plan_file, rank_timeout)
    if engine is None:
        return
    engine.start()
    try:
        if system:
            engine.set_system(system)
        run_chat(engine, max_tokens, title=lambda state: banner(state, _model_name(source), options.sampling.describe()),
                 first=prompt)
    finally:
        end_session(engine)


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
    temp: TempOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    min_p: MinPOption = 0.0,
    seed: SeedOption = None,
    max_kv_size: MaxKVOption = None,
    chat_template: ChatTemplateOption = None,
    chat_template_args: ChatTemplateArgsOption = None,
    plan_file: PlanFileOption = None,
    rank_timeout: RankTimeoutOption = 60.0,
    hostfile: Annotated[Optional[Path], typer.Option("--hostfile", metavar="FILE", help="With --plan: run the pipeline on this mlx.launch hostfile's hosts, rank 0 here in the terminal, the others started as mlx.launch starts them (ssh; bash on 127.0.0.1). mlx.launch itself pipes rank 0's terminal, which a full-screen UI cannot use.")] = None,
    importance: Annotated[str, typer.Option(metavar="METRIC", help=f"Layer importance the layers panel shows: {' | '.join(m.name for m in METRICS.values() if m.display)} | none (cached after the first run).")] = "jaccard",
) -> None:
    """A terminal UI: memory, the per-layer plan, chat, and live precision swaps (F2 plan, F3 auto, Ctrl+P commands).

    Examples: lsaq-mlx tui -m ./my-model -b 4 --auto ·
    lsaq-mlx tui --plan pipe.json --hostfile hosts.json --auto (a model over the hosts' Macs, from plan --ranks;
    the layers panel shows every rank)"""
    import os

    from lsaq_mlx.runtime.pipeline.guard import before_exit
    from lsaq_mlx.sources import resolve_model
    from lsaq_tui.app import LsaqApp
    from lsaq_tui.terminal import terminal_restorer

    sampling = dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_kv_size=max_kv_size)
    options = _options(bits_budget, auto, memory_trace, budgets, method, reserve, sampling, chat_template,
                       chat_template_args, memory_events=True,
                       importance=None if importance == "none" or plan_file is not None else importance)
    options.check()
    source = resolve_model(model)
    launched = _launch_ranks(hostfile, plan_file)
    if os.environ.get("MLX_RANK") == "0" and launched is None and not sys.stdout.isatty():
        raise UserError("the TUI needs a terminal and mlx.launch pipes rank 0's: run lsaq-mlx tui --plan FILE "
                        "--hostfile HOSTFILE in a terminal instead (it starts the other ranks)", setting="hostfile")
    try:
        engine = session_engine(source, options, plan_file, rank_timeout)
        if engine is None:
            return
        ui = LsaqApp(engine.start(), _model_name(source), max_tokens)
        if launched is not None:
            before_exit(terminal_restorer())
        try:
            if system:
                engine.set_system(system)
            ui.run()
        finally:
            end_session(engine)
    finally:
        if launched is not None:
            launched.stop()
    failures = launched.failures() if launched is not None else []
    if ui.error or failures:
        raise UserError(ui.error or "; ".join(failures))


def _launch_ranks(hostfile: Path | None, plan_file: Path | None):
    """``--hostfile``: this process becomes rank 0 and starts the others (None under
    mlx.launch, which started them, or without a hostfile)."""
    import os

    from lsaq_mlx.runtime.pipeline.launch import launch_followers

    if hostfile is None:
        return None
    if plan_file is None:
        raise UserError("--hostfile runs a pipeline: give its --plan (plan --ranks HOSTFILE -o FILE)", setting="hostfile")
    if "MLX_RANK" in os.environ:  # a rank started by mlx.launch, or by rank 0 here
        return None
    return launch_followers(hostfile, sys.argv[1:])
