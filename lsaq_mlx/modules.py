"""Module paths of mlx-lm models (``model.layers.3.mlp.up_proj``): which decoder layer a
module belongs to, and the module a path names."""

import re

import mlx.nn as nn

from lsaq_mlx.errors import UserError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """The decoder layer ``path`` lies in; None for embeddings, the final norm, the LM head."""
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


def layer_label(path: str) -> str:
    """``"3"`` for a module of decoder layer 3, ``"rest"`` for the others."""
    index = layer_index(path)
    return "rest" if index is None else str(index)


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at ``path``."""
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else m[part]
    return m


def by_layer(items: dict) -> list[dict]:
    """``{path: value}`` split into one dict per decoder layer, in layer order, the
    modules outside the layers last."""
    groups: dict[int, dict] = {}
    for path, value in items.items():
        index = layer_index(path)
        groups.setdefault(1 << 30 if index is None else index, {})[path] = value
    return [groups[k] for k in sorted(groups)]


def shard_groups(params: dict) -> list[dict]:
    """``{name: array}`` split into one dict per decoder layer, in layer order, then one
    per module outside the layers (the embeddings and the LM head each alone): the
    shards of a written model."""
    return _grouped(params, lambda name: "")


def module_groups(params: dict) -> list[dict]:
    """``{name: array}`` split into one dict per module, in layer order: what is computed
    at once to bound memory by the largest module."""
    return _grouped(params, lambda name: name.rpartition(".")[0])


def _grouped(params: dict, within_layer) -> list[dict]:
    groups: dict = {}
    for name, value in params.items():
        index = layer_index(name)
        key = (0, index, within_layer(name)) if index is not None else (1, 0, name.rpartition(".")[0])
        groups.setdefault(key, {})[name] = value
    return [groups[k] for k in sorted(groups)]


INNER_PATHS = ("model", "language_model.model", "backbone")  # backbone: nemotron_h
FINAL_NORMS = ("norm", "norm_f", "embedding_norm", "final_layernorm")  # norm_f: nemotron_h, embedding_norm: lfm2
EMBEDDINGS = ("embed_tokens", "embeddings")


def inner_model(model: nn.Module) -> nn.Module:
    """The module holding embeddings, layers and the final norm (``model.model`` in most
    of mlx-lm; its names for the parts: ``final_norm``, ``embedding``)."""
    for path in INNER_PATHS:
        inner = model
        for part in path.split("."):
            inner = inner.get(part) if isinstance(inner, dict) else None
            if inner is None:
                break
        if inner is not None and "layers" in inner and any(n in inner for n in FINAL_NORMS):
            return inner
    raise UserError(f"{type(model).__module__} models are not supported: no inner model with layers and a final norm")


def final_norm(inner: nn.Module) -> str:
    """The name of the inner model's final norm."""
    return next(n for n in FINAL_NORMS if n in inner)


def embedding(inner: nn.Module) -> str | None:
    """The name of the inner model's token embedding (None if it has none)."""
    return next((n for n in EMBEDDINGS if n in inner), None)


def layer_hidden(out):
    """A decoder layer's hidden states from what it returns: most return them alone,
    Gemma 4's a tuple that also holds the keys and values later layers share."""
    return out[0] if isinstance(out, tuple) else out
