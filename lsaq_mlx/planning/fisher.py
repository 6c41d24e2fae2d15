"""The diagonal empirical Fisher information of every quantizable weight, one decoder
layer at a time.

The Fisher of a weight is the mean over calibration sequences of its squared gradient
of the sequence's next-token cross-entropy. Computed for the whole model at once it
needs every gradient in memory (about ten bytes per parameter); here, on a
``StreamedModel``:

1. a forward pass keeps each layer's input for the batch of sequences, on disk (the
   only thing that grows with the number of layers: layers x tokens x hidden floats);
2. the head: per sequence, the gradient of the loss at the logits and, through the
   final norm and the LM head, at the last hidden state; the LM head's Fisher comes row
   block by row block from the logits' gradient;
3. the layers, top down: each loaded once, its forward recomputed for one sequence at a
   time under ``mx.vjp``, giving that sequence's weight gradients (squared and summed)
   and the gradient at the layer's input, which goes on to the layer below;
4. the token embedding: the gradient at the first layer's input, summed over the
   positions of each token (scaled by whatever the model multiplies embeddings by),
   row block by row block; tied embeddings add the LM head's part.

``on_weights(path, weight, fisher)`` receives each module's float32 weight and Fisher
while they are in memory (the LM head and embedding in row blocks: the cost of a
choice is a sum over rows), so nothing but one layer's worth is kept.
"""

import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from lsaq_mlx.backend.allocator import reused_buffers
from lsaq_mlx.backend.hybrid import weight_rows
from lsaq_mlx.planning.expert_fisher import ExpertRecorder
from lsaq_mlx.planning.plan import QuantModule
from lsaq_mlx.modules import EMBEDDINGS, embedding, inner_model
from lsaq_mlx.scoring.lens import find_lens

ROW_BLOCK_BYTES = 64 << 20  # float32 bytes of one row block of the LM head or embedding


def streamed_fisher(streamed, sequences: list[list[int]], modules: list[QuantModule], on_weights, progress=None):
    """Call ``on_weights`` for every module of ``modules`` (see the module's docstring)."""
    with reused_buffers(_largest_layer_bytes(modules)), _LayerInputs() as boundaries:
        _streamed_fisher(streamed, sequences, modules, on_weights, progress, boundaries)


def _largest_layer_bytes(modules: list[QuantModule]) -> int:
    """Float32 bytes of the dense weight gradients of the decoder layer with the most
    (stacked experts have none: ``expert_fisher``)."""
    layers = {}
    for q in modules:
        if q.layer is not None and q.copies == 1:
            layers[q.layer] = layers.get(q.layer, 0) + 4 * q.rows * q.cols
    return max(layers.values(), default=0)


class _LayerInputs:
    """Each layer's input for the calibration batch, kept on disk from the forward pass
    to the backward walk: in memory they would grow with the number of layers (8 x 255
    tokens in float32: 33 MB per layer of an 8B model, 67 MB of a 70B one)."""

    def __enter__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="lsaq-mlx-layer-inputs-")
        self._dtypes = {}
        return self

    def __exit__(self, *exc):
        self._folder.cleanup()

    def _path(self, i: int) -> Path:
        return Path(self._folder.name, f"{i}.npy")

    def put(self, i: int, x: mx.array) -> None:
        self._dtypes[i] = x.dtype  # numpy has no bfloat16: stored as float32, exactly
        np.save(self._path(i), np.array(x.astype(mx.float32)))

    def take(self, i: int) -> mx.array:
        """Layer ``i``'s input, read back and removed from disk."""
        x = mx.array(np.load(self._path(i))).astype(self._dtypes.pop(i))
        self._path(i).unlink()
        return x


def _streamed_fisher(streamed, sequences, modules, on_weights, progress, boundaries: _LayerInputs):
    if len({len(s) for s in sequences}) != 1:
        raise ValueError("the Fisher's calibration sequences must have one length")
    inputs = mx.array([s[:-1] for s in sequences])
    targets = mx.array([s[1:] for s in sequences])
    wanted = {q.path for q in modules}
    lens = find_lens(streamed.model)
    head_path = "lm_head" if "lm_head" in wanted else None
    embed_path = next((p for p in wanted if p.endswith(EMBEDDINGS)), None)
    tied = head_path is None and embed_path is not None and _tied(streamed.model)
    step = progress or (lambda n=1: None)

    # 1. forward, keeping each layer's input and a way to run it again
    forwards = []

    def keep(i, layer, x_in, x_out, forward):
        boundaries.put(i, x_in)
        forwards.append(forward)
        step()

    with streamed.matrices_released(only=_head_weight(streamed.model)):  # an untied head waits on disk
        hidden = streamed.run_layers(inputs, keep)

    # 2. the head
    def head_matrix() -> mx.array:  # looked up each time: the matrices leave memory in step 3
        holder = streamed.model.get("language_model", streamed.model)
        return weight_rows(holder["lm_head"] if "lm_head" in holder else _embedding(streamed.model))

    normed, lses, grad_hidden = _head(lens, hidden, targets, head_matrix())

    def logit_grad(s: int, rows: slice) -> mx.array:
        return _logit_grad(normed[s], lses[s], targets[s], head_matrix(), rows, lens.transform)

    if head_path:
        _row_blocks(head_path, head_matrix(), lambda rows: _head_block(logit_grad, normed, rows), on_weights)
    step()

    # 3. the layers, top down (the embeddings and head wait on disk)
    grad = grad_hidden
    with streamed.matrices_released():
        for i in reversed(range(len(streamed.layers))):
            with streamed.layer(i) as layer:
                paths = [p for p in wanted if p.startswith(streamed.prefixes[i])]
                grad, fisher, experts = _layer_fisher(layer, forwards[i], boundaries.take(i), grad,
                                                      streamed.prefixes[i], paths)
                params = dict(tree_flatten(layer.parameters()))
                for path in fisher:
                    on_weights(path, params[path[len(streamed.prefixes[i]):] + ".weight"].astype(mx.float32),
                               fisher[path])
                experts.price(streamed.prefixes[i], len(sequences), on_weights)
            step()

    # 4. the embedding (with the head's share when they are tied)
    if embed_path:
        embed = weight_rows(_embedding(streamed.model))
        scale = _embedding_scale(streamed)

        def block(rows):
            head = (lambda s: logit_grad(s, rows).T @ normed[s]) if tied else None
            return _embedding_block(grad, inputs, scale, rows, head)

        _row_blocks(embed_path, embed, block, on_weights, skip_zero=not tied)
    step()


def _head(lens, hidden: mx.array, targets: mx.array, weight: mx.array):
    """Per sequence: the log-normalizer of its logits and the gradient of its mean
    cross-entropy at the last hidden state (through the final norm and the LM head
    ``weight``); and the normed states. Both are summed over row blocks of the head, and
    the gradients at the logits are recomputed by row blocks when needed
    (``_logit_grad``): nothing of vocabulary size is held."""
    normed = lens.norm(hidden).astype(mx.float32)
    mx.eval(normed)
    blocks = _blocks(weight)
    lses, at_hidden = [], []
    for s in range(hidden.shape[0]):
        lse = None
        for rows in blocks:
            part = mx.logsumexp(_transformed(normed[s] @ weight[rows].astype(mx.float32).T, lens.transform), axis=-1)
            lse = part if lse is None else mx.logaddexp(lse, part)
            mx.eval(lse)
        at_normed = None
        for rows in blocks:
            part = _logit_grad(normed[s], lse, targets[s], weight, rows, lens.transform) @ weight[rows].astype(mx.float32)
            at_normed = part if at_normed is None else at_normed + part
            mx.eval(at_normed)
        _, (g_hidden,) = mx.vjp(lambda h: (lens.norm(h).astype(mx.float32),), [hidden[s]], [at_normed])
        mx.eval(g_hidden)
        lses.append(lse)
        at_hidden.append(g_hidden)
    return normed, lses, mx.stack(at_hidden)


def _blocks(weight: mx.array) -> list[slice]:
    step = max(1, ROW_BLOCK_BYTES // (4 * weight.shape[1]))
    return [slice(r, min(weight.shape[0], r + step)) for r in range(0, weight.shape[0], step)]


def _logit_grad(normed: mx.array, lse: mx.array, targets: mx.array, weight: mx.array, rows: slice,
                transform=None) -> mx.array:
    """The gradient of a sequence's mean cross-entropy at the head's output on vocabulary
    ``rows`` (``z = normed @ weight.T``, logits ``transform(z)``): ``(softmax - one-hot) /
    length``, times the transform's derivative."""
    z = normed @ weight[rows].astype(mx.float32).T
    onehot = targets[:, None] == mx.arange(rows.start, rows.stop)[None, :]
    grad = (mx.exp(_transformed(z, transform) - lse[:, None]) - onehot) / normed.shape[0]
    if transform is None:
        return grad
    return mx.jvp(transform, [z], [mx.ones_like(z)])[1][0] * grad


def _transformed(z: mx.array, transform) -> mx.array:
    return z if transform is None else transform(z)


def _head_block(logit_grad, normed: mx.array, rows: slice) -> mx.array:
    """The LM head's Fisher on ``rows``: the mean of each sequence's squared gradient."""
    total = None
    for s in range(normed.shape[0]):
        grad = logit_grad(s, rows).T @ normed[s]
        total = grad * grad if total is None else total + grad * grad
        mx.eval(total)
    return total / normed.shape[0]


def _layer_fisher(layer, forward, x: mx.array, grad: mx.array, prefix: str, paths: list[str]):
    """``(gradient at the layer's input, {path: Fisher}, the layer's ExpertRecorder)`` for
    one decoder layer: its stacked experts' Fisher is left to the recorder (``expert_fisher``)."""
    experts = ExpertRecorder.of(layer, [p[len(prefix):] for p in paths])
    paths = [p for p in paths if p[len(prefix):] not in experts.modules]
    names = [p[len(prefix):] + ".weight" for p in paths]
    params = dict(tree_flatten(layer.parameters()))
    weights = [params[n] for n in names]

    sequence = 0

    def run(h, *ws):
        layer.update(_nested(dict(zip(names, ws[: len(names)]))))
        experts.current = dict(zip(experts.modules, ws[len(names):]))
        return (forward(h, sequence),)

    # MLX gives a linear layer's weight gradient transposed (column-major): sums kept in
    # that layout add to it elementwise at memory speed, not on a strided path 10x slower
    sums = [mx.zeros(w.T.shape, mx.float32) for w in weights]
    grads_in = []
    with experts.installed():
        probes = experts.probes(forward, x[:1])
        for s in range(x.shape[0]):
            sequence = s
            _, cotangents = mx.vjp(run, [x[s : s + 1], *weights, *probes], [grad[s : s + 1]])
            experts.current = None
            grads_in.append(cotangents[0])
            mx.eval(grads_in[-1], experts.keep(cotangents[1 + len(names):]))
            weight_grads = list(cotangents[1 : 1 + len(names)])
            del cotangents
            _add_squares(sums, weight_grads)
    layer.update(_nested(dict(zip(names, weights))))
    fisher = {path: mx.contiguous(acc.T) / x.shape[0] for path, acc in zip(paths, sums)}
    return mx.concatenate(grads_in), fisher, experts


def _add_squares(sums: list, weight_grads: list) -> None:
    for j in range(len(weight_grads)):  # one module's gradient at a time, dropped once summed
        g = weight_grads[j].T.astype(mx.float32)
        weight_grads[j] = None
        sums[j] = sums[j] + g * g
        mx.eval(sums[j])
        del g


def _embedding_block(grad: mx.array, inputs: mx.array, scale: float, rows: slice, head=None) -> mx.array:
    """The embedding's Fisher on ``rows``: per sequence, the gradient at the first
    layer's input summed over each token's positions (times the embedding scale), plus,
    for tied embeddings, ``head(sequence)``, the LM head's gradient on those rows; squared."""
    start, stop = rows.start, rows.stop
    total = mx.zeros((stop - start, grad.shape[-1]), mx.float32)
    tokens = np.array(inputs)
    for s in range(grad.shape[0]):
        here = (tokens[s] >= start) & (tokens[s] < stop)
        g = head(s) if head is not None else mx.zeros_like(total)
        if here.any():
            ids = mx.array(tokens[s][here] - start)
            g = g.at[ids].add(grad[s][mx.array(np.nonzero(here)[0])].astype(mx.float32) * scale)
        total = total + g * g
        mx.eval(total)
    return total / grad.shape[0]


def _embedding_scale(streamed) -> float:
    """What the model multiplies a token's embedding by before the first layer (Gemma:
    the square root of the hidden size), read from the gradient of one token's lookup."""
    inner = inner_model(streamed.model)
    name = embedding(inner)
    table = inner[name]
    first_row = weight_rows(table)[:1].astype(mx.float32)
    inner[name] = nn.Embedding(*first_row.shape)  # token 0's row alone, float (the table may be codes)

    def first_input(weight):
        inner[name].weight = weight
        h = _until_first_layer(inner, mx.array([[0]]))
        return (h.sum(),)

    try:  # one row is enough to read the scale (a float32 copy of the table would not be small)
        _, (g,) = mx.vjp(first_input, [first_row], [mx.array(1.0)])
    finally:
        inner[name] = table
    return float(g[0].mean().item())


def _until_first_layer(inner, tokens: mx.array) -> mx.array:
    """The hidden states the inner model hands its first layer."""
    captured = {}

    class Stop(Exception):
        pass

    layer = inner["layers"][0]
    cls = type(layer)

    def capture(self, x, *args, **kwargs):
        captured["x"] = x
        raise Stop

    layer.__class__ = type("Capture", (cls,), {"__call__": capture})
    try:
        inner(tokens)
    except Stop:
        pass
    finally:
        layer.__class__ = cls
    return captured["x"]


def _row_blocks(path: str, weight: mx.array, fisher_of_rows, on_weights, skip_zero: bool = False) -> None:
    """``on_weights`` on row blocks of a large matrix; with ``skip_zero``, rows whose
    Fisher is zero (embedding rows of tokens never seen) are left out."""
    for block in _blocks(weight):
        fisher = fisher_of_rows(block)
        w = weight[block].astype(mx.float32)
        if skip_zero:
            seen = np.nonzero(np.array(fisher.sum(axis=1)) > 0)[0]
            if not len(seen):
                continue
            keep = mx.array(seen)
            w, fisher = w[keep], fisher[keep]
        mx.eval(w, fisher)
        on_weights(path, w, fisher)


def _tied(model: nn.Module) -> bool:
    holder = model.get("language_model", model)
    return "lm_head" not in holder


def _nested(flat: dict) -> dict:
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def _embedding(model: nn.Module) -> nn.Module:
    inner = inner_model(model)
    return inner[embedding(inner)]


def _head_weight(model: nn.Module) -> set[str]:
    """The name of the LM head's weight where it is not the embedding (else none)."""
    holder = model.get("language_model", model)
    prefix = "language_model." if holder is not model else ""
    return set() if _tied(model) else {f"{prefix}lm_head.weight"}
