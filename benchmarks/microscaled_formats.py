"""MLX's microscaling formats (mxfp4, nvfp4, mxfp8) as plan choices beside affine: do
they lower the cost per byte? (docs/plans.md)

    python benchmarks/microscaled_formats.py [--model M] [--budgets 3.5 4.0 4.5 5.0 6.0]
        [--formats mxfp4,nvfp4,mxfp8] [--quantizer rtn]

For each budget: the lsaq plan with affine choices only and with the formats beside
affine, both written with the quantizer; how many modules the second plan gives each
format, and the KL of each to the source on the first 2,048 WikiText-2 test tokens
(windows of 512). One JSON line per budget.
"""

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.5, 4.0, 4.5, 5.0, 6.0])
    parser.add_argument("--formats", default="mxfp4,nvfp4,mxfp8")
    parser.add_argument("--quantizer", default="rtn")
    args = parser.parse_args()

    from lsaq_mlx.backend.blas import reexec_with_fast_blas

    reexec_with_fast_blas()
    from lsaq_mlx.convert import convert
    from lsaq_mlx.evaluation.run import EvalRequest, evaluate
    from lsaq_mlx.planning.microscaled import FORMATS
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.sources import resolve_model

    source = resolve_model(args.model)
    planner = Planner(source)
    codecs = ("affine", *args.formats.split(","))
    with tempfile.TemporaryDirectory() as work:
        for budget in args.budgets:
            row = {"budget": budget, "quantizer": args.quantizer}
            for name, request in (("affine", PlanRequest(bits_budgets=[budget])),
                                  ("formats", PlanRequest(bits_budgets=[budget], codecs=codecs))):
                plan = planner.plan(request)
                folder = Path(work) / f"{budget}-{name}"
                convert(source, plan, folder, quantizer=args.quantizer, smoke_tokens=1)
                result = evaluate(resolve_model(str(folder)), EvalRequest(max_tokens=2048), reference=source)
                row[name] = {"kl": result.divergence["kl"], "kl_stderr": result.divergence["kl_stderr"],
                             "bits_per_weight": plan.predicted_bits_per_weight,
                             "modules": dict(Counter(c.label for c in plan.modules.values() if c.label in FORMATS))}
            row["kl_ratio"] = row["formats"]["kl"] / row["affine"]["kl"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
