"""``eval`` and ``sweep``: one model's quality, or a grid of them."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import JsonOption, MethodOption, ModelOption
from lsaq_mlx.cli.output import emit_json, err
from lsaq_mlx.errors import UserError


@app.command("eval")
def eval_command(
    model: ModelOption = None,
    ppl: Annotated[str, typer.Option(metavar="TEXT", help="Perplexity text: auto (WikiText-2 test from a data folder or the Hugging Face hub, else packaged), wikitext2, packaged (public-domain text shipped with lsaq-mlx), a text file or a folder with wiki.test.raw, or none.")] = "auto",
    tasks: Annotated[str, typer.Option(metavar="TASKS", help="Zero-shot tasks, comma-separated: piqa, arc_easy, arc_challenge, openbookqa, boolq, winogrande, hellaswag, lambada, or all.")] = "",
    reference: Annotated[Optional[str], typer.Option(metavar="MODEL", help="Also report KL divergence and top-1 agreement against this model (e.g. default).")] = None,
    max_tokens: Annotated[int, typer.Option(metavar="N", help="Perplexity/KL: the first N tokens of the text.")] = 4096,
    seq_len: Annotated[int, typer.Option(metavar="N", help="Perplexity/KL: tokens per non-overlapping window.")] = 512,
    limit: Annotated[Optional[int], typer.Option(metavar="N", help="Tasks: at most N items each.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder with the task files, laid out like ../shared/data/tasks (default: $LSAQ_MLX_DATA/tasks, ../shared/data/tasks, else downloaded from the Hugging Face hub with `datasets`).")] = None,
    bits_budget: Annotated[Optional[float], typer.Option("--bits-budget", "-b", metavar="BITS", help="Evaluate the plan of this many bits per weight that chat and serve would run from this model (KL against the model itself unless --reference).")] = None,
    method: MethodOption = "lsaq",
    plan_file: Annotated[Optional[Path], typer.Option("--plan", metavar="FILE", help="Evaluate the model quantized as this plan says (KL against the model itself unless --reference): a QuantPlan, or a PipelinePlan, which under mlx.launch runs pipelined (perplexity and tasks; no KL).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Evaluate a model: perplexity (non-overlapping windows), KL to a reference, zero-shot accuracy.

    Examples: lsaq-mlx eval -m out-4bpw --reference default · lsaq-mlx eval -m out-4bpw --tasks piqa,arc_easy --limit 200 --json · lsaq-mlx eval -m ./Llama-3-8B -b 4 (what chat -b 4 runs) · mlx.launch -n 2 -- lsaq-mlx eval -m ./my-model --plan pipe.json"""
    from lsaq_mlx.cli.render.evaluation import print_eval
    from lsaq_mlx.evaluation.run import EvalRequest, evaluate
    from lsaq_mlx.sources import resolve_model

    request = EvalRequest.from_text(ppl=ppl, tasks=tasks, max_tokens=max_tokens, seq_len=seq_len, limit=limit,
                                    task_dir=data_dir)
    request.check()
    source = resolve_model(model)
    if plan_file is not None:
        return _planned_eval(source, plan_file, request, reference, bits_budget, json_out)
    against = resolve_model(reference) if reference else source if bits_budget is not None else None
    served = _served_plan(source, bits_budget, method) if bits_budget is not None else None
    result = evaluate(source, request, against, model=served)
    if json_out:
        return emit_json(result.to_dict())
    print_eval(result)


def _planned_eval(source, plan_file: Path, request, reference, bits_budget, json_out: bool) -> None:
    """``eval --plan``: in one process, or one rank's stage of a pipeline (rank 0 reports)."""
    from lsaq_mlx.backend.ranks import Ranks
    from lsaq_mlx.cli.render.evaluation import print_eval
    from lsaq_mlx.evaluation.run import evaluate
    from lsaq_mlx.runtime.pipeline import load_planned, read_plan_file
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.load import load_tokenizer

    if bits_budget is not None:
        raise UserError("give -b or --plan, not both", setting="plan")
    ranks = Ranks()
    if ranks.size > 1 and reference:
        raise UserError("under mlx.launch, eval --plan measures perplexity and tasks; measure KL in one process",
                        setting="reference")
    plan = read_plan_file(plan_file, source)
    net, _ = load_planned(source, plan, ranks)
    if ranks.size > 1:
        net.all_positions = True
    against = resolve_model(reference) if reference else source if ranks.size == 1 else None
    result = evaluate(source, request, against, model=(net, load_tokenizer(source)))
    if ranks.rank != 0:
        return None
    if json_out:
        return emit_json(result.to_dict() | {"ranks": ranks.size})
    print_eval(result)


def _served_plan(source, bits_budget: float, method: str):
    """``(model, tokenizer)``: the plan of ``bits_budget`` as the runtime builds and runs it."""
    from lsaq_mlx.adaptive.folder import AdaptivePlans, planner_for
    from lsaq_mlx.backend.compute import prepare_for_compute
    from lsaq_mlx.convert import quantized_model
    from lsaq_mlx.planning.planner import PlanRequest
    from lsaq_mlx.sources.load import load_tokenizer

    planner = planner_for(source)
    plan = planner.plans(PlanRequest(method=method, bits_budgets=[bits_budget]))[0]
    if isinstance(planner, AdaptivePlans):
        net, tokenizer = planner.folder.model_at(source, plan)
    else:
        net, tokenizer = quantized_model(source, plan, planner.model_in_memory())[0], load_tokenizer(source)
        planner.release()
    prepare_for_compute(net)
    err(f"evaluating the {plan.method} plan of {plan.predicted_bits_per_weight:.3f} bits per weight")
    return net, tokenizer


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="A TOML file: \\[eval] settings and \\[\\[grid]] tables of models, methods, budgets (see the README).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", help="Results folder (default: the spec's `out`, else <spec>-results beside it).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="List the cells and which are already done; evaluate nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Write results into a folder lsaq-mlx did not make, or where the spec's `out` leads outside its folder.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Evaluate a grid of models x methods x budgets; resumes where it stopped. Under `mlx.launch -n N` the cells are shared among the processes.

    Examples: lsaq-mlx sweep grid.toml --dry-run · mlx.launch -n 2 lsaq-mlx sweep grid.toml"""
    from lsaq_mlx.sweep.report import markdown_table
    from lsaq_mlx.sweep.run import Sweep
    from lsaq_mlx.sweep.spec import SweepSpec

    runner = Sweep(SweepSpec.load(spec, out, force), force=force)
    if dry_run:
        runner.check_inputs()
        cells = runner.status()
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
        print(markdown_table(summary.rows), end="")
        err(f"{summary.cells} cells ({summary.evaluated} evaluated, {summary.reused} from earlier runs) on "
            f"{summary.ranks} rank(s) in {summary.wall_seconds:.0f} s; results in {summary.out}")
    if summary.failed:
        raise UserError(f"{summary.failed} of {summary.cells} cells failed (see {summary.out / 'results.md'})")
