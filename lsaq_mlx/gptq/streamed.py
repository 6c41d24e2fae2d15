"""GPTQ for every affine module of a plan, in one pass of calibration text through the
source a decoder layer at a time (``sources.streaming.StreamedModel``).

While a layer is loaded its forward runs again with each planned linear module
recording ``H = sum x^T x`` of its inputs (modules that share an input, such as q, k
and v, share one ``H``); each module is then quantized with GPTQ at its planned bits
and group size and written to a scratch folder, one safetensors file per layer. The LM
head's ``H`` comes from the final normed hidden states and it goes through in row
blocks. Embeddings are lookups without an input Hessian: they stay round-to-nearest.
The activations passed on are the float source's, as in ``mlx_lm.gptq``.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from lsaq_mlx.gptq.solver import gptq_quantize, inverse_hessian_factor
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.scoring.lens import find_lens

HEAD_ROW_BLOCK_BYTES = 64 << 20  # float32 bytes of the LM head's rows quantized at once
TOKENS, SEQ_LEN = 16384, 256  # calibration: 2,048 tokens overfit (KL above round to nearest), see README
BATCH_TOKENS = 2048  # calibration tokens a layer runs on at once (its temporaries scale with them)


class _Recorder(nn.Module):
    """A linear module that adds ``x^T x`` of its inputs to ``hessians[key]`` (when it
    is the one module recording that input)."""

    def __init__(self, module: nn.Module, hessians: dict, key: str | None):
        super().__init__()
        self.module, self._hessians, self._key = module, hessians, key

    def __call__(self, x):
        if self._key is not None:
            flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            h = flat.T @ flat
            self._hessians[self._key] = h if self._key not in self._hessians else self._hessians[self._key] + h
        return self.module(x)


def gptq_weights(streamed, tokens: mx.array, choices: dict, scratch: Path, progress=None) -> dict[str, dict]:
    """``{path: {"weight", "scales", "biases"}}`` (lazily read from ``scratch``) of every
    linear module of ``choices`` (path -> planned choice) with an affine choice,
    quantized with GPTQ on ``tokens`` (batch, length)."""
    scratch = Path(scratch)
    affine = {p: c for p, c in choices.items() if isinstance(c, Affine)}
    written: dict[str, dict] = {}
    step = progress or (lambda n=1: None)
    rows = max(1, BATCH_TOKENS // tokens.shape[1])

    def on_layer(i, layer, x_in, x_out, forward):
        prefix = streamed.prefixes[i]
        modules = {p: m for p, m in layer.named_modules() if f"{prefix}{p}" in affine and isinstance(m, nn.Linear)}
        hessians = _layer_hessians(layer, modules, forward, x_in, rows)
        arrays = {}
        factors: dict[str, np.ndarray] = {}
        for p, m in modules.items():
            key = _input_key(p)
            if key not in factors:
                factors[key] = inverse_hessian_factor(hessians[key])
            choice = affine[prefix + p]
            codes = gptq_quantize(np.array(m.weight.astype(mx.float32)), factors[key], choice.bits, choice.group_size)
            arrays |= _named(prefix + p, codes, m)
        written.update(_save(arrays, scratch / f"layer-{i}.safetensors"))
        step()

    hidden = streamed.run_layers(tokens, on_layer, batch_rows=rows)
    lens = find_lens(streamed.model)
    holder = streamed.model.get("language_model", streamed.model)
    if "lm_head" in affine and "lm_head" in holder and isinstance(holder["lm_head"], nn.Linear):
        normed = lens.norm(hidden).reshape(-1, hidden.shape[-1]).astype(mx.float32)
        factor = inverse_hessian_factor(np.array(normed.T @ normed))
        written.update(_save(_head_arrays(holder["lm_head"], factor, affine["lm_head"]), scratch / "lm_head.safetensors"))
    step()
    return written


def _layer_hessians(layer: nn.Module, modules: dict, forward, x_in: mx.array, rows: int) -> dict[str, np.ndarray]:
    """``H`` of each distinct input of ``modules`` (keyed by ``_input_key``), the layer
    run on ``rows`` sequences at a time."""
    hessians: dict = {}
    originals = list(modules.items())
    keys = {}
    for p, _ in originals:
        keys.setdefault(_input_key(p), p)  # the first module reading an input records it
    wrapped = [(p, _Recorder(m, hessians, _input_key(p) if keys[_input_key(p)] == p else None)) for p, m in originals]
    layer.update_modules(tree_unflatten(wrapped))
    try:
        for start in range(0, x_in.shape[0], rows):
            forward(x_in[start : start + rows])
            mx.eval(hessians)
    finally:
        layer.update_modules(tree_unflatten(originals))
    return {k: np.array(h) for k, h in hessians.items()}


_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _input_key(path: str) -> str:
    """Modules reading the same tensor share a key (and so one ``H``)."""
    parent, _, name = path.rpartition(".")
    return f"{parent}.{_SHARED_INPUT.get(name, name)}"


def _head_arrays(head: nn.Linear, factor: np.ndarray, choice: Affine) -> dict:
    rows = max(1, HEAD_ROW_BLOCK_BYTES // (4 * head.weight.shape[1]))
    parts = [gptq_quantize(np.array(head.weight[r : r + rows].astype(mx.float32)), factor, choice.bits,
                           choice.group_size) for r in range(0, head.weight.shape[0], rows)]
    arrays = {"lm_head.weight": np.concatenate([p.weight for p in parts]),
              "lm_head.scales": np.concatenate([p.scales for p in parts]),
              "lm_head.biases": np.concatenate([p.biases for p in parts])}
    return {k: mx.array(v) for k, v in arrays.items()}


def _named(path: str, codes, module: nn.Module) -> dict:
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
