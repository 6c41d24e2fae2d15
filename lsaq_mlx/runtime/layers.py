"""Per-layer precision of a loaded model, for displays: the bits per weight of every
decoder layer's linear modules (scales and biases of groups included, as mlx-lm counts).

The sizes are read from the model as loaded, before the CPU backend dequantizes it for
compute; after a swap, a module's bits follow its new plan choice.
"""

import mlx.nn as nn
from mlx.utils import tree_flatten

from lsaq_mlx.modules import layer_index


def module_precision(model: nn.Module) -> dict[str, tuple[float, int]]:
    """path -> (bits per weight as stored, number of weights) of every module with a
    weight matrix (linear layers, embeddings)."""
    sizes = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)):
        if "weight" not in m or m.weight.ndim != 2:
            continue
        if "scales" in m:
            weights = m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
            sizes[path] = (m.bits + m.scales.dtype.size * 8 * 2 / m.group_size, weights)
        else:
            sizes[path] = (m.weight.dtype.size * 8, m.weight.size)
    return sizes


def layer_bits(precision: dict[str, tuple[float, int]], choices: dict) -> dict:
    """``{"layers": [bits per weight of decoder layer i], "other": bits of the rest}``:
    weighted by each module's weights; ``choices`` (path -> plan choice) overrides what
    was loaded."""
    totals: dict = {}
    for path, (bits, weights) in precision.items():
        if path in choices:
            bits = choices[path].bits_per_weight() or bits
        index = layer_index(path)
        key = "other" if index is None else index
        bit_sum, weight_sum = totals.get(key, (0.0, 0))
        totals[key] = (bit_sum + bits * weights, weight_sum + weights)
    mean = {k: b / w for k, (b, w) in totals.items() if w}
    layers = sorted(k for k in mean if k != "other")
    return {"layers": [mean[i] for i in layers], "other": mean.get("other")}
