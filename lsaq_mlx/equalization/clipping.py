"""Clipping before round to nearest (AWQ's second step): each group's range shrunk to
``p [min, max]`` for the ``p`` on a grid that gives the group the lowest output error
``e H_gg e^T``, ``H_gg`` the group's diagonal block of the module's input Hessian (the
terms between groups are left out, as mlx_lm.awq leaves them out). A group whose
extremes are outliers gives them up for a finer step on the rest.
"""

import mlx.core as mx
import numpy as np

from lsaq_mlx.planning.choices import Affine

SHRINKS = 10  # p = 1, 0.95, ..., 0.55 (mlx_lm.awq: down to 0.5 in steps of 1/20)
UNCLIPPED = ("q_proj", "k_proj", "qkv_proj")  # their errors meet in the softmax; mlx_lm.awq leaves them too


def clip_ratios() -> list[float]:
    return [1.0 - k / (2 * SHRINKS) for k in range(SHRINKS)]


def group_blocks(hessian: np.ndarray, group_size: int) -> mx.array:
    """The diagonal blocks of ``hessian``, one per group of columns: (groups, g, g)."""
    g = group_size
    return mx.array(np.stack([hessian[i : i + g, i : i + g] for i in range(0, hessian.shape[0], g)]), dtype=mx.float32)


def clipped_weight(weight: mx.array, blocks: mx.array, choice: Affine) -> mx.array:
    """``weight`` (rows, cols; any rows of a module) with each group clipped to its
    best range, given the module's ``group_blocks``."""
    rows, cols = weight.shape
    g, n = choice.group_size, cols // choice.group_size
    w = weight.astype(mx.float32).reshape(rows, n, g)
    low, high = w.min(axis=2, keepdims=True), w.max(axis=2, keepdims=True)
    best, best_error = w, None
    for p in clip_ratios():
        c = mx.clip(w, p * low, p * high)
        q, s, b = mx.quantize(c.reshape(rows, cols), g, choice.bits)
        s, b = (a.astype(mx.float16).astype(mx.float32) for a in (s, b))
        e = (w - mx.dequantize(q, s, b, g, choice.bits).reshape(rows, n, g)).transpose(1, 0, 2)  # (groups, rows, g)
        error = mx.sum((e @ blocks) * e, axis=2).T  # (rows, groups)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_error = mx.where(better, error, best_error)
        best = mx.where(better[..., None], c, best)
        mx.eval(best, best_error)
    return best.reshape(rows, cols)
