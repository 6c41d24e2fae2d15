"""GPTQ on one large matrix: the solver now (MLX) against the NumPy solver of an earlier
revision, in one process, on the same matrix and Hessian.

The baseline's ``gptq/solver.py`` and ``gptq/refit.py`` are read from git at
``--baseline-rev`` (the last revision whose column loop ran in NumPy) into a package of
their own. Reported per setting: seconds of each (best of ``--repeats``), their ratio,
the share of codes that differ (float32 sums in another order flip a rounding tie now
and then) and each result's output error ``tr(dW H dW^T)``.

    python benchmarks/bench_gptq.py [--rows 4096] [--cols 4096] [--bits 4] [--group-size 64]
"""

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "cd0c335"  # the NumPy column loop


def baseline_solver(rev: str):
    """``gptq/solver.py`` of ``rev`` as a module (its ``refit.py`` beside it)."""
    folder = Path(tempfile.mkdtemp()) / "gptq_baseline"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name in ("solver", "refit"):
        text = subprocess.run(["git", "show", f"{rev}:lsaq_mlx/gptq/{name}.py"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        for before, now in (("lsaq_mlx.gptq.solver", "gptq_baseline.solver"), ("lsaq_mlx.gptq.refit", "gptq_baseline.refit"),
                            ("lsaq_mlx.planning.cost import affine_scales", "lsaq_mlx.planning.affine_error import affine_scales")):
            text = text.replace(before, now)  # the baseline's own modules, and where moved helpers live now
        (folder / f"{name}.py").write_text(text)
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module("gptq_baseline.solver")


def timed(run, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    args = parser.parse_args()

    from lsaq_mlx.backend.blas import active_blas, reexec_with_fast_blas

    reexec_with_fast_blas()  # as the CLI does: NumPy and MLX both on OpenBLAS where it is installed
    from lsaq_mlx.gptq import solver

    old = baseline_solver(args.baseline_rev)
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    x = rng.standard_normal((2048, args.cols)).astype(np.float32) * np.linspace(0.1, 3.0, args.cols, dtype=np.float32)
    hessian = (x.T @ x / len(x)).astype(np.float32)
    factor = solver.hessian_factor(hessian)
    old_factor = old.HessianFactor(factor.upper, factor.order)
    def unpacked(codes, bits: int) -> np.ndarray:
        return np.unpackbits(codes.weight.view(np.uint8), bitorder="little").reshape(args.rows, -1, bits)

    def error(codes) -> float:
        import mlx.core as mx

        dequantized = mx.dequantize(*codes.arrays(), group_size=args.group_size, bits=args.bits)
        return round(solver.output_error(weight, np.array(dequantized.astype(mx.float32)), hessian), 4)

    rows = []
    for name, clip, refit in (("gptq", None, None), ("gptq + clip", hessian, None), ("gptq + clip + refit", hessian, hessian)):
        new_s, new = timed(lambda: solver.gptq_quantize(weight, factor, args.bits, args.group_size, clip, refit),
                           args.repeats)
        old_s, base = timed(lambda: old.gptq_quantize(weight, old_factor, args.bits, args.group_size, clip, refit),
                            args.repeats)
        rows.append({"setting": name, "mlx_seconds": round(new_s, 2), "numpy_seconds": round(old_s, 2),
                     "numpy_over_mlx": round(old_s / new_s, 2),
                     "codes_differing": float(np.mean(unpacked(new, args.bits) != unpacked(base, args.bits))),
                     "output_error_mlx": error(new), "output_error_numpy": error(base)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"shape": [args.rows, args.cols], "bits": args.bits, "group_size": args.group_size,
                      "baseline": args.baseline_rev, "blas": active_blas(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
