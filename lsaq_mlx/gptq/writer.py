"""GPTQ for every affine module of a plan (``hessians``: one streamed calibration pass),
each module quantized at its planned bits and group size while its layer is loaded and
written to a scratch folder, one safetensors file per layer. The LM head goes through
in row blocks. Embeddings are lookups without an input Hessian: they stay
round-to-nearest.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lsaq_mlx.gptq.hessians import each_layer_hessians
from lsaq_mlx.gptq.solver import AffineCodes, gptq_quantize, inverse_hessian_factor
from lsaq_mlx.planning.choices import Affine

ROW_BLOCK_BYTES = 64 << 20  # float32 bytes of a matrix's rows quantized at once


def gptq_weights(streamed, tokens: mx.array, choices: dict, scratch: Path, progress=None) -> dict[str, dict]:
    """``{path: {"weight", "scales", "biases"}}`` (lazily read from ``scratch``) of every
    linear module of ``choices`` (path -> planned choice) with an affine choice,
    quantized with GPTQ on ``tokens`` (batch, length)."""
    affine = {p: c for p, c in choices.items() if isinstance(c, Affine)}
    written: dict[str, dict] = {}

    def on_modules(modules: dict, hessians: dict):
        factors: dict[int, np.ndarray] = {}  # by the Hessian's identity: shared inputs, one factor
        arrays = {}
        for path, module in modules.items():
            h = hessians[path]
            if id(h) not in factors:
                factors[id(h)] = inverse_hessian_factor(h)
            arrays |= _named(path, _quantized(module.weight, factors[id(h)], affine[path]), module)
        if arrays:
            written.update(_save(arrays, Path(scratch) / f"{len(written)}.safetensors"))

    each_layer_hessians(streamed, tokens, set(affine), on_modules, progress)
    return written


def _quantized(weight: mx.array, factor: np.ndarray, choice: Affine) -> AffineCodes:
    """GPTQ of ``weight`` a row block at a time (rows are independent)."""
    rows = max(1, ROW_BLOCK_BYTES // (4 * weight.shape[1]))
    parts = [gptq_quantize(np.array(weight[r : r + rows].astype(mx.float32)), factor, choice.bits, choice.group_size)
             for r in range(0, weight.shape[0], rows)]
    if len(parts) == 1:
        return parts[0]
    return AffineCodes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("weight", "scales", "biases")))


def _named(path: str, codes: AffineCodes, module: nn.Module) -> dict:
    weight, scales, biases = codes.arrays()
    out = {f"{path}.weight": weight, f"{path}.scales": scales, f"{path}.biases": biases}
    if "bias" in module:
        out[f"{path}.bias"] = module.bias.astype(mx.float16)
    return out


def _save(arrays: dict, file: Path) -> dict[str, dict]:
    mx.save_safetensors(str(file), arrays)
    loaded = mx.load(str(file))  # lazy: read when the model is written
    out: dict[str, dict] = {}
    for name in loaded:
        path, _, param = name.rpartition(".")
        out.setdefault(path, {})[param] = loaded[name]
    return out
