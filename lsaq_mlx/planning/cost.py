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
import numpy as np

from lsaq_mlx.backend.cores import map_on_cores
from lsaq_mlx.planning.choices import KEEP, SWSC, Affine
from lsaq_mlx.planning.plan import QuantModule
from lsaq_mlx.swsc.codec import compress


def roundtrip(w: mx.array, choice: Affine) -> mx.array:
    """``w`` quantized with ``choice`` and dequantized, scales and biases in float16."""
    q, scales, biases = mx.quantize(w, choice.group_size, choice.bits)
    return mx.dequantize(q, _f16(scales), _f16(biases), choice.group_size, choice.bits)


CHUNK_BYTES = 4 << 20  # float32 bytes of the rows priced at a time (see module_errors)


def module_errors(weight: mx.array, fisher: mx.array, choices) -> dict[str, float]:
    """``{choice.key: sum F (W - Q(W))^2}`` for ``weight`` (float32, evaluated) and its
    Fisher; 0 for keep. Affine choices are priced on row chunks spread over the CPU's
    cores (``backend.cores``). The chunks are small so that their temporaries are
    reused from the allocator's cache and stay in the CPU's: whole 64 MB chunks spent a
    third of an 8B conversion's CPU time in the kernel, mapping fresh pages."""
    step = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
    if weight.shape[0] <= step:  # at least one chunk per core
        step = max(1, -(-weight.shape[0] // 2))
    chunks = [slice(r, r + step) for r in range(0, weight.shape[0], step)]
    mx.eval(weight, fisher)  # the workers may only read evaluated arrays
    affine = [c for c in choices if isinstance(c, Affine)]
    per_chunk = map_on_cores(lambda rows: affine_errors(weight[rows], fisher[rows], affine), chunks)
    errors = {c.key: float(sum(errs[j] for errs in per_chunk)) for j, c in enumerate(affine)}
    for choice in choices:
        if choice == KEEP:
            errors[choice.key] = 0.0
        elif isinstance(choice, SWSC):  # k-means and SVD see the whole matrix
            err = (fisher * mx.square(weight - compress(weight, choice.settings).dense())).sum()
            errors[choice.key] = err.item()
    return errors


def affine_errors(w: mx.array, f: mx.array, choices: list[Affine]) -> list[float]:
    """``sum f (w - Q(w))^2`` for each affine choice: ``roundtrip``'s values (tested),
    computed elementwise from each group's minimum and maximum, which every bit width
    of a group size shares. This avoids MLX's pack and unpack of the codes, slow on the
    CPU for 3, 5 and 6 bits: about 2x faster over the 18 candidates."""
    errors = {}
    for size in sorted({c.group_size for c in choices}):
        wg = w.reshape(w.shape[0], -1, size)
        fg = f.reshape(wg.shape)
        low, high = wg.min(axis=-1, keepdims=True), wg.max(axis=-1, keepdims=True)
        mx.eval(low, high)
        for choice in (c for c in choices if c.group_size == size):
            levels = float((1 << choice.bits) - 1)
            scale, bias = affine_scales(low, high, levels)
            codes = mx.clip(mx.round((wg - bias) / scale), 0.0, levels)
            err = (fg * mx.square(wg - (codes * _f16(scale) + _f16(bias)))).sum()
            errors[choice] = err.item()
    return [errors[c] for c in choices]


def affine_scales(low: mx.array, high: mx.array, levels: float) -> tuple[mx.array, mx.array]:
    """The scale and bias ``mx.quantize`` gives groups with these extremes (its CPU
    kernel's arithmetic: the extreme of larger magnitude lands exactly on a code)."""
    low_is_edge = mx.abs(low) > mx.abs(high)
    scale = mx.maximum((high - low) / levels, 1e-7)
    scale = mx.where(low_is_edge, scale, -scale)
    edge = mx.where(low_is_edge, low, high)
    q0 = mx.round(edge / scale)
    exact = q0 != 0
    return mx.where(exact, edge / mx.where(exact, q0, 1.0), scale), mx.where(exact, edge, 0.0)


def _f16(a: mx.array) -> mx.array:
    return a.astype(mx.float16).astype(mx.float32)


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
