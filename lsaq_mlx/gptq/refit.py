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

BLOCK_BYTES = 256 << 20  # float32 bytes of the codes times ``H`` by group (groups x rows x cols) at once
RIDGE = 1e-6  # of the system's mean diagonal: groups whose codes are all equal have no unique fit


def refitted_scales(weight: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                    hessian: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scales, biases)`` (float16, rows x groups) minimizing each row's output error
    ``(w - w_q) H (w - w_q)^T`` for ``codes`` (rows x cols, unpacked), where they lower it."""
    rows, cols = weight.shape
    groups = cols // group_size
    h = mx.array(np.asarray(hessian, dtype=np.float32))
    h_by_group = h.reshape(cols, groups, group_size).sum(axis=-1)  # H P: H's columns summed within groups
    ones_system = h_by_group.reshape(groups, group_size, groups).sum(axis=1)  # P^T H P, the same for every row
    step = max(1, BLOCK_BYTES // (4 * cols * groups))
    new_scales, new_biases = [], []
    for r in range(0, rows, step):
        w, q = mx.array(weight[r : r + step], dtype=mx.float32), mx.array(codes[r : r + step]).astype(mx.float32)
        system, rhs = _normal_equations(w, q, h, h_by_group, ones_system, group_size)
        old = mx.stack([mx.array(scales[r : r + step]), mx.array(biases[r : r + step])], axis=-1)
        new = _solved(system, rhs)
        better = (mx.isfinite(_excess(new, system, rhs)) & (_excess(new, system, rhs) < _excess(old, system, rhs)))
        chosen = mx.where(better[:, None, None], new, old)
        new_scales.append(chosen[..., 0])
        new_biases.append(chosen[..., 1])
        mx.eval(new_scales[-1], new_biases[-1])
    return np.array(mx.concatenate(new_scales)), np.array(mx.concatenate(new_biases))


def _normal_equations(weight: mx.array, codes: mx.array, h: mx.array, h_by_group: mx.array, ones_system: mx.array,
                      group_size: int) -> tuple[mx.array, mx.array]:
    """Each row's system ``A`` (rows, 2G, 2G) and right side ``r`` (rows, 2G), unknowns
    ordered (group, scale | bias): the row's error is ``t A t - 2 t r + w H w``. The
    blocks of the bias unknowns are ``P^T H P`` and ``Q^T H P``, cheap: only the scales'
    block multiplies each row's codes by all of ``H``."""
    rows, cols = weight.shape
    groups = cols // group_size
    by_group = codes.reshape(rows, groups, group_size).transpose(1, 0, 2)  # G, rows, g
    codes_h = by_group @ h.reshape(groups, group_size, cols)  # G, rows, cols: group k's codes times H
    scales_block = (codes_h.reshape(groups, rows, groups, group_size) * codes.reshape(1, rows, groups, group_size)).sum(-1)
    scales_block = scales_block.transpose(1, 0, 2)  # rows, k, j
    cross = (by_group @ h_by_group.reshape(groups, group_size, groups)).transpose(1, 0, 2)  # rows, k (scale), j (bias)
    ones = mx.broadcast_to(ones_system, scales_block.shape)
    system = mx.stack([mx.stack([scales_block, cross], axis=-1),
                       mx.stack([cross.transpose(0, 2, 1), ones], axis=-1)], axis=2)  # rows, k, a, j, b
    system = system.reshape(rows, 2 * groups, 2 * groups)
    wh = (weight @ h).reshape(rows, groups, group_size)
    rhs = mx.stack([(codes.reshape(wh.shape) * wh).sum(-1), wh.sum(-1)], axis=-1).reshape(rows, 2 * groups)
    return system, rhs


def _solved(system: mx.array, rhs: mx.array) -> mx.array:
    """The least-squares scales and biases of each row (rows, G, 2), in float16."""
    rows, n = rhs.shape
    ridge = RIDGE * mx.mean(mx.diagonal(system, axis1=1, axis2=2), axis=1)
    theta = mx.linalg.solve(system + ridge[:, None, None] * mx.eye(n), rhs[..., None], stream=mx.cpu)  # CPU only
    return theta.reshape(rows, n // 2, 2).astype(mx.float16)


def _excess(theta: mx.array, system: mx.array, rhs: mx.array) -> mx.array:
    """Each row's output error less ``w H w`` (the same for every ``theta``)."""
    t = theta.astype(mx.float32).reshape(rhs.shape)
    return mx.sum((system @ t[..., None])[..., 0] * t, axis=-1) - 2 * mx.sum(t * rhs, axis=-1)
