"""How much distilling a converted folder's scales and biases against its source lowers
its KL: the idea of ``mlx_lm.dwq`` (every code fixed, each group's scale and bias
trained), measured here before anything like it goes into ``convert``.

    python benchmarks/distillation_probe.py FOLDER [--model default] [--mode end-to-end|layer]
                                            [--steps 40] [--epochs 4] [--lr 1e-4]

``end-to-end``: Adam on the scales and biases of every quantized decoder module, the loss
the KL from the source's next-token distributions, on the packaged calibration text
(what ``convert --quantizer`` reads: 64 sequences of 256 tokens, 4 held out, batches of
8), ``--steps`` steps. ``layer``: each decoder layer in turn, its scales and biases
trained for ``--epochs`` to reproduce the source layer's output on the input the
quantized layers before it give (the one-layer memory bound ``convert`` keeps).
Steps are relative (a scale moves by ``lr`` of itself, a bias by ``lr`` of its group's
scale); the result is rounded to float16, as a folder stores it. A probe: the whole
model is held in float32 and nothing is written. Prints KL to the source on the first
--tokens WikiText-2 test tokens (windows of 512) and on the held-out calibration
sequences, before and after.
"""

import argparse
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load

from common import start as start_benchmark, wikitext_tokens
from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
from lsaq_mlx.gptq.hessians import calibration_tokens
from lsaq_mlx.scoring.calibration import load_calibration
from lsaq_mlx.sources import resolve_model
from lsaq_mlx.sources.load import load_model

HELD_OUT = 4  # calibration sequences kept out of training, for the held-out KL and layer errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by lsaq-mlx convert (or any mlx-lm affine folder)")
    parser.add_argument("--model", default="default", help="its source")
    parser.add_argument("--mode", default="end-to-end", choices=["end-to-end", "layer"])
    parser.add_argument("--steps", type=int, default=40, help="end-to-end: optimizer steps")
    parser.add_argument("--epochs", type=int, default=4, help="layer: passes over the calibration sequences per layer")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=8, help="calibration sequences per step")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start_benchmark()
    mx.random.seed(args.seed)
    begin = time.perf_counter()
    source, _, _ = load_model(resolve_model(args.model))
    source.freeze()
    student, tokenizer = load(args.folder, lazy=False)
    modules = trainable_copy(student)
    reference = ReferenceDistributions.compute(source, wikitext_tokens(tokenizer, args.tokens), 512)
    calibration = calibration_tokens(tokenizer, load_calibration(None))
    held_out, train = calibration[:HELD_OUT], calibration[HELD_OUT:]

    def report(label: str) -> None:
        result = compare_to_reference(student, reference)
        print(f"{label}: WikiText KL {result.kl:.4f} ± {result.kl_stderr:.4f}, perplexity "
              f"{result.perplexity.perplexity:.2f}; held-out calibration KL {kl(source, student, held_out).item():.4f} "
              f"({time.perf_counter() - begin:.0f} s)", flush=True)

    report("before")
    if args.mode == "end-to-end":
        distil_end_to_end(source, student, modules, train, args)
    else:
        distil_layers(source, student, calibration, args)
    for m in modules:
        m.round_to_stored()
    report(f"after {args.mode}")


class TrainableScales(nn.Module):
    """A quantized linear as float32 ``codes * s + b``: codes fixed, ``s`` and ``b``
    trained as relative changes ``ds``, ``db`` of the written ones."""

    def __init__(self, q: nn.QuantizedLinear):
        super().__init__()
        rows = q.scales.shape[0]
        codes = mx.dequantize(q.weight, mx.ones_like(q.scales), mx.zeros_like(q.biases), q.group_size, q.bits)
        self.codes = codes.astype(mx.float32).reshape(rows, -1, q.group_size)
        self.s0, self.b0 = q.scales.astype(mx.float32), q.biases.astype(mx.float32)
        self.ds, self.db = mx.zeros_like(self.s0), mx.zeros_like(self.b0)
        if "bias" in q:
            self.bias = q.bias.astype(mx.float32)

    def round_to_stored(self):
        s = (self.s0 * (1 + self.ds)).astype(mx.float16).astype(mx.float32)
        b = (self.b0 + self.db * self.s0).astype(mx.float16).astype(mx.float32)
        self.ds, self.db = s / self.s0 - 1, (b - self.b0) / self.s0

    def __call__(self, x):
        s, b = self.s0 * (1 + self.ds), self.b0 + self.db * self.s0
        y = x @ (self.codes * s[..., None] + b[..., None]).reshape(self.codes.shape[0], -1).T
        return y + self.bias if "bias" in self else y


def trainable_copy(model) -> list[TrainableScales]:
    """Every quantized linear of the decoder layers made a ``TrainableScales``, the rest
    float32 and frozen (MLX's CPU quantized matmul is slow); returns those modules."""
    modules = []
    for layer in model.model.layers:
        swapped = [(n, TrainableScales(m)) for n, m in layer.named_modules() if isinstance(m, nn.QuantizedLinear)]
        layer.update_modules(tree_unflatten(swapped))
        modules += [m for _, m in swapped]
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
                                 if v.dtype in (mx.float16, mx.bfloat16)]))
    embedding = model.model.embed_tokens
    if isinstance(embedding, nn.QuantizedEmbedding):
        weight = mx.dequantize(embedding.weight, embedding.scales, embedding.biases, embedding.group_size,
                               embedding.bits)
        model.model.embed_tokens = nn.Embedding(*weight.shape)
        model.model.embed_tokens.weight = weight.astype(mx.float32)
    model.freeze()
    for m in modules:
        m.unfreeze(keys=["ds", "db"])
    mx.eval(model.parameters())
    return modules


def kl(source, student, tokens):
    """Mean KL (nats per token) from the source's next-token distributions to the student's."""
    teacher = source(tokens)
    teacher = teacher - mx.logsumexp(teacher, -1, keepdims=True)
    logits = student(tokens)
    return mx.mean(mx.sum(mx.exp(teacher) * (teacher - (logits - mx.logsumexp(logits, -1, keepdims=True))), -1))


def distil_end_to_end(source, student, modules, train, args) -> None:
    step_fn = nn.value_and_grad(student, lambda model, x: kl(source, model, x))
    optimizer = optim.Adam(learning_rate=args.lr)
    step = 0
    while step < args.steps:
        order = mx.random.permutation(train.shape[0])
        for i in range(0, train.shape[0] - args.batch + 1, args.batch):
            loss, grads = step_fn(student, train[order[i : i + args.batch]])
            optimizer.update(student, grads)
            mx.eval(student.parameters(), optimizer.state, loss)
            step += 1
            print(f"  step {step}/{args.steps}: KL {loss.item():.4f}", file=sys.stderr, flush=True)
            if step == args.steps:
                return


def distil_layers(source, student, calibration, args) -> None:
    def run(layer, x):
        return mx.concatenate([_evaluated(layer(x[i : i + args.batch], mask="causal", cache=None))
                               for i in range(0, x.shape[0], args.batch)])

    x = student.model.embed_tokens(calibration)
    for i, (layer, source_layer) in enumerate(zip(student.model.layers, source.model.layers)):
        target = run(source_layer, x)
        before = mx.mean(mx.square(run(layer, x[:HELD_OUT]) - target[:HELD_OUT])).item()
        step_fn = nn.value_and_grad(layer, lambda m, x, y: mx.mean(mx.square(m(x, mask="causal", cache=None) - y)))
        optimizer = optim.Adam(learning_rate=args.lr)
        for _ in range(args.epochs):
            order = mx.random.permutation(x.shape[0] - HELD_OUT) + HELD_OUT
            for j in range(0, order.shape[0], args.batch):
                _, grads = step_fn(layer, x[order[j : j + args.batch]], target[order[j : j + args.batch]])
                optimizer.update(layer, grads)
                mx.eval(layer.parameters(), optimizer.state)
        for m in layer.modules():
            if isinstance(m, TrainableScales):
                m.round_to_stored()  # the next layer learns on what this one will compute as written
        error = mx.mean(mx.square(run(layer, x[:HELD_OUT]) - target[:HELD_OUT])).item()
        x = run(layer, x)
        print(f"  layer {i + 1}/{len(student.model.layers)}: held-out output error {before:.4g} -> {error:.4g} "
              f"({error / before:.2f}x)", file=sys.stderr, flush=True)


def _evaluated(a):
    mx.eval(a)
    return a


if __name__ == "__main__":
    main()
