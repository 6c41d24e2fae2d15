"""Should the lsaq cost weight layers by their jaccard importance on top of the Fisher?

    python benchmarks/ablate_importance.py [--budgets 4 3 5] [--tokens 1024]

For each budget: lsaq plans with layer weight (jaccard importance / mean)^p for p in
{0, 1, 2}, and mlx-lm's dynamic_quant at the same budget (as in quality_table.py), each
quantized in memory and compared with the source by KL on the first --tokens tokens of
WikiText-2 test (windows of 512). The README's numbers for ``PlanRequest.importance_power``
come from it.
"""

import argparse

from common import dq_sensitivities, dynamic_quant_plan, low_bits_for, start, wikitext_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 3.0, 5.0])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    start()
    from lsaq_mlx.backend.compute import prepare_for_compute
    from lsaq_mlx.convert import quantized_model
    from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
    from lsaq_mlx.planning.choices import BITS
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.sources import resolve_model

    source = resolve_model("default")
    planner = Planner(source)
    model, tokenizer = planner.loaded()
    reference = ReferenceDistributions.compute(model, wikitext_tokens(tokenizer, args.tokens), 512)
    ctx = planner.context()

    def kl(plan) -> float:
        quantized, _ = quantized_model(source, plan, model)
        prepare_for_compute(quantized)
        return compare_to_reference(quantized, reference).kl

    print("| budget | p = 0 | p = 1 | p = 2 | dynamic_quant |")
    print("|---|---|---|---|---|")
    sensitivities = {}
    for budget in args.budgets:
        row = []
        for power in (0.0, 1.0, 2.0):
            row.append(kl(planner.plan(PlanRequest(method="lsaq", bits_budgets=[budget], importance_power=power))))
        low = low_bits_for(ctx, budget)
        high = BITS[BITS.index(low) + 1]
        if (low, high) not in sensitivities:
            sensitivities[low, high] = dq_sensitivities(source, tokenizer, low, high, 2048)
        row.append(kl(dynamic_quant_plan(ctx, budget, sensitivities[low, high], low, high)))
        print(f"| {budget} | " + " | ".join(f"{v:.4f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
