"""The equalizing scales of modules that read one input: ``s = rms(x)^a`` (normalised
so ``sqrt(max(s) min(s)) = 1``) for the ratio ``a`` on a grid that gives the lowest
summed output error ``tr(E H E^T)`` of round-to-nearest, ``E = W - Q(W diag(s)) / s``,
each module at its planned bits and group size.

mlx_lm.awq takes ``mean |x|`` from stored activations and measures the block's output;
here ``rms(x)`` is the Hessian's diagonal and each module's output error its Hessian
form, so nothing but ``H`` is kept. The ratio 0 (no scaling) is on the grid: the chosen
scales never raise the measured error.
"""

import mlx.core as mx
import numpy as np

from lsaq_mlx.planning.choices import Affine

GRID = 20  # ratios 0, 1/20, ..., 19/20 (mlx_lm.awq's default grid)
SEARCH_FLOPS = 1 << 33  # per module and ratio: rows are sampled so E @ H stays near this


def equalizing_scales(weights: list[mx.array], hessian: np.ndarray, choices: list[Affine]) -> np.ndarray | None:
    """Float32 scales (one per input channel) for ``weights`` (out, in) sharing the input
    of ``hessian`` (in, in), each quantized as its ``choices`` entry; None when no ratio
    beats leaving the weights unscaled."""
    h = mx.array(hessian, dtype=mx.float32)
    rms = mx.sqrt(mx.maximum(mx.diagonal(h), 0.0))
    sampled = [_sample_rows(w.astype(mx.float32), h.shape[0]) for w in weights]
    best, best_error = None, None
    for step in range(GRID):
        scales = _scales(rms, step / GRID)
        error = sum(_output_error(w, h, scales, c) for w, c in zip(sampled, choices)).item()
        if best_error is None or error < best_error:
            best, best_error = (None if step == 0 else scales), error
    return None if best is None else np.array(best)


def _scales(rms: mx.array, ratio: float) -> mx.array:
    s = mx.maximum(rms ** ratio, 1e-4)
    return s / mx.sqrt(s.max() * s.min())


def _sample_rows(w: mx.array, cols: int) -> mx.array:
    """Evenly spaced rows of ``w``: the error is a sum over rows, so a sample ranks ratios."""
    rows = max(64, SEARCH_FLOPS // (cols * cols))
    if rows >= w.shape[0]:
        return w
    return w[mx.array(np.linspace(0, w.shape[0] - 1, rows).astype(np.int32))]


def _output_error(w: mx.array, h: mx.array, scales: mx.array, choice: Affine) -> mx.array:
    scaled = w * scales
    q, s, b = mx.quantize(scaled, choice.group_size, choice.bits)
    s, b = (a.astype(mx.float16).astype(mx.float32) for a in (s, b))  # as the model stores them
    d = w - mx.dequantize(q, s, b, choice.group_size, choice.bits) / scales
    return mx.sum((d @ h) * d)
