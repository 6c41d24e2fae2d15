"""A model over several ranks: the joint plan against one precision for the whole model and
against exo's split (layers in proportion to memory, each rank the most uniform bits that
fit), all under the same ranks' memory; then pipelined generation against one process.

    python benchmarks/pipeline.py [--model default] [--ranks 160MB,80MB] [--context 1024]
                                  [--tokens 2048] [--generate 32] [--out results.json]

Quality is KL to the source on the first ``--tokens`` WikiText-2 tokens (the plans are
built in one process: the quality of a split does not depend on where its layers run).
Speed runs ``generate --plan`` in one process and under ``mlx.launch -n RANKS --backend
ring`` on this host, one after the other in this run: tokens/s, prompt tokens/s, whether
the texts are equal, each rank's peak memory and RSS, the bytes between ranks per token.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import start as start_benchmark, wikitext_tokens
from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.convert import quantized_model
from lsaq_mlx.errors import UserError
from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
from lsaq_mlx.planning.budgets import Budget
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.planning.pipeline import ModelLayout, parse_ranks, rank_needs
from lsaq_mlx.planning.planner import PlanRequest, Planner
from lsaq_mlx.sources import load_model, resolve_model

CLI = [sys.executable, "-m", "lsaq_mlx"]
PROMPT = "The history of the city begins"


def one_precision(planner, memories, context):
    """The largest single setting for every module that some split fits (the joint
    planner with every module pinned to it)."""
    ctx = planner.context()
    settings = sorted({c for q in ctx.modules for c in ctx.candidates(q) if isinstance(c, Affine)},
                      key=lambda c: -c.bits_per_weight())
    for c in settings:
        try:
            return c, planner.pipeline_plan(PlanRequest(context=context, overrides=[f".={c.bits}:{c.group_size}"]),
                                            memories, shape_only=True)
        except UserError:
            continue
    return None, None


def exo_split(planner, memories, context):
    """Layers in proportion to memory; each rank the largest single setting that fits it."""
    ctx = planner.context()
    layout = ModelLayout.of(*planner.structure, ctx.modules)
    n, total = len(memories), sum(memories)
    ends, acc = [], 0
    for m in memories:
        acc += m
        ends.append(round(acc / total * layout.n_layers))
    settings = sorted({c for q in ctx.modules for c in ctx.candidates(q) if isinstance(c, Affine)},
                      key=lambda c: -c.bits_per_weight())
    choices, first = {}, 0
    for rank, end in enumerate(ends):
        held = [q for q in ctx.modules if (q.layer is not None and first <= q.layer < end)
                or (q.layer is None and rank in layout.holder(q, n))]
        floats, kv, reserve = rank_needs(layout, n, rank, range(first, end), context, memories[rank])
        room = memories[rank] - floats - kv - reserve
        fitting = [c for c in settings if all(c.fits(q.cols) for q in held)
                   and sum(q.bytes_for(choices.get(q.path, c)) for q in held) <= room]
        if not fitting:
            return None, ends
        for q in held:
            choices.setdefault(q.path, fitting[0])
        first = end
    return ctx.plan("exo-uniform", Budget(bytes=ctx.total_bytes(choices)), choices), ends


def kl_of(source, plan, reference) -> float:
    model, _ = quantized_model(source, plan)
    prepare_for_compute(model)
    return compare_to_reference(model, reference).kl


def generate(args: list[str], ranks: int) -> dict:
    command = [*CLI, "generate", *args, "--json"]
    if ranks > 1:
        command = [shutil.which("mlx.launch"), "-n", str(ranks), "--backend", "ring", "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or "{" not in done.stdout:
        sys.exit(f"generate failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--ranks", default="160MB,80MB")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--generate", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start_benchmark()
    source = resolve_model(args.model)
    memories = parse_ranks(args.ranks)
    planner = Planner(source)
    joint = planner.pipeline_plan(PlanRequest(context=args.context), memories)
    setting, uniform = one_precision(planner, memories, args.context)
    exo, exo_ends = exo_split(planner, memories, args.context)
    model, tokenizer, _ = load_model(source)
    reference = ReferenceDistributions.compute(model, wikitext_tokens(tokenizer, args.tokens), args.seq_len)
    del model
    rows = [{"plan": "joint (lsaq over ranks)", "layers": [[s.first_layer, s.end_layer] for s in joint.ranks],
             "bits_per_weight": joint.plan.predicted_bits_per_weight, "bytes": joint.plan.predicted_bytes,
             "kl": kl_of(source, joint.plan, reference)}]
    if uniform:
        rows.append({"plan": f"one precision ({setting.label})", "layers": [[s.first_layer, s.end_layer] for s in uniform.ranks],
                     "bits_per_weight": uniform.plan.predicted_bits_per_weight, "bytes": uniform.plan.predicted_bytes,
                     "kl": kl_of(source, uniform.plan, reference)})
    if exo:
        bounds = list(zip([0, *exo_ends[:-1]], exo_ends))
        rows.append({"plan": "exo split, uniform bits per rank", "layers": [list(b) for b in bounds],
                     "bits_per_weight": exo.predicted_bits_per_weight, "bytes": exo.predicted_bytes,
                     "kl": kl_of(source, exo, reference)})
    print(f"\nquality at ranks {args.ranks}, context {args.context}, KL on {args.tokens} WikiText-2 tokens:")
    print("| plan | layers per rank | bits per weight | MB | KL | x joint |\n|---|---|---|---|---|---|")
    if not exo:
        print(f"(exo's split, layers ending at {exo_ends}, fits no uniform setting on some rank)")
    if not uniform:
        print("(no single setting fits these ranks)")
    for r in rows:
        print(f"| {r['plan']} | {' / '.join(f'{a}-{b - 1}' for a, b in r['layers'])} | {r['bits_per_weight']:.3f} | "
              f"{r['bytes'] / 1e6:.1f} | {r['kl']:.4f} | {r['kl'] / rows[0]['kl']:.2f} |")
    work = Path(tempfile.mkdtemp(prefix="pipeline-"))
    joint.save(work / "pipe.json")
    gen_args = [*(["-m", args.model] if args.model else []), "--plan", str(work / "pipe.json"), "-p", PROMPT,
                "-n", str(args.generate)]
    one, many = generate(gen_args, 1), generate(gen_args, len(memories))
    speed = {"one_process_tps": one["generation_tps"], "pipelined_tps": many["generation_tps"],
             "tps_ratio": many["generation_tps"] / one["generation_tps"],
             "prompt_tps_ratio": many["prompt_tps"] / one["prompt_tps"], "same_text": one["text"] == many["text"],
             "one_process_peak": one["peak_memory_bytes"], "ranks": many["ranks"],
             "bytes_between_ranks_per_token": many["bytes_between_ranks_per_token"]}
    print(f"\nspeed, {len(memories)} ranks on this host vs one process (same run): "
          f"{speed['pipelined_tps']:.2f} vs {speed['one_process_tps']:.2f} tok/s ({speed['tps_ratio']:.2f}x), "
          f"prompt {speed['prompt_tps_ratio']:.2f}x; same text: {speed['same_text']}; "
          f"{speed['bytes_between_ranks_per_token']} bytes between ranks per token")
    for r in many["ranks"]:
        share = joint.share(r["rank"])
        print(f"  rank {r['rank']}: layers {r['layers']}, plan {share.weight_bytes / 1e6:.1f} MB of weights, "
              f"peak MLX {r['peak_memory_bytes'] / 1e6:.1f} MB, RSS {r['rss_bytes'] / 1e6:.1f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "quality": rows, "speed": speed}, indent=2))


if __name__ == "__main__":
    main()
