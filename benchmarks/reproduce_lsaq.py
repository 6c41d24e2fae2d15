"""The LSAQ paper's experiment on the default model, through ``lsaq-mlx sweep``.

    python benchmarks/reproduce_lsaq.py [--tokens 2048] [--tasks piqa,arc_easy] [--limit 100]
                                     [--ranks 1] [--out reproduce-lsaq]

25 / 50 / 75 % of the decoder layers at 4 bits and the rest at 8 (group 64; embeddings
and LM head at 4), the layers kept at 8 chosen by four orders: jaccard (LSAQ), cosine
(ShortGPT's Block Influence; LIM gives the same order), zscore (ZD) and a seeded random
order. Plus our allocator (``lsaq``) at the bits per weight of each of those plans, and
the source model. Perplexity and KL to the source on WikiText-2 test, zero-shot accuracy.
The sweep resumes where it stopped; ``--ranks N`` runs it under ``mlx.launch -n N``.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

FRACTIONS = (0.25, 0.5, 0.75)
ORDERS = {"lsaq-tiers": "jaccard", "tiers-cosine": "cosine", "tiers-zscore": "zscore", "tiers-random": "random"}


def tier_bits_per_weight(fraction: float) -> float:
    """Bits per weight of the tiers plan with ``fraction`` of layers low (the same for every order)."""
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.sources import resolve_model

    plan = Planner(resolve_model(None)).plan(PlanRequest(method="tiers-random", low_fraction=fraction))
    return plan.predicted_bits_per_weight


def write_spec(path: Path, args, budgets: list[float]) -> None:
    tasks = ", ".join(f'"{t}"' for t in args.tasks.split(",") if t)
    path.write_text(f"""out = "{args.out}"

[eval]
ppl = "wikitext2"
max_tokens = {args.tokens}
seq_len = 512
kl = true
tasks = [{tasks}]
limit = {args.limit}

[[grid]]
models = ["default"]
methods = ["source", {", ".join(f'"{m}"' for m in ORDERS)}]
low_fractions = {list(FRACTIONS)}
high_bits = 8
low_bits = 4
group_size = 64

[[grid]]
models = ["default"]
methods = ["lsaq"]
budgets = {budgets}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--tasks", default="piqa,arc_easy")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--out", default="reproduce-lsaq")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(exist_ok=True)
    budgets = [round(tier_bits_per_weight(f), 4) for f in FRACTIONS]
    spec = out / "spec.toml"
    write_spec(spec, args, budgets)
    sweep = [sys.executable, "-m", "lsaq_mlx", "sweep", str(spec), "--out", str(out), "--json"]
    if args.ranks > 1:
        sweep = [shutil.which("mlx.launch"), "-n", str(args.ranks), *sweep]
    done = subprocess.run(sweep, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        sys.exit(f"the sweep failed (exit {done.returncode}); see {out / 'results.jsonl'}")
    rows = [r for r in json.loads(done.stdout)["rows"] if r["status"] == "ok"]
    print_table(rows, budgets, args)


def print_table(rows: list[dict], budgets: list[float], args) -> None:
    tasks = [t for t in args.tasks.split(",") if t]
    source = next(r for r in rows if r["method"] == "source")
    print(f"default model (SmolLM2-135M-Instruct), WikiText-2 test first {args.tokens} tokens (windows of 512), "
          f"tasks {', '.join(tasks)} (first {args.limit} items each, acc)\n")
    print("| layers at 4 bits | order | bits/weight | perplexity | KL (nats/token) | top-1 agree | "
          + " | ".join(tasks) + " | mean acc |")
    print("|---|---|---|---|---|---|" + "---|" * (len(tasks) + 1))
    line(source, "source (no quantization)", "-", tasks)
    wins = {}
    for fraction, budget in zip(FRACTIONS, budgets):
        group = [r for r in rows if r.get("low_fraction") == fraction] + [
            r for r in rows if r["method"] == "lsaq" and r["budget"] == budget]
        best = min(group, key=lambda r: r["eval"]["divergence"]["kl"])
        for r in group:
            order = ORDERS.get(r["method"], "our allocator (lsaq)")
            line(r, order, f"{fraction:.0%}", tasks, best=r is best)
        tiers = [r for r in group if r["method"] in ORDERS]
        ranked = sorted(tiers, key=lambda r: r["eval"]["divergence"]["kl"])
        wins[fraction] = [ORDERS[r["method"]] for r in ranked]
    print("\norder of the four layer orders by KL (best first), per share of layers at 4 bits:")
    for fraction, order in wins.items():
        print(f"  {fraction:.0%}: {' < '.join(order)}")


def line(r: dict, order: str, fraction: str, tasks: list[str], best: bool = False) -> None:
    e = r["eval"]
    accs = {t["task"]: t["acc"] for t in e["tasks"]}
    kl = f"{e['divergence']['kl']:.4f} ± {e['divergence']['kl_stderr']:.4f}"
    cells = [fraction, order, f"{r['bits_per_weight']:.3f}", f"{e['perplexity']['perplexity']:.2f}",
             f"**{kl}**" if best else kl, f"{e['divergence']['top1_agreement']:.3f}",
             *[f"{accs[t]:.3f}" if t in accs else "" for t in tasks],
             f"{sum(accs.values()) / len(accs):.3f}" if accs else ""]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
