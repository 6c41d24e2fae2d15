"""Which of a tied embedding's two roles its quantization error comes from: the lookups
that feed the first layer, or the LM head (docs/plans.md).

    python benchmarks/tied_embedding_roles.py --model SOURCE FOLDER [FOLDER ...] [--tokens 2048]

Each FOLDER is a converted model whose embedding is tied to its head. It is evaluated
with the lookups and the head each taken from the folder's embedding as stored, from
the source's embedding rounded to nearest at the folder's bits and group size, or from
the source's float embedding; KL to the source and perplexity on the first ``--tokens``
WikiText-2 test tokens (windows of 512). One JSON line per folder and pairing. A stock
model cannot be written this way (the two roles share one tensor): this only measures.
"""

import argparse
import json
import sys

PAIRINGS = (("stored", "stored"), ("stored", "rounded"), ("stored", "float"), ("rounded", "stored"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the float source the folders were converted from")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()

    from common import start, wikitext_tokens

    start()
    import mlx.core as mx
    import mlx.nn as nn

    from adaptive_folder import measure
    from lsaq_mlx.evaluation.divergence import ReferenceDistributions
    from lsaq_mlx.modules import embedding, inner_model
    from lsaq_mlx.sources import load_model, resolve_model

    class SplitEmbedding(nn.Module):
        """Lookups from one embedding, the head (``as_linear``) from another."""

        def __init__(self, lookup: nn.Module, head: nn.Module):
            super().__init__()
            self.lookup, self.head = lookup, head

        def __call__(self, x):
            return self.lookup(x)

        def as_linear(self, x):
            return self.head.as_linear(x)

    source, tokenizer, _ = load_model(resolve_model(args.model))
    reference = ReferenceDistributions.compute(source, wikitext_tokens(tokenizer, args.tokens), 512)
    inner = inner_model(source)
    floats = nn.Embedding(*inner[embedding(inner)].weight.shape)
    floats.weight = inner[embedding(inner)].weight.astype(mx.float32)
    mx.eval(floats.parameters())
    del source, inner
    for folder in args.folders:
        model = load_model(resolve_model(folder))[0]
        inner = inner_model(model)
        name = embedding(inner)
        stored = inner[name]
        if not isinstance(stored, nn.QuantizedEmbedding):
            sys.exit(f"{folder}: its embedding is not quantized")
        rounded = nn.QuantizedEmbedding.from_embedding(floats, stored.group_size, stored.bits)
        mx.eval(rounded.parameters())
        roles = {"stored": stored, "rounded": rounded, "float": floats}
        for head, lookup in PAIRINGS:
            inner[name] = SplitEmbedding(roles[lookup], roles[head])
            row = {"folder": folder, "bits": stored.bits, "group_size": stored.group_size, "head": head,
                   "lookups": lookup, **measure(model, reference)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
