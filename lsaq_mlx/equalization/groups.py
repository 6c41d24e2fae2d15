"""Where a decoder layer's equalizing scales fold (names relative to the layer, as in
mlx-lm's Llama, Qwen, Mistral, SmolLM and Gemma 3 layers; mlx_lm.awq's table):

- ``input_layernorm`` feeds ``q_proj``, ``k_proj``, ``v_proj``;
- the MLP's norm (``pre_feedforward_layernorm`` where the layer has one, as Gemma's
  do, else ``post_attention_layernorm``) feeds ``gate_proj`` and ``up_proj``;
- ``up_proj``'s rows scale ``down_proj``'s input (``down(act(gate x) * up x)``);
- where the projections are fused (phi3's ``qkv_proj`` and ``gate_up_proj``), the same
  norms feed the fused module.

A group whose modules the layer lacks is left out. Folding is checked on the layer's
own calibration inputs (``writer``), so a layer wired differently (a norm that also
feeds something else) is caught rather than written wrong.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from lsaq_mlx.planning.choices import STORED_FLOAT


@dataclass(frozen=True)
class ScaleGroup:
    """``members`` read one input, produced by ``source`` (a norm or a linear module)."""

    source: str
    members: tuple[str, ...]
    through_layer: bool = False  # the members' outputs meet in a nonlinearity: measure the layer's output


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """The groups of ``layer`` in the order they are searched and folded."""
    modules = dict(layer.named_modules())
    mlp_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in modules else "post_attention_layernorm"
    groups = [
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
        ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), True),
        ScaleGroup(mlp_norm, ("mlp.gate_up_proj",), True),
    ]
    return [g for g in groups if all(isinstance(modules.get(p), nn.Linear) for p in g.members)
            and _foldable(modules.get(g.source))]


def _foldable(module) -> bool:
    return isinstance(module, nn.Linear) or (module is not None and _is_norm(module))


def _is_norm(module: nn.Module) -> bool:
    weight = module.get("weight") if isinstance(module, nn.Module) else None
    return "norm" in type(module).__name__.lower() and isinstance(weight, mx.array) and weight.ndim == 1


def norm_offset(norm: nn.Module) -> int:
    """0 for a norm that multiplies by ``weight``, 1 for one that multiplies by
    ``1 + weight`` (Gemma's), found by running it on ones (rms 1)."""
    weight = norm.weight.astype(mx.float32)
    out = norm(mx.ones((1, weight.shape[0]), dtype=norm.weight.dtype)).astype(mx.float32)[0]
    return round(mx.median(out - weight).item())


def folded_source(source: nn.Module, scales: mx.array) -> tuple[dict[str, mx.array], mx.array]:
    """``(params, applied)``: the parameters of ``source`` that make its output
    ``out / applied``, and ``applied``, the scales the members must take. A linear
    source applies ``scales``. A norm's weight is rounded to the float16 it is stored
    in, and each channel's scale is what that stored weight divides by, so the fold
    stays exact as written: Gemma's ``1 + weight`` loses digits where the sum is small
    (the folded norms in float16 with the searched scales doubled Gemma 3 270M's KL)."""
    if isinstance(source, nn.Linear):
        out = {"weight": source.weight / scales[:, None].astype(source.weight.dtype)}
    else:
        offset = norm_offset(source)
        gain = source.weight.astype(mx.float32) + offset
        folded = (gain / scales - offset).astype(STORED_FLOAT).astype(mx.float32)
        stored = folded + offset
        exact = mx.isfinite(stored) & (stored * gain > 0)
        scales = mx.where(exact, gain / mx.where(exact, stored, 1.0), mx.where(gain == 0, scales, 1.0))
        folded = mx.where(exact | (gain == 0), folded, source.weight.astype(mx.float32))
        out = {"weight": folded.astype(source.weight.dtype)}
    if "bias" in source:
        out["bias"] = source.bias / scales.astype(source.bias.dtype)
    return out, scales
