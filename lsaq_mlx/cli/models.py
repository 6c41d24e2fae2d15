"""``doctor``, ``inspect`` and ``generate``: this machine, a model, a one-shot generation."""

import time

import typer
from typing import Annotated

from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import JsonOption, ModelOption
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
    prompt: Annotated[str, typer.Option("--prompt", "-p", metavar="TEXT", help="Text to continue (or the user message with --chat).")],
    model: ModelOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", metavar="N", min=1, help="Tokens to generate.")] = 64,
    temp: Annotated[float, typer.Option("--temp", metavar="X", min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    chat: Annotated[bool, typer.Option("--chat", metavar="", help="Wrap the prompt in the model's chat template.")] = False,
    json_out: JsonOption = False,
) -> None:
    """One-shot generation, with tokens/s and peak memory: a smoke test of a model.

    Examples: lsaq-mlx generate -m out-4bpw -p "The capital of France is" -n 16"""
    from lsaq_mlx.backend.compute import compute_mode
    from lsaq_mlx.runtime.generation import build_prompt, generate_text
    from lsaq_mlx.sources import load_model, resolve_model

    source = resolve_model(model)
    start = time.perf_counter()
    net, tokenizer, config = load_model(source)
    load_s = time.perf_counter() - start
    text_in = build_prompt(tokenizer, prompt, chat)
    stream = None if json_out else (lambda piece: print(piece, end="", flush=True))
    text, stats = generate_text(net, tokenizer, text_in, max_tokens=max_tokens, temp=temp, on_text=stream,
                                context=config.get("max_position_embeddings"))
    if json_out:
        return emit_json({"model": source.spec or "default", "prompt": prompt, "text": text, "load_seconds": load_s,
                          "compute_mode": compute_mode(), **stats.to_dict()})
    print(flush=True)
    err(f"{stats.line()} · load {load_s:.1f} s · compute {compute_mode()}")
