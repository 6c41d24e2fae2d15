"""A layer's stacked experts read from the checkpoint a block of experts at a time.

A decoder layer of a large mixture of experts is mostly its experts (4.8 GB in float16
for a Qwen3-235B-A22B layer). Held whole while its layer runs, they set the memory of
every streamed stage, and mlx-lm's ``sanitize`` stacking the experts a checkpoint stores
apart held them twice. A ``CheckpointExperts`` holds nothing: each ``block(first, last)``
reads those experts' weights from the files (rows of the stacked tensor as stored,
quantized codes dequantized exactly, or the per-expert tensors sanitize would stack) in
float32. Its readers are ``backend.expert_blocks.BlockedSwitchLinear`` and the code that
quantizes or prices experts (through ``experts_of``).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from lsaq_mlx.backend.hybrid import exact_dequantize
from lsaq_mlx.modules import layer_index
from lsaq_mlx.sources.model_tensors import DTYPES
from lsaq_mlx.sources.tensors import stored_quantization


class CheckpointExperts:
    """An ``ExpertStack`` (see ``backend.expert_blocks.HeldExperts``) read from disk."""

    def __init__(self, shape: tuple, read):
        self.shape, self._read = tuple(shape), read

    def block(self, first: int, last: int) -> mx.array:
        return self._read(first, last).astype(mx.float32)


def checkpoint_experts(tensors, config: dict, model: nn.Module) -> dict[str, CheckpointExperts]:
    """``{path: CheckpointExperts}`` of ``model``'s stacked-expert modules (mlx-lm's
    float ``SwitchLinear``; the checkpoint may hold them quantized) whose weights
    ``tensors`` (its ``ModelTensors``) can read a block of experts at a time; empty
    where its files cannot be read in parts (a pack)."""
    if not hasattr(tensors.tensors, "rows"):
        return {}
    found, stacked, sliced = {}, {}, {}
    for path, module in model.named_modules():
        if type(module) is not SwitchLinear or "weight" not in module:
            continue
        i = layer_index(path)
        if i not in stacked:
            stacked[i], sliced[i] = tensors.stacked(i), tensors.sliced(i)
        shape = tuple(module.weight.shape)
        read = (_stacked_rows(tensors, config, path, shape)
                or _apart(tensors.tensors, stacked[i].get(f"{path}.weight"), shape)
                or _slice_of_stack(tensors.tensors, sliced[i].get(f"{path}.weight"), shape))
        if read is not None:
            found[path] = CheckpointExperts(shape, read)
    return found


def _stacked_rows(tensors, config: dict, path: str, shape: tuple):
    """Blocks of the stacked tensor as stored, its codes dequantized where quantized."""
    name = f"{path}.weight"
    if name not in tensors.direct:
        return None
    stored, dtype = tensors.shape_of(name)
    if f"{path}.scales" not in tensors.direct:
        return (lambda first, last: tensors.rows(name, first, last)) if tuple(stored) == shape and dtype in DTYPES \
            else None
    q = stored_quantization(config.get("quantization") or {}, path)
    bits, group, mode = q.get("bits"), q.get("group_size"), q.get("mode", "affine")
    scales = tensors.shape_of(f"{path}.scales")[0]
    if (dtype != "U32" or bits not in range(1, 9) or group not in (16, 32, 64, 128)  # a config is not trusted
            or tuple(stored) != (*shape[:2], shape[2] * bits // 32) or tuple(scales) != (*shape[:2], shape[2] // group)):
        return None
    biases = f"{path}.biases" if f"{path}.biases" in tensors.direct else None

    def read(first, last):
        return exact_dequantize(tensors.rows(name, first, last), tensors.rows(f"{path}.scales", first, last),
                                tensors.rows(biases, first, last) if biases else None, group, bits, mode)
    return read


def _slice_of_stack(raw, where: tuple | None, shape: tuple):
    """Blocks cut from a stacked tensor the checkpoint holds (``(name, first, last)``:
    ``tensor[:, first:last]``), read a block of experts at a time."""
    if where is None:
        return None
    name, first, last = where
    stored = tuple(raw.shape_of(name)[0])
    if len(stored) != 3 or (stored[0], last - first, stored[2]) != shape:
        return None
    return lambda a, b: raw.rows(name, a, b)[:, first:last]


def _apart(raw, names: list[str] | None, shape: tuple):
    """Blocks stacked from the checkpoint's per-expert matrices ``names``."""
    if names is None or len(names) != shape[0] or any(tuple(raw.shape_of(n)[0]) != shape[1:] for n in names):
        return None
    return lambda first, last: mx.stack([raw.rows(n, 0, shape[1]) for n in names[first:last]])
