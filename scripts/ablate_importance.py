"""Should the lsaq cost weight layers by their jaccard importance on top of the Fisher?

    python scripts/ablate_importance.py [--budgets 4 3 5] [--tokens 1024]

For each budget: lsaq plans with layer weight (jaccard importance / mean)^p for p in
{0, 1, 2}, and mlx-lm's dynamic_quant at the same budget (as in quality_table.py), each
quantized in memory and compared with the source by KL on the first --tokens tokens of
WikiText-2 test (windows of 512). The README's numbers for IMPORTANCE_POWER come from it.
"""

import argparse

from lsaq_mlx.backend.blas import reexec_with_fast_blas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 3.0, 5.0])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    reexec_with_fast_blas()
    import quality_table as qt

    from lsaq_mlx.planning import cost
    from lsaq_mlx.backend.compute import prepare_for_compute
    from lsaq_mlx.convert import quantized_model
    from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
    from lsaq_mlx.planning.methods import Budget, PlanningContext, plan_lsaq
    from lsaq_mlx.planning.planner import _error_table
    from lsaq_mlx.scoring.run import ScoreOptions, score
    from lsaq_mlx.sources import load_model, resolve_model

    source = resolve_model("default")
    model, tokenizer, _ = load_model(source)
    with open(qt.WIKITEXT, encoding="utf-8") as f:
        tokens = tokenizer.encode(f.read(100_000))[: args.tokens]
    reference = ReferenceDistributions.compute(model, tokens, 512)
    ctx = PlanningContext(model, source.fingerprint)
    jaccard = score(source, ScoreOptions("jaccard"), model=(model, tokenizer))
    errors = _error_table(source, model, tokenizer, ctx, None)
    del model

    def kl(plan) -> float:
        quantized, _ = quantized_model(source, plan)
        prepare_for_compute(quantized)
        return compare_to_reference(quantized, reference).kl

    print("| budget | p = 0 | p = 1 | p = 2 | dynamic_quant |")
    print("|---|---|---|---|---|")
    sensitivities = {}
    for budget in args.budgets:
        row = []
        for power in (0.0, 1.0, 2.0):
            cost.IMPORTANCE_POWER = power
            row.append(kl(plan_lsaq(ctx, Budget(budget), errors, cost.layer_weights(jaccard.scores, ctx.modules))))
        low = qt.low_bits_for(ctx, budget)
        high = qt.BITS[qt.BITS.index(low) + 1]
        if (low, high) not in sensitivities:
            sensitivities[low, high] = qt.dq_sensitivities(source, tokenizer, low, high, 2048)
        row.append(kl(qt.dynamic_quant_plan(ctx, budget, sensitivities[low, high], low, high)))
        print(f"| {budget} | " + " | ".join(f"{v:.4f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
