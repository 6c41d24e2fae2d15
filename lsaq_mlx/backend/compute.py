"""How models run here: the MLX backend, the BLAS behind it, and the compute mode.

MLX's CPU backend has a slow quantized matmul (and on Linux a reference BLAS,
see ``lsaq_mlx.backend.blas``). There, models run in float32: a bounded share of the
quantized layers is dequantized (the same weights the quantized kernel reconstructs,
multiplied by a fast GEMM), the rest run as hybrid layers that keep their stored
weights (``lsaq_mlx.backend.hybrid``), so memory stays near the quantized size. On a
GPU (Metal) MLX's quantized kernels are fast and used as they are.
"""

import math
import os
import sys
from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from lsaq_mlx.backend.blas import active_blas
from lsaq_mlx.backend.hybrid import exact_scales, make_hybrid
from lsaq_mlx.modules import layer_index, module_groups
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.sizes import parse_size
from lsaq_mlx.settings import settings



def backend() -> str:
    """"gpu" when MLX's default device is a GPU (Metal or CUDA), else "cpu"."""
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def compute_mode() -> str:
    """"float32": quantized layers dequantized, all in float32 (CPU default);
    "quantized": MLX's quantized kernels in the model's own dtype (GPU default)."""
    return settings().compute or ("float32" if backend() == "cpu" else "quantized")


def dequantize_layers(model: nn.Module, paths: set[str] | None = None, now: bool = False) -> nn.Module:
    """Replace quantized layers (those at ``paths``; default all) by float32 ones holding
    the exact dequantized weights: lazily, or with ``now`` computed at once, a row block
    at a time (whole, MLX's dequantize of 3, 5 or 6 bits takes about 6x the float32
    matrix in temporaries).

    Scales and biases are upcast before ``mx.dequantize`` so the weights are the
    exact ``scale * q + bias`` values, not rounded to the scales' float16.
    """
    replaced = []
    for name, module in model.named_modules():
        if paths is not None and name not in paths:
            continue
        if isinstance(module, nn.QuantizedLinear):
            layer = nn.Linear(1, 1, bias="bias" in module)
        elif isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(1, 1)
        elif isinstance(module, QuantizedSwitchLinear):  # stacked experts: blocks of experts, not rows
            layer = SwitchLinear(1, 1, 1, bias="bias" in module)
        else:
            continue
        layer.weight = _dequantized(module, now)
        if not now:  # a block of rows without the whole matrix's temporaries (convert.MatrixRows)
            layer.stored_rows = _stored_rows(module)
        if "bias" in module:
            layer.bias = module.bias
        replaced.append((name, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return model


# float32 bytes of the rows dequantized at once (``now``): MLX holds up to 7x that while it
# runs (6 bits), and on the CPU small blocks are no slower
DEQUANTIZE_BLOCK_BYTES = 4 << 20


def _stored_rows(module: nn.Module):
    """``rows(block)``: the exact float32 weights of ``block`` (a slice) of the rows of
    the quantized ``module``, dequantized from those rows alone."""
    scales, biases = exact_scales(module)

    def rows(block: slice) -> mx.array:
        return mx.dequantize(module.weight[block], scales[block], None if biases is None else biases[block],
                             group_size=module.group_size, bits=module.bits, mode=module.mode)

    return rows


def _dequantized(module: nn.Module, now: bool) -> mx.array:
    rows = _stored_rows(module)
    shape = (*module.weight.shape[:-1], module.weight.shape[-1] * 32 // module.bits)
    if not now or 4 * math.prod(shape) <= DEQUANTIZE_BLOCK_BYTES:
        return rows(slice(None))
    weight = mx.zeros(shape, mx.float32)
    step = max(1, DEQUANTIZE_BLOCK_BYTES // (4 * math.prod(shape[1:])))
    for r in range(0, shape[0], step):
        weight[r : r + step] = rows(slice(r, r + step))  # in place: nothing else refers to it
        mx.eval(weight)
    return weight


def float_copy_bytes() -> int | None:
    """How many bytes of float32 weights a model may hold for compute on the CPU
    (``LSAQ_MLX_FLOAT_COPY``, e.g. ``2GB``; ``all`` for no bound)."""
    value = settings().float_copy
    return None if value == "all" else parse_size(value)


def prepare_for_compute(model: nn.Module, mode: str | None = None, float_paths: set[str] | None = None) -> nn.Module:
    """Put a loaded model in the compute mode of this machine (see ``compute_mode``) and
    evaluate it one module at a time. In
    float32 mode the linear and embedding modules at ``float_paths`` (default:
    ``float_copy_paths`` within ``float_copy_bytes``) get float32 weights (dequantized if
    quantized); the others keep their stored weights and run as hybrid layers
    (``lsaq_mlx.backend.hybrid``); every other float parameter becomes float32."""
    if (mode or compute_mode()) == "float32":
        if float_paths is None:
            float_paths = float_copy_paths(model, float_copy_bytes())
        dequantize_layers(model, float_paths, now=True)
        for path, module in model.named_modules():
            if path not in float_paths:
                make_hybrid(module)
        _float32_except_stored(model, float_paths)
    groups = module_groups(dict(tree_flatten(model.parameters())))
    with progress_bar("preparing the model", len(groups)) if len(groups) > 1 else nullcontext(lambda: None) as advance:
        for group in groups:
            mx.eval(list(group.values()))
            advance()
    return model


_MATRICES = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)


def float_copy_paths(model: nn.Module, float_bytes: int | None) -> set[str]:
    """The linear modules of the decoder layers, first layers first, whose float32
    weights fit ``float_bytes``; None: every linear and embedding module. Under a bound
    the embeddings and LM head stay hybrid: dequantizing the largest matrices costs a
    few times their float32 size at once, and a lookup needs no copy."""
    if float_bytes is None:
        return {p for p, m in model.named_modules() if isinstance(m, _MATRICES)}
    chosen, total = set(), 0
    in_layers = [(p, m) for p, m in model.named_modules() if isinstance(m, _MATRICES) and layer_index(p) is not None]
    for path, module in sorted(in_layers, key=lambda pm: layer_index(pm[0])):
        rows, cols = module.weight.shape
        size = 4 * rows * (cols * 32 // module.bits if "scales" in module else cols)
        if total + size > float_bytes:
            break
        chosen.add(path)
        total += size
    return chosen


def _float32_except_stored(model: nn.Module, float_paths: set[str]) -> None:
    """Every float parameter to float32, except the weights of hybrid layers."""
    for path, module in model.named_modules():
        keep = {"weight", "scales", "biases"} if path not in float_paths and isinstance(module, _MATRICES) else set()
        for name, value in module.items():
            if isinstance(value, mx.array) and name not in keep and mx.issubdtype(value.dtype, mx.floating):
                module[name] = value.astype(mx.float32)


def describe() -> dict:
    """What ``lsaq-mlx doctor`` reports."""
    return {
        "mlx": mx.__version__,
        "backend": backend(),
        "device": str(mx.default_device()),
        "blas": active_blas(),
        "compute_mode": compute_mode(),
        "platform": sys.platform,
        "machine": os.uname().machine,
        "cpu_count": os.cpu_count(),
    }

