"""GPTQ on one matrix (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers"), in MLX's group-wise affine format.

Columns are quantized in order of decreasing ``diag H`` ("act-order": the inputs that
carry the most energy first, while the most columns are left to absorb their error).
Each column's rounding error, divided by the diagonal of the upper Cholesky factor
``U`` of the reordered ``H^-1``, is spread over the columns not yet quantized
(``W[:, j:] -= e U[j, j:]``): within a block of columns at once, into the columns after
the block once per block (the "lazy batch" update). MLX's groups are contiguous input
columns, so each group's scale and bias are fixed before any column moves ("static
groups"): MLX's round-to-nearest ones (``mx.quantize``'s arithmetic), clipped to
the group's block of ``H`` where given, rounded to float16 as the model
stores them, so ``mx.dequantize`` of the written codes gives exactly the values the
errors were computed from. Rows are independent: large matrices go through in row
blocks.

The column loop runs in MLX, one compiled call per block of columns, so a Mac's GPU runs
it; only ``H``'s factorization stays on the CPU (MLX's linear algebra is CPU-only).
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from lsaq_mlx.equalization.clipping import clip_ratios
from lsaq_mlx.gptq.packing import pack_codes
from lsaq_mlx.gptq.refit import refitted_scales
from lsaq_mlx.gptq.row_errors import row_output_errors
from lsaq_mlx.planning.affine_error import affine_scales

# Of mean(diag H), added to H's diagonal. 0.01 (mlx_lm.gptq's) overfits 16k calibration tokens;
# with act-order and clipping 0.03 / 0.1 / 0.3 / 1.0 gave KL 0.225 / 0.210 / 0.199 / 0.199 (docs/plans.md).
DAMP = 0.3


@dataclass
class AffineCodes:
    """A quantized matrix as MLX stores it: packed codes, float16 scales and biases."""

    weight: np.ndarray  # uint32 (rows, cols * bits / 32)
    scales: np.ndarray  # float16 (rows, cols / group_size)
    biases: np.ndarray

    def arrays(self) -> tuple[mx.array, mx.array, mx.array]:
        return mx.array(self.weight), mx.array(self.scales), mx.array(self.biases)

    def expert(self, e: int) -> "AffineCodes":
        """Expert ``e``'s codes, of codes of stacked experts."""
        return AffineCodes(self.weight[e], self.scales[e], self.biases[e])

    @classmethod
    def stacked(cls, parts: list["AffineCodes"]) -> "AffineCodes":
        """The codes of stacked experts, of each expert's."""
        return cls(*(np.stack([getattr(p, f) for p in parts]) for f in ("weight", "scales", "biases")))

    def dequantized(self, choice, rows: slice = slice(None)) -> mx.array:
        """Rows ``rows`` of the matrix these codes stand for at ``choice``."""
        parts = (mx.array(getattr(self, f)[rows]) for f in ("weight", "scales", "biases"))
        return mx.dequantize(*parts, group_size=choice.group_size, bits=choice.bits)


@dataclass
class HessianFactor:
    """``U`` of ``H`` with its inputs taken in ``order`` (see ``hessian_factor``)."""

    upper: np.ndarray
    order: np.ndarray  # input columns, largest diag H first


class ModuleInputs:
    """A module's input Hessian on calibration text, and its GPTQ factor, computed once
    for all the modules that read the same input (q, k and v; gate and up)."""

    def __init__(self, hessian: np.ndarray):
        self.hessian = hessian
        self._factor: HessianFactor | None = None

    @property
    def factor(self) -> HessianFactor:
        if self._factor is None:
            self._factor = hessian_factor(self.hessian)
        return self._factor


MIN_EXPERT_TOKENS = 128  # routed calibration tokens below which an expert is rounded to nearest


class ExpertHessians:
    """The input Hessians of a layer's stacked experts, one per expert from the tokens
    routed to it (inputs x inputs; or while fewer tokens than inputs reached an expert,
    its rows, tokens x inputs; None for an expert no token reached), and how many tokens
    each saw."""

    def __init__(self, hessians: list[np.ndarray | None], tokens: np.ndarray):
        self.hessians, self.tokens = hessians, tokens

    @classmethod
    def summed(cls, parts: list["ExpertHessians"]) -> "ExpertHessians":
        """The inputs of ``parts`` together (several activation tracks): each expert's
        rows joined while they stay fewer than its inputs, else its Hessians added."""
        return cls([_joined([h for p in parts if (h := p.hessians[e]) is not None])
                    for e in range(len(parts[0].hessians))], sum(p.tokens for p in parts))

    def expert(self, e: int) -> ModuleInputs | None:
        """Expert ``e``'s inputs, or None when too few tokens reached it to calibrate on."""
        if self.tokens[e] < MIN_EXPERT_TOKENS:
            return None
        h = self.hessians[e]
        return ModuleInputs(h if h.shape[0] == h.shape[1] else h.T @ h)


def _joined(inputs: list[np.ndarray]) -> np.ndarray | None:
    """One expert's Hessian (or rows) of several tracks' (each a Hessian or rows)."""
    if not inputs:
        return None
    width = inputs[0].shape[1]
    if all(h.shape[0] != width for h in inputs) and sum(h.shape[0] for h in inputs) < width:
        return np.concatenate(inputs)
    total = np.zeros((width, width), np.float32)
    for h in inputs:
        total += h if h.shape[0] == width else h.T @ h
    return total


def hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> HessianFactor:
    """The act-order factor of ``hessian``: inputs by decreasing ``diag H``."""
    order = np.argsort(-np.diagonal(hessian), kind="stable")
    return HessianFactor(_inverse_hessian_factor(hessian, damp, order), order)


def _inverse_hessian_factor(hessian: np.ndarray, damp: float, order: np.ndarray) -> np.ndarray:
    """``U``: upper triangular, ``U^T U = (H + damp * mean(diag H) I)^-1``, ``H``'s
    inputs taken in ``order``. Inputs that never fire (zero diagonal) get 1 there, so
    ``H`` stays invertible."""
    h = hessian[np.ix_(order, order)].astype(np.float32)  # a copy, reordered
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diagonal(h)))
    # H = R R^T with R = J chol(J H J) J upper (J reverses the order); U = R^-1. Each
    # step frees the one before: an 8B down_proj's H is 0.8 GB
    flipped = np.ascontiguousarray(h[::-1, ::-1])
    del h
    with mx.stream(mx.cpu):
        lower = mx.linalg.cholesky(mx.array(flipped))
        del flipped
        mx.eval(lower)
        upper = mx.linalg.tri_inv(lower[::-1, ::-1], upper=True)
        del lower
        mx.eval(upper)
        return np.array(upper)


def gptq_quantize(weight: np.ndarray, factor: HessianFactor, bits: int, group_size: int,
                  hessian: np.ndarray | None = None, refit_by: np.ndarray | None = None) -> AffineCodes:
    """``weight`` (rows, cols; float) quantized with act-order GPTQ given ``factor``
    (``hessian_factor``), each group's scale and bias fixed first; given ``hessian``,
    each group's range is also clipped (``_group_scales``); given ``refit_by`` (the
    input Hessian), scales and biases are then refitted to the codes (``refit``)."""
    codes, scales, biases = compensated_codes(weight, factor, np.full(weight.shape[0], bits), group_size, hessian)
    if refit_by is not None:
        scales, biases = refitted_scales(weight, codes, scales, biases, refit_by, group_size)
    return AffineCodes(pack_codes(codes, bits), scales, biases)


def compensated_codes(weight: np.ndarray, factor: HessianFactor, bits: np.ndarray, group_size: int,
                      hessian: np.ndarray | None = None):
    """``(codes, scales, biases)`` of GPTQ on ``weight`` with ``bits[r]`` bits for row
    ``r`` (rows are independent, so one pass can price several bit widths)."""
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"group size {group_size} does not divide {cols} columns")
    w = np.array(weight, dtype=np.float32)
    levels = ((1 << np.asarray(bits, dtype=np.int64)) - 1).astype(np.float32)
    scales = np.empty((rows, cols // group_size), dtype=np.float16)
    biases = np.empty_like(scales)
    for start in range(0, cols, group_size):
        diagonal = None if hessian is None else hessian[start : start + group_size, start : start + group_size]
        scales[:, start // group_size], biases[:, start // group_size] = _group_scales(
            w[:, start : start + group_size], levels, diagonal)
    order = mx.array(factor.order)
    u = mx.array(factor.upper)
    column_scales = mx.array(scales)[:, order // group_size].astype(mx.float32)
    column_biases = mx.array(biases)[:, order // group_size].astype(mx.float32)
    w, lv = mx.array(w)[:, order], mx.array(levels)
    blocks = []
    for start in range(0, cols, group_size):  # blocks of a group's width, in act-order (not the groups)
        stop = start + group_size
        codes, errors = _block_codes(w[:, start:stop], u[start:stop, start:stop], column_scales[:, start:stop],
                                     column_biases[:, start:stop], lv)
        if stop < cols:
            w[:, stop:] -= errors @ u[start:stop, stop:]
        mx.eval(codes, w)
        blocks.append(codes)
    codes = mx.concatenate(blocks, axis=1)[:, mx.array(np.argsort(factor.order))]
    return np.array(codes.astype(mx.uint8)), scales, biases


@mx.compile
def _block_codes(block: mx.array, u: mx.array, scales: mx.array, biases: mx.array, levels: mx.array):
    """Codes of one block of columns, each column's rounding error spread over the
    block's later ones (``u[j, k]`` is 0 for ``k < j``); ``(codes, errors)``."""
    codes, errors = [], []
    for j in range(block.shape[1]):
        column, s, b = block[:, j], scales[:, j], biases[:, j]
        q = mx.clip(mx.round((column - b) / s), 0.0, levels)
        e = (column - (q * s + b)) / u[j, j]
        block = block - e[:, None] * u[j][None, :]
        codes.append(q)
        errors.append(e)
    return mx.stack(codes, axis=1), mx.stack(errors, axis=1)


def _group_scales(group: np.ndarray, levels: np.ndarray, diagonal: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """MLX's round-to-nearest scale and bias of each row of ``group`` (``mx.quantize``'s
    arithmetic, ``planning.cost``), in float16. Given ``diagonal`` (the group's block of
    ``H``), each row's range is shrunk to ``p [min, max]`` for the ``p`` of
    ``equalization.clipping``'s grid with the lowest rounding error ``e H_gg e^T``."""
    g, lv = mx.array(group), mx.array(levels)[:, None]
    low, high = g.min(axis=1), g.max(axis=1)
    best_scale = best_bias = best_error = None
    for p in ([1.0] if diagonal is None else clip_ratios()):
        scale, bias = (a.astype(mx.float16) for a in affine_scales(p * low, p * high, lv[:, 0]))
        if diagonal is None:
            return np.array(scale), np.array(bias)
        s, b = scale.astype(mx.float32)[:, None], bias.astype(mx.float32)[:, None]
        e = g - (mx.clip(mx.round((g - b) / s), 0.0, lv) * s + b)
        error = mx.sum((e @ mx.array(diagonal)) * e, axis=1)
        better = error < best_error if best_error is not None else mx.ones(error.shape, dtype=mx.bool_)
        best_scale = scale if best_scale is None else mx.where(better, scale, best_scale)
        best_bias = bias if best_bias is None else mx.where(better, bias, best_bias)
        best_error = error if best_error is None else mx.minimum(error, best_error)
    return np.array(best_scale), np.array(best_bias)


def output_error(weight: np.ndarray, dequantized: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(dW H dW^T)``: the summed squared error of the module's outputs on the
    calibration inputs ``H`` was collected from."""
    d = np.asarray(dequantized, dtype=np.float64) - np.asarray(weight, dtype=np.float64)
    return float(row_output_errors(d, np.asarray(hessian, dtype=np.float64)).sum())
