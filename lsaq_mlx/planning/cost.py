"""The cost model of the ``lsaq`` allocator.

    cost(module m, choice c) = weight(layer of m) * sum_ij F_ij (W_ij - Q_c(W)_ij)^2

``F`` is the diagonal empirical Fisher information of the weights on calibration text
(the mean squared gradient of the next-token loss), so the sum estimates twice the loss
increase that quantizing ``W`` with choice ``c`` causes (a second-order Taylor
expansion). ``Q`` is MLX's affine round trip with float16 scales and biases, exactly
what the written model holds. ``weight`` is the layer's LSAQ (jaccard) importance over
the mean importance, raised to a power (embeddings and the LM head get the largest
layer weight); measured best at power 0 (``PlanRequest.importance_power``), where it is
1 for every layer. Costs add over modules: the allocator minimizes their sum under the
byte budget.
``benchmarks/quality_table.py`` checks that the summed cost ranks held-out plans like their
measured KL divergence.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lsaq_mlx.modules import module_at
from lsaq_mlx.planning.choices import KEEP, Affine
from lsaq_mlx.planning.plan import QuantModule
from lsaq_mlx.swsc.codec import compress

def roundtrip(w: mx.array, choice: Affine) -> mx.array:
    """``w`` quantized with ``choice`` and dequantized, scales and biases in float16."""
    q, scales, biases = mx.quantize(w, choice.group_size, choice.bits)
    f16 = lambda a: a.astype(mx.float16).astype(mx.float32)
    return mx.dequantize(q, f16(scales), f16(biases), choice.group_size, choice.bits)


def quantization_errors(model: nn.Module, modules: list[QuantModule], fisher: dict | None = None, progress=None) -> dict:
    """``{path: {choice.key: err}}`` for every choice of ``module.choices()`` (0 for keep):
    the Fisher-weighted squared weight error ``sum F (W - Q(W))^2`` (plain squared error
    without ``fisher``)."""
    table = {}
    for q in modules:
        w = module_at(model, q.path).weight.astype(mx.float32)
        f = fisher[q.path] if fisher else mx.ones_like(w)
        errs = {}
        for choice in q.choices():
            if choice == KEEP:
                errs[choice.key] = mx.array(0.0)
                continue
            diff = w - roundtrip(w, choice)
            errs[choice.key] = (f * diff * diff).sum()
        mx.eval(list(errs.values()))
        table[q.path] = {k: e.item() for k, e in errs.items()}
        if progress:
            progress(1)
    return table


def swsc_errors(model: nn.Module, options: dict, fisher: dict | None = None, progress=None) -> dict:
    """``{path: {choice.key: err}}`` for the SWSC choices ``options[path]``: the same
    Fisher-weighted squared error, of the matrix each SWSC setting reconstructs (k-means
    and SVD run)."""
    table = {}
    for path, choices in options.items():
        w = module_at(model, path).weight.astype(mx.float32)
        f = fisher[path] if fisher else mx.ones_like(w)
        errs = {}
        for choice in choices:
            diff = w - compress(w, choice.settings).dense()
            errs[choice.key] = (f * diff * diff).sum().item()
        table[path] = errs
        if progress:
            progress(1)
    return table


def layer_weights(importance: list[float] | None, modules: list[QuantModule], power: float = 0.0) -> dict:
    """``{path: weight}``: the importance of the module's layer over the mean importance,
    to ``power`` (1 for every module without importance). Weighting layers by their
    jaccard importance on top of the Fisher made plans worse on SmolLM2 (KL at 4.0 bits
    per weight: 0.69 with power 0, 1.00 with 1, 1.21 with 2; see README), so the default
    is 0 and the Fisher alone carries importance."""
    if importance is None or power == 0:
        return {q.path: 1.0 for q in modules}
    imp = np.maximum(np.asarray(importance, dtype=float), 1e-6)
    rel = (imp / imp.mean()) ** power
    return {q.path: float(rel[q.layer] if q.layer is not None else rel.max()) for q in modules}


def fisher_diagonal(model: nn.Module, modules: list[QuantModule], sequences, progress=None) -> dict:
    """The diagonal of the empirical Fisher information of every quantizable weight:
    the mean over calibration sequences of the squared gradient of the next-token
    cross-entropy. ``sum F * dW^2 / 2`` estimates the loss increase a weight change dW
    causes (second-order Taylor expansion with the Fisher for the Hessian)."""
    from mlx.utils import tree_flatten

    model.freeze()
    for q in modules:
        module_at(model, q.path).unfreeze(keys=["weight"])

    def loss(tokens):
        logits = model(tokens[None, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, tokens[None, 1:]).mean()

    grad_fn = nn.value_and_grad(model, loss)
    sums = {}
    try:
        for seq in sequences:
            _, grads = grad_fn(mx.array(seq))
            flat = dict(tree_flatten(grads))
            for q in modules:
                g = flat[f"{q.path}.weight"].astype(mx.float32)
                sums[q.path] = sums[q.path] + g * g if q.path in sums else g * g
            mx.eval(sums)
            if progress:
                progress(len(seq))
    finally:
        model.unfreeze()
    return {p: v / len(sequences) for p, v in sums.items()}
