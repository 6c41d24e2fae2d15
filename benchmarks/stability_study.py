"""Stability of the LSAQ (jaccard) layer ranking: which top-k, how many tokens, which stride?

    python benchmarks/stability_study.py [--model default] [--calib PATH] [--seq-len 512] [--sums FILE]

One pass over the calibration text records, for every sequence, layer, k in
{1, 5, 10, 20, 50} and position residue p mod 16, the summed Jaccard similarity of the
logit-lens top-k sets (the top-50 ids are sorted by logit, so top-k is their first k).
Any token budget T is then the first T/seq_len sequences, and any position stride S
dividing 16 the residues that are multiples of S (scoring lenses positions 0, S, 2S...).
It prints the Spearman correlation of the layer ranking (a) between two disjoint
samples of T tokens and (b) between T tokens and a 4x larger sample (4T tokens at
stride 1, containing the first):

1. by k and T at stride 1, and the default it implies: the smallest T (then the most
   stable k) whose ranking correlates >= 0.95 with 4T tokens;
2. by T and S at the default k, with the measured wall time of scoring one sequence at
   each stride (the model forward and the lens, with the real ``lens_statistics``), and
   the default it implies: the smallest cost T/seq_len * time(S) whose ranking
   correlates >= 0.95 with 4T tokens. As a check of that single comparison it also
   gives the lowest correlation over all disjoint 4T blocks of the sample.

``--sums FILE`` keeps the pass's sums (.npz) and reuses them when FILE exists.
"""

import argparse
import math
import os
import time

import mlx.core as mx
import numpy as np

from lsaq_mlx.backend.blas import reexec_with_fast_blas
from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
from lsaq_mlx.scoring.metrics import jaccard_per_position, lens_statistics
from lsaq_mlx.modules import inner_model
from lsaq_mlx.scoring.lens import find_lens, layer_hooks
from lsaq_mlx.scoring.scores import DEFAULT_TOP_K, spearman
from lsaq_mlx.sources import load_model, resolve_model

KS = (1, 5, 10, 20, 50)
BUDGETS = (512, 1024, 2048, 4096)
STRIDES = (1, 2, 4, 8, 16)
RESIDUES = max(STRIDES)  # every stride divides it
SHARED_CALIB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "calib", "sotu-1900-1960.txt")


def per_sequence_jaccard(model, sequences) -> np.ndarray:
    """Array (sequences, layers, len(KS), RESIDUES): per-position Jaccard similarities
    summed over the positions p of each residue p mod RESIDUES."""
    lens, kmax = find_lens(model), max(KS)
    n_layers = len(inner_model(model)["layers"])
    out = np.zeros((len(sequences), n_layers, len(KS), RESIDUES))
    state = {}

    def ordered_top(h):
        return lens.top_k(h.astype(mx.float32), kmax, ordered=True)

    def on_layer(i, x_in, x_out):
        ids_in = state.pop("ids") if i > 0 else ordered_top(x_in[0])
        ids_out = ordered_top(x_out[0])
        per_position = mx.stack([jaccard_per_position(ids_in[:, :k], ids_out[:, :k]) for k in KS])
        mx.eval(per_position, ids_out)
        values = np.array(per_position)
        padded = np.zeros((len(KS), math.ceil(values.shape[1] / RESIDUES) * RESIDUES))
        padded[:, : values.shape[1]] = values
        out[state["seq"], i] = padded.reshape(len(KS), -1, RESIDUES).sum(1)
        state["ids"] = ids_out

    with layer_hooks(model, on_layer):
        for s, seq in enumerate(sequences):
            state["seq"] = s
            inner_model(model)(mx.array(seq)[None])
    return out


def ranking_scores(sums: np.ndarray, n_seq: int, k_index: int, stride: int = 1, first: int = 0) -> list[float]:
    """Layer scores (up to a positive factor) from sequences first..first+n_seq lensed at ``stride``."""
    return (1 - sums[first : first + n_seq, :, k_index, ::stride].sum((0, 2))).tolist()


def stride_seconds(model, sequence, k: int, repeats: int = 3) -> dict[int, float]:
    """Wall seconds of jaccard scoring (``lens_statistics``) of one sequence at each
    stride, the fastest of ``repeats`` rounds over all strides (so a change of load on a
    shared CPU hits them alike); stride 0 is the forward without the lens."""
    seconds = dict.fromkeys((0, *STRIDES), float("inf"))
    for _ in range(repeats):
        for stride in seconds:
            start = time.perf_counter()
            lens_statistics(model, [sequence], k, max(stride, 1), with_jaccard=stride > 0)
            seconds[stride] = min(seconds[stride], time.perf_counter() - start)
    return seconds


def jaccard_sums(model, main_seqs, other_seqs, path: str | None):
    if path and os.path.exists(path):
        saved = np.load(path)
        return saved["main"], saved["other"], 0.0
    start = time.perf_counter()
    main_sums, other_sums = per_sequence_jaccard(model, main_seqs), per_sequence_jaccard(model, other_seqs)
    elapsed = time.perf_counter() - start
    if path:
        np.savez(path, main=main_sums, other=other_sums)
    return main_sums, other_sums, elapsed


def k_table(main_sums, other_sums, seq_len: int) -> None:
    print("Spearman correlation of the jaccard layer ranking: disjoint samples of T tokens / T vs 4T tokens\n")
    print("| T tokens | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    results = {}
    for t in BUDGETS:
        n = t // seq_len
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


def stride_table(main_sums, other_sums, seq_len: int, seconds: dict[int, float]) -> None:
    j = KS.index(DEFAULT_TOP_K)
    print(f"\nMeasured wall time of jaccard scoring (k={DEFAULT_TOP_K}) of one {seq_len}-token sequence:\n")
    print("| stride | seconds | lens share |")
    print("|---|---|---|")
    print(f"| no lens (forward + cosine) | {seconds[0]:.2f} | 0% |")
    for s in STRIDES:
        print(f"| {s} | {seconds[s]:.2f} | {1 - seconds[0] / seconds[s]:.0%} |")
    print(f"\nk={DEFAULT_TOP_K}: disjoint samples of T tokens at stride S / T tokens at stride S vs 4T at stride 1 / "
          "lowest of the latter over the disjoint 4T blocks (count); cost = T/seq_len x seconds(S)\n")
    print("| T tokens | " + " | ".join(f"S={s}" for s in STRIDES) + " |")
    print("|---|" + "---|" * len(STRIDES))
    results = {}
    for t in BUDGETS:
        n = t // seq_len
        blocks = len(main_sums) // (4 * n)
        if not blocks:
            continue
        reference = [ranking_scores(main_sums, 4 * n, j, first=4 * n * b) for b in range(blocks)]
        for s in STRIDES:
            a = ranking_scores(main_sums, n, j, s)
            worst = min(spearman(ranking_scores(main_sums, n, j, s, 4 * n * b), reference[b]) for b in range(blocks))
            results[t, s] = (spearman(a, ranking_scores(other_sums, n, j, s)), spearman(a, reference[0]), worst,
                             n * seconds[s], blocks)
        print(f"| {t} ({blocks}) | " + " | ".join(
            "{:.3f} / {:.3f} / {:.3f}".format(*results[t, s][:3]) for s in STRIDES) + " |")
    print("\n| T tokens | " + " | ".join(f"S={s}" for s in STRIDES) + " |")
    print("|---|" + "---|" * len(STRIDES))
    for t in BUDGETS:
        if (t, 1) in results:
            print(f"| {t} | " + " | ".join(f"{results[t, s][3]:.1f} s" for s in STRIDES) + " |")
    stable = [(cost, t, s) for (t, s), (_, larger, _, cost, _) in results.items() if larger >= 0.95]
    if stable:
        cost, t, s = min(stable)
        disjoint, larger, worst, _, blocks = results[t, s]
        print(f"\ndefault: {t} tokens, stride {s}: {cost:.1f} s (rho vs 4x = {larger:.3f}, lowest over {blocks} "
              f"blocks = {worst:.3f}, disjoint = {disjoint:.3f}); stride 1 at {t} tokens: {results[t, 1][3]:.1f} s")
    else:
        print("\nno (T, stride) reached rho >= 0.95 against 4x the tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--calib", default=SHARED_CALIB)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sums", default=None, help="keep the pass's sums in this .npz file; reuse it when it exists")
    args = parser.parse_args()
    reexec_with_fast_blas()

    source = resolve_model(args.model)
    model, tokenizer, _ = load_model(source)
    calib = load_calibration(args.calib)
    tmax = max(BUDGETS)
    main_seqs = token_sequences(tokenizer, calib, 4 * tmax, args.seq_len)
    # the disjoint sample starts well past the 4x sample
    other_seqs = token_sequences(tokenizer, calib, tmax, args.seq_len, skip_tokens=5 * tmax)
    main_sums, other_sums, elapsed = jaccard_sums(model, main_seqs, other_seqs, args.sums)
    seconds = stride_seconds(model, main_seqs[0], DEFAULT_TOP_K)
    n_tokens = sum(map(len, main_seqs)) + sum(map(len, other_seqs))

    print(f"model: {args.model} ({len(main_sums[0])} layers); calibration: {os.path.basename(args.calib)}; "
          f"seq_len {args.seq_len}; {n_tokens} tokens lensed" +
          (f" in {elapsed:.0f} s ({n_tokens / elapsed:.0f} tok/s)\n" if elapsed else f" (read from {args.sums})\n"))
    k_table(main_sums, other_sums, args.seq_len)
    stride_table(main_sums, other_sums, args.seq_len, seconds)


if __name__ == "__main__":
    main()
