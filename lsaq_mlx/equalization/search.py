"""The equalizing scales of modules that read one input: ``s = rms(x)^a`` (normalised
so ``sqrt(max(s) min(s)) = 1``) for the ratio ``a`` on a grid that gives the lowest
error of round to nearest, ``Q(W diag(s)) / s`` in place of each ``W`` at its planned
bits and group size. The error is either the modules' summed output error
``tr(E H E^T)`` (``E`` the weight error; exact for a module whose output goes on
linearly, as ``down_proj``'s) or, given ``layer_error``, the error of the decoder
layer's output on calibration sequences (for modules whose outputs meet in a
nonlinearity: q, k and v in the attention softmax).

mlx_lm.awq takes ``mean |x|`` from stored activations; here ``rms(x)`` comes from the
Hessian's diagonal, so no activations are kept. The ratio 0 (no scaling) is on the
grid: the chosen scales never raise the measured error.
"""

from typing import Callable

import mlx.core as mx
import numpy as np

from lsaq_mlx.planning.choices import Affine

GRID = 20  # ratios 0, 1/20, ..., 19/20 (mlx_lm.awq's default grid)
SEARCH_FLOPS = 1 << 33  # per module and ratio: rows are sampled so E @ H stays near this


def equalizing_scales(weights: list[mx.array], hessian: np.ndarray, choices: list[Affine],
                      layer_error: Callable[[list[mx.array]], float] | None = None) -> np.ndarray | None:
    """Float32 scales (one per input channel) for ``weights`` (out, in) sharing the input
    of ``hessian`` (in, in), each quantized as its ``choices`` entry; None when no ratio
    beats leaving the weights unscaled. ``layer_error(weights)``: the layer's output
    error with these (dequantized) weights in place of the originals."""
    rms = mx.array(np.sqrt(np.maximum(np.diagonal(hessian), 0.0)), dtype=mx.float32)
    sampled = [_sample_rows(w.astype(mx.float32), hessian.shape[0]) for w in weights]
    best, best_error = None, None
    for step in range(GRID):
        scales = _scales(rms, step / GRID)
        if layer_error is not None:
            error = layer_error([_rounded(w, scales, c) for w, c in zip(weights, choices)])
        else:
            error = sum(_hessian_form(np.array(w - _rounded(w, scales, c)), hessian) for w, c in zip(sampled, choices))
        if best_error is None or error < best_error:
            best, best_error = (None if step == 0 else scales), error
    return None if best is None else np.array(best)


def _hessian_form(d: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(d H d^T)``, in numpy: ``H`` is not copied (an 8B down_proj's is 0.8 GB)."""
    return float(np.einsum("ij,ij->", d @ hessian, d, dtype=np.float64))


def _scales(rms: mx.array, ratio: float) -> mx.array:
    s = mx.maximum(rms ** ratio, 1e-4)
    return s / mx.sqrt(s.max() * s.min())


def _sample_rows(w: mx.array, cols: int) -> mx.array:
    """Evenly spaced rows of ``w``: the error is a sum over rows, so a sample ranks ratios."""
    rows = max(64, SEARCH_FLOPS // (cols * cols))
    if rows >= w.shape[0]:
        return w
    return w[mx.array(np.linspace(0, w.shape[0] - 1, rows).astype(np.int32))]


def _rounded(w: mx.array, scales: mx.array, choice: Affine) -> mx.array:
    """``Q(W diag(s)) / s``: what the module computes with once equalized and quantized."""
    q, s, b = mx.quantize(w.astype(mx.float32) * scales, choice.group_size, choice.bits)
    s, b = (a.astype(mx.float16).astype(mx.float32) for a in (s, b))  # as the model stores them
    return mx.dequantize(q, s, b, choice.group_size, choice.bits) / scales
