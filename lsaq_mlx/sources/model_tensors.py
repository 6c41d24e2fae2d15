"""A checkpoint's tensors under the names of the model's parameters, read lazily one at
a time or one decoder layer at a time.

mlx-lm's ``sanitize`` maps a checkpoint's tensors to the model's parameters when it
loads. Run once on unread placeholders, it shows which tensors it only renames or keeps:
those are read by name. Where it transforms a layer's tensors (experts stored apart and
stacked into one ``SwitchLinear`` weight, fused projections split, norms stored as
offsets), it is run again when the layer is read, on that layer's tensors with unread
placeholders of all the others (a sanitize may decide from the whole checkpoint what to
do: Qwen3.5 shifts every norm when any convolution is in Hugging Face's layout), and the
layer's parameters are taken from it, so memory stays one layer's. The tensors outside
the layers are one more such group.
"""

import copy
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import layer_index

DTYPES = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}
# what MLX loads each stored dtype as (FP8 codes come as uint8, as ``mx.from_fp8`` takes them)
LOADED_AS = DTYPES | {"F8_E4M3": mx.uint8, "F8_E5M2": mx.uint8, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16,
                      "I16": mx.int16, "U32": mx.uint32, "I32": mx.int32, "U64": mx.uint64, "I64": mx.int64,
                      "BOOL": mx.bool_}


class NotStreamable(UserError):
    """The checkpoint's tensors are not the model's one for one."""

    def __init__(self, why: str):
        super().__init__(f"cannot read this checkpoint one layer at a time: {why}")


class ModelTensors:
    """``tensors`` (a ``SourceTensors``, a pack's) under ``model``'s parameter names."""

    def __init__(self, tensors, model: nn.Module):
        self.tensors, self.folder = tensors, getattr(tensors, "folder", None)
        stand_ins = placeholders(tensors, tensors.names)
        self.direct, transformed = _checkpoint_names(model, stand_ins)
        # a model quantized in memory has scales and biases the float checkpoint lacks
        params = [n for n, _ in tree_flatten(model.parameters()) if not n.endswith((".scales", ".biases"))]
        raw = {}
        for name, array in stand_ins.items():
            raw.setdefault(layer_index(name), {})[name] = array
        self.sanitizers = {i: _LayerSanitizer(model, raw, i, {n for n in params if layer_index(n) == i
                                                             and n not in self.direct}) for i in transformed}
        self.files = {n: tensors.files[raw] for n, raw in self.direct.items() if raw in getattr(tensors, "files", {})}

    @property
    def bytes_read(self) -> int:
        return self.tensors.bytes_read

    @property
    def names(self) -> list[str]:
        return list(self.direct) + [n for s in self.sanitizers.values() for n in s.names]

    def get(self, name: str) -> mx.array | None:
        """The model's parameter ``name``, unread until evaluated (None if there is none)."""
        sanitizer = self.sanitizers.get(layer_index(name))
        if name not in self.direct and sanitizer is not None:
            return sanitizer.arrays(self.tensors.get).get(name)
        return self.tensors.get(self.direct[name]) if name in self.direct else None

    def layer(self, index: int, names) -> dict[str, mx.array | None]:
        """The parameters ``names`` of decoder layer ``index`` (one sanitize for all)."""
        sanitizer = self.sanitizers.get(index)
        if sanitizer is None:
            return {n: self.get(n) for n in names}
        arrays = sanitizer.arrays(self.tensors.get)
        return {n: arrays.get(n) for n in names}

    def shape_of(self, name: str):
        return self.tensors.shape_of(self.direct[name])

    def stacked(self, index: int) -> dict[str, list[str]]:
        """``{parameter: [checkpoint tensors]}`` of decoder layer ``index``'s parameters
        that sanitize makes by stacking whole checkpoint tensors (experts stored apart),
        in stacking order."""
        sanitizer = self.sanitizers.get(index)
        return sanitizer.stacked(self.tensors) if sanitizer is not None else {}

    def sliced(self, index: int) -> dict[str, tuple[str, int, int]]:
        """``{parameter: (checkpoint tensor, first, last)}`` of decoder layer ``index``'s
        parameters that sanitize cuts from a stacked tensor as ``tensor[:, first:last]``
        (Qwen3.5's experts' ``gate_up_proj`` split in two)."""
        sanitizer = self.sanitizers.get(index)
        return sanitizer.sliced(self.tensors) if sanitizer is not None else {}

    def rows(self, name: str, start: int, stop: int) -> mx.array:
        return self.tensors.rows(self.direct[name], start, stop)


def _checkpoint_names(model: nn.Module, stand_ins: dict) -> tuple[dict[str, str], set[int | None]]:
    """Model parameter name -> checkpoint tensor name, through mlx-lm's ``sanitize`` run on
    unread placeholders, for the tensors it renames or keeps; and the decoder layers
    whose tensors it transforms (they are sanitized one layer at a time)."""
    sanitized = sanitized_by(model, dict(stand_ins)) if hasattr(model, "sanitize") else dict(stand_ins)
    by_id = {id(array): name for name, array in stand_ins.items()}
    names, transformed = {}, set()
    for name, array in sanitized.items():
        if id(array) in by_id:
            names[name] = by_id[id(array)]
        else:
            transformed.add(layer_index(name))  # None: outside the layers
    return names, transformed


def placeholders(tensors, names) -> dict[str, mx.array]:
    """Unread stand-ins of the checkpoint's tensors: their shapes and dtypes, no data."""
    out = {}
    for name in names:
        shape, dtype = tensors.shape_of(name)
        out[name] = mx.zeros(shape, LOADED_AS.get(dtype, mx.float32)) if len(shape) else mx.zeros(())
    return out


class _LayerSanitizer:
    """mlx-lm's ``sanitize`` for one decoder layer's checkpoint tensors (``index`` None:
    those outside the layers), checked on placeholders when made: it must give every
    parameter ``wanted`` names. It runs with placeholders of the checkpoint's other
    tensors beside the layer's; where that fails, on the layer's tensors alone, and for
    sanitizers that look for layer 0's tensors (mixtral's) with the layer under index 0
    (its names given back)."""

    def __init__(self, model: nn.Module, stand_ins: dict, index: int | None, wanted: set[str]):
        """``stand_ins``: placeholders of the checkpoint's tensors by layer."""
        self.model, self.index, self.stand_ins = model, index, stand_ins
        self.raw = list(stand_ins.get(index, {}))
        for mode in ("in context", "alone", "renumbered"):
            self.mode = mode
            if mode == "renumbered" and index is None:
                break
            try:
                out = self._sanitized(stand_ins.get(index, {}))
            except Exception:  # a sanitize that needs what this mode does not give it
                continue
            if wanted <= set(out):
                self.names = list(out)
                return
        where = "the tensors outside the layers" if index is None else f"layer {index}'s parameters"
        raise NotStreamable(f"mlx-lm's sanitize does not give {where} from the layer's tensors")

    def stacked(self, tensors) -> dict[str, list[str]]:
        """See ``ModelTensors.stacked``: sanitize run on small distinct stand-ins of the
        layer's 2-D float tensors (the rest unread placeholders); a parameter made of
        them is a stack where each of its matrices is exactly one of them."""
        shapes = {n: tensors.shape_of(n) for n in self.raw}
        small = [n for n in self.raw if len(shapes[n][0]) == 2 and shapes[n][1] in DTYPES]
        marks = {n: mx.arange(6, dtype=mx.float32).reshape(2, 3) + 8 * k for k, n in enumerate(small)}
        try:
            out = self._sanitized(self.stand_ins.get(self.index, {}) | marks)
        except Exception:  # a sanitize that reads the real shapes
            return {}
        stacks = {}
        for name, array in out.items():
            if array.shape[1:] != (2, 3) or array.ndim != 3 or not mx.issubdtype(array.dtype, mx.floating):
                continue
            values = np.array(array.astype(mx.float32))
            which = [int(v[0, 0]) // 8 for v in values]
            if all(0 <= k < len(small) and np.array_equal(v, np.array(marks[small[k]])) for k, v in zip(which, values)):
                stacks[name] = [small[k] for k in which]
        return stacks

    def sliced(self, tensors) -> dict[str, tuple[str, int, int]]:
        """See ``ModelTensors.sliced``: sanitize run with each 3-D float tensor of the layer
        replaced by a marked stand-in of two experts and one column (its second axis as
        stored); a parameter made of them is a slice when its values are one stand-in's
        consecutive rows for both experts."""
        shapes = {n: tensors.shape_of(n) for n in self.raw}
        stacks = [n for n in self.raw if len(shapes[n][0]) == 3 and shapes[n][1] in DTYPES]
        offsets, offset, marks = {}, 0, {}
        for n in stacks:
            rows = shapes[n][0][1]
            offsets[n] = offset
            marks[n] = mx.arange(offset, offset + 2 * rows, dtype=mx.float32).reshape(2, rows, 1)
            offset += 2 * rows
        if not stacks or offset >= 1 << 24:  # float32 holds each mark exactly
            return {}
        try:
            out = self._sanitized(self.stand_ins.get(self.index, {}) | marks)
        except Exception:  # a sanitize that reads the real shapes
            return {}
        found = {}
        for name, array in out.items():
            if array.ndim != 3 or array.shape[0] != 2 or array.shape[2] != 1 or not mx.issubdtype(array.dtype,
                                                                                                  mx.floating):
                continue
            values = np.array(array.astype(mx.float32))[:, :, 0]
            source = next((n for n in stacks if offsets[n] <= values[0, 0] < offsets[n] + shapes[n][0][1]), None)
            if source is None:
                continue
            rows, first = shapes[source][0][1], int(values[0, 0]) - offsets[source]
            expected = offsets[source] + first + np.arange(values.shape[1])
            if np.array_equal(values, np.stack([expected, expected + rows])):
                found[name] = (source, first, first + values.shape[1])
        return found

    def arrays(self, read) -> dict[str, mx.array]:
        """The layer's parameters by model name, from ``read(checkpoint name)`` (lazy)."""
        return self._sanitized({n: read(n) for n in self.raw})

    def _sanitized(self, tensors: dict) -> dict[str, mx.array]:
        if self.mode == "in context":
            others = {n: a for i, group in self.stand_ins.items() if i != self.index for n, a in group.items()}
            out = sanitized_by(self.model, others | tensors)
            return {n: a for n, a in out.items() if layer_index(n) == self.index}
        if self.mode == "alone":
            return sanitized_by(self.model, dict(tensors))
        out = sanitized_by(self.model, {_with_layer(n, self.index, 0): a for n, a in tensors.items()})
        return {_with_layer(n, 0, self.index): a for n, a in out.items()}


def sanitized_by(model: nn.Module, tensors: dict) -> dict:
    """mlx-lm's ``sanitize`` of ``tensors``, with what it changes in ``model`` (a child
    removed, a flag set: Gemma 3's drops ``lm_head`` where the checkpoint has none) made
    to ``model`` as loading does, and found already made a second time (run on the
    model itself, Gemma 3's would fail on the ``lm_head`` it removed before)."""
    twin = copy.copy(model)
    twin.pop = lambda key, *default: dict.pop(twin, key, *(default or (None,)))
    out = twin.sanitize(tensors)
    for key in [k for k in model if k not in twin]:
        model.pop(key)
    model.__dict__.update({k: v for k, v in vars(twin).items() if k != "pop"})
    return out


def _with_layer(name: str, old: int, new: int) -> str:
    return re.sub(rf"(^|\.)layers\.{old}\.", rf"\g<1>layers.{new}.", name, count=1)
