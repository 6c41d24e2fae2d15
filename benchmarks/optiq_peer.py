"""mlx-optiq as a peer: its Python API (``optiq.models.llm.run_llm_pipeline``: per-module
KL sensitivity with every candidate bit width, its knapsack, then mlx-lm's convert with
its predicate) on a local model folder and our calibration text, the result a stock
mlx-lm folder. Run with the Python of a virtual environment that has mlx-optiq (it pins
its own mlx-lm and transformers), not ours: this file imports nothing of lsaq-mlx.

    OPTIQ_PYTHON benchmarks/optiq_peer.py PEER SOURCE_FOLDER OUT --calibration TEXT.jsonl [--tokens 8192] [--work DIR]

PEER is ``optiq-<target bpw>`` (its default candidate bits, 4 and 8) or
``optiq-<target bpw>-wide`` (2, 3, 4, 5, 6 and 8). ``--calibration`` is a JSONL file
in optiq's schema (``{"domain": ..., "text": ...}`` per line); ``quality_table.py``
writes it from the packaged calibration text. Its probes read ``--tokens`` of it in
sequences of 512 (optiq's length), group size 64, its reference the source in memory
(``bf16`` mode: the folder's own dtype), no baseline folders. ``--work DIR`` keeps
optiq's working folder: its sensitivity checkpoint (one entry per module measured) is
read back by the next run with the same folder, so a stopped run resumes (a
temporary folder otherwise).
"""

import argparse
import contextlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

CANDIDATES = {"": [4, 8], "-wide": [2, 3, 4, 5, 6, 8]}
SEQ_LEN = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer")
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--calibration", required=True, help="JSONL in optiq's calibration schema")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens its sensitivity probes read (x 512)")
    parser.add_argument("--work", type=Path, default=None, help="keep optiq's working folder here (a rerun resumes)")
    args = parser.parse_args()
    match = re.fullmatch(r"optiq-(\d+(?:\.\d+)?)(-wide)?", args.peer)
    if not match:
        sys.exit(f"unknown peer {args.peer!r}: optiq-<target bpw>[-wide]")
    from optiq.models.llm import run_llm_pipeline

    target, menu = float(match.group(1)), CANDIDATES[match.group(2) or ""]
    with contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="optiq-peer-") as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        result = run_llm_pipeline(model_name=args.source, output_dir=str(work), target_bpw=target,
                                  n_calibration=max(1, args.tokens // SEQ_LEN), candidate_bits=menu,
                                  group_size=64, skip_baselines=True, reference="bf16",
                                  calibration_mix=str(Path(args.calibration).resolve()))
        shutil.move(result["optiq_path"], args.out)


if __name__ == "__main__":
    main()
