"""``plan`` and ``convert``: plans under a budget, and the folders written from them."""

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lsaq_mlx.cache import check_output_file
from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import (
    BudgetOption,
    BudgetsOption,
    CalibOption,
    CodecsOption,
    ContextOption,
    ForceOption,
    GroupSizeOption,
    HighBitsOption,
    JsonOption,
    LowBitsOption,
    MemoryOption,
    MethodOption,
    ModelOption,
    OverrideOption,
    QuantizerOption,
    RecipeOption,
    ScoresOption,
    UniformBitsOption,
)
from lsaq_mlx.cli.output import emit_json, err


def _request(**values):
    """The command's PlanRequest, checked before any model is read."""
    from lsaq_mlx.planning.planner import PlanRequest

    codecs = values.pop("codecs")
    values["overrides"] = list(values.pop("override") or [])
    values["scores_file"] = values.pop("scores")
    request = PlanRequest(**values, codecs=tuple(c.strip() for c in codecs.split(",") if c.strip()))
    request.check()
    return request


@app.command()
def plan(
    model: ModelOption = None,
    bits_budget: BudgetsOption = None,
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
    ranks: Annotated[Optional[str], typer.Option("--ranks", metavar="SIZES|HOSTFILE", help="Plan the model over several Macs (mlx.launch ranks): each one's memory (64GB,32GB), or an mlx.launch hostfile whose hosts carry a \"memory\" field. Chooses each rank's layers and every module's bits together (a PipelinePlan for generate/eval --plan); -b also caps the total.")] = None,
    rank_budgets: Annotated[Optional[str], typer.Option("--rank-budgets", metavar="BITS,BITS,...", help="With --ranks: each rank also gets plans of its own layers at these bits per weight below its share, which chat/serve --plan --auto move through as that rank's memory changes.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="With --ranks: price settings from the config alone (every weight equally sensitive), reading no weights: a plan on paper for a model you have not downloaded (-m a folder holding its config.json).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", help="Write the QuantPlan (one budget), PlanSet (several) or PipelinePlan (--ranks) JSON here.")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace the file --out names if it exists.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Plan per-module bit widths under a budget without writing weights (a QuantPlan, or a PlanSet for several budgets; over several Macs, a PipelinePlan).

    Examples: lsaq-mlx plan -m ./my-model -b 3.5 · lsaq-mlx plan -b 3 -b 4 -b 5 -o plans.json · lsaq-mlx plan --memory-budget 6GB · lsaq-mlx plan -m ./Llama-3.3-70B --ranks 64GB,32GB --dry-run · lsaq-mlx plan --ranks 200MB,100MB --context 1024 -o pipeline.json"""
    from lsaq_mlx.cli.render.plan import print_plan
    from lsaq_mlx.planning.budgets import headroom
    from lsaq_mlx.planning.plan import PlanSet
    from lsaq_mlx.planning.planner import Planner
    from lsaq_mlx.sources import resolve_model

    request = _request(method=method, bits_budgets=list(bits_budget or []) or ([16.0] if ranks else []),
                       memory_budget=memory_budget, context=context, recipe=recipe, scores=scores, calib=calib,
                       high_bits=high_bits, low_bits=low_bits, group_size=group_size, bits=bits, override=override,
                       codecs=codecs)
    if out:
        check_output_file(out, force)
    if ranks or dry_run:
        return _pipeline_plan(model, ranks, dry_run, request, bits_budget, out, force, json_out, rank_budgets)
    source = resolve_model(model)
    plans = Planner(source).plans(request)
    result = plans[0] if len(plans) == 1 else PlanSet(plans)
    if out:
        result.save(out, force, make_folders=False)
    if json_out:
        return emit_json({"model": source.spec or "default"} | result.to_dict())
    for p in plans:
        print_plan(p, headroom(p.predicted_bytes))


def _pipeline_plan(model, ranks, dry_run, request, bits_budget, out, force, json_out, rank_budgets=None) -> None:
    from dataclasses import replace

    from lsaq_mlx.cli.render.plan import print_pipeline_plan
    from lsaq_mlx.errors import UserError
    from lsaq_mlx.planning.pipeline import parse_ranks
    from lsaq_mlx.planning.planner import Planner
    from lsaq_mlx.runtime.options import parse_budgets
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.resolve import config_source

    if not ranks:
        raise UserError("--dry-run plans over ranks: give --ranks (e.g. --ranks 64GB,32GB)", setting="ranks")
    memories = parse_ranks(ranks)
    source = config_source(model) if dry_run and model else resolve_model(model)
    levels = parse_budgets(rank_budgets) if rank_budgets else ()
    result = Planner(source).pipeline_plan(replace(request, bits_budgets=list(bits_budget or [])), memories,
                                           shape_only=dry_run, rank_budgets=levels)
    if out:
        result.save(out, force)
    if json_out:
        return emit_json({"model": source.spec or "default", "priced_from": "config" if dry_run else "weights"}
                         | result.to_dict())
    print_pipeline_plan(result, dry_run)


@app.command()
def convert(
    model: ModelOption = None,
    bits_budget: BudgetOption = None,
    memory_budget: MemoryOption = None,
    method: MethodOption = "lsaq",
    recipe: RecipeOption = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan", metavar="FILE", help="Write this QuantPlan JSON (from plan --out) instead of planning.")] = None,
    scores: ScoresOption = None,
    calib: CalibOption = None,
    high_bits: HighBitsOption = 8,
    low_bits: LowBitsOption = 4,
    group_size: GroupSizeOption = None,
    bits: UniformBitsOption = None,
    override: OverrideOption = None,
    codecs: CodecsOption = "affine",
    context: ContextOption = 4096,
    quantizer: QuantizerOption = None,
    adaptive: Annotated[Optional[str], typer.Option("--adaptive", metavar="BUDGETS", help="Write an adaptive folder: stock mlx_lm opens it at the largest of these budgets (bits per weight: 3-6 for every half bit, or 3,4,5,6) and lsaq-mlx chat, tui, serve and eval move between all of them without the float source.")] = None,
    adaptive_size: Annotated[float, typer.Option("--adaptive-size", metavar="X", help="An adaptive folder's most bytes (every file in it), as a multiple of its largest plan's folder (what convert -b writes for that plan: weights, tokenizer, configs): room for the smaller settings the quantizer made better than rounding the stored weights, each stored as the steps its codes take from that rounding (1.0: none; every other setting is rounded from the stored weights when swapped to).")] = 1.3,
    adaptive_tracks: Annotated[bool, typer.Option("--adaptive-tracks/--no-adaptive-tracks", help="With a calibrated --quantizer, fit each smaller plan of an adaptive folder on the activations its own layers give (closest to converting each plan directly; one more copy of the calibration activations per plan, and the plans' input Hessians of a layer on disk, one sum of them in memory: about 1.1 GB at 8B), or all on the largest plan's.")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", help="Model folder to write (default: <model>-<method>-<bits>bpw).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="Print the plan (per-layer table, size, headroom); write nothing.")] = False,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Quantize a model under a budget and write a folder that stock mlx_lm loads (plus lsaq_plan.json, lsaq_report.json); with --codecs affine,swsc, one that lsaq-mlx loads.

    Examples: lsaq-mlx convert -m ./Llama-3-8B -b 3.5 -o llama3-3.5bpw · lsaq-mlx convert -b 4 --quantizer awq-gptq · lsaq-mlx convert --memory-budget 6GB --dry-run · lsaq-mlx convert --adaptive 3-6 --quantizer awq-gptq -o smol-adaptive"""
    from lsaq_mlx.cli.render.plan import print_plan
    from lsaq_mlx.convert import convert as write_model, default_output
    from lsaq_mlx.errors import UserError
    from lsaq_mlx.planning.budgets import headroom
    from lsaq_mlx.planning.plan import QuantPlan
    from lsaq_mlx.planning.planner import Planner, plan_from_file
    from lsaq_mlx.model_index import record_converted
    from lsaq_mlx.quantizers import AUTO, QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.settings import settings
    from lsaq_mlx.sources import resolve_model

    quantizer = quantizer or settings().quantizer
    if quantizer not in (AUTO, *QUANTIZERS):
        raise UserError(f"unknown quantizer '{quantizer}' (one of {AUTO}, {', '.join(QUANTIZERS)})",
                        setting="quantizer")
    # a bad plan file or setting fails before the model is read
    from_file = QuantPlan.load(plan_file) if plan_file else None
    budgets = adaptive_budgets(adaptive, bits_budget, memory_budget, plan_file, codecs, adaptive_size) if adaptive else None
    request = None if plan_file else _request(
        method=method, bits_budgets=budgets or ([bits_budget] if bits_budget else []), memory_budget=memory_budget,
        context=context, recipe=recipe, scores=scores, calib=calib, high_bits=high_bits, low_bits=low_bits,
        group_size=group_size, bits=bits, override=override, codecs=codecs)
    source = resolve_model(model)
    planner = Planner(source)
    codec_names = tuple(c.strip() for c in codecs.split(",") if c.strip())
    planning = time.perf_counter()
    side = None
    if budgets:
        from lsaq_mlx.adaptive.side import AdaptiveSide

        plans = planner.nested_plans(request)
        costs = planner.cost_table(planner.context(request.overrides, request.codecs), calib)
        side, chosen = AdaptiveSide(plans, costs, adaptive_size, own_tracks=adaptive_tracks), plans.plans[-1]
    else:
        chosen = plan_from_file(plan_file, source, codec_names, from_file) if plan_file else planner.plan(request)
    if dry_run:
        if json_out:
            return emit_json({"plan": chosen.to_dict(), **headroom(chosen.predicted_bytes)})
        return print_plan(chosen, headroom(chosen.predicted_bytes))
    target = out or default_output(source, chosen)
    if quantizer == AUTO:
        quantizer = _affordable_quantizer(chosen)
    report = write_model(source, chosen, target, force=force, float_model=planner.model_in_memory(),
                         plan_seconds=time.perf_counter() - planning,
                         quantizer=quantizer, calib=load_calibration(calib) if calib else None, adaptive=side,
                         costs=planner.priced(calib))
    record_converted(report)
    if json_out:
        return emit_json(report.to_dict())
    print_plan(chosen)
    err(f"wrote {target}: {report.bits_per_weight:.3f} bits per weight, {report.written_bytes / 1e6:.1f} MB, "
        f"planned in {report.plan_seconds:.1f} s, written in {report.wall_seconds:.1f} s, "
        f"peak memory {report.peak_memory_bytes / 1e9:.2f} GB")
    err(f"smoke test: {report.smoke_prompt!r} -> {report.smoke_text!r}")
    if report.adaptive:
        a = report.adaptive
        err(f"adaptive: {len(a['budgets'])} plans, {a['budgets'][0]:g} to {a['budgets'][-1]:g} bits per weight; "
            f"{a['settings_kept']} smaller settings stored ({a['side_bytes'] / 1e6:.1f} MB, "
            f"{a['side_bytes'] / report.written_bytes:.2f}x of the stored plan's bytes), {a['settings_derived']} "
            "rounded from the stored weights when swapped to")


def _affordable_quantizer(plan) -> str:
    """``--quantizer auto``: the calibrated quantizer where this machine does it in
    minutes, else rtn; the choice and the estimate in one line."""
    from lsaq_mlx.doctor import gemm_gflops
    from lsaq_mlx.gptq.hessians import TOKENS
    from lsaq_mlx.quantizers import choose_quantizer

    choice = choose_quantizer(plan.parameters, gemm_gflops(1024), TOKENS)
    err(choice.reason())
    return choice.name


def adaptive_budgets(text: str, bits_budget, memory_budget, plan_file, codecs: str, size: float) -> list[float]:
    """``--adaptive``'s budgets: ``3-6`` (every half bit) or ``3,4,5,6``; checked with the
    options it cannot go with."""
    from lsaq_mlx.errors import UserError
    from lsaq_mlx.planning.budgets import check_bits_budget

    if bits_budget or memory_budget or plan_file:
        raise UserError("--adaptive names the budgets itself: leave out -b, --memory-budget and --plan",
                        setting="adaptive")
    if codecs.replace(" ", "") != "affine":
        raise UserError("an adaptive folder holds affine settings only (--codecs affine)", setting="adaptive")
    if size < 1.0:
        raise UserError(f"--adaptive-size is a multiple of the largest plan's bytes, at least 1.0, not {size:g}",
                        setting="adaptive_size")
    try:
        if "-" in text:
            low, high = (float(x) for x in text.split("-"))
            budgets = [low + 0.5 * i for i in range(int((high - low) / 0.5 + 1e-9) + 1)]
        else:
            budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--adaptive takes budgets as 3-6 or 3,4,5,6, not {text!r}", setting="adaptive") from None
    for b in budgets:
        check_bits_budget(b)
    if len(set(budgets)) < 2:
        raise UserError(f"--adaptive needs at least two budgets, not {text!r}", setting="adaptive")
    return sorted(set(budgets))
