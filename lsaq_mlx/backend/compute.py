"""How models run here: the MLX backend, the BLAS behind it, and the compute mode.

MLX's CPU backend has a naive quantized matmul (and on Linux a reference BLAS,
see ``lsaq_mlx.backend.blas``). There, models run in float32 with their quantized layers
dequantized: the same weights the quantized kernel reconstructs, multiplied by a
fast GEMM. On a GPU (Metal) MLX's quantized kernels are fast and used as they are.
"""

import os
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from lsaq_mlx.backend.blas import active_blas

COMPUTE_ENV = "LSAQ_MLX_COMPUTE"  # "float32" or "quantized"; default: by backend


def backend() -> str:
    """"gpu" when MLX's default device is a GPU (Metal or CUDA), else "cpu"."""
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def compute_mode() -> str:
    """"float32": quantized layers dequantized, all in float32 (CPU default);
    "quantized": MLX's quantized kernels in the model's own dtype (GPU default)."""
    mode = os.environ.get(COMPUTE_ENV)
    if mode in ("float32", "quantized"):
        return mode
    return "float32" if backend() == "cpu" else "quantized"


def dequantize_layers(model: nn.Module) -> nn.Module:
    """Replace quantized layers by float32 ones holding the exact dequantized weights.

    Scales and biases are upcast before ``mx.dequantize`` so the weights are the
    exact ``scale * q + bias`` values, not rounded to the scales' float16.
    """
    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            layer = nn.Linear(1, 1, bias="bias" in module)
        elif isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(1, 1)
        else:
            continue
        biases = module.get("biases")
        layer.weight = mx.dequantize(
            module.weight,
            module.scales.astype(mx.float32),
            None if biases is None else biases.astype(mx.float32),
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        )
        if "bias" in module:
            layer.bias = module.bias
        replaced.append((name, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return model


def prepare_for_compute(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Put a loaded model in the compute mode of this machine (see ``compute_mode``)."""
    if (mode or compute_mode()) == "float32":
        dequantize_layers(model)
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


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

