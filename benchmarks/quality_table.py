"""Quality of every planning method at every budget, on the same WikiText-2 tokens.

    python benchmarks/quality_table.py [--model default] [--tokens 2048] [--budgets 2.5 3 3.5 4 4.5 5]
                                    [--quantizers rtn gptq] [--out results.json]

For each budget: ``lsaq`` (knapsack on the cost model), the two-tier scheme ordered by
jaccard (``lsaq-tiers``), cosine, zscore and random scores, ``uniform`` (the largest
uniform setting that fits, if any), and mlx-lm's ``dynamic_quant`` (its own gradient
sensitivities, its own threshold rule, at the same budget). Plus mlx-lm's four mixed
recipes. Every model is quantized in memory exactly as ``convert`` writes it and
compared with the source model (KL divergence of the next-token distributions, top-1
agreement, perplexity) on the first --tokens tokens of wiki.test.raw in windows of
--seq-len. Tiers and dynamic_quant use low = the largest bit width whose uniform
group-64 model fits the budget; tiers high = low + 2 (at most 8), dynamic_quant
high = the next bit width (its default pairing is 4/5).

With ``--quantizers rtn gptq`` every plan is also written with GPTQ (the same bits,
the codes compensated on the packaged calibration text, which is not WikiText; rows
``<method>+gptq``), and ``lsaq+gptq priced`` rows add the plans ``convert --quantizer
gptq`` writes: lsaq with every choice priced by its error after GPTQ.

It also checks the cost model: the Spearman correlation between each plan's predicted
cost and its measured KL over the plans the lsaq allocator did not make (held out).
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from common import dq_sensitivities, dynamic_quant_plan, low_bits_for, start as start_benchmark, wikitext_tokens
from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.convert import quantized_model
from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
from lsaq_mlx.planning.choices import BITS
from lsaq_mlx.planning.methods import RECIPES
from lsaq_mlx.planning.planner import Planner, PlanRequest
from lsaq_mlx.quantizers import QUANTIZERS
from lsaq_mlx.scoring.scores import spearman
from lsaq_mlx.sources import resolve_model

TIERS = ("lsaq-tiers", "tiers-cosine", "tiers-zscore", "tiers-random")


def plan_cost(plan, ctx, errors) -> float:
    """The lsaq cost model's prediction for ``plan``: its summed error (layer weights are 1)."""
    return sum(errors[q.path][plan.modules[q.path].key] for q in ctx.modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 4.5, 5.0])
    parser.add_argument("--dq-tokens", type=int, default=2048, help="calibration tokens of dynamic_quant's sensitivities")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (and recipes), e.g. lsaq uniform")
    parser.add_argument("--quantizers", nargs="+", default=["rtn"], choices=list(QUANTIZERS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start_benchmark()
    start = time.perf_counter()

    source = resolve_model(args.model)
    planner = Planner(source)
    model, tokenizer = planner.loaded()
    tokens = wikitext_tokens(tokenizer, args.tokens)
    reference = ReferenceDistributions.compute(model, tokens, args.seq_len)
    source_result = compare_to_reference(model, reference)
    ctx = planner.context()
    errors = planner.cost_table(ctx)

    plans = []
    sensitivities = {}
    for budget in args.budgets:
        plans.append(planner.plan(PlanRequest(method="lsaq", bits_budgets=[budget])))
        low = low_bits_for(ctx, budget)
        if low is None:
            continue
        high = min(8, low + 2)
        for method in TIERS:
            plans.append(planner.plan(PlanRequest(method=method, bits_budgets=[budget], high_bits=high, low_bits=low,
                                                  group_size=64)))
        plans.append(planner.plan(PlanRequest(method="uniform", bits_budgets=[budget])))
        dq_high = BITS[BITS.index(low) + 1] if low < 8 else None
        if dq_high and (not args.methods or "dynamic_quant" in args.methods):
            if (low, dq_high) not in sensitivities:
                sensitivities[low, dq_high] = dq_sensitivities(source, tokenizer, low, dq_high, args.dq_tokens)
            plans.append(dynamic_quant_plan(ctx, budget, sensitivities[low, dq_high], low, dq_high))
    for recipe in RECIPES:
        plans.append(planner.plan(PlanRequest(recipe=recipe)))
    if args.methods:
        plans = [p for p in plans if p.method in args.methods]

    rows = []
    runs = [(p, q, p.method if q == "rtn" else f"{p.method}+{q}") for p in plans for q in args.quantizers]
    for budget in args.budgets if "gptq" in args.quantizers and (not args.methods or "lsaq" in args.methods) else []:
        runs.append((planner.plan(PlanRequest(method="lsaq", bits_budgets=[budget], quantizer="gptq")), "gptq",
                     "lsaq+gptq priced"))
    for plan, quantizer, method in runs:
        with tempfile.TemporaryDirectory() as scratch:
            quantized, _ = quantized_model(source, plan, model, quantizer, scratch=Path(scratch))
            prepare_for_compute(quantized)
            result = compare_to_reference(quantized, reference)
            del quantized
        budget = plan.budget.get("bits_per_weight")
        rows.append({"budget": budget, "method": method, "quantizer": quantizer,
                     "bits_per_weight": plan.predicted_bits_per_weight,
                     "kl": result.kl, "kl_stderr": result.kl_stderr, "top1": result.top1_agreement,
                     "perplexity": result.perplexity.perplexity, "predicted_cost": plan_cost(plan, ctx, errors),
                     "details": {k: v for k, v in plan.details.items() if k != "module_bytes_by_layer"}})
        print(f"  {method:14s} budget {budget} -> {plan.predicted_bits_per_weight:.3f} bpw, "
              f"KL {result.kl:.4f}, ppl {result.perplexity.perplexity:.2f}", flush=True)

    print(f"\nmachine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}; model {args.model}; WikiText-2 test, first {len(tokens)} tokens, windows of "
          f"{args.seq_len}; source perplexity {source_result.perplexity.perplexity:.3f}; "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print("| budget | method | bits/weight | KL (nats/token) | top-1 agree | perplexity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        best = r["budget"] is not None and r["kl"] == min(x["kl"] for x in rows if x["budget"] == r["budget"])
        kl = f"**{r['kl']:.4f}**" if best else f"{r['kl']:.4f}"
        print(f"| {r['budget'] if r['budget'] is not None else '-'} | {r['method']} | {r['bits_per_weight']:.3f} | "
              f"{kl} ± {r['kl_stderr']:.4f} | {r['top1']:.3f} | {r['perplexity']:.2f} |")
    priced = [r for r in rows if r["quantizer"] == "rtn"]  # the cost model prices round to nearest
    held_out = [r for r in priced if r["method"] != "lsaq"]
    rho = spearman([r["predicted_cost"] for r in held_out], [r["kl"] for r in held_out])
    rho_all = spearman([r["predicted_cost"] for r in priced], [r["kl"] for r in priced])
    print(f"\ncost model: Spearman(predicted cost, measured KL) = {rho:.3f} over {len(held_out)} held-out plans "
          f"(not made by lsaq), {rho_all:.3f} over all {len(priced)} written round to nearest")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"source_perplexity": source_result.perplexity.perplexity, "rows": rows,
                       "cost_model_spearman_held_out": rho}, f, indent=2)


if __name__ == "__main__":
    main()
