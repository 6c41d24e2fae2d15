"""What a rank puts in place of what other ranks hold: parameterless stand-ins for their
layers (two of them pass activations to and from the neighbouring ranks), the embedding
and the head, so nothing of theirs is read and module paths stay the model's own."""

import mlx.core as mx
import mlx.nn as nn

from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import layer_index
from lsaq_mlx.planning.pipeline import PipelinePlan
from lsaq_mlx.planning.plan import QuantPlan


class OtherRanksLayer(nn.Module):
    """A decoder layer another rank holds: the activations pass through. It keeps the
    layer's plain attributes (``use_sliding``, ``is_linear``...), which a model's forward
    and ``make_cache`` read."""

    def like(self, layer: nn.Module) -> "OtherRanksLayer":
        for name, value in vars(layer).items():
            if not name.startswith("_"):
                object.__setattr__(self, name, value)
        return self

    def __call__(self, x, *args, **kwargs):
        return x


class ReceiveActivations(OtherRanksLayer):
    """In place of the layer before this rank's first: the previous rank's activations."""

    def __init__(self, source: int):
        super().__init__()
        self.source = source

    def __call__(self, x, *args, **kwargs):
        return mx.distributed.recv_like(x, self.source)


class SendActivations(OtherRanksLayer):
    """In place of the layer after this rank's last: the activations go to the next rank."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target
        self.sent = None

    def __call__(self, x, *args, **kwargs):
        self.sent = mx.distributed.send(x, self.target)
        return x


class EmbeddingStandIn(nn.Module):
    """The token embedding on a rank that does not hold it: zeros of the activations'
    shape, which the received activations replace (and a head that computes nothing)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.dtype = mx.float32

    def __call__(self, tokens):
        return mx.zeros((*tokens.shape, self.hidden), self.dtype)

    def as_linear(self, x):
        return x


class HeadStandIn(nn.Module):
    """The LM head (or a final module outside the layers) on a rank other than the last."""

    def __call__(self, x, *args, **kwargs):
        return x


def rank_plan(pipeline: PipelinePlan, rank: int) -> QuantPlan:
    """The modules of ``pipeline``'s plan that ``rank`` holds."""
    from dataclasses import replace

    plan = pipeline.plan
    return replace(plan, modules={p: c for p, c in plan.modules.items() if rank in pipeline.rank_of(p)})


def keep_share(model: nn.Module, pipeline: PipelinePlan, rank: int) -> None:
    """Replace what ``rank`` does not hold in ``model`` (lazily loaded: nothing replaced
    is ever read) with stand-ins, and put the transfers in the slots around its layers."""
    share = pipeline.share(rank)
    layers = _decoder_layers(model)
    for i in range(len(layers)):
        if i not in share.layers:
            stand_in = (ReceiveActivations(rank - 1) if i == share.first_layer - 1 else
                        SendActivations(rank + 1) if i == share.end_layer else OtherRanksLayer())
            layers[i] = stand_in.like(layers[i])
    hidden = _hidden_size(model)
    for path, module in list(model.named_modules()):
        if layer_index(path) is not None or not path or rank in pipeline.rank_of(path):
            continue
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            _replace(model, path, EmbeddingStandIn(hidden))
        elif isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            _replace(model, path, HeadStandIn())


def _decoder_layers(model: nn.Module) -> list:
    """The model's own list of decoder layers (``model.layers`` may be a copy: mlx-lm's
    pipelined models return a slice of it)."""
    first = next(path for path, _ in model.named_modules() if path.endswith("layers.0"))
    parent, _, name = first.removesuffix(".0").rpartition(".")
    return (dict(model.named_modules())[parent] if parent else model)[name]


def _hidden_size(model) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "hidden_size", None) or getattr(getattr(args, "text_config", None), "hidden_size", None)
    if not size:
        raise UserError("cannot find this model's hidden size to pipeline it")
    return int(size)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = dict(model.named_modules())[parent_path] if parent_path else model
    setattr(parent, name, module)
