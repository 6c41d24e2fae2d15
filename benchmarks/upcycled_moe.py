"""A small mixture-of-experts whose outputs mean something: the default model's MLPs
split into experts ("MoEfication"), written as a Hugging Face ``mixtral`` folder that
stock mlx-lm opens, for quality comparisons on a MoE (random-weight MoEs rank nothing).

    python benchmarks/upcycled_moe.py OUT [--model default] [--experts 8] [--active 4] [--tokens 4096]

Each decoder layer's MLP (intermediate size I) becomes ``--experts`` experts of I /
experts neurons each (neurons grouped in order: any grouping is a split of the same sum).
Every expert of a layer together is the dense MLP. The router is fitted on calibration
activations: least squares from the MLP's input to each expert's output norm, so the
``--active`` experts that contribute most are chosen. Mixtral weighs the chosen experts
by a softmax of their router logits; the router is scaled so those logits differ by at
most 0.01 on the calibration text (weights within about 1 % of 1 / active) and each
expert's ``down_proj`` is multiplied by ``--active``: the MoE computes the dense MLP
restricted to its chosen experts. The script prints the folder's KL to the dense model
and both perplexities on WikiText-2 (2,048 tokens), so its distance from the dense model
is known.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common import start, wikitext_tokens

LOGIT_SPREAD = 0.01


def mlp_inputs(model, tokens: list[int], seq_len: int = 512) -> list[mx.array]:
    """Each layer's MLP input (after its norm) on ``tokens``, rows of float32."""
    layers = model.model.layers
    seen = [[] for _ in layers]
    originals = [layer.mlp for layer in layers]
    for i, layer in enumerate(layers):
        def recorder(x, i=i, mlp=originals[i]):
            seen[i].append(x.reshape(-1, x.shape[-1]))
            return mlp(x)
        layer.mlp = recorder
    try:
        for s in range(0, len(tokens) - seq_len + 1, seq_len):
            mx.eval(model(mx.array([tokens[s:s + seq_len]])), seen)
    finally:
        for layer, mlp in zip(layers, originals):
            layer.mlp = mlp
    return [mx.concatenate(rows) for rows in seen]


def expert_outputs_norms(mlp, x: mx.array, experts: int) -> mx.array:
    """``rows x experts``: the norm of each neuron group's part of the MLP's output."""
    act = nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    size = act.shape[-1] // experts
    down = mlp.down_proj.weight
    return mx.stack([mx.linalg.norm(act[:, e * size:(e + 1) * size] @ down[:, e * size:(e + 1) * size].T, axis=-1)
                     for e in range(experts)], axis=-1)


def fitted_router(x: mx.array, targets: mx.array) -> np.ndarray:
    """Least squares ``experts x hidden`` from the MLP input to each expert's output norm,
    scaled so its logits on ``x`` spread by at most ``LOGIT_SPREAD`` per row."""
    a, b = np.array(x, dtype=np.float64), np.array(targets, dtype=np.float64)
    w = np.linalg.lstsq(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ b, rcond=None)[0].T
    logits = a @ w.T
    spread = float(np.max(logits.max(axis=1) - logits.min(axis=1)))
    return (w * LOGIT_SPREAD / spread).astype(np.float32)


def moe_tensors(model, inputs: list[mx.array], experts: int, active: int) -> dict[str, mx.array]:
    """The dense model's tensors with each MLP as ``experts`` Mixtral experts and a router."""
    from mlx.utils import tree_flatten

    tensors = {k: v for k, v in tree_flatten(model.parameters()) if ".mlp." not in k}
    for i, layer in enumerate(model.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.block_sparse_moe"
        size = mlp.gate_proj.weight.shape[0] // experts
        router = fitted_router(inputs[i], expert_outputs_norms(mlp, inputs[i], experts))
        tensors[f"{prefix}.gate.weight"] = mx.array(router)
        for e in range(experts):
            part = slice(e * size, (e + 1) * size)
            tensors[f"{prefix}.experts.{e}.w1.weight"] = mlp.gate_proj.weight[part]
            tensors[f"{prefix}.experts.{e}.w3.weight"] = mlp.up_proj.weight[part]
            tensors[f"{prefix}.experts.{e}.w2.weight"] = mlp.down_proj.weight[:, part] * active
    return tensors


def write_folder(source: Path, out: Path, tensors: dict, experts: int, active: int) -> None:
    config = json.loads((source / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("lsaq_source", "architectures", "head_dim")}
    config |= {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": experts,
               "num_experts_per_tok": active, "intermediate_size": config["intermediate_size"] // experts,
               "torch_dtype": "float32"}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="default")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--active", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens the routers are fitted on")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists")
    start()
    from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
    from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
    from lsaq_mlx.sources import load_model, resolve_model

    source = resolve_model(args.model)
    model, tokenizer = load_model(source)[:2]
    if model.model_type != "llama" or model.args.intermediate_size % args.experts:
        sys.exit("the source must be a llama whose MLP splits evenly into --experts")
    calibration = [t for s in token_sequences(tokenizer, load_calibration(None), args.tokens, 512) for t in s]
    tensors = moe_tensors(model, mlp_inputs(model, calibration), args.experts, args.active)
    write_folder(source.path, args.out, tensors, args.experts, args.active)

    tokens = wikitext_tokens(tokenizer, 2048)
    reference = ReferenceDistributions.compute(model, tokens, 512)
    moe = load_model(resolve_model(str(args.out)))[0]
    result = compare_to_reference(moe, reference)
    dense = compare_to_reference(model, reference)
    print(f"{args.out}: mixtral, {args.experts} experts, {args.active} active; on 2,048 WikiText-2 tokens: "
          f"KL to the dense model {result.kl:.4f}, top-1 agreement {result.top1_agreement:.3f}, perplexity "
          f"{result.perplexity.perplexity:.2f} (dense {dense.perplexity.perplexity:.2f})")


if __name__ == "__main__":
    main()
