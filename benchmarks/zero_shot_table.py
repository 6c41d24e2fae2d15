"""Zero-shot accuracy of the source, ours and mlx-lm's dynamic_quant at one budget.

    python benchmarks/zero_shot_table.py [--model default] [--budget 4.0] [--quantizer awq-gptq]
                                         [--tasks piqa,arc_easy] [--limit 500] [--out result.json]

Writes ``lsaq`` at ``--budget`` with ``--quantizer`` and mlx-lm's dynamic_quant rule at
the same budget (its own sensitivities; the best peer at 4.0 bits per weight in the
README's table), then runs ``lsaq-mlx eval --tasks ... --limit ...`` on each folder and
on the source, one process each, and prints accuracy with its standard error.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import dq_sensitivities, dynamic_quant_plan, low_bits_for, start as start_benchmark

from lsaq_mlx.convert import convert
from lsaq_mlx.planning.choices import BITS
from lsaq_mlx.planning.planner import Planner, PlanRequest
from lsaq_mlx.quantizers import QUANTIZERS
from lsaq_mlx.sources import resolve_model


def evaluate(model: str, tasks: str, limit: int) -> dict:
    cmd = ["lsaq-mlx", "eval", "-m", model, "--tasks", tasks, "--limit", str(limit), "--ppl", "none", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--quantizer", default="awq-gptq", choices=list(QUANTIZERS))
    parser.add_argument("--tasks", default="piqa,arc_easy")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--dq-tokens", type=int, default=2048)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start_benchmark()
    start = time.perf_counter()

    source = resolve_model(args.model)
    planner = Planner(source)
    _, tokenizer = planner.loaded()
    ctx = planner.context()
    low = low_bits_for(ctx, args.budget)
    high = BITS[BITS.index(low) + 1]
    work = Path(tempfile.mkdtemp(prefix="zero-shot-"))
    ours = planner.plan(PlanRequest(method="lsaq", bits_budgets=[args.budget]))
    peer = dynamic_quant_plan(ctx, args.budget, dq_sensitivities(source, tokenizer, low, high, args.dq_tokens), low, high)
    folders = {f"lsaq+{args.quantizer}": (ours, args.quantizer), f"dynamic_quant {low}/{high}": (peer, "rtn")}
    rows = [{**evaluate(args.model, args.tasks, args.limit), "model": "source", "bits_per_weight": None}]
    for name, (plan, quantizer) in folders.items():
        out = work / name.replace(" ", "-").replace("/", "-")
        report = convert(source, plan, out, quantizer=quantizer)
        rows.append({**evaluate(str(out), args.tasks, args.limit), "model": name,
                     "bits_per_weight": report.bits_per_weight})
        print(f"  {name}: {report.bits_per_weight:.3f} bpw", flush=True)

    tasks = args.tasks.split(",")
    print(f"\nzero-shot, first {args.limit} items each, {time.perf_counter() - start:.0f} s in all")
    print("| model | bits/weight | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    for row in rows:
        cells = [_accuracy(row, t) for t in tasks]
        bpw = "source" if row["bits_per_weight"] is None else f"{row['bits_per_weight']:.3f}"
        print(f"| {row['model']} | {bpw} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def _accuracy(row: dict, task: str) -> str:
    result = next(t for t in row["tasks"] if t["task"] == task)
    norm = "" if result["acc_norm"] is None else f" (norm {result['acc_norm']:.3f})"
    return f"{result['acc']:.3f} ± {result['acc_stderr']:.3f}{norm}"


if __name__ == "__main__":
    main()
