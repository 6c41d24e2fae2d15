"""Quality of every planning method at every budget, on the same WikiText-2 tokens.

    python benchmarks/quality_table.py [--model default] [--tokens 2048] [--budgets 2.5 3 3.5 4 4.5 5]
                                    [--quantizers rtn gptq awq awq-gptq] [--peers convert-3-64 gptq-4 awq-3 ...]
                                    [--peer-quantizer awq]
                                    [--out results.json]

For each budget: ``lsaq`` (knapsack on the cost model), the two-tier scheme ordered by
jaccard (``lsaq-tiers``), cosine, zscore and random scores, ``uniform`` (the largest
uniform setting that fits, if any), and mlx-lm's ``dynamic_quant`` (its own gradient
sensitivities, its own threshold rule, at the same budget). Plus mlx-lm's four mixed
recipes. Every model is quantized in memory exactly as ``convert`` writes it and
compared with the source model (KL divergence of the next-token distributions, top-1
agreement, perplexity) on the first --tokens tokens of wiki.test.raw in windows of
--seq-len. Tiers and dynamic_quant use low = the largest bit width whose uniform
group-64 model fits the budget; tiers high = the first bit width from low + 2 (at most 8), dynamic_quant
high = the next bit width (its default pairing is 4/5).

With ``--quantizers rtn gptq awq awq-gptq`` every lsaq plan is also written with each
calibrated quantizer (the same bits; calibration on the packaged text, which is not
WikiText; rows ``<method>+<quantizer>``, what ``convert --quantizer ...`` writes). With ``--priced P ...``,
``lsaq+<Q> priced^P`` rows are lsaq plans whose every choice is priced by its cost
times (its error after GPTQ / its error after round to nearest)^P (``gptq.pricing``),
written with ``--priced-quantizer`` Q (gptq by default): pricing by the compensated error, or by a damped estimate of it.

With ``--peers``, mlx-lm's own quantizers (``peer_quantizers.py``: ``mlx_lm.convert``,
``mlx_lm.gptq``, ``mlx_lm.awq``, ``mlx_lm.dwq``), and mlx-optiq (``optiq_peer.py``, ``optiq-<target>[-wide]``,
run by ``--optiq-python``: the Python of a virtual environment holding mlx-optiq) run on
the same source folder and calibration text, each in its own process (wall time, peak memory), are evaluated the same way, and
``lsaq+<--peer-quantizer>`` is also planned at each one's bits per weight; a last table
puts each peer beside ours, and ``lsaq-mlx convert -b 4.0 --quantizer <it>`` is timed
from an empty cache (``--peers-only``: the peers alone). Perplexity is also measured on a second text, LAMBADA's
test passages.

It also checks the cost model: the Spearman correlation between each plan's predicted
cost and its measured KL over the plans the lsaq allocator did not make (held out).
"""

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from common import (dq_sensitivities, dynamic_quant_plan, lambada_tokens, low_bits_for, measured,
                    start as start_benchmark, wikitext_tokens)
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
    return sum(errors.cost(q.path, plan.modules[q.path]) for q in ctx.modules)


PEER_SCRIPT = Path(__file__).with_name("peer_quantizers.py")
OPTIQ_SCRIPT = Path(__file__).with_name("optiq_peer.py")


def peer_command(peer: str, source, out: Path, work: Path, args) -> list[str]:
    """How ``peer`` runs: mlx-lm's quantizers in this Python, mlx-optiq in its own."""
    if peer.startswith("optiq-"):
        if not args.optiq_python:
            sys.exit(f"{peer} needs --optiq-python (the Python of a virtual environment with mlx-optiq)")
        kept = ["--work", str(Path(args.optiq_work) / peer)] if args.optiq_work else []
        return [args.optiq_python, str(OPTIQ_SCRIPT), peer, str(source.path), str(out), "--tokens",
                str(args.peer_tokens), "--calibration", str(optiq_calibration(work)), *kept]
    tokens = {"awq": args.awq_tokens, "dwq": args.dwq_tokens}.get(peer.split("-")[0]) or args.peer_tokens
    return [sys.executable, str(PEER_SCRIPT), peer, str(source.path), str(out), "--tokens", str(tokens),
            "--n-grid", str(args.awq_grid)]


def optiq_calibration(work: Path) -> Path:
    """The packaged calibration text as mlx-optiq's JSONL mix, a paragraph per line."""
    from lsaq_mlx.scoring.calibration import load_calibration

    path = work / "optiq-calibration.jsonl"
    paragraphs = [p.strip() for p in load_calibration(None).text.split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"domain": "prose", "text": p}) + "\n" for p in paragraphs))
    return path


def peer_row(peer: str, source, work: Path, reference, second, args) -> dict:
    """``peer`` run in its own process on the source folder (time and peak memory from
    outside), its folder loaded as ``lsaq-mlx eval`` loads a model, and evaluated."""
    from mlx_lm.utils import compute_bits_per_weight

    from lsaq_mlx.sources import load_model

    out = work / peer
    wall, rss = measured(peer_command(peer, source, out, work, args))
    quantized = load_model(resolve_model(str(out)), compute=False)[0]
    bpw = compute_bits_per_weight(quantized)
    prepare_for_compute(quantized)
    result, result_second = compare_to_reference(quantized, reference), compare_to_reference(quantized, second)
    name = peer if peer.startswith("optiq-") else f"mlx_lm {peer}"
    print(f"  {name}: {bpw:.3f} bpw, KL {result.kl:.4f}, {wall:.0f} s, {rss / 1e9:.2f} GB", flush=True)
    return {"budget": None, "method": name, "quantizer": "peer", "bits_per_weight": bpw, "kl": result.kl,
            "kl_stderr": result.kl_stderr, "top1": result.top1_agreement, "perplexity": result.perplexity.perplexity,
            "perplexity_second": result_second.perplexity.perplexity, "kl_second": result_second.kl,
            "predicted_cost": None, "seconds": wall, "peak_rss": rss}


def priced_plan(planner, ctx, errors, budget: float, power: float):
    """The lsaq plan at ``budget`` with each choice priced by its GPTQ ratio to ``power``."""
    from lsaq_mlx.gptq.pricing import ratio_table
    from lsaq_mlx.planning.budgets import Budget
    from lsaq_mlx.planning.cost import layer_weights
    from lsaq_mlx.planning.methods import plan_lsaq
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = planner.source
    ratios = ratio_table(source.fingerprint, load_calibration(None), ctx, StreamedModel(source), load_tokenizer(source))
    return plan_lsaq(ctx, Budget(bits_per_weight=budget), errors.scaled(ratios, power), layer_weights(None, ctx.modules))


def print_against_peers(rows: list[dict], ours: tuple[float, int] | None, quantizer: str) -> None:
    """Each peer against ``lsaq+<quantizer>`` at its bits per weight; the target is
    ours <= 0.8x the best peer at equal or higher bits per weight."""
    peers = [r for r in rows if r["quantizer"] == "peer"]
    priced = [r for r in rows if r["method"] == f"lsaq+{quantizer}"]
    print(f"\n| peer | bpw | peer KL | best peer at >= its bpw | ours (lsaq+{quantizer}) at <= its bpw | ours / best | "
          "peer time, memory |")
    print("|---|---|---|---|---|---|---|")
    for p in sorted(peers, key=lambda r: r["bits_per_weight"]):
        best = min((q for q in peers if q["bits_per_weight"] >= p["bits_per_weight"]), key=lambda q: q["kl"])
        mine = [r for r in priced if r["bits_per_weight"] <= p["bits_per_weight"] + 1e-9]
        mine = max(mine, key=lambda r: r["bits_per_weight"]) if mine else None
        ratio = f"{mine['kl'] / best['kl']:.2f}" if mine else "-"
        ours_kl = f"{mine['kl']:.4f} ({mine['bits_per_weight']:.3f})" if mine else "-"
        print(f"| {p['method']} | {p['bits_per_weight']:.3f} | {p['kl']:.4f} | {best['method']} {best['kl']:.4f} | "
              f"{ours_kl} | {ratio} | {p['seconds']:.0f} s, {p['peak_rss'] / 1e9:.2f} GB |")
    if ours:
        print(f"\nours: lsaq-mlx convert -b 4.0 --quantizer {quantizer} from an empty cache (cost table, plan, {quantizer}): "
              f"{ours[0]:.0f} s, {ours[1] / 1e9:.2f} GB")


def save_rows(out: str | None, rows: list[dict], source_result, source_second, **extra) -> None:
    """The rows so far as JSON at ``out`` (rewritten after every row: a long run that stops
    keeps what it measured)."""
    if out:
        Path(out).write_text(json.dumps({"source_perplexity": source_result.perplexity.perplexity,
                                         "source_perplexity_second": source_second.perplexity.perplexity,
                                         "rows": rows} | extra, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--budgets", type=float, nargs="*", default=[2.5, 3.0, 3.5, 4.0, 4.5, 5.0],
                        help="none: only the recipes, and with --peers ours at each peer's bits per weight")
    parser.add_argument("--dq-tokens", type=int, default=2048, help="calibration tokens of dynamic_quant's sensitivities")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (and recipes), e.g. lsaq uniform")
    parser.add_argument("--quantizers", nargs="+", default=["rtn"], choices=list(QUANTIZERS))
    parser.add_argument("--peers", nargs="*", default=[],
                        help="mlx-lm quantizers run as peer_quantizers.py runs them, e.g. convert-3-64 gptq-4 awq-3 dwq-4, "
                             "and mlx-optiq as optiq_peer.py runs it (optiq-4.0, optiq-4.0-wide; needs --optiq-python); "
                             "each also gets a lsaq plan at its bits per weight (--peer-quantizer), and a table against them")
    parser.add_argument("--priced", type=float, nargs="*", default=[],
                        help="also lsaq plans priced by cost x (GPTQ error / RTN error)^P, for each P")
    parser.add_argument("--priced-quantizer", default="gptq", choices=list(QUANTIZERS),
                        help="the quantizer that writes the --priced plans")
    parser.add_argument("--peer-quantizer", default="awq", choices=list(QUANTIZERS),
                        help="how ours is written at each peer's bits per weight")
    parser.add_argument("--peer-tokens", type=int, default=8192, help="calibration tokens of the peers (x 512)")
    parser.add_argument("--awq-tokens", type=int, default=None, help="calibration tokens of mlx_lm.awq (default --peer-tokens)")
    parser.add_argument("--dwq-tokens", type=int, default=None,
                        help="calibration tokens of mlx_lm.dwq (x 513: the peers' 512 plus the one dwq drops; "
                             "default --peer-tokens)")
    parser.add_argument("--awq-grid", type=int, default=20)
    parser.add_argument("--optiq-python", default=os.environ.get("OPTIQ_PYTHON"),
                        help="the Python of a virtual environment with mlx-optiq (default $OPTIQ_PYTHON)")
    parser.add_argument("--optiq-work", default=None,
                        help="keep each mlx-optiq peer's working folder under this one (one per model): a rerun resumes its "
                             "sensitivity pass from the modules already measured")
    parser.add_argument("--peers-only", action="store_true",
                        help="with --peers, measure the peers alone: no lsaq plan at their bits per weight, no convert timed")
    parser.add_argument("--no-convert-timing", action="store_true",
                        help="with --peers, do not time lsaq-mlx convert -b 4.0 from an empty cache")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start_benchmark()
    start = time.perf_counter()

    source = resolve_model(args.model)
    planner = Planner(source)
    model, tokenizer = planner.loaded()
    tokens = wikitext_tokens(tokenizer, args.tokens)
    reference = ReferenceDistributions.compute(model, tokens, args.seq_len)
    second = ReferenceDistributions.compute(model, lambada_tokens(tokenizer, args.tokens), args.seq_len)
    source_result, source_second = compare_to_reference(model, reference), compare_to_reference(model, second)
    ctx = planner.context()
    errors = planner.cost_table(ctx)

    plans = []
    sensitivities = {}
    for budget in args.budgets:
        plans.append(planner.plan(PlanRequest(method="lsaq", bits_budgets=[budget])))
        low = low_bits_for(ctx, budget)
        if low is None:
            continue
        high = next((b for b in BITS if b >= low + 2), 8)  # MLX has no 7 bits
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
    work = tempfile.TemporaryDirectory(prefix="quality-table-")
    runs = [(p, q, p.method if q == "rtn" else f"{p.method}+{q}") for p in plans for q in args.quantizers
            if q == "rtn" or p.method == "lsaq"]
    for peer in args.peers:
        row = peer_row(peer, source, Path(work.name), reference, second, args)
        rows.append(row)
        save_rows(args.out, rows, source_result, source_second)
        if args.peers_only:
            continue
        at = math.floor(row["bits_per_weight"] * 1000) / 1000
        runs.append((planner.plan(PlanRequest(method="lsaq", bits_budgets=[at])), args.peer_quantizer,
                     f"lsaq+{args.peer_quantizer}"))
    for budget, power in [(b, p) for b in args.budgets for p in args.priced]:
        runs.append((priced_plan(planner, ctx, errors, budget, power), args.priced_quantizer,
                     f"lsaq+{args.priced_quantizer} priced^{power:g}"))
    measured_plans = {}  # a peer's bits per weight often gives the plan of a round budget: written once
    for plan, quantizer, method in runs:
        key = (quantizer, json.dumps({p: c.config() for p, c in plan.modules.items()}, sort_keys=True))
        if key not in measured_plans:
            with tempfile.TemporaryDirectory() as scratch:
                quantized, _ = quantized_model(source, plan, model, quantizer, scratch=Path(scratch))
                prepare_for_compute(quantized)
                measured_plans[key] = compare_to_reference(quantized, reference), compare_to_reference(quantized, second)
                del quantized
        result, result_second = measured_plans[key]
        budget = plan.budget.get("bits_per_weight")
        rows.append({"budget": budget, "method": method, "quantizer": quantizer,
                     "bits_per_weight": plan.predicted_bits_per_weight,
                     "kl": result.kl, "kl_stderr": result.kl_stderr, "top1": result.top1_agreement,
                     "perplexity": result.perplexity.perplexity, "perplexity_second": result_second.perplexity.perplexity,
                     "kl_second": result_second.kl, "predicted_cost": plan_cost(plan, ctx, errors),
                     "details": {k: v for k, v in plan.details.items() if k != "module_bytes_by_layer"}})
        print(f"  {method:14s} budget {budget} -> {plan.predicted_bits_per_weight:.3f} bpw, "
              f"KL {result.kl:.4f}, ppl {result.perplexity.perplexity:.2f}", flush=True)
        save_rows(args.out, rows, source_result, source_second)
    ours = None
    if args.peers and not (args.no_convert_timing or args.peers_only):
        ours = measured([sys.executable, "-m", "lsaq_mlx", "convert", "-m", str(source.path), "-b", "4.0",
                         "--quantizer", args.peer_quantizer, "-o", str(Path(work.name) / "ours-4.0")],
                        env=os.environ | {"LSAQ_MLX_CACHE": str(Path(work.name) / "empty-cache")})
    work.cleanup()

    print(f"\nmachine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}; model {args.model}; WikiText-2 test, first {len(tokens)} tokens, windows of "
          f"{args.seq_len}; source perplexity {source_result.perplexity.perplexity:.3f}; "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print(f"second text: LAMBADA test passages, first {args.tokens} tokens; source perplexity "
          f"{source_second.perplexity.perplexity:.3f}\n")
    print("| budget | method | bits/weight | KL (nats/token) | top-1 agree | perplexity | perplexity, LAMBADA |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        best = r["budget"] is not None and r["kl"] == min(x["kl"] for x in rows if x["budget"] == r["budget"])
        kl = f"**{r['kl']:.4f}**" if best else f"{r['kl']:.4f}"
        print(f"| {r['budget'] if r['budget'] is not None else '-'} | {r['method']} | {r['bits_per_weight']:.3f} | "
              f"{kl} ± {r['kl_stderr']:.4f} | {r['top1']:.3f} | {r['perplexity']:.2f} | {r['perplexity_second']:.2f} |")
    if args.peers:
        print_against_peers(rows, ours, args.peer_quantizer)
    priced = [r for r in rows if r["quantizer"] == "rtn"]  # the cost model prices round to nearest
    held_out = [r for r in priced if r["method"] != "lsaq"]
    rho = spearman([r["predicted_cost"] for r in held_out], [r["kl"] for r in held_out]) if len(held_out) > 2 else None
    if rho is not None:
        rho_all = spearman([r["predicted_cost"] for r in priced], [r["kl"] for r in priced])
        print(f"\ncost model: Spearman(predicted cost, measured KL) = {rho:.3f} over {len(held_out)} held-out plans "
              f"(not made by lsaq), {rho_all:.3f} over all {len(priced)} written round to nearest")
    save_rows(args.out, rows, source_result, source_second, cost_model_spearman_held_out=rho,
              ours_convert={"seconds": ours[0], "peak_rss": ours[1]} if ours else None)


if __name__ == "__main__":
    main()
