"""Layer importance metrics: LSAQ Jaccard, cosine (Block Influence), ZD, random, sensitivity.

All return one score per decoder layer, higher = more important.
"""

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from lsaq_mlx.backend.attention import causal_attention_in_blocks
from lsaq_mlx.backend.hybrid import exact_dequantize
from lsaq_mlx.backend.compute import dequantize_layers
from lsaq_mlx.backend.cores import map_on_cores
from lsaq_mlx.scoring.divergence import token_kl
from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import inner_model
from lsaq_mlx.scoring.lens import find_lens, layer_hooks


def jaccard_per_position(a: mx.array, b: mx.array) -> mx.array:
    """Jaccard similarity of the id sets in each row of ``a`` and ``b`` (positions, k)."""
    k = a.shape[-1]
    inter = (a[:, :, None] == b[:, None, :]).sum(axis=(1, 2)).astype(mx.float32)
    return inter / (2 * k - inter)


def jaccard_of_union(a: mx.array, b: mx.array, vocab: int) -> mx.array:
    """Jaccard similarity of the union of all rows' ids of ``a`` and of ``b``."""
    sa = mx.zeros((vocab,), mx.int32).at[a.reshape(-1)].add(1) > 0
    sb = mx.zeros((vocab,), mx.int32).at[b.reshape(-1)].add(1) > 0
    return (sa & sb).sum() / (sa | sb).sum()


def cosine_per_position(x: mx.array, y: mx.array) -> mx.array:
    dot = (x * y).sum(axis=-1)
    return dot / (mx.linalg.norm(x, axis=-1) * mx.linalg.norm(y, axis=-1) + 1e-12)


def lens_statistics(model, sequences, k=10, stride=1, sets="position", with_jaccard=True, progress=None,
                    workers=None):
    """Mean Jaccard similarity of the logit-lens top-k sets entering and leaving each
    layer, and mean cosine similarity of the hidden states, over ``sequences``.

    Layer i's output is layer i+1's input, so each position is projected L+1 times;
    nothing but the previous layer's top-k ids is kept between layers. Sequences run
    on ``workers`` threads (default: one per CPU core, see ``lsaq_mlx.backend.cores``).
    Returns ``(jaccard, cosine, positions)``: per-layer means (jaccard is None
    without ``with_jaccard``, which skips the vocabulary projections).
    """
    lens = find_lens(model)
    if not 1 <= k <= lens.vocab_size:
        raise UserError(f"top-k must be between 1 and the vocabulary size {lens.vocab_size}, got {k}")
    inner = inner_model(model)
    n_layers = len(inner["layers"])
    current = threading.local()  # each worker's sequence: its sums and the previous layer's ids

    def on_layer(i, x_in, x_out):
        h_in = x_in[0, ::stride].astype(mx.float32)
        h_out = x_out[0, ::stride].astype(mx.float32)
        cos = cosine_per_position(h_in, h_out).sum()
        mx.eval(cos, x_out)
        current.cos[i] = cos.item()
        if not with_jaccard:
            return
        ids_in = current.ids if i > 0 else lens.top_k(h_in, k)
        ids_out = lens.top_k(h_out, k)
        if sets == "position":
            jac = jaccard_per_position(ids_in, ids_out).sum()
        else:
            jac = jaccard_of_union(ids_in, ids_out, lens.vocab_size)
        mx.eval(jac, ids_out)
        current.jac[i] = jac.item()
        current.ids = ids_out

    def one_sequence(seq):
        current.jac, current.cos = np.zeros(n_layers), np.zeros(n_layers)
        inner(mx.array(seq)[None])
        current.ids = None
        return current.jac, current.cos

    advance = (lambda seq: progress(len(seq))) if progress else None
    # workers can only read arrays that exist: the parameters and what modules keep
    # privately (Gemma 4's rotary frequencies, made lazily)
    mx.eval([a for _, a in tree_flatten(model) if isinstance(a, mx.array)])
    with layer_hooks(model, on_layer), causal_attention_in_blocks():
        per_sequence = map_on_cores(one_sequence, sequences, advance, workers)
    positions = sum(len(range(0, len(seq), stride)) for seq in sequences)
    per_layer_units = positions if sets == "position" else len(sequences)
    jaccard = (sum(jac for jac, _ in per_sequence) / per_layer_units).tolist() if with_jaccard else None
    cosine = (sum(cos for _, cos in per_sequence) / positions).tolist()
    return jaccard, cosine, positions


def linear_weights(layer: nn.Module):
    """Float weights of a decoder layer's linear sublayers (dequantized when quantized)."""
    for _, m in tree_flatten(layer.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)):
        if isinstance(m, nn.QuantizedLinear):
            yield exact_dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
        elif isinstance(m, nn.Linear):
            yield m.weight.astype(mx.float32)


def zscore_scores(model) -> list[float]:
    """ZD: the share of a layer's weights with |z| > 1 (z within each linear sublayer);
    a lower share means a more important layer, so the score is 1 - share."""
    return [layer_zscore(layer) for layer in inner_model(model)["layers"]]


def layer_zscore(layer: nn.Module) -> float:
    """One layer's ZD score: 1 - the share of its linear weights with |z| > 1."""
    outside = total = 0
    for w in linear_weights(layer):
        z = (w - w.mean()) / (mx.sqrt(w.var()) + 1e-12)
        outside += (mx.abs(z) > 1).sum().item()
        total += w.size
    return 1.0 - outside / total


def random_scores(n_layers: int, seed: int = 0) -> list[float]:
    return np.random.default_rng(seed).random(n_layers).tolist()


def sensitivity_scores(model, sequences, bits: int = 3, group_size: int = 32, progress=None) -> list[float]:
    """Mean KL(reference || model) per token when only layer i is quantized to ``bits``.

    The reference logits of each sequence are computed once; each layer's linear
    weights are swapped for their quantize-dequantize round trip, then restored.
    """
    dequantize_layers(model)
    layers = inner_model(model)["layers"]
    kl_sum, count = np.zeros(len(layers)), 0
    for seq in sequences:
        tokens = mx.array(seq)[None]
        ref = model(tokens)[0]
        mx.eval(ref)
        for i, layer in enumerate(layers):
            with quantized_layer(layer, bits, group_size):
                kl = token_kl(ref, model(tokens)[0]).sum()
                mx.eval(kl)
            kl_sum[i] += kl.item()
        count += len(seq)
        if progress:
            progress(len(seq))
    return (kl_sum / count).tolist()


class quantized_layer:
    """Temporarily replace a layer's linear weights by their quantized round trip."""

    def __init__(self, layer, bits, group_size):
        self.linears = [
            m for _, m in tree_flatten(layer.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module))
            if isinstance(m, nn.Linear)
        ]
        self.bits, self.group_size = bits, group_size

    def __enter__(self):
        self.saved = [m.weight for m in self.linears]
        for m in self.linears:
            group = self.group_size if m.weight.shape[-1] % self.group_size == 0 else 32
            m.weight = mx.dequantize(*mx.quantize(m.weight, group, self.bits), group, self.bits)

    def __exit__(self, *exc):
        for m, w in zip(self.linears, self.saved):
            m.weight = w
