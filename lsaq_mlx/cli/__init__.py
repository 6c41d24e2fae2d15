"""The ``lsaq-mlx`` command line.

Every command that produces data takes ``--json`` (one JSON document on stdout;
progress and logs on stderr). Exit status: 0 success, 1 user error (one line on
stderr), 2 usage error. Set LSAQ_MLX_DEBUG=1 to see full tracebacks.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lsaq_mlx import __version__
from lsaq_mlx.backend.blas import reexec_with_fast_blas
from lsaq_mlx.cache import sweep_cache
from lsaq_mlx.errors import Terminated, UserError, os_error_line
from lsaq_mlx.scoring.scores import (
    DEFAULT_SEQ_LEN,
    DEFAULT_STRIDE,
    DEFAULT_TOKENS,
    DEFAULT_TOP_K,
)

app = typer.Typer(
    name="lsaq-mlx",
    help="Make language models fit your Mac: score layer importance, give important layers more bits, "
    "write models stock mlx_lm opens, and hot-swap precision as memory changes.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="default (embedded SmolLM2-135M-Instruct) | path/to/model.gguf | HF or MLX model folder | model.lsaqpack | Hugging Face id",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version(value: bool) -> None:
    if value:
        print(f"lsaq-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def doctor(json_out: JsonOption = False) -> None:
    """Show the MLX backend, the BLAS in use, the compute mode, and a GEMM speed check."""
    from lsaq_mlx.backend.doctor import diagnose

    report = diagnose()
    if json_out:
        return emit_json(report)
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


@app.command()
def inspect(model: ModelOption = None, json_out: JsonOption = False) -> None:
    """Architecture, parameters per module kind, precision of every module, size, bits per weight."""
    from lsaq_mlx.sources.inspection import describe_model
    from lsaq_mlx.cli.render.inspection import print_description
    from lsaq_mlx.sources import resolve_model

    info = describe_model(resolve_model(model))
    if json_out:
        return emit_json(info)
    print_description(info)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue (or the user message with --chat).")],
    model: ModelOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens to generate.")] = 64,
    temp: Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    json_out: JsonOption = False,
) -> None:
    """One-shot generation, with tokens/s and peak memory: a smoke test of a model."""
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
        return emit_json(
            {"model": source.spec or "default", "prompt": prompt, "text": text, "load_seconds": load_s,
             "compute_mode": compute_mode(), **stats.to_dict()}
        )
    print(flush=True)
    err(f"{stats.line()} · load {load_s:.1f} s · compute {compute_mode()}")


@app.command()
def score(
    model: ModelOption = None,
    metric: Annotated[str, typer.Option(help="jaccard (LSAQ) | cosine (Block Influence/LIM) | zscore (ZD) | random | sensitivity")] = "jaccard",
    calib: Annotated[Optional[str], typer.Option(help="Calibration text: a file, a folder of .txt files, a HF dataset name[:config[:split]], or default.")] = None,
    tokens: Annotated[int, typer.Option(help="Calibration tokens.")] = DEFAULT_TOKENS,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = DEFAULT_SEQ_LEN,
    top_k: Annotated[int, typer.Option(help="jaccard: size of each top-k token set.")] = DEFAULT_TOP_K,
    stride: Annotated[Optional[int], typer.Option(help=f"Use every stride-th position only (default: {DEFAULT_STRIDE} for jaccard, chosen by scripts/stability_study.py; 1 for cosine).")] = None,
    sets: Annotated[str, typer.Option(help="jaccard: 'position' (a set per position) or 'sequence' (the union over a sequence).")] = "position",
    seed: Annotated[int, typer.Option(help="random: the seed.")] = 0,
    bits: Annotated[int, typer.Option(help="sensitivity: the bit width a layer is quantized to.")] = 3,
    skip_tokens: Annotated[int, typer.Option(help="Start this many tokens into the calibration text.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the LayerScores JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG plot of the scores by layer.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute even when cached.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Score every decoder layer's importance (higher = more important); cached by content fingerprint.

    jaccard is LSAQ: 1 - mean Jaccard similarity of the logit-lens top-k token sets of the
    hidden state entering and leaving the layer.
    """
    from lsaq_mlx.cli.render.scores import plot_scores, print_bar_chart
    from lsaq_mlx.scoring.run import ScoreOptions, score as compute_scores
    from lsaq_mlx.sources import resolve_model

    opts = ScoreOptions(metric, calib, tokens, seq_len, top_k, stride, sets, seed, bits, skip_tokens)
    opts.check()
    result = compute_scores(resolve_model(model), opts, use_cache=not no_cache)
    if out:
        result.save(out)
    if plot:
        plot_scores([result], plot)
    if json_out:
        return emit_json(result.to_dict())
    print_bar_chart(result)


@app.command("plot-scores")
def plot_scores_command(
    files: Annotated[list[Path], typer.Argument(help="LayerScores JSON files (from score --out).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("scores.png"),
    normalize: Annotated[bool, typer.Option(help="Rescale each metric to [0, 1].")] = True,
) -> None:
    """Plot several score files (e.g. one per metric) as lines by layer in one PNG."""
    from lsaq_mlx.scoring.scores import LayerScores
    from lsaq_mlx.cli.render.scores import plot_scores

    all_scores = [LayerScores.load(f) for f in files]
    plot_scores(all_scores, out, normalize)
    err(f"wrote {out}")


BudgetOption = Annotated[list[float], typer.Option("--bits-budget", "-b", help="Bits per weight (mlx-lm's definition, scales included); repeat for several plans.")]
MemoryOption = Annotated[Optional[str], typer.Option("--memory-budget", help="Total memory for the model, e.g. 1.2GB: weights get what a --context KV cache (float16) and a 10 % runtime reserve leave.")]
RecipeOption = Annotated[Optional[str], typer.Option(help="Instead of a method: mlx-lm's mixed_2_6 | mixed_3_4 | mixed_3_6 | mixed_4_6.")]
ScoresOption = Annotated[Optional[Path], typer.Option(help="LayerScores JSON to use (from score --out); default: computed and cached.")]
CalibOption = Annotated[Optional[str], typer.Option(help="Calibration text for the scores and the cost model (default: packaged).")]
HighBitsOption = Annotated[int, typer.Option(help="Tiers: bits of the important layers.")]
LowBitsOption = Annotated[int, typer.Option(help="Tiers: bits of the other layers, embeddings and LM head.")]
GroupSizeOption = Annotated[Optional[int], typer.Option(help="Tiers/uniform/recipe: group size (default 64).")]
UniformBitsOption = Annotated[Optional[int], typer.Option(help="Uniform: this bit width (no budget needed).")]
OverrideOption = Annotated[Optional[list[str]], typer.Option(help="Pin modules: REGEX=BITS[:GROUP], REGEX=keep or REGEX=swsc:K:R (repeatable).")]
CodecsOption = Annotated[str, typer.Option(help="affine (stock mlx-lm opens the result) | affine,swsc (lsaq may also choose SWSC: shared channel weights + SVD correction; opens with lsaq-mlx only).")]
ContextOption = Annotated[int, typer.Option(help="Tokens of KV cache a --memory-budget reserves.")]
MethodOption = Annotated[str, typer.Option("--method", help="lsaq (knapsack on importance x quantization error) | lsaq-tiers | tiers-cosine | tiers-zscore | tiers-random | uniform")]


def _plan_request(method, bits_budget, memory_budget, context, recipe, scores, calib, high_bits, low_bits, group_size,
                  bits, override, codecs="affine"):
    from lsaq_mlx.planning.planner import PlanRequest

    return PlanRequest(method, list(bits_budget or []), memory_budget, context, recipe, scores, calib, high_bits,
                       low_bits, group_size, bits, list(override or []),
                       codecs=tuple(c.strip() for c in codecs.split(",") if c.strip()))


@app.command()
def plan(
    model: ModelOption = None,
    bits_budget: BudgetOption = None,
    memory_budget: MemoryOption = None,
    method: MethodOption = "lsaq",
    recipe: RecipeOption = None,
    scores: ScoresOption = None,
    calib: CalibOption = None,
    high_bits: HighBitsOption = 8,
    low_bits: LowBitsOption = 4,
    group_size: GroupSizeOption = None,
    bits: UniformBitsOption = None,
    override: OverrideOption = None,
    codecs: CodecsOption = "affine",
    context: ContextOption = 4096,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the QuantPlan (one budget) or PlanSet (several) JSON here.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Plan per-module bit widths under a budget without writing weights (a QuantPlan, or a PlanSet for several budgets)."""
    from lsaq_mlx.planning.plan import PlanSet
    from lsaq_mlx.cli.render.plan import print_plan
    from lsaq_mlx.planning.planner import headroom, make_plans
    from lsaq_mlx.sources import resolve_model

    request = _plan_request(method, bits_budget, memory_budget, context, recipe, scores, calib, high_bits, low_bits,
                            group_size, bits, override, codecs)
    plans, _, _ = make_plans(resolve_model(model), request)
    result = plans[0] if len(plans) == 1 else PlanSet(plans)
    if out:
        result.save(out)
    if json_out:
        data = result.to_dict() if len(plans) == 1 else {"type": "PlanSet", "plans": [p.to_dict() for p in plans]}
        return emit_json(data)
    for p in plans:
        print_plan(p, headroom(p.predicted_bytes))


@app.command()
def convert(
    model: ModelOption = None,
    bits_budget: Annotated[Optional[float], typer.Option("--bits-budget", "-b", help="Bits per weight (mlx-lm's definition, scales included).")] = None,
    memory_budget: MemoryOption = None,
    method: MethodOption = "lsaq",
    recipe: RecipeOption = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan", help="Write this QuantPlan JSON (from plan --out) instead of planning.")] = None,
    scores: ScoresOption = None,
    calib: CalibOption = None,
    high_bits: HighBitsOption = 8,
    low_bits: LowBitsOption = 4,
    group_size: GroupSizeOption = None,
    bits: UniformBitsOption = None,
    override: OverrideOption = None,
    codecs: CodecsOption = "affine",
    context: ContextOption = 4096,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Model folder to write (default: <model>-lsaq-<budget>).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (per-layer table, size, headroom); write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Quantize a model under a budget and write a folder that stock mlx_lm loads (plus lsaq_plan.json, lsaq_report.json); with --codecs affine,swsc, one that lsaq-mlx loads."""
    from lsaq_mlx.convert import convert as write_model
    from lsaq_mlx.planning.plan import QuantPlan
    from lsaq_mlx.cli.render.plan import print_plan
    from lsaq_mlx.planning.planner import headroom, make_plans
    from lsaq_mlx.sources import resolve_model

    source = resolve_model(model)
    if plan_file:
        chosen = QuantPlan.load(plan_file)
        if chosen.model_fingerprint != source.fingerprint:
            raise UserError(f"{plan_file} is a plan for another model (fingerprint {chosen.model_fingerprint})")
        if chosen.swsc_modules() and "swsc" not in codecs:
            raise UserError(f"{plan_file} gives {len(chosen.swsc_modules())} modules to SWSC, which stock mlx-lm "
                            "cannot open: add --codecs affine,swsc")
    else:
        request = _plan_request(method, [bits_budget] if bits_budget else [], memory_budget, context, recipe, scores,
                                calib, high_bits, low_bits, group_size, bits, override, codecs)
        chosen = make_plans(source, request)[0][0]
    if dry_run:
        if json_out:
            return emit_json({"plan": chosen.to_dict(), **headroom(chosen.predicted_bytes)})
        return print_plan(chosen, headroom(chosen.predicted_bytes))
    target = out or Path(f"{Path(source.origin).stem if source.kind != 'default' else 'smollm2-135m'}-"
                         f"{recipe or chosen.method}-{chosen.predicted_bits_per_weight:.2f}bpw")
    report = write_model(source, chosen, target, force=force)
    if json_out:
        return emit_json(report.to_dict())
    print_plan(chosen)
    err(f"wrote {target}: {report.bits_per_weight:.3f} bits per weight, {report.written_bytes / 1e6:.1f} MB, "
        f"{report.wall_seconds:.1f} s, peak memory {report.peak_memory_bytes / 1e9:.2f} GB")
    err(f"smoke test: {report.smoke_prompt!r} -> {report.smoke_text!r}")


ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


@app.command()
def pack(
    folder: Annotated[Path, typer.Argument(help="A model folder (e.g. written by convert).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Pack file to write (default: <folder>.lsaqpack).")] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Compress a model folder into one file, exactly lossless (every file's SHA-256 is kept and checked).

    --model accepts the file as it is (the weights are decoded straight into memory); unpack restores the folder."""
    from lsaq_mlx.storage.model_pack import pack_model

    target = out or folder.resolve().with_name(folder.resolve().name + ".lsaqpack")
    report = pack_model(folder, target, force=force)
    if json_out:
        return emit_json(report)
    err(f"wrote {target}: {report['raw_bytes'] / 1e6:.1f} MB -> {report['packed_bytes'] / 1e6:.1f} MB "
        f"({report['ratio']:.3f}x), {report['files']} files, {report['seconds']:.1f} s")


@app.command()
def unpack(
    pack_file: Annotated[Path, typer.Argument(help="A file written by pack.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder to write (default: the file's name without .lsaqpack).")] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Restore the model folder a pack holds, byte for byte (every file's SHA-256 is checked)."""
    from lsaq_mlx.storage.model_pack import unpack_model

    target = out or pack_file.with_name(pack_file.stem if pack_file.suffix == ".lsaqpack" else pack_file.name + ".unpacked")
    report = unpack_model(pack_file, target, force=force)
    if json_out:
        return emit_json(report)
    err(f"wrote {target}: {report['files']} files, {report['raw_bytes'] / 1e6:.1f} MB, {report['seconds']:.1f} s")


@app.command("eval")
def eval_command(
    model: ModelOption = None,
    ppl: Annotated[str, typer.Option(help="Perplexity text: wikitext2 (the local WikiText-2 test set), a text file, or none.")] = "wikitext2",
    tasks: Annotated[str, typer.Option(help="Zero-shot tasks, comma-separated: piqa, arc_easy, arc_challenge, openbookqa, boolq, winogrande, hellaswag, lambada, or all.")] = "",
    reference: Annotated[Optional[str], typer.Option(help="Also report KL divergence and top-1 agreement against this model (e.g. default).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Perplexity/KL: the first N tokens of the text.")] = 4096,
    seq_len: Annotated[int, typer.Option(help="Perplexity/KL: tokens per non-overlapping window.")] = 512,
    limit: Annotated[Optional[int], typer.Option(help="Tasks: at most N items each.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder with the task files (default: ../shared/data/tasks).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Evaluate a model: perplexity (non-overlapping windows), KL to a reference, zero-shot accuracy."""
    from lsaq_mlx.evaluation.run import evaluate
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.evaluation.tasks import TASKS

    names = list(TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    if max_tokens < 2 or seq_len < 2:
        raise UserError("--max-tokens and --seq-len must be at least 2")
    result = evaluate(resolve_model(model), None if ppl == "none" else ppl, names,
                      resolve_model(reference) if reference else None, max_tokens, seq_len, limit, data_dir)
    if json_out:
        return emit_json(result.to_dict())
    if result.perplexity:
        p = result.perplexity
        print(f"perplexity {p['perplexity']:.3f} (mean NLL {p['mean_nll']:.4f} ± {p['stderr_nll']:.4f}) on {p['tokens']} "
              f"tokens of {p['data']}, windows of {p['seq_len']}")
    if result.divergence:
        d = result.divergence
        print(f"KL to {d['reference']}: {d['kl']:.4f} ± {d['kl_stderr']:.4f} nats/token · top-1 agreement {d['top1_agreement']:.3f}")
    for t in result.tasks:
        extra = f" · acc_norm {t['acc_norm']:.3f} ± {t['acc_norm_stderr']:.3f}" if t["acc_norm"] is not None else ""
        extra += f" · perplexity {t['perplexity']:.2f}" if t["perplexity"] is not None else ""
        skipped = f" ({t['skipped']} malformed rows skipped)" if t["skipped"] else ""
        print(f"{t['task']}: acc {t['acc']:.3f} ± {t['acc_stderr']:.3f}{extra} on {t['items']} items{skipped}")
    err(f"{result.wall_seconds:.1f} s")


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="A TOML file: [eval] settings and [[grid]] tables of models, methods, budgets (see the README).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Results folder (default: the spec's `out`, else <spec>-results beside it).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and which are already done; evaluate nothing.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Evaluate a grid of models x methods x budgets; resumes where it stopped. Under `mlx.launch -n N` the cells are shared among the processes."""
    from lsaq_mlx.sweep.run import Sweep, SweepSpec, read_results

    runner = Sweep(SweepSpec.load(spec, out))
    if dry_run:
        done, _ = read_results(runner.spec.out / "results.jsonl")
        cells = [{"cell": c.label, "done": done.get(runner.key(c), {}).get("status") == "ok"} for c in runner.spec.cells]
        if json_out:
            return emit_json({"out": str(runner.spec.out), "cells": cells})
        for c in cells:
            print(f"{'done ' if c['done'] else 'to do'}  {c['cell']}")
        return
    summary = runner.run()
    if runner.ranks.rank != 0:
        return
    if json_out:
        emit_json(summary.to_dict())
    else:
        from lsaq_mlx.sweep.report import markdown_table

        print(markdown_table(summary.rows), end="")
        err(f"{summary.cells} cells ({summary.evaluated} evaluated, {summary.reused} from earlier runs) on "
            f"{summary.ranks} rank(s) in {summary.wall_seconds:.0f} s; results in {summary.out}")
    if summary.failed:
        raise UserError(f"{summary.failed} of {summary.cells} cells failed (see {summary.out / 'results.md'})")


StartBudgetOption = Annotated[Optional[float], typer.Option("--bits-budget", "-b", help="Start with the plan of this many bits per weight (default: the source precision).")]
AutoOption = Annotated[bool, typer.Option("--auto", help="Follow this machine's memory: swap between plans of --budgets.")]
TraceOption = Annotated[Optional[Path], typer.Option(help="Follow a replayed memory trace instead (one 'available[,pressure]' per line, one line per second).")]
BudgetsOption = Annotated[str, typer.Option(help="Automatic mode: the plans' bits per weight.")]
ReserveOption = Annotated[str, typer.Option(help="Automatic mode: memory to keep free.")]
MaxTokensOption = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Longest reply, in tokens.")]
SystemOption = Annotated[Optional[str], typer.Option(help="System prompt.")]


def _runtime_engine(source, bits_budget, auto, memory_trace, budgets, method, reserve, **options):
    """An engine (not started) for chat and tui: a planner for ``method``, the PlanSet of
    ``budgets`` in automatic mode, the system's memory or a replayed trace."""
    from lsaq_mlx.planning.planner import PlanRequest, make_plans
    from lsaq_mlx.runtime import Engine, ScriptedSampler, SystemSampler
    from lsaq_mlx.sizes import parse_size

    try:
        auto_budgets = [float(b) for b in budgets.split(",")] if (auto or memory_trace) else []
    except ValueError:
        raise UserError(f"--budgets must be numbers separated by commas, got '{budgets}'") from None
    sampler = ScriptedSampler(memory_trace) if memory_trace else SystemSampler()
    planner = lambda bs: make_plans(source, PlanRequest(method, list(bs)))[0]
    return Engine(source, planner, bits_budget, auto_budgets, sampler, {"reserve": parse_size(reserve)}, **options)


@app.command()
def chat(
    model: ModelOption = None,
    bits_budget: StartBudgetOption = None,
    auto: AutoOption = False,
    memory_trace: TraceOption = None,
    budgets: BudgetsOption = "3,3.5,4,4.5,5,6",
    method: MethodOption = "lsaq",
    reserve: ReserveOption = "512MB",
    max_tokens: MaxTokensOption = 512,
    system: SystemOption = None,
    layer_store: Annotated[bool, typer.Option("--layer-store", help="Keep every layer at every setting of the plans on disk, compressed (built once, cached), so swaps read them instead of re-quantizing.")] = False,
) -> None:
    """Chat with a model that adapts its precision to memory; /help lists the commands.

    With standard input not a terminal, reads one message or /command per line (scripted)."""
    from lsaq_mlx.cli.chat_session import run_chat
    from lsaq_mlx.sources import resolve_model

    source = resolve_model(model)
    engine = _runtime_engine(source, bits_budget, auto, memory_trace, budgets, method, reserve,
                             layer_store=layer_store).start()
    try:
        if system:
            engine.send("system", system)
        run_chat(engine, max_tokens)
    finally:
        engine.shutdown()


@app.command()
def tui(
    model: ModelOption = None,
    bits_budget: StartBudgetOption = None,
    auto: AutoOption = False,
    memory_trace: TraceOption = None,
    budgets: BudgetsOption = "3,3.5,4,4.5,5,6",
    method: MethodOption = "lsaq",
    reserve: ReserveOption = "512MB",
    max_tokens: MaxTokensOption = 512,
    system: SystemOption = None,
    importance: Annotated[str, typer.Option(help="Layer importance the layers panel shows: jaccard | cosine | zscore | none (cached after the first run).")] = "jaccard",
) -> None:
    """A terminal UI: memory, the per-layer plan, chat, and live precision swaps (F2 plan, F3 auto, Ctrl+P commands)."""
    from lsaq_mlx.scoring.run import ScoreOptions, score
    from lsaq_mlx.sources import resolve_model

    if importance not in ("jaccard", "cosine", "zscore", "none"):
        raise UserError(f"--importance must be jaccard, cosine, zscore or none, got '{importance}'")
    source = resolve_model(model)

    def layer_importance() -> dict:
        scores = score(source, ScoreOptions(importance))
        return {"metric": scores.metric, "scores": scores.scores}

    engine = _runtime_engine(source, bits_budget, auto, memory_trace, budgets, method, reserve, memory_events=True,
                             importance=None if importance == "none" else layer_importance)
    from lsaq_tui.app import LsaqApp

    name = "SmolLM2-135M-Instruct (default)" if source.kind == "default" else Path(source.origin).name
    ui = LsaqApp(engine.start(), name, max_tokens)
    try:
        if system:
            engine.send("system", system)
        ui.run()
    finally:
        engine.shutdown()
    if ui.error:
        raise UserError(ui.error)


def _terminate(signum, frame):
    raise Terminated(signum)


def main() -> None:
    reexec_with_fast_blas()
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)
    debug = bool(os.environ.get("LSAQ_MLX_DEBUG"))
    try:
        sweep_cache()
        app()
    except UserError as e:
        if debug:
            raise
        _exit(1, f"error: {e}")
    except OSError as e:
        if debug:
            raise
        _exit(1, f"error: {os_error_line(e)}")
    except KeyboardInterrupt:
        _exit(130, "interrupted")
    except Terminated as e:
        _exit(128 + e.signum, f"stopped by {signal.Signals(e.signum).name}")


def _exit(status: int, line: str) -> None:
    err(" ".join(line.split()))  # one line, whatever the message held
    sys.exit(status)
