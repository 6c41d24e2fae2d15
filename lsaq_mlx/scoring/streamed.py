"""The layer metrics on a ``StreamedModel``: one layer in memory at a time.

The calibration sequences go through the model as one batch, layer after layer
(``StreamedModel.run_layers``); shorter sequences are padded at the end, which causal
attention never lets reach a real position, and padded positions are left out of every
statistic. Results equal the whole-model metrics of ``scoring.metrics`` (summation
order aside).
"""

import mlx.core as mx
import numpy as np

from lsaq_mlx.errors import UserError
from lsaq_mlx.scoring.divergence import token_kl
from lsaq_mlx.scoring.lens import find_lens
from lsaq_mlx.scoring.metrics import cosine_per_position, jaccard_of_union, jaccard_per_position, layer_zscore, quantized_layer


def batch(sequences: list[list[int]]) -> tuple[mx.array, np.ndarray]:
    """``(tokens, valid)``: the sequences right-padded to one length, and which positions are real."""
    length = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), length), np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = seq
        valid[row, : len(seq)] = True
    return mx.array(tokens), valid


def lens_statistics(streamed, sequences, k=10, stride=1, sets="position", with_jaccard=True, progress=None):
    """As ``scoring.metrics.lens_statistics``, one layer at a time."""
    lens = find_lens(streamed.model)
    if not 1 <= k <= lens.vocab_size:
        raise UserError(f"top-k must be between 1 and the vocabulary size {lens.vocab_size}, got {k}")
    tokens, valid = batch(sequences)
    kept = valid[:, ::stride]  # (batch, positions lensed)
    rows, cols = np.nonzero(kept)
    n_layers = len(streamed.layers)
    jac, cos, state = np.zeros(n_layers), np.zeros(n_layers), {}

    def positions(h):  # (positions lensed, hidden), real ones only
        return h[:, ::stride].astype(mx.float32)[mx.array(rows), mx.array(cols)]

    def on_layer(i, layer, x_in, x_out, forward):
        h_in, h_out = positions(x_in), positions(x_out)
        c = cosine_per_position(h_in, h_out).sum()
        mx.eval(c)
        cos[i] = c.item()
        if with_jaccard:
            ids_in = state["ids"] if i > 0 else lens.top_k(h_in, k)
            ids_out = lens.top_k(h_out, k)
            if sets == "position":
                j = jaccard_per_position(ids_in, ids_out).sum()
            else:  # one set per sequence: the union of its positions' ids
                j = sum(jaccard_of_union(ids_in[mx.array(np.nonzero(rows == r)[0])],
                                         ids_out[mx.array(np.nonzero(rows == r)[0])], lens.vocab_size)
                        for r in range(len(sequences)))
            mx.eval(j, ids_out)
            jac[i] = float(j.item() if hasattr(j, "item") else j)
            state["ids"] = ids_out
        if progress:
            progress(sum(len(s) for s in sequences) / n_layers)

    streamed.run_layers(tokens, on_layer)
    count = len(rows)
    per_layer_units = count if sets == "position" else len(sequences)
    return (jac / per_layer_units).tolist() if with_jaccard else None, (cos / count).tolist(), count


def zscore_scores(streamed) -> list[float]:
    """As ``scoring.metrics.zscore_scores``, loading one layer at a time."""
    scores = []
    for i in range(len(streamed.layers)):
        with streamed.layer(i) as layer:
            scores.append(layer_zscore(layer))
    return scores


def sensitivity_scores(streamed, sequences, bits: int = 3, group_size: int = 32, progress=None) -> list[float]:
    """As ``scoring.metrics.sensitivity_scores``: the KL at the logits when only layer i
    is quantized to ``bits``. Layer by layer, the batch's clean hidden states go on
    beside one variant per layer already passed (that layer quantized), so each layer
    is read once; memory holds (layers + 1) x the batch's hidden states."""
    tokens, valid = batch(sequences)
    lens = find_lens(streamed.model)
    variants: list[mx.array] = []  # variant j: layer j ran quantized

    def on_layer(i, layer, x_in, x_out, forward):
        # the variants of earlier layers through this layer as it is; then this layer's own
        for j, h in enumerate(variants):
            variants[j] = forward(h)
        with quantized_layer(layer, bits, group_size):
            variants.append(forward(x_in))
        mx.eval(variants)
        if progress:
            progress(sum(len(s) for s in sequences) / len(streamed.layers))

    clean = streamed.run_layers(tokens, on_layer)
    mask = mx.array(valid)
    ref = lens.logits(clean)
    scores = []
    for h in variants:
        kl = (token_kl(ref, lens.logits(h)) * mask).sum()
        mx.eval(kl)
        scores.append(kl.item() / int(valid.sum()))
    return scores

