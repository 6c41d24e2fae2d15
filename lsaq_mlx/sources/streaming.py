"""A model whose decoder layers hold their weights only while they run.

``StreamedModel`` is a source's mlx-lm model built from its config (no weights), with
everything outside the decoder layers (embeddings, final norm, LM head) loaded, and
each layer's weights read from disk when ``with streamed.layer(i)`` enters and dropped
when it leaves. ``run_layers`` sends a batch of token sequences through the model's own
forward that way: each layer runs once on the whole batch, its output is evaluated, its
weights are released, and ``on_layer`` sees the layer (weights loaded), its input and
output. So peak memory is one layer, the resident parts and the activations, whatever
the number of layers.

Weights come in the compute dtype (float32 on the CPU backend, where MLX's float16
matmul is slow; the source's own float type on a GPU), except on the CPU the embeddings
and LM head, which stay as stored (float, or quantized codes) and are upcast or
dequantized in row blocks as they are used (``backend.hybrid``), and
stacked experts, which are not held at all: each call reads and upcasts a block of
experts at a time (``sources.expert_stacks``, ``backend.expert_blocks``), or where the
checkpoint cannot be read in parts (a pack) they stay as stored if float. Quantized
sources are dequantized exactly. Tensors are read under the model's names
(``model_tensors``: mlx-lm's ``sanitize`` run a layer at a time where it transforms
them). So a layer's memory is its weights other than the experts, one block of
``EXPERT_BLOCK_BYTES`` experts in float32, and the activations.
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import SwitchLinear

from lsaq_mlx.backend.compute import backend
from lsaq_mlx.backend.expert_blocks import make_blocked
from lsaq_mlx.backend.hybrid import exact_dequantize
from lsaq_mlx.backend.hybrid import make_hybrid
from lsaq_mlx.modules import final_norm, inner_model, layer_hidden, layer_index
from lsaq_mlx.sources.expert_stacks import checkpoint_experts
from lsaq_mlx.sources.load import skeleton_model
from lsaq_mlx.sources.model_tensors import DTYPES, ModelTensors, NotStreamable
from lsaq_mlx.sources.tensors import source_tensors, stored_quantization
from lsaq_mlx.settings import settings

STREAM_ABOVE_BYTES = 1 << 30  # auto: stream models whose compute weights take more


def streams(source) -> bool:
    """Whether stages read ``source`` one layer at a time: always above
    ``STREAM_ABOVE_BYTES`` of compute weights (unless told never), below it (where the
    whole model in memory runs faster, on every core) only when told always."""
    wanted = settings().stream
    if wanted in ("always", "never"):
        return wanted == "always"
    model, _ = skeleton_model(source)
    return sum(v.size for _, v in tree_flatten(model.parameters())) * 4 > STREAM_ABOVE_BYTES


class StreamedModel:
    def __init__(self, source, dtype=None):
        self.source = source
        self.model, self.config = skeleton_model(source, shaped=False)
        self.tensors = ModelTensors(source_tensors(source), self.model)  # named as loading would
        self.dtype = dtype or _compute_dtype(self.tensors.tensors)
        self.layers = inner_model(self.model)["layers"]
        self.prefixes = _layer_prefixes(self.model, self.layers)
        modules = dict(self.model.named_modules())
        self.expert_stacks = checkpoint_experts(self.tensors, self.config, self.model) \
            if self.dtype == mx.float32 else {}
        for path, stack in self.expert_stacks.items():
            make_blocked(modules[path], stack)
        self._idle = [dict(tree_flatten(layer.parameters())) for layer in self.layers]  # never evaluated: no memory
        self._codes_kept = _keep_codes(self.model, self.tensors, self.config) if self.dtype == mx.float32 else set()
        resident = [n for n, _ in tree_flatten(self.model.parameters()) if layer_index(n) is None]
        self._stored = _hybrid_matrices(self.model) | _float_experts(self) if self.dtype == mx.float32 else set()
        self._resident = resident
        self.resident_bytes = self._load_resident(resident)
        for path, module in self.model.named_modules():
            if f"{path}.weight" in self._stored:
                make_hybrid(module) or make_blocked(module)

    def _load_resident(self, names) -> int:
        loaded = [(n, self._read(n, keep_dtype=n in self._stored)) for n in names]
        self.model.update(tree_unflatten(loaded))
        mx.eval([a for _, a in loaded])  # not the layers' placeholders: evaluated, they would take memory
        return sum(a.nbytes for _, a in loaded)

    @contextmanager
    def matrices_released(self, only: set[str] | None = None):
        """Within the block the matrices outside the layers (embeddings, LM head; or the
        parameters ``only``) are not in memory (unevaluated placeholders); they are read
        again after it. For work on the layers alone, where they would be the largest
        thing held."""
        params = dict(tree_flatten(self.model.parameters()))
        names = [n for n in self._resident if n.endswith(".weight") and params[n].ndim == 2
                 and (only is None or n in only)]
        self.model.update(tree_unflatten([(n, mx.zeros(params[n].shape, params[n].dtype)) for n in names]))
        del params
        mx.clear_cache()
        try:
            yield
        finally:
            self._load_resident(names)

    def layer_parameters(self, i: int) -> dict[str, mx.array]:
        """Layer ``i``'s weights (names relative to the layer), unread until evaluated."""
        names = [self.prefixes[i] + n for n in self._idle[i]]
        scales = [f"{n.rpartition('.')[0]}.scales" for n in names] + [f"{n.rpartition('.')[0]}.biases" for n in names]
        arrays = self.tensors.layer(i, names + scales)
        return {n: self._read(self.prefixes[i] + n, arrays=arrays, keep_dtype=self.prefixes[i] + n in self._stored)
                for n in self._idle[i]}

    @contextmanager
    def layer(self, i: int):
        """Within the block, layer ``i`` holds its weights; they are released after."""
        layer = self.layers[i]
        params = self.layer_parameters(i)
        layer.update(tree_unflatten(list(params.items())))
        # made alone: experts' stacks (a pack's), and every dequantized matrix (MLX's CPU dequantize
        # of 3-, 5- and 6-bit codes holds about 7x its float32 output)
        quantized = self.config.get("quantization")
        for a in (a for a in params.values() if quantized or a.ndim == 3):
            mx.eval(a)
        mx.eval(layer.parameters())  # together: a fused tensor split in two is read once
        try:
            yield layer
        finally:
            layer.update(tree_unflatten(list(self._idle[i].items())))
            mx.clear_cache()

    def _read(self, name: str, keep_dtype: bool = False, arrays: dict | None = None) -> mx.array:
        """A parameter in the compute dtype; with ``keep_dtype`` a float one stays as stored.
        ``arrays``: the layer's tensors, read together (else read by name)."""
        def get(model_name):
            return arrays.get(model_name) if arrays is not None else self.tensors.get(model_name)

        path, _, param = name.rpartition(".")
        array = get(name)
        if array is None:
            raise NotStreamable(f"{name} is not in the checkpoint")
        if path in self._codes_kept:
            return array
        scales = get(f"{path}.scales")
        if param == "weight" and scales is not None:
            q = stored_quantization(self.config.get("quantization") or {}, path)
            biases = get(f"{path}.biases")
            array = exact_dequantize(array, scales, biases, q["group_size"], q["bits"], q.get("mode", "affine"))
        if keep_dtype and scales is None or not mx.issubdtype(array.dtype, mx.floating):
            return array
        return array.astype(self.dtype)

    def run_layers(self, tokens: mx.array, on_layer=None, batch_rows: int | None = None) -> mx.array:
        """The final hidden states (before the final norm) of ``tokens`` (batch, length),
        each layer loaded once for the whole batch and run on ``batch_rows`` sequences at
        a time (all at once by default; fewer bound the layer's temporaries);
        ``on_layer(i, layer, x_in, x_out, forward)`` is called with the layer's weights
        loaded, ``forward(h, start=0)`` running the layer on other hidden states of the
        same length (with the mask the model gave it) for the batch's sequences from
        ``start`` on; what it returns, if not None, is passed on in place of ``x_out``.
        A layer that returns more than its hidden states (Gemma 4's: the keys and
        values later layers share) is seen by ``on_layer`` as its hidden states; the
        rest is passed on as computed."""
        inner = inner_model(self.model)
        stream = self
        rows = batch_rows or tokens.shape[0]

        def run(self_layer, index, cls, x, *args, **kwargs):
            batch = x.shape[0]  # not x: the Fisher keeps every layer's forward, which must not hold its input

            with stream.layer(index) as layer:
                def call(h, start=0):  # inputs per sequence (Gemma 4's) for the same sequences as h
                    a, k = _batch_rows((args, kwargs), batch, start, h.shape[0])
                    return cls.__call__(layer, h, *a, **k)

                out = forward_by_rows(call, x, rows)
                if on_layer is not None:
                    replaced = on_layer(index, layer, x, layer_hidden(out),
                                        lambda h, start=0: layer_hidden(call(h, start)))
                    out = out if replaced is None else _with_hidden(out, replaced)
            return out

        originals = [type(layer) for layer in self.layers]
        for index, layer in enumerate(self.layers):
            cls = type(layer)
            layer.__class__ = type(f"Streamed{cls.__name__}", (cls,), {
                "__call__": lambda s, x, *a, _i=index, _c=cls, **k: run(s, _i, _c, x, *a, **k)})
        try:
            hidden = _hidden_states(inner, tokens)
        finally:
            for layer, cls in zip(self.layers, originals):
                layer.__class__ = cls
        return hidden


def forward_by_rows(forward, x: mx.array, rows: int):
    """``forward(x)``, evaluated, computed ``rows`` sequences at a time (an output that is
    a tuple: each array in it joined along the batch)."""
    if rows >= x.shape[0]:
        out = forward(x)
        mx.eval(out)
        return out
    out = None
    for start in range(0, x.shape[0], rows):
        part = forward(x[start : start + rows], start)
        if out is None:  # filled in place: no second copy of the output while joining
            out = _batch_like(part, x.shape[0])
        _fill(out, part, start)
        mx.eval(out)
    return out


def _batch_rows(value, batch: int, start: int, count: int):
    """``value`` (a layer's other inputs) with each array of per-sequence rows (three or
    more axes, the first the batch's) cut to the ``count`` sequences from ``start``."""
    if count == batch:
        return value
    if isinstance(value, mx.array):
        return value[start : start + count] if value.ndim >= 3 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_rows(v, batch, start, count) for v in value)
    if isinstance(value, dict):
        return {k: _batch_rows(v, batch, start, count) for k, v in value.items()}
    return value


def _batch_like(part, batch: int):
    if isinstance(part, mx.array):
        return mx.zeros((batch, *part.shape[1:]), part.dtype) if part.ndim else part
    return type(part)(_batch_like(p, batch) for p in part) if isinstance(part, (tuple, list)) else part


def _fill(out, part, start: int) -> None:
    if isinstance(out, mx.array) and out.ndim:
        out[start : start + part.shape[0]] = part
    elif isinstance(out, (tuple, list)):
        for o, p in zip(out, part):
            _fill(o, p, start)


def _with_hidden(out, hidden: mx.array):
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _hidden_states(inner: nn.Module, tokens: mx.array) -> mx.array:
    """The inner model's output without its final norm: its forward with the norm as the
    identity (mlx-lm's inner models end with ``self.norm(h)``)."""
    name = final_norm(inner)
    norm = inner[name]
    inner[name] = _Identity()
    try:
        return inner(tokens)
    finally:
        inner[name] = norm


class _Identity(nn.Module):
    def __call__(self, x):
        return x


def _hybrid_matrices(model: nn.Module) -> set[str]:
    """The weights of the linear and embedding modules outside the decoder layers (the
    embeddings, the LM head: the largest matrices), kept as stored and upcast per use
    (``backend.hybrid``) rather than held in float32."""
    kinds = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
    return {f"{p}.weight" for p, m in model.named_modules() if isinstance(m, kinds) and layer_index(p) is None}


def _keep_codes(model: nn.Module, tensors: ModelTensors, config: dict) -> set[str]:
    """Turn the embeddings and LM head that the checkpoint holds quantized into quantized
    modules of its setting, in place, so that they are read as stored codes (a 4-bit head
    of a 152k vocabulary: 0.17 GB, dequantized to float32 1.2 GB); their paths. One whose
    stored shapes or config do not fit is left to be dequantized when read."""
    kept = []
    for path, module in model.named_modules():
        if type(module) not in (nn.Linear, nn.Embedding) or layer_index(path) is not None:
            continue
        q = stored_quantization(config.get("quantization") or {}, path)
        if _stored_codes_fit(tensors, path, tuple(module.weight.shape), q):
            kept.append((path, module.to_quantized(group_size=q["group_size"], bits=q["bits"],
                                                   mode=q.get("mode", "affine"))))
    model.update_modules(tree_unflatten(kept))
    return {p for p, _ in kept}


def _stored_codes_fit(tensors: ModelTensors, path: str, shape: tuple, q: dict) -> bool:
    if f"{path}.weight" not in tensors.direct or f"{path}.scales" not in tensors.direct:
        return False
    bits, group, mode = q.get("bits"), q.get("group_size"), q.get("mode", "affine")
    if bits not in range(1, 9) or group not in (16, 32, 64, 128) or mode not in ("affine", "mxfp4", "nvfp4", "mxfp8"):
        return False  # a config is not trusted
    rows, cols = shape
    stored, dtype = tensors.shape_of(f"{path}.weight")
    return (dtype == "U32" and cols % group == 0 and (cols * bits) % 32 == 0
            and tuple(stored) == (rows, cols * bits // 32)
            and tuple(tensors.shape_of(f"{path}.scales")[0]) == (rows, cols // group))


def _float_experts(streamed) -> set[str]:
    """The weights of the decoder layers' stacked experts that the checkpoint holds as
    floats (quantized ones are dequantized to the compute dtype)."""
    stored = set(streamed.tensors.names)
    return {f"{prefix}{path}.weight" for layer, prefix in zip(streamed.layers, streamed.prefixes)
            for path, module in layer.named_modules()
            if type(module) is SwitchLinear and f"{prefix}{path}.scales" not in stored}


def _layer_prefixes(model: nn.Module, layers) -> list[str]:
    where = {id(m): path for path, m in model.named_modules()}
    return [where[id(layer)] + "." for layer in layers]


def _compute_dtype(tensors) -> mx.Dtype:
    if backend() == "cpu":
        return mx.float32
    floats = [DTYPES[d] for n in tensors.names if (d := tensors.shape_of(n)[1]) in DTYPES]
    return floats[0] if floats else mx.float16
