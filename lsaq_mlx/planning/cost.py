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
    f16 = lambda a: a.astype(mx.float16).astype(mx.float32)
    return mx.dequantize(q, f16(scales), f16(biases), choice.group_size, choice.bits)


CHUNK_BYTES = 64 << 20  # float32 bytes of the rows one candidate is evaluated on at a time


def module_errors(weight: mx.array, fisher: mx.array, choices) -> dict[str, float]:
    """``{choice.key: sum F (W - Q(W))^2}`` for ``weight`` (float32, evaluated) and its
    Fisher: one choice at a time on row chunks of bounded size, the chunks spread over
    the CPU's cores (``backend.cores``); 0 for keep."""
    step = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
    chunks = [(weight[r : r + step], fisher[r : r + step]) for r in range(0, weight.shape[0], step)]
    if len(chunks) < 2:  # at least one chunk per core
        half = max(1, weight.shape[0] // 2)
        chunks = [(weight[r : r + half], fisher[r : r + half]) for r in range(0, weight.shape[0], half)]
    mx.eval(chunks)

    def chunk_errors(chunk, choices) -> list[float]:
        w, f = chunk
        errs = []
        for choice in choices:
            if choice == KEEP:
                errs.append(0.0)
                continue
            reconstructed = compress(w, choice.settings).dense() if isinstance(choice, SWSC) else roundtrip(w, choice)
            err = (f * mx.square(w - reconstructed)).sum()
            mx.eval(err)
            errs.append(err.item())
        return errs

    affine = [c for c in choices if not isinstance(c, SWSC)]
    per_chunk = map_on_cores(lambda chunk: chunk_errors(chunk, affine), chunks)
    errors = {c.key: float(sum(errs[j] for errs in per_chunk)) for j, c in enumerate(affine)}
    swsc = [c for c in choices if isinstance(c, SWSC)]  # k-means and SVD see the whole matrix
    return errors | dict(zip((c.key for c in swsc), chunk_errors((weight, fisher), swsc)))


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
