"""Layers that compute in float32 on the CPU without a float32 copy of their weights.

MLX's CPU quantized kernel is fast enough for one token at a time only with float32
scales, its float16 paths are ~30x slower than float32, and a float32 copy of every
layer costs 4 bytes per weight. These layers keep the stored weights (packed integers
with float16 scales and biases, or float16 matrices) and upcast per call: a quantized
layer runs ``mx.quantized_matmul`` with float32 scales for a few rows (decoding) and, for
many rows (a prompt), dequantizes its matrix for that call and multiplies with the BLAS;
a float16 layer is upcast in row blocks. Only one layer's float32 weights exist at a time.

They are subclasses of mlx-lm's (``isinstance`` and parameter names hold), so plans,
swaps and ``model_bits_per_weight`` see ordinary layers.
"""

import mlx.core as mx
import mlx.nn as nn

DEQUANTIZE_ROWS = 16  # from this many rows on, one dequantization + GEMM beats the quantized kernel
ROW_BLOCK_BYTES = 32 << 20  # float32 bytes of a matrix dequantized or upcast at once


def exact_scales(module: nn.Module):
    """``(scales, biases)`` of a quantized module for its dequantize: affine float16 ones
    as float32, so the weights are exactly ``scale * q + bias``; a microscaled format's
    8-bit scales as stored (its only kind)."""
    if module.mode != "affine":
        return module.scales, None
    biases = module.get("biases")
    return module.scales.astype(mx.float32), None if biases is None else biases.astype(mx.float32)


def exact_dequantize(codes: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                     mode: str = "affine") -> mx.array:
    """Stored codes as the float weights they stand for (see ``exact_scales``)."""
    if mode == "affine":
        scales, biases = scales.astype(mx.float32), None if biases is None else biases.astype(mx.float32)
    return mx.dequantize(codes, scales, biases, group_size, bits, mode=mode)


def float_weight(module: nn.Module) -> mx.array:
    """The float matrix a linear or embedding module stands for: its weight, or its codes
    dequantized exactly (lazily; in float32)."""
    return module.weight if "scales" not in module else QuantizedRows(module)[:]


class QuantizedRows:
    """A quantized module's matrix read by row blocks (``rows[a:b]``), each dequantized
    exactly when read: no float copy of the whole matrix."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.shape = (module.weight.shape[0], module.scales.shape[1] * module.group_size)

    def __getitem__(self, rows: slice) -> mx.array:
        m = self.module
        biases = m.get("biases")
        return exact_dequantize(m.weight[rows], m.scales[rows], None if biases is None else biases[rows],
                                m.group_size, m.bits, m.mode)


def weight_rows(module: nn.Module):
    """What ``[a:b]`` reads a module's float rows from: its weight, or ``QuantizedRows``."""
    return QuantizedRows(module) if "scales" in module else module.weight


def _matmul(module: nn.Module, x: mx.array) -> mx.array:
    scales, biases = exact_scales(module)
    x = x.astype(mx.float32)
    if x.size // x.shape[-1] >= DEQUANTIZE_ROWS:  # the matrix dequantized by row blocks, each used at once
        rows = max(1, ROW_BLOCK_BYTES // (4 * scales.shape[1] * module.group_size))
        blocks = []
        for r in range(0, module.weight.shape[0], rows):
            w = mx.dequantize(module.weight[r : r + rows], scales[r : r + rows],
                              None if biases is None else biases[r : r + rows], group_size=module.group_size,
                              bits=module.bits, mode=module.mode)
            blocks.append(_computed(x @ w.T))
        return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=-1)
    return mx.quantized_matmul(x, module.weight, scales, biases, transpose=True, group_size=module.group_size,
                               bits=module.bits, mode=module.mode)


class HybridQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = _matmul(self, x)
        return y + self.bias.astype(mx.float32) if "bias" in self else y


class HybridQuantizedEmbedding(nn.QuantizedEmbedding):
    def __call__(self, x):
        scales, biases = exact_scales(self)
        return mx.dequantize(self.weight[x], scales[x], None if biases is None else biases[x],
                             group_size=self.group_size, bits=self.bits, mode=self.mode)

    def as_linear(self, x):
        return _matmul(self, x)




def _float_matmul(weight: mx.array, x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    if weight.dtype == mx.float32:
        return x @ weight.T
    rows = max(1, ROW_BLOCK_BYTES // (4 * weight.shape[1]))
    blocks = [_computed(x @ weight[i : i + rows].astype(mx.float32).T) for i in range(0, weight.shape[0], rows)]
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=-1)


def _computed(block: mx.array) -> mx.array:
    """``block`` evaluated now. Left lazy, a forward pass is one graph that MLX schedules
    breadth first, so every block's float32 weights (and the temporaries of MLX's
    dequantize, 6x the block for 3, 5 and 6 bits) were alive together: 2.3 GB for one
    prompt through a 0.5B model quantized to 0.24 GB, more than 18 GB at 8B. These
    layers are for inference: nothing differentiates through them."""
    mx.eval(block)
    return block


class HybridLinear(nn.Linear):
    def __call__(self, x):
        y = _float_matmul(self.weight, x)
        return y + self.bias.astype(mx.float32) if "bias" in self else y


class HybridEmbedding(nn.Embedding):
    def __call__(self, x):
        return self.weight[x].astype(mx.float32)

    def as_linear(self, x):
        return _float_matmul(self.weight, x)


_HYBRID = {nn.QuantizedLinear: HybridQuantizedLinear, nn.QuantizedEmbedding: HybridQuantizedEmbedding,
           nn.Linear: HybridLinear, nn.Embedding: HybridEmbedding}


def make_hybrid(module: nn.Module) -> bool:
    """Turn an mlx-lm linear or embedding layer into its hybrid kind, in place; False for
    other modules."""
    kind = _HYBRID.get(type(module))
    if kind is None:
        return type(module) in _HYBRID.values()
    # same fields, only __call__ differs: changing the class keeps the module where it is
    module.__class__ = kind
    return True
