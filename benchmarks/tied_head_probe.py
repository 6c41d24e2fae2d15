"""The tied embedding through GPTQ or rounded to nearest, at several budgets: what sets
``gptq.writer.TIED_HEAD_MAX_BITS`` (docs/plans.md).

    python benchmarks/tied_head_probe.py [--model M] [--budgets 4.0 5.5 7.0] [--quantizer awq-gptq]

For each budget: the lsaq plan, written with the quantizer as it is (the embedding tied
to the head through GPTQ up to ``TIED_HEAD_MAX_BITS`` bits), with the tied embedding
always through GPTQ, and always rounded; KL to the source on the first 2,048 WikiText-2
test tokens (windows of 512) of each. One JSON line per budget.
"""

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 5.5, 7.0])
    parser.add_argument("--quantizer", default="awq-gptq")
    args = parser.parse_args()

    from lsaq_mlx.backend.blas import reexec_with_fast_blas

    reexec_with_fast_blas()
    from lsaq_mlx.convert import convert
    from lsaq_mlx.evaluation.run import EvalRequest, evaluate
    from lsaq_mlx.gptq import writer
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.sources import resolve_model

    source = resolve_model(args.model)
    planner = Planner(source)
    head = writer.head_path(planner.structure[0])
    as_set = writer.TIED_HEAD_MAX_BITS
    with tempfile.TemporaryDirectory() as work:
        for budget in args.budgets:
            plan = planner.plan(PlanRequest(bits_budgets=[budget]))
            row = {"budget": budget, "head": head, "head_choice": plan.modules[head].label if head else None}
            for name, limit in (("as_set", as_set), ("gptq", 8), ("rounded", 0)):
                writer.TIED_HEAD_MAX_BITS = limit
                folder = Path(work) / f"{budget}-{name}"
                convert(source, plan, folder, quantizer=args.quantizer, smoke_tokens=1)
                result = evaluate(resolve_model(str(folder)), EvalRequest(max_tokens=2048), reference=source)
                row[name] = {"kl": result.divergence["kl"], "kl_stderr": result.divergence["kl_stderr"]}
            writer.TIED_HEAD_MAX_BITS = as_set
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
