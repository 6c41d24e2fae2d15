"""A matrix's MLX affine codes, a row block at a time: round to nearest or GPTQ, with
AWQ's clipping and GPTQ's refit where asked (what ``quantizers`` combine)."""

import mlx.core as mx
import numpy as np

from lsaq_mlx.equalization.clipping import clipped_weight, group_blocks
from lsaq_mlx.gptq.solver import AffineCodes, HessianFactor, gptq_quantize
from lsaq_mlx.planning.choices import Affine

ROW_BLOCK_BYTES = 64 << 20  # float32 bytes of a matrix's rows quantized at once


def affine_codes(weight: mx.array, factor: HessianFactor | None, choice: Affine, clip_by: np.ndarray | None = None,
               refit_by: np.ndarray | None = None) -> AffineCodes:
    """GPTQ (round to nearest without a ``factor``) of ``weight``, a row block at a time
    (rows are independent); given ``clip_by`` (the input Hessian), each group's range
    clipped where that lowers its error; given ``refit_by`` (the same), GPTQ's scales
    and biases refitted to its codes."""
    rows = max(1, ROW_BLOCK_BYTES // (4 * weight.shape[1]))
    blocks = group_blocks(clip_by, choice.group_size) if clip_by is not None and factor is None else None
    parts = []
    for r in range(0, weight.shape[0], rows):
        block = weight[r : r + rows]
        if blocks is not None:
            block = clipped_weight(block, blocks, choice)
        parts.append(_row_block_codes(block, factor, choice, clip_by, refit_by))
    if len(parts) == 1:
        return parts[0]
    return AffineCodes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("weight", "scales", "biases")))


def _row_block_codes(weight: mx.array, factor: HessianFactor | None, choice: Affine, clip_by: np.ndarray | None,
                 refit_by: np.ndarray | None) -> AffineCodes:
    if factor is not None:
        return gptq_quantize(np.array(weight.astype(mx.float32)), factor, choice.bits, choice.group_size, clip_by,
                             refit_by)
    q, s, b = mx.quantize(weight.astype(mx.float32), choice.group_size, choice.bits)
    return AffineCodes(np.array(q), np.array(s.astype(mx.float16)), np.array(b.astype(mx.float16)))
