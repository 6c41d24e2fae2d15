"""``doctor``, ``inspect`` and ``generate``: this machine, a model, a one-shot generation."""

import os
import time
from pathlib import Path
from typing import Optional

import typer
from typing import Annotated

from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import JsonOption, MinPOption, ModelOption, SystemOption, TopKOption, TopPOption
from lsaq_mlx.cli.output import emit_json, err


@app.command()
def doctor(json_out: JsonOption = False) -> None:
    """Show the MLX backend, the BLAS in use, the compute mode, and a GEMM speed check.

    Examples: lsaq-mlx doctor --json"""
    from lsaq_mlx.doctor import diagnose

    report = diagnose()
    if json_out:
        return emit_json(report)
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


@app.command()
def inspect(model: ModelOption = None, json_out: JsonOption = False) -> None:
    """Architecture, parameters per module kind, precision of every module, size, bits per weight; the plans an adaptive folder serves.

    Examples: lsaq-mlx inspect -m ./Llama-3-8B-Instruct"""
    from lsaq_mlx.cli.render.inspection import print_description
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.adaptive.folder import AdaptiveFolder
    from lsaq_mlx.sources.inspection import describe_model

    source = resolve_model(model)
    info = describe_model(source)
    folder = AdaptiveFolder.of(source)
    if folder:
        info["adaptive"] = folder.describe()
    if json_out:
        return emit_json(info)
    print_description(info)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", metavar="TEXT", help="Text to continue (or the user message with --chat); - reads it from standard input.")],
    model: ModelOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", metavar="N", min=1, help="Tokens to generate.")] = 64,
    temp: Annotated[float, typer.Option("--temp", metavar="X", min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    min_p: MinPOption = 0.0,
    chat: Annotated[bool, typer.Option("--chat", metavar="", help="Wrap the prompt in the model's chat template.")] = False,
    system: SystemOption = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan", metavar="FILE", help="Quantize the model as this plan says first: a QuantPlan (plan -o), or a PipelinePlan (plan --ranks), which under mlx.launch runs pipelined, each rank holding its own layers.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", metavar="N", help="Random seed for --temp above 0.")] = None,
    rank_timeout: Annotated[float, typer.Option("--rank-timeout", metavar="SECONDS", min=1.0, help="Pipelined: end the run when no token comes for this long (a rank stalled or died).")] = 60.0,
    json_out: JsonOption = False,
) -> None:
    """One-shot generation, with tokens/s and peak memory: a smoke test of a model.

    Examples: lsaq-mlx generate -m out-4bpw -p "The capital of France is" -n 16 ·
    cat question.txt | lsaq-mlx generate -p - --chat --system-prompt "Answer briefly" --temp 0.7 --top-p 0.9 --seed 1 ·
    lsaq-mlx generate --plan pipeline.json -p "Hello" (one process) ·
    mlx.launch -n 2 --backend ring -- lsaq-mlx generate --plan pipeline.json -p "Hello" (pipelined over 2 ranks)"""
    import mlx.core as mx

    from lsaq_mlx.backend.compute import compute_mode
    from lsaq_mlx.runtime.generation import build_prompt, generate_text
    from lsaq_mlx.sources import load_model, resolve_model
    from lsaq_mlx.sources.load import load_tokenizer

    from lsaq_mlx.errors import UserError
    from lsaq_mlx.runtime.sampling import Sampling

    sampling = Sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    sampling.check()
    if system and not chat:
        raise UserError("a system prompt goes with --chat (the model's chat template)", setting="chat")
    if prompt == "-":
        import sys

        prompt = sys.stdin.read()
    source = resolve_model(model)
    ranks = pipeline = guard = None
    start = time.perf_counter()
    if plan_file:
        from lsaq_mlx.backend.ranks import Ranks
        from lsaq_mlx.runtime.pipeline import load_planned, read_plan_file

        from lsaq_mlx.runtime.pipeline import StallGuard

        ranks = Ranks()
        plan = read_plan_file(plan_file, source)
        pipeline = plan if ranks.size > 1 else None
        guard = StallGuard(ranks.rank, rank_timeout) if pipeline else None
        net, config = load_planned(source, plan, ranks)
        tokenizer = load_tokenizer(source)
    else:
        net, tokenizer, config = load_model(source)
    load_s = time.perf_counter() - start
    first = ranks is None or ranks.rank == 0
    if pipeline:
        guard.start(grace=2 * load_s)  # the others load shares of about this size
        load_s = max(ranks.gather(load_s))  # also: every rank has loaded
    if temp > 0:
        mx.random.seed(ranks.from_rank0(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
                       if pipeline else seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    text_in = build_prompt(tokenizer, prompt, chat, system)

    def stream(piece):
        if guard:
            guard.beat()
        if first and not json_out:
            print(piece, end="", flush=True)

    text, stats = generate_text(net, tokenizer, text_in, max_tokens=max_tokens, sampler=sampling.sampler(),
                                on_text=stream, context=config.get("max_position_embeddings"))
    extra = {}
    if pipeline:
        guard.stop()
        extra = _pipeline_report(pipeline, ranks, net, config, stats)
    if not first:
        return None
    if json_out:
        return emit_json({"model": source.spec or "default", "prompt": prompt, "text": text, "load_seconds": load_s,
                          "compute_mode": compute_mode(), **stats.to_dict(), **extra})
    print(flush=True)
    err(f"{stats.line()} · load {load_s:.1f} s · compute {compute_mode()}")
    for r in extra.get("ranks", []):
        err(f"rank {r['rank']}: layers {r['layers']}, peak memory {r['peak_memory_bytes'] / 1e9:.2f} GB")


def _pipeline_report(pipeline, ranks, stage, config, stats) -> dict:
    """Every rank's layers and peak memory, and the bytes between ranks per token."""
    import mlx.core as mx
    import psutil

    from lsaq_mlx.runtime.pipeline import bytes_between_ranks

    share = pipeline.share(ranks.rank)
    mine = {"rank": ranks.rank, "layers": f"{share.first_layer}-{share.end_layer - 1}",
            "peak_memory_bytes": int(mx.get_peak_memory()), "rss_bytes": psutil.Process().memory_info().rss}
    hidden = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    return {"ranks": ranks.gather(mine),
            "bytes_between_ranks_per_token": bytes_between_ranks(pipeline, int(hidden), stage.vocabulary)}
