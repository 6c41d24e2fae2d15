"""Scales and biases refitted to fixed codes: with each code of a row fixed, the row's
output error ``(w - w_q) H (w - w_q)^T`` is quadratic in its groups' scales and biases
(``w_q = sum_g s_g q_g + b_g 1_g``), so its minimum is one linear solve of ``2 G``
unknowns (``G`` groups). GPTQ fixes each group's scale and bias before it moves any
column, and then picks codes for weights it has since changed; the solve gives the
scale and bias those codes want, against the module's real output on the calibration
inputs (DWQ learns the same parameters by distillation, end to end). A row keeps its
old values unless the refitted ones, rounded to float16 as stored, lower its error.
"""

import mlx.core as mx
import numpy as np

BLOCK_BYTES = 256 << 20  # float32 bytes of ``B H`` (rows x 2 x cols x cols / group) at once
RIDGE = 1e-6  # of the system's mean diagonal: groups whose codes are all equal have no unique fit


def refitted_scales(weight: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                    hessian: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scales, biases)`` (float16, rows x groups) minimizing each row's output error
    ``(w - w_q) H (w - w_q)^T`` for ``codes`` (rows x cols, unpacked), where they lower it."""
    rows, cols = weight.shape
    groups = cols // group_size
    h = mx.array(np.asarray(hessian, dtype=np.float32))
    step = max(1, BLOCK_BYTES // (4 * 2 * cols * groups))
    new_scales, new_biases = [], []
    for r in range(0, rows, step):
        w, q = mx.array(weight[r : r + step], dtype=mx.float32), mx.array(codes[r : r + step]).astype(mx.float32)
        old_s, old_b = mx.array(scales[r : r + step]), mx.array(biases[r : r + step])
        s, b = _solved(w, q, h, group_size)
        old, new = _errors(w, q, old_s, old_b, h, group_size), _errors(w, q, s, b, h, group_size)
        better = (mx.isfinite(new) & (new < old))[:, None]
        new_scales.append(mx.where(better, s, old_s))
        new_biases.append(mx.where(better, b, old_b))
        mx.eval(new_scales[-1], new_biases[-1])
    return np.array(mx.concatenate(new_scales)), np.array(mx.concatenate(new_biases))


def _solved(weight: mx.array, codes: mx.array, h: mx.array, group_size: int) -> tuple[mx.array, mx.array]:
    """The least-squares scales and biases of each row, in float16."""
    rows, cols = weight.shape
    groups = cols // group_size
    basis = mx.stack([codes.reshape(rows, groups, group_size), mx.ones((rows, groups, group_size))], axis=2)  # r, G, 2, g
    by_group = basis.transpose(1, 0, 2, 3).reshape(groups, rows * 2, group_size)
    bh = by_group @ h.reshape(groups, group_size, cols)  # G, rows*2, cols: each basis vector times H
    bh = bh.reshape(groups, rows, 2, groups, group_size)
    by_row = bh.transpose(1, 3, 0, 2, 4).reshape(rows, groups, groups * 2, group_size)  # r, k, (j, a), h
    system = by_row @ basis.transpose(0, 1, 3, 2)  # r, k, (j, a), b
    system = system.reshape(rows, groups, groups, 2, 2).transpose(0, 2, 3, 1, 4).reshape(rows, 2 * groups, 2 * groups)
    wh = (weight @ h).reshape(rows, groups, 1, group_size)
    rhs = mx.sum(basis * wh, axis=-1).reshape(rows, 2 * groups, 1)
    ridge = RIDGE * mx.mean(mx.diagonal(system, axis1=1, axis2=2), axis=1)
    system = system + ridge[:, None, None] * mx.eye(2 * groups)
    theta = mx.linalg.solve(system, rhs, stream=mx.cpu).reshape(rows, groups, 2)  # MLX solves on the CPU only
    return theta[..., 0].astype(mx.float16), theta[..., 1].astype(mx.float16)


def _errors(weight, codes, scales, biases, h, group_size) -> mx.array:
    """Each row's output error ``(w - w_q) H (w - w_q)^T``."""
    rows = codes.shape[0]
    dequantized = (codes.reshape(rows, -1, group_size) * scales.astype(mx.float32)[..., None]
                   + biases.astype(mx.float32)[..., None]).reshape(codes.shape)
    delta = dequantized - weight
    return mx.sum((delta @ h) * delta, axis=1)
