"""Stability of the LSAQ (jaccard) layer ranking: which top-k and how many tokens?

    python scripts/stability_study.py [--model default] [--calib PATH] [--seq-len 512]

One pass over the calibration text records, for every sequence, layer and k in
{1, 5, 10, 20, 50}, the summed Jaccard similarity of the logit-lens top-k sets (the
top-50 ids are sorted by logit, so top-k is their first k). Any token budget T is
then the first T/seq_len sequences. It prints the Spearman correlation of the layer
ranking (a) between two disjoint samples of T tokens and (b) between T tokens and a
4x larger sample (4T tokens, containing the first), and the default it implies: the
smallest T (then the most stable k) whose ranking correlates >= 0.95 with 4T tokens.
"""

import argparse
import os
import time

import mlx.core as mx
import numpy as np

from lsaq_mlx.blas import reexec_with_fast_blas
from lsaq_mlx.calibration import load_calibration, token_sequences
from lsaq_mlx.importance import jaccard_per_position
from lsaq_mlx.lens import find_lens, inner_model, layer_hooks
from lsaq_mlx.scores import spearman
from lsaq_mlx.sources import load_model, resolve_model

KS = (1, 5, 10, 20, 50)
BUDGETS = (512, 1024, 2048, 4096)
SHARED_CALIB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "calib", "sotu-1900-1960.txt")


def per_sequence_jaccard(model, sequences) -> np.ndarray:
    """Array (sequences, layers, len(KS)) of summed per-position Jaccard similarities."""
    lens, kmax = find_lens(model), max(KS)
    n_layers = len(inner_model(model)["layers"])
    out = np.zeros((len(sequences), n_layers, len(KS)))
    state = {}

    def ordered_top(h):
        return lens.top_k(h.astype(mx.float32), kmax, ordered=True)

    def on_layer(i, x_in, x_out):
        ids_in = state.pop("ids") if i > 0 else ordered_top(x_in[0])
        ids_out = ordered_top(x_out[0])
        sums = mx.stack([jaccard_per_position(ids_in[:, :k], ids_out[:, :k]).sum() for k in KS])
        mx.eval(sums, ids_out)
        out[state["seq"], i] = np.array(sums)
        state["ids"] = ids_out

    with layer_hooks(model, on_layer):
        for s, seq in enumerate(sequences):
            state["seq"] = s
            inner_model(model)(mx.array(seq)[None])
    return out


def ranking_scores(sums: np.ndarray, n_seq: int, k_index: int) -> list[float]:
    return (1 - sums[:n_seq, :, k_index].sum(0)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--calib", default=SHARED_CALIB)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    reexec_with_fast_blas()

    source = resolve_model(args.model)
    model, tokenizer, _ = load_model(source)
    calib = load_calibration(args.calib)
    tmax = max(BUDGETS)
    start = time.perf_counter()
    main_seqs = token_sequences(tokenizer, calib, 4 * tmax, args.seq_len)
    # the disjoint sample starts well past the 4x sample
    other_seqs = token_sequences(tokenizer, calib, tmax, args.seq_len, skip_tokens=5 * tmax)
    main_sums = per_sequence_jaccard(model, main_seqs)
    other_sums = per_sequence_jaccard(model, other_seqs)
    elapsed = time.perf_counter() - start
    n_tokens = sum(map(len, main_seqs)) + sum(map(len, other_seqs))

    print(f"model: {args.model} ({len(main_sums[0])} layers); calibration: {os.path.basename(args.calib)}; "
          f"seq_len {args.seq_len}; {n_tokens} tokens lensed in {elapsed:.0f} s ({n_tokens / elapsed:.0f} tok/s)\n")
    print("Spearman correlation of the jaccard layer ranking: disjoint samples of T tokens / T vs 4T tokens\n")
    print("| T tokens | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    results = {}
    for t in BUDGETS:
        n = t // args.seq_len
        for j, k in enumerate(KS):
            a = ranking_scores(main_sums, n, j)
            results[t, k] = (spearman(a, ranking_scores(other_sums, n, j)), spearman(a, ranking_scores(main_sums, 4 * n, j)))
        print(f"| {t} | " + " | ".join(f"{results[t, k][0]:.3f} / {results[t, k][1]:.3f}" for k in KS) + " |")
    stable = [(t, -results[t, k][0], k) for (t, k), (_, larger) in results.items() if larger >= 0.95]
    if stable:
        t, _, k = min(stable)
        print(f"\ndefault: k={k}, {t} tokens (rho vs 4x = {results[t, k][1]:.3f}, disjoint = {results[t, k][0]:.3f})")
    else:
        print("\nno budget reached rho >= 0.95 against 4x the tokens")

if __name__ == "__main__":
    main()
