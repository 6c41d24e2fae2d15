"""Peak memory of an adaptive folder's activation tracks while its layers are calibrated.

    python scripts/make_random_model.py /tmp/llama3-8b-1 --shape llama3-8b --layers 1
    python benchmarks/track_hessians.py --model /tmp/llama3-8b-1 [--tracks 0 1 2 3] [--sequences 4] [--out r.json]

An ``awq-gptq`` adaptive convert runs the calibration batch once more for each smaller
plan (its activation track) and fits each smaller setting on the summed Hessians of the
tracks whose plan gives the module that setting. This runs the same
``each_layer_hessians`` over every decoder layer of ``--model`` with one copy of the
batch per track, and a consumer that asks, as ``calibrated_weights`` does, for each
module's planned inputs and then for each track's setting (each track its own setting:
no two share a sum), with the tracks' Hessians spilled to disk as convert does and kept
in memory as before; each case in a process of its own (peak RSS by GNU time). A Hessian
is as large whatever number of tokens made it, so a few sequences cost in memory what
the 16,384 calibration tokens do; no GPTQ is run.
"""

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

from common import measured, start as start_benchmark


def one_case(model: str, tracks: int, spill: bool, sequences: int) -> None:
    import mlx.core as mx

    from lsaq_mlx.gptq.hessians import calibration_tokens, each_layer_hessians
    from lsaq_mlx.gptq.writer import _TrackHessians
    from lsaq_mlx.planning.choices import Affine
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = resolve_model(model)
    streamed = StreamedModel(source)
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:sequences]
    paths = {p for p, m in streamed.model.named_modules() if ".layers." in p and "Linear" in type(m).__name__}
    planned = Affine(6, 64)
    settings = [{p: Affine(3 + t % 3, 64 if t < 3 else 32) for p in paths} for t in range(tracks)]

    def on_modules(modules, hessians, layer):
        fitted_on = _TrackHessians(hessians, settings)
        for path in modules:
            fitted_on(path, planned, planned)[0].hessian.sum()
            for plan in settings:
                fitted_on(path, plan[path], planned)[0].hessian.sum()
        return None

    with tempfile.TemporaryDirectory() as scratch:
        each_layer_hessians(streamed, tokens, paths, on_modules, held_out=sequences // 2, copies=1 + tracks,
                            spill=Path(scratch) if spill and tracks else None)
    mx.eval(mx.zeros(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tracks", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--sequences", type=int, default=4, help="Calibration sequences of 256 tokens (half held out).")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # TRACKS SPILL: one case, in this process
    args = parser.parse_args()
    start_benchmark()
    if args.one:
        one_case(args.model, int(args.one[0]), args.one[1] == "1", args.sequences)
        return
    rows = []
    for tracks in args.tracks:
        for spill in ([False, True] if tracks else [False]):
            wall, rss = measured([sys.executable, __file__, "--model", args.model, "--sequences", str(args.sequences),
                                  "--one", str(tracks), "1" if spill else "0"])
            rows.append({"tracks": tracks, "spilled": spill, "peak_rss": rss, "seconds": wall})
            print(f"{tracks} tracks, {'spilled' if spill else 'in memory'}: {rss / 1e9:.2f} GB peak RSS, {wall:.0f} s",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "sequences": args.sequences, "rows": rows,
                                              "machine": platform.platform()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
