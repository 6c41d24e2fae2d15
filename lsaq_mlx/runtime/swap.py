"""Hot swap: change the precision of some modules of a loaded model, in place.

Each new module is computed from the highest-precision copy on disk (the source model's
safetensors or pack, read lazily one tensor at a time, never from the current low-bit
copy), or read ready-made from a layer store (``lsaq_mlx.storage.layer_store``),
evaluated before it replaces the old one, and the old one's memory is released at once.
A module that fails keeps its old weights; the failure is reported, the rest goes on.
"""

import logging
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.convert import MatrixRows, quantize_by_row_blocks
from lsaq_mlx.modules import by_layer, module_at
from lsaq_mlx.sources.tensors import SourceTensors

log = logging.getLogger(__name__)


def quantized_module(old: nn.Module, path: str, choice, weights: SourceTensors) -> nn.Module:
    """The module at ``path`` with precision ``choice`` from the source weights, as it is
    stored (float16 scales, biases and kept weights); the stored arrays themselves where
    a quantized source stores the module at ``choice``."""
    stored = weights.stored_as(path, choice) if hasattr(weights, "stored_as") else None
    if stored is not None:
        return module_from_arrays(old, choice, stored)
    w = weights.get(f"{path}.weight")
    if w is None:
        raise FileNotFoundError(f"{path}.weight is not in {weights.folder}")
    bias = weights.get(f"{path}.bias")
    new = _float_like(old, bias is not None)
    new.weight = w.astype(mx.float32)
    if bias is not None:
        new.bias = bias
    holder = nn.Module()
    holder.m = choice.module(new)
    stored_rows = weights.stored_rows(f"{path}.weight") if hasattr(weights, "stored_rows") else None
    rows = MatrixRows(w, weights, f"{path}.weight", stored_rows)
    if "scales" in holder.m and w.size * 4 > rows.block_bytes:
        quantize_by_row_blocks(holder, {"m": rows})
    holder.m.set_dtype(mx.float16)
    return holder.m


def _float_like(old: nn.Module, bias: bool) -> nn.Module:
    """An empty float module of ``old``'s kind (weights set by the caller)."""
    if isinstance(old, (nn.Embedding, nn.QuantizedEmbedding)):
        return nn.Embedding(1, 1)
    if isinstance(old, (SwitchLinear, QuantizedSwitchLinear)):
        return SwitchLinear(1, 1, 1, bias=bias)
    return nn.Linear(1, 1, bias=bias)


def float_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of ``module``'s weight as a float matrix (a quantized one unpacked)."""
    *rest, cols = module.weight.shape
    return (*rest, cols * 32 // module.bits) if "scales" in module else (*rest, cols)


def module_from_arrays(old: nn.Module, choice, arrays: dict) -> nn.Module:
    """The module ``choice`` makes of ``old`` (its kind and shape), holding ``arrays``
    (read from a file: any parameter missing, unexpected, of another shape, or codes
    where values belong and back, is refused)."""
    holder = nn.Module()
    new = _float_like(old, "bias" in arrays)
    new.weight = mx.zeros(float_shape(old), mx.float32)  # lazy: only its shape is read
    if "bias" in arrays:
        new.bias = mx.zeros(old.bias.shape if "bias" in old else arrays["bias"].shape)
    holder.m = choice.module(new)
    expected = dict(tree_flatten(holder.m.parameters()))
    if set(arrays) != set(expected):
        raise ValueError(f"{choice.label} needs {', '.join(sorted(expected))}, not {', '.join(sorted(arrays))}")
    for name, value in arrays.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name} is {tuple(value.shape)}, not {tuple(expected[name].shape)}")
        if mx.issubdtype(value.dtype, mx.floating) != mx.issubdtype(expected[name].dtype, mx.floating):
            raise ValueError(f"{name} is {value.dtype}, not {expected[name].dtype}")
    holder.m.update(tree_unflatten(list(arrays.items())))
    return holder.m


def module_maker(model: nn.Module, weights):
    """``make(path, choice)``: the module of ``model`` at ``path`` quantized at ``choice``
    from ``weights`` (what a layer store is built with)."""
    modules = dict(model.named_modules())
    return lambda path, choice: quantized_module(modules[path], path, choice, weights)


def build_module(old: nn.Module, path: str, choice, weights: SourceTensors, float32_compute: bool,
                 store=None, float_copy: bool = False) -> nn.Module:
    """The module at ``path`` with precision ``choice``: read ready from ``store`` (a
    ``storage.layer_store.LayerStore``) when it holds it, else quantized from the source;
    for float32 compute dequantized when ``float_copy``, else kept as stored (hybrid)."""
    new = store.module(path, choice) if store is not None else None
    if new is not None:
        try:
            new = module_from_arrays(old, choice, dict(tree_flatten(new.parameters())))
        except ValueError as e:
            log.warning("warning: the stored %s of %s does not fit it (%s); rounding it from the weights instead",
                        choice.label, path, e)
            new = None
    if new is None:
        new = quantized_module(old, path, choice, weights)
    holder = nn.Module()
    holder.m = new
    prepare_for_compute(holder, "float32" if float32_compute else "quantized", {"m"} if float_copy else set())
    return holder.m


@dataclass
class SwapReport:
    changed: list[str] = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # path -> message
    seconds: float = 0.0
    source_bytes: int = 0  # read from the source to re-quantize
    store_bytes: int = 0  # read from the layer store (compressed)

    def merge(self, other: "SwapReport") -> None:
        self.changed += other.changed
        self.failed |= other.failed
        self.seconds += other.seconds
        self.source_bytes += other.source_bytes
        self.store_bytes += other.store_bytes


@dataclass
class SwapInProgress:
    """A plan change applied one layer group at a time (between tokens while a reply
    streams): what is left, what was done, where it came from, who waits for it."""

    groups: list[dict]  # layer groups of path -> choice still to swap
    from_bits_per_weight: float | None
    reason: str
    memory_before: dict
    replies: list = field(default_factory=list)  # Futures that get its Swapped
    report: SwapReport = field(default_factory=SwapReport)
    at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)


def swap_modules(model: nn.Module, changes: dict, weights: SourceTensors, float32_compute: bool,
                 store=None, float_paths: set[str] | None = None) -> SwapReport:
    """Replace every module of ``changes`` (path -> choice) by its new precision. For
    float32 compute, those at ``float_paths`` are dequantized (the model's bounded float32
    copy, see ``backend.compute.prepare_for_compute``); default: the modules that are
    float now."""
    report, start = SwapReport(), time.perf_counter()
    source_before, store_before = getattr(weights, "bytes_read", 0), getattr(store, "bytes_read", 0)
    for path, choice in changes.items():
        try:
            old = module_at(model, path)
            float_copy = not _is_quantized(old) if float_paths is None else path in float_paths
            new = build_module(old, path, choice, weights, float32_compute, store, float_copy)
        except Exception as e:  # keep the old weights, report, go on
            report.failed[path] = f"{type(e).__name__}: {e}"
            continue
        model.update_modules(tree_unflatten([(path, new)]))
        del new
        mx.clear_cache()
        report.changed.append(path)
    report.seconds = time.perf_counter() - start
    report.source_bytes = getattr(weights, "bytes_read", 0) - source_before
    report.store_bytes = getattr(store, "bytes_read", 0) - store_before
    return report


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def layer_groups(changes: dict) -> list[dict]:
    """``changes`` split by decoder layer (modules outside layers last), for swapping
    one layer between two generated tokens."""
    return by_layer(changes)
