"""An adaptive folder against converting each plan directly, on the same WikiText tokens.

    python benchmarks/adaptive_folder.py [--model default] [--budgets 3,4,5,6] [--quantizer awq-gptq]
                                         [--sizes 1.0 1.3 3] [--tokens 2048] [--out results.json]
                                         [--more-text] [--work DIR [--reuse]]

For each ``--adaptive-size`` it writes ``convert --adaptive BUDGETS --quantizer Q`` (wall
time and peak RSS of its own process), then builds every plan of the set as chat and
serve do (``AdaptiveFolder.model_at``: the stored model, then the plan's swaps, without
the float source) and measures KL to the source and perplexity. Each plan is also
written directly (``convert --plan``, the same plan, the same quantizer) and measured
the same way: the ratio is what the adaptive folder costs in quality. ``--more-text``
measures KL on two more texts as well (LAMBADA, and WikiText-2's next tokens): a few
thousand tokens can hang on a handful of positions. Disk is the
folder's bytes over the largest plan's folder (its bytes but the plans and the store: what
``convert -b`` writes for that plan), and over its weights. Last, on the largest size, the swap
from the smallest plan to the largest and back and each step between neighbouring plans
(seconds, in one process) beside a fresh load of the largest plan's own folder, in the
same process and in a new one.
"""

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from common import lambada_tokens, measured, start as start_benchmark, wikitext_tokens
from lsaq_mlx.adaptive.folder import PLANS_FILE, SIDE_FOLDER, AdaptiveFolder, budget_of, planner_for
from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
from lsaq_mlx.runtime import Engine
from lsaq_mlx.runtime.options import RuntimeOptions
from lsaq_mlx.sources import load_model, resolve_model

CLI = [sys.executable, "-m", "lsaq_mlx"]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model*.safetensors"))


def top_plan_bytes(folder: Path) -> int:
    """The adaptive folder's bytes but its plans and store: the largest plan's folder as
    ``convert -b`` writes it."""
    extra = folder_bytes(folder / SIDE_FOLDER) + (folder / PLANS_FILE).stat().st_size
    return folder_bytes(folder) - extra


def measure(model, reference, more: dict | None = None) -> dict:
    """KL, its standard error and perplexity on ``reference``, and KL on each of ``more``
    (name -> reference) as ``kl_<name>``."""
    prepare_for_compute(model)
    r = compare_to_reference(model, reference)
    kls = {f"kl_{name}": compare_to_reference(model, ref).kl for name, ref in (more or {}).items()}
    return {"kl": r.kl, "kl_stderr": r.kl_stderr, "perplexity": r.perplexity.perplexity, **kls}


def converted(cmd: list[str], out: Path, reuse: bool) -> tuple[float, int]:
    """Seconds and peak RSS of ``convert`` writing ``out``; with ``reuse`` a folder already
    there is kept, and its report's seconds (planning and writing) and peak RSS are given."""
    report = out / "lsaq_report.json"
    if reuse and report.is_file():
        done = json.loads(report.read_text())
        return done["wall_seconds"] + done["plan_seconds"], done["max_rss_bytes"]
    return measured(cmd)


def swap_round_trip(folder_source, fresh: Path) -> dict:
    """Seconds of the swap smallest -> largest -> smallest in one engine, and of each
    step between neighbouring plans (what ``--auto`` does as memory moves), beside
    loading the largest plan's own folder afresh: in this process, and in a new process
    (imports, load, evaluation: what restarting with another folder costs); and this
    process's peak resident memory through the swaps, before that load, beside the new
    process's (what holding the largest plan costs)."""
    planner = planner_for(folder_source)
    budgets = planner.folder.budgets()
    engine = Engine(folder_source, planner, RuntimeOptions(bits_budget=budgets[0])).start()
    try:
        up = engine.apply_budget(budgets[-1]).result(600)
        down = engine.apply_budget(budgets[0]).result(600)
        steps = [engine.apply_budget(b).result(600) for b in [*budgets[1:], *budgets[-2::-1]]]
    finally:
        engine.shutdown()
    engine_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    begin = time.perf_counter()
    model = load_model(resolve_model(str(fresh)))[0]
    mx.eval(model.parameters())
    load = time.perf_counter() - begin
    load_folder = ("import sys, mlx.core as mx; from lsaq_mlx.sources import load_model, resolve_model; "
                   "mx.eval(load_model(resolve_model(sys.argv[1]))[0].parameters())")
    process, process_rss = measured([sys.executable, "-c", load_folder, str(fresh)])
    step_seconds = [s.seconds for s in steps]
    return {"up_seconds": up.seconds, "down_seconds": down.seconds, "modules": up.changed,
            "fresh_load_seconds": load, "fresh_process_seconds": process, "up_over_load": up.seconds / load,
            "down_over_load": down.seconds / load, "step_seconds": step_seconds,
            "step_modules": [s.changed for s in steps], "mean_step_over_load": sum(step_seconds) / len(steps) / load,
            "swaps_peak_rss": engine_rss, "fresh_process_peak_rss": process_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--budgets", default="3,4,5,6")
    parser.add_argument("--quantizer", default="awq-gptq")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 1.3, 3.0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", default=None, help="Keep the folders here (default: a temporary folder).")
    parser.add_argument("--reuse", action="store_true",
                        help="Measure the folders already in --work instead of converting them again.")
    parser.add_argument("--more-text", action="store_true",
                        help="Also KL on LAMBADA's first --tokens tokens and on WikiText-2's next 2x --tokens.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start_benchmark()
    source = resolve_model(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="adaptive-"))
    model_args = ["-m", args.model] if args.model else []
    source_model, tokenizer, _ = load_model(source)
    wikitext = wikitext_tokens(tokenizer, 3 * args.tokens)
    reference = ReferenceDistributions.compute(source_model, wikitext[: args.tokens], args.seq_len)
    more = {"lambada": lambada_tokens(tokenizer, args.tokens), "wikitext_next": wikitext[args.tokens :]} \
        if args.more_text else {}
    more = {name: ReferenceDistributions.compute(source_model, t, args.seq_len) for name, t in more.items()}
    del source_model
    rows, folders = [], {}
    for size in args.sizes:
        out = work / f"adaptive-{size:g}"
        wall, rss = converted([*CLI, "convert", *model_args, "--adaptive", args.budgets, "--quantizer", args.quantizer,
                               "--adaptive-size", str(size), "-o", str(out), "--force"], out, args.reuse)
        folders[size] = out
        folder = AdaptiveFolder.open(out)
        disk, over_weights = folder_bytes(out) / top_plan_bytes(out), folder_bytes(out) / weights_bytes(out)
        print(f"adaptive size {size:g}: {wall:.0f} s, {rss / 1e9:.2f} GB peak RSS, folder {disk:.2f}x its largest "
              f"plan's folder ({over_weights:.2f}x its weights)", flush=True)
        for plan in folder.plans.plans:
            budget = budget_of(plan)
            built = measure(folder.model_at(resolve_model(str(out)), plan)[0], reference, more)
            rows.append({"size": size, "budget": budget, "bits_per_weight": plan.predicted_bits_per_weight,
                         "convert_seconds": wall, "convert_peak_rss": rss, "disk_over_top": disk, "disk_over_top_weights": over_weights, **built})
            print(f"  {budget:g} bpw: KL {built['kl']:.4f}", flush=True)
    direct = {}
    for plan in AdaptiveFolder.open(folders[args.sizes[0]]).plans.plans:
        budget = budget_of(plan)
        plan_file, out = work / f"plan-{budget:g}.json", work / f"direct-{budget:g}"
        plan.save(plan_file)
        wall, rss = converted([*CLI, "convert", *model_args, "--plan", str(plan_file), "--quantizer", args.quantizer,
                               "-o", str(out), "--force"], out, args.reuse)
        direct[budget] = measure(load_model(resolve_model(str(out)), compute=False)[0], reference, more) | {
            "convert_seconds": wall, "convert_peak_rss": rss}
        print(f"direct {budget:g} bpw: KL {direct[budget]['kl']:.4f}, {wall:.0f} s", flush=True)
    for row in rows:
        row["direct_kl"] = direct[row["budget"]]["kl"]
        row["kl_over_direct"] = row["kl"] / row["direct_kl"]
        for name in more:
            row[f"kl_{name}_over_direct"] = row[f"kl_{name}"] / direct[row["budget"]][f"kl_{name}"]
    largest = max(args.sizes)
    swaps = swap_round_trip(resolve_model(str(folders[largest])), work / f"direct-{budget_of(plan):g}")
    print("\n| --adaptive-size | folder / largest plan | " + " | ".join(f"{b:g} bpw KL (x direct)" for b in direct) + " |")
    print("|---|---|" + "---|" * len(direct))
    for size in args.sizes:
        cells = [r for r in rows if r["size"] == size]
        print(f"| {size:g} | {cells[0]['disk_over_top']:.2f}x | "
              + " | ".join(f"{r['kl']:.4f} ({r['kl_over_direct']:.2f}x)" for r in cells) + " |")
    print("| direct `convert --plan` | | " + " | ".join(f"{d['kl']:.4f}" for d in direct.values()) + " |")
    for name in more:
        print(f"KL on {name} (x direct): " + "; ".join(
            f"{r['size']:g}/{r['budget']:g} bpw {r[f'kl_{name}']:.4f} ({r[f'kl_{name}_over_direct']:.2f}x)" for r in rows))
    print(f"\nswap {args.budgets.split(',')[0]} -> largest: {swaps['up_seconds']:.2f} s, back {swaps['down_seconds']:.2f} s "
          f"({swaps['modules']} modules); fresh load of the largest plan's folder {swaps['fresh_load_seconds']:.2f} s "
          f"in this process, {swaps['fresh_process_seconds']:.2f} s in a new one")
    print("steps between neighbouring plans: " + ", ".join(f"{s:.2f} s ({n} modules)" for s, n in
                                                           zip(swaps["step_seconds"], swaps["step_modules"]))
          + f"; mean {swaps['mean_step_over_load']:.2f}x the fresh load")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "direct": direct, "swaps": swaps, "quantizer": args.quantizer,
                                              "machine": platform.platform(), "tokens": args.tokens,
                                              "more_text": {"lambada": "LAMBADA's first tokens",
                                                            "wikitext_next": "WikiText-2's next tokens"}
                                              if more else {}}, indent=2))


if __name__ == "__main__":
    main()
