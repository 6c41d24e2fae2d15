"""The cost model of the ``lsaq`` allocator.

    cost(module m, choice c) = weight(layer of m) * err(m, c)

``err`` is the relative squared error that quantizing the module's weight W with choice
c causes on its outputs, for inputs with the per-channel energy ``d_j`` measured on
calibration text (the diagonal of E[x x^T]):

    err = sum_j d_j ||W[:, j] - Q(W)[:, j]||^2 / sum_j d_j ||W[:, j]||^2

(with ``d = 1`` when no activations are given: plain weight error). ``Q`` is MLX's
affine round trip with float16 scales and biases, exactly what the written model holds.
``weight`` is the layer's importance divided by the mean importance, so a layer that
changes the logit lens a lot pays more for the same error; embeddings and the LM head
get the largest layer weight. Costs add over modules: the allocator minimizes
their sum under the byte budget. ``scripts/validate_cost_model.py`` checks that the
summed cost ranks held-out plans like their measured KL divergence.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lsaq_mlx.plan import QuantModule


def roundtrip(w: mx.array, choice: dict) -> mx.array:
    """``w`` quantized with ``choice`` and dequantized, scales and biases in float16."""
    q, scales, biases = mx.quantize(w, choice["group_size"], choice["bits"])
    f16 = lambda a: a.astype(mx.float16).astype(mx.float32)
    return mx.dequantize(q, f16(scales), f16(biases), choice["group_size"], choice["bits"])


def quantization_errors(model: nn.Module, modules: list[QuantModule], energy: dict | None = None, progress=None) -> dict:
    """``{path: [err of each choice of module.choices()]}`` (0 for keep)."""
    table = {}
    for q in modules:
        w = _module(model, q.path).weight.astype(mx.float32)
        d = energy.get(q.path) if energy else None
        d = mx.ones((q.cols,)) if d is None else d.astype(mx.float32)
        total = ((w * w) * d).sum()
        errs = []
        for choice in q.choices():
            if choice is False:
                errs.append(0.0)
                continue
            diff = w - roundtrip(w, choice)
            errs.append(((diff * diff) * d).sum() / total)
        mx.eval(errs[:-1])
        table[q.path] = [float(e) for e in errs]
        if progress:
            progress(1)
    return table


def _module(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else m[part]
    return m


def layer_weights(importance: list[float], modules: list[QuantModule]) -> dict:
    """``{path: weight}``: the importance of the module's layer over the mean importance."""
    imp = np.maximum(np.asarray(importance, dtype=float), 1e-6)
    rel = imp / imp.mean()
    return {q.path: float(rel[q.layer] if q.layer is not None else rel.max()) for q in modules}


def input_energy(model: nn.Module, modules: list[QuantModule], sequences) -> dict:
    """Mean squared input of every channel of every quantizable linear module, over
    ``sequences`` (hooks on the modules; only a vector per module is kept)."""
    sums, count = {}, 0
    targets = {q.path: _module(model, q.path) for q in modules if isinstance(_module(model, q.path), nn.Linear)}
    originals = {p: type(m) for p, m in targets.items()}

    def hooked(cls, path):
        def __call__(self, x):
            e = (x.astype(mx.float32) ** 2).reshape(-1, x.shape[-1]).sum(axis=0)
            sums[path] = sums[path] + e if path in sums else e
            mx.eval(sums[path])
            return cls.__call__(self, x)

        return type(f"Energy{cls.__name__}", (cls,), {"__call__": __call__})

    for path, m in targets.items():
        m.__class__ = hooked(type(m), path)
    try:
        for seq in sequences:
            model(mx.array(seq)[None])
            count += len(seq)
    finally:
        for path, m in targets.items():
            m.__class__ = originals[path]
    return {p: s / count for p, s in sums.items()}
