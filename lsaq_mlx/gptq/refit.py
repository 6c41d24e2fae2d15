"""Scales and biases refitted to fixed codes: with each code of a row fixed, the row's
output error ``(w - w_q) H (w - w_q)^T`` is quadratic in its groups' scales and biases
(``w_q = sum_g s_g q_g + b_g 1_g``), so its minimum is one linear solve of ``2 G``
unknowns (``G`` groups). GPTQ fixes each group's scale and bias before it moves any
column, and then picks codes for weights it has since changed; the solve gives the
scale and bias those codes want, against the module's real output on the calibration
inputs (DWQ learns the same parameters by distillation, end to end). A row keeps its
old values unless the refitted ones, rounded to float16 as stored, lower its error.
"""

import numpy as np

from lsaq_mlx.gptq.solver import row_output_errors

BLOCK_BYTES = 256 << 20  # float32 bytes of ``B H`` (rows x 2 x cols x cols / group) at once
RIDGE = 1e-6  # of the system's mean diagonal: groups whose codes are all equal have no unique fit


def refitted_scales(weight: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                    hessian: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scales, biases)`` (float16, rows x groups) minimizing each row's output error
    ``(w - w_q) H (w - w_q)^T`` for ``codes`` (rows x cols, unpacked), where they lower it."""
    rows, cols = weight.shape
    groups = cols // group_size
    h = np.asarray(hessian, dtype=np.float32)
    step = max(1, BLOCK_BYTES // (4 * 2 * cols * groups))
    new_scales, new_biases = scales.copy(), biases.copy()
    for r in range(0, rows, step):
        block = slice(r, min(rows, r + step))
        s, b = _solved(weight[block], codes[block], h, group_size)
        old = _errors(weight[block], codes[block], scales[block], biases[block], h, group_size)
        new = _errors(weight[block], codes[block], s, b, h, group_size)
        better = np.isfinite(new) & (new < old)
        new_scales[block][better], new_biases[block][better] = s[better], b[better]
    return new_scales, new_biases


def _solved(weight: np.ndarray, codes: np.ndarray, h: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares scales and biases of each row, in float16."""
    rows, cols = weight.shape
    groups = cols // group_size
    basis = np.stack([codes.astype(np.float32).reshape(rows, groups, group_size),
                      np.ones((rows, groups, group_size), dtype=np.float32)], axis=2)  # rows, G, 2, g
    by_group = basis.transpose(1, 0, 2, 3).reshape(groups, rows * 2, group_size)
    bh = np.matmul(by_group, h.reshape(groups, group_size, cols))  # G, rows*2, cols: each basis vector times H
    bh = bh.reshape(groups, rows, 2, groups, group_size)
    by_row = bh.transpose(1, 3, 0, 2, 4).reshape(rows, groups, groups * 2, group_size)  # r, k, (j, a), h
    system = np.matmul(by_row, basis.transpose(0, 1, 3, 2))  # r, k, (j, a), b
    system = system.reshape(rows, groups, groups, 2, 2).transpose(0, 2, 3, 1, 4).reshape(rows, 2 * groups, 2 * groups)
    wh = weight.astype(np.float32) @ h
    rhs = np.einsum("rjag,rjg->rja", basis, wh.reshape(rows, groups, group_size)).reshape(rows, 2 * groups)
    ridge = RIDGE * np.mean(np.diagonal(system, axis1=1, axis2=2), axis=1)
    system[:, np.arange(2 * groups), np.arange(2 * groups)] += ridge[:, None]
    with np.errstate(all="ignore"):
        theta = np.linalg.solve(system, rhs[..., None])[..., 0].reshape(rows, groups, 2)
    return theta[..., 0].astype(np.float16), theta[..., 1].astype(np.float16)


def _errors(weight, codes, scales, biases, h, group_size) -> np.ndarray:
    dequantized = (codes.astype(np.float32).reshape(codes.shape[0], -1, group_size)
                   * scales.astype(np.float32)[..., None] + biases.astype(np.float32)[..., None])
    with np.errstate(all="ignore"):
        return row_output_errors(dequantized.reshape(codes.shape) - weight, h)
