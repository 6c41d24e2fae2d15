"""SWSC against MLX affine quantization at equal bits per weight, on the default model.

    python benchmarks/swsc_table.py [--model default] [--tokens 2048] [--layers 0 6 12 18 24 29]
                                 [--budgets 3.0 3.5 4.0] [--no-big] [--out results.json]

1. Reconstruction: for each module kind (q, k, v, o, gate, up, down) and each affine
   size (2/64 = 2.5 bits per weight, 2/32 = 3.0, 3/64 = 3.5, 3/32 = 4.0, 4/64 = 4.5), the
   relative squared error sum ||W - W^||^2 / sum ||W||^2 over the sampled layers, of the
   affine round trip and of the best SWSC setting that fits the same bits per weight
   (centroid bits 2, 3, 4 x share of the bytes for the SVD factors 0 or 5 %, output
   channels shared; plus the best one with input channels shared).
2. Whole model: every decoder-layer linear module SWSC (the best setting of its kind
   from 1) against every one affine at the same size; the tied embedding at 6 bits /
   group 64 in both. KL(source || model), top-1 agreement and perplexity on the first
   --tokens tokens of WikiText-2 test (windows of 512), against the source (the
   dequantized GGUF). The wall time and peak memory of compressing all layers.
3. The lsaq planner with --codecs affine against affine,swsc at --budgets, same tokens;
   how long the SWSC candidates' cost table took (k-means and SVD of every candidate);
   and from that table, per module kind over all layers, the Fisher-weighted error
   (the planner's loss estimate) of SWSC against affine at 3.0 and 4.0 bits per weight.
4. Scale: one random 8192 x 8192 matrix compressed (k = 512, rank 32), time and memory.
"""

import argparse
import json
import os
import platform
import resource
import time
from collections import Counter, defaultdict

import mlx.core as mx

from common import start as start_benchmark, wikitext_tokens
from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.convert import quantized_model
from lsaq_mlx.planning.affine_error import roundtrip
from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
from lsaq_mlx.planning.budgets import Budget
from lsaq_mlx.planning.choices import SWSC, Affine
from lsaq_mlx.planning.planner import Planner, PlanRequest
from lsaq_mlx.sources import resolve_model
from lsaq_mlx.swsc.candidates import fitting_settings
from lsaq_mlx.swsc.codec import SWSCSettings, compress

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AFFINE_POINTS = ((2, 64), (2, 32), (3, 64), (3, 32), (4, 64))  # bits, group: 2.5 3.0 3.5 4.0 4.5 bits per weight
SWSC_GRID = [(c, share) for c in (2, 3, 4) for share in (0.0, 0.05)]
EMBEDDING = Affine(6, 64)


def affine_bpw(bits: int, group: int) -> float:
    return bits + 32 / group


def relative_error(pairs) -> float:
    num = sum(mx.square(w - r).sum().item() for w, r in pairs)
    return num / sum(mx.square(w).sum().item() for w, _ in pairs)


def reconstruction(weights: dict, layers: list[int]) -> list[dict]:
    rows = []
    for kind in KINDS:
        mats = [weights[i][kind] for i in layers]
        for bits, group in AFFINE_POINTS:
            bpw = affine_bpw(bits, group)
            affine = relative_error([(w, roundtrip(w, Affine(bits, group))) for w in mats])
            tried = {}
            for axis, grid in (("output", SWSC_GRID), ("input", [(c, 0.0) for c in (2, 3, 4)])):
                for c, share in grid:
                    settings = [fitting_settings(*w.shape, c, bpw, share, axis) for w in mats]
                    if any(s is None for s in settings):
                        continue
                    err = relative_error([(w, compress(w, s).dense()) for w, s in zip(mats, settings)])
                    tried[(axis, c, share)] = (err, settings)
            best = min((k for k in tried if k[0] == "output"), key=lambda k: tried[k][0])
            best_input = min((k for k in tried if k[0] == "input"), key=lambda k: tried[k][0], default=None)
            input_err = tried[best_input][0] if best_input else None
            err, settings = tried[best]
            channels = settings[0].channels(*mats[0].shape)
            rows.append({"kind": kind, "bits_per_weight": bpw, "affine": f"{bits}/{group}", "affine_error": affine,
                         "swsc_error": err, "swsc_centroid_bits": best[1], "swsc_rank_share": best[2],
                         "swsc_k": settings[0].k, "swsc_k_share": settings[0].k / channels, "swsc_rank": settings[0].rank,
                         "swsc_input_axis_error": input_err})
            print(f"  {kind:9s} {bpw:.1f} bpw: affine {affine:.4f}, SWSC {err:.4f} (c{best[1]} k={settings[0].k} "
                  f"r={settings[0].rank}), input axis {_number(input_err)}", flush=True)
    return rows


def _number(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def measure(source, plan, reference, float_model) -> dict:
    mx.reset_peak_memory()
    start = time.perf_counter()
    model, _ = quantized_model(source, plan, float_model)
    compress_s = time.perf_counter() - start
    peak = mx.get_peak_memory()
    prepare_for_compute(model)
    result = compare_to_reference(model, reference)
    del model
    return {"bits_per_weight": plan.predicted_bits_per_weight, "kl": result.kl, "kl_stderr": result.kl_stderr,
            "top1": result.top1_agreement, "perplexity": result.perplexity.perplexity,
            "build_seconds": compress_s, "build_peak_bytes": peak,
            "swsc_modules": len(plan.swsc_modules())}


def whole_model(source, ctx, reference, recon: list[dict], bpws: list[float], float_model) -> list[dict]:
    rows = []
    for bits, group in AFFINE_POINTS:
        bpw = affine_bpw(bits, group)
        if bpw not in bpws:
            continue
        best = {r["kind"]: r for r in recon if r["bits_per_weight"] == bpw}
        affine, swsc = {}, {}
        for q in ctx.modules:
            if q.layer is None:
                affine[q.path] = swsc[q.path] = EMBEDDING
                continue
            r = best[q.path.rsplit(".", 1)[-1]]
            affine[q.path] = Affine(bits, group)
            swsc[q.path] = SWSC(fitting_settings(q.rows, q.cols, r["swsc_centroid_bits"], bpw, r["swsc_rank_share"]))
        for name, choices in (("affine", affine), ("swsc", swsc)):
            plan = ctx.plan(f"all-{name}", Budget(bpw), choices)
            row = {"point": f"{bits}/{group}", "linear_bits_per_weight": bpw, "codec": name,
                   **measure(source, plan, reference, float_model)}
            rows.append(row)
            print(f"  all-{name} at {bpw} bpw (linear): model {row['bits_per_weight']:.3f} bpw, KL {row['kl']:.4f}, "
                  f"ppl {row['perplexity']:.2f}, built in {row['build_seconds']:.1f} s, peak {row['build_peak_bytes'] / 1e9:.2f} GB",
                  flush=True)
    return rows


def planner_rows(planner, reference, budgets: list[float]) -> tuple[list[dict], float]:
    rows = []
    float_model, _ = planner.loaded()
    affine_plans = planner.plans(PlanRequest(method="lsaq", bits_budgets=budgets))
    start = time.perf_counter()
    swsc_plans = planner.plans(PlanRequest(method="lsaq", bits_budgets=budgets, codecs=("affine", "swsc")))
    table_seconds = time.perf_counter() - start
    for codecs, plans in (("affine", affine_plans), ("affine,swsc", swsc_plans)):
        for plan in plans:
            row = {"budget": plan.budget["bits_per_weight"], "codecs": codecs, "cost": plan.details["cost"],
                   **measure(planner.source, plan, reference, float_model)}
            row["swsc_kinds"] = dict(Counter(p.rsplit(".", 1)[-1].removesuffix("_proj") for p in plan.swsc_modules()))
            rows.append(row)
            print(f"  lsaq --codecs {codecs} at {row['budget']}: KL {row['kl']:.4f}, ppl {row['perplexity']:.2f}, "
                  f"{row['swsc_modules']} SWSC modules", flush=True)
    return rows, table_seconds


def fisher_costs(planner, ctx) -> list[dict]:
    """Summed over all layers, per kind: the cost model's error of affine b/32 and of the
    best SWSC candidate between b + 0.5 and b + 1 bits per weight (b + 1 = 3.0 and 4.0)."""
    errors = planner.cost_table(ctx)
    sums = defaultdict(float)
    for q in ctx.modules:
        if q.layer is None:
            continue
        cost = errors.errors[q.path]
        kind = q.path.rsplit(".", 1)[-1]
        for bits in (2, 3):
            sums[kind, bits, "affine"] += cost[Affine(bits, 32).key]
            sums[kind, bits, "swsc"] += min(cost[c.key] for c in ctx.candidates(q) if isinstance(c, SWSC) and bits + 0.5 <= (
                c.settings.bits_per_weight(q.rows, q.cols)) <= bits + 1)
    return [{"kind": k, "bits_per_weight": b + 1, "affine": sums[k, b, "affine"], "swsc": sums[k, b, "swsc"]}
            for k in KINDS for b in (2, 3)]


def big_matrix() -> dict:
    w = mx.random.normal((8192, 8192), key=mx.random.key(0)) * 0.02
    mx.eval(w)
    settings = SWSCSettings(512, 32)
    mx.reset_peak_memory()
    start = time.perf_counter()
    compressed = compress(w, settings)
    seconds = time.perf_counter() - start
    return {"shape": [8192, 8192], "k": 512, "rank": 32, "seconds": seconds, "peak_bytes": mx.get_peak_memory(),
            "matrix_bytes": w.nbytes, "bits_per_weight": settings.bits_per_weight(8192, 8192),
            "relative_error": relative_error([(w, compressed.dense())])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 6, 12, 18, 24, 29])
    parser.add_argument("--whole-model", type=float, nargs="+", default=[3.0, 3.5, 4.0, 4.5],
                        help="linear bits per weight of the all-SWSC / all-affine models")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0, 3.5, 4.0])
    parser.add_argument("--no-big", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start_benchmark()
    start = time.perf_counter()

    source = resolve_model(args.model)
    planner = Planner(source)
    model, tokenizer = planner.loaded()
    tokens = wikitext_tokens(tokenizer, args.tokens)
    reference = ReferenceDistributions.compute(model, tokens, args.seq_len)
    source_ppl = compare_to_reference(model, reference).perplexity.perplexity
    ctx = planner.context(codecs=("affine", "swsc"))
    weights = {i: {k: dict(model.named_modules())[f"model.layers.{i}.{'mlp' if k in KINDS[4:] else 'self_attn'}.{k}"].weight
                   for k in KINDS} for i in args.layers}

    print("1. reconstruction", flush=True)
    recon = reconstruction(weights, args.layers)
    print("2. whole model", flush=True)
    whole = whole_model(source, ctx, reference, recon, args.whole_model, model)
    print("3. lsaq planner", flush=True)
    planned, table_seconds = planner_rows(planner, reference, args.budgets)
    costs = fisher_costs(planner, ctx)
    big = None if args.no_big else big_matrix()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)

    print(f"\nmachine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}; model {args.model}; layers {args.layers}; WikiText-2 test, first {len(tokens)} "
          f"tokens, windows of {args.seq_len}; source perplexity {source_ppl:.2f}; {time.perf_counter() - start:.0f} s in all\n")
    print("| module | bits/weight | affine | affine error | SWSC (centroid bits, k / channels, rank) | SWSC error | "
          "SWSC input-channel error | better |")
    print("|---|---|---|---|---|---|---|---|")
    for r in recon:
        better = "SWSC" if r["swsc_error"] < r["affine_error"] else "affine"
        print(f"| {r['kind']} | {r['bits_per_weight']:.1f} | {r['affine']} | {r['affine_error']:.4f} | "
              f"c{r['swsc_centroid_bits']}, {r['swsc_k_share']:.2f}, {r['swsc_rank']} | {r['swsc_error']:.4f} | "
              f"{_number(r['swsc_input_axis_error'])} | {better} |")
    print("\n| linear layers | codec | model bits/weight | KL (nats/token) | top-1 agree | perplexity | "
          "build s | build peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in whole:
        print(f"| {r['point']} = {r['linear_bits_per_weight']:.1f} bpw | {r['codec']} | {r['bits_per_weight']:.3f} | "
              f"{r['kl']:.4f} ± {r['kl_stderr']:.4f} | {r['top1']:.3f} | {r['perplexity']:.2f} | "
              f"{r['build_seconds']:.1f} | {r['build_peak_bytes'] / 1e9:.2f} |")
    print(f"\nlsaq planner (SWSC cost table, k-means and SVD of every candidate of every module: {table_seconds:.0f} s)\n")
    print("| budget | --codecs | bits/weight | SWSC modules | predicted cost | KL (nats/token) | top-1 agree | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in planned:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(r["swsc_kinds"].items(), key=lambda x: -x[1]))
        modules = f"{r['swsc_modules']} ({kinds})" if kinds else str(r["swsc_modules"])
        print(f"| {r['budget']} | {r['codecs']} | {r['bits_per_weight']:.3f} | {modules} | {r['cost']:.3g} | "
              f"{r['kl']:.4f} ± {r['kl_stderr']:.4f} | {r['top1']:.3f} | {r['perplexity']:.2f} |")
    print("\nFisher-weighted squared error sum F (W - W^)^2, all layers (the planner's cost)\n")
    print("| module | bits/weight | affine b/32 | best SWSC candidate | SWSC / affine |")
    print("|---|---|---|---|---|")
    for r in costs:
        print(f"| {r['kind']} | {r['bits_per_weight']:.1f} | {r['affine']:.3g} | {r['swsc']:.3g} | {r['swsc'] / r['affine']:.2f} |")
    if big:
        print(f"\n8192 x 8192 float32 matrix, k = 512, rank 32 ({big['bits_per_weight']:.2f} bits per weight): "
              f"{big['seconds']:.1f} s, MLX peak {big['peak_bytes'] / 1e9:.2f} GB ({big['peak_bytes'] / big['matrix_bytes']:.1f}x "
              f"the matrix), relative error {big['relative_error']:.3f}")
    print(f"process peak RSS {max_rss / 1e9:.2f} GB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"source_perplexity": source_ppl, "tokens": len(tokens), "reconstruction": recon, "whole_model": whole,
                       "planner": planned, "swsc_table_seconds": table_seconds, "fisher_costs": costs, "big_matrix": big}, f, indent=2)


if __name__ == "__main__":
    main()
