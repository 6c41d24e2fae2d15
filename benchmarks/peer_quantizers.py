"""mlx-lm's quantizers run as a user runs them, on a local model folder and local
calibration text (their command lines download calibration data, which fails here),
one peer per process, each result saved as a stock mlx-lm folder.

    python benchmarks/peer_quantizers.py PEER SOURCE_FOLDER OUT [--tokens 8192] [--seq-len 512] [--n-grid 20]
                                         [--dwq-valid 4] [--learning-rate 1e-6]

PEER is one of:

- ``convert-<bits>-<group>``: ``mlx_lm.convert -q`` (``mlx_lm.utils.quantize_model``):
  every linear and embedding module round-to-nearest at those bits and group size;
- ``gptq-<bits>``: ``mlx_lm.gptq`` (``gptq_quantize``): GPTQ on the linear modules at
  those bits, group 64; the rest (embeddings) at its default fallback, 6 bits, group 64;
- ``awq-<bits>``: ``mlx_lm.awq`` (``awq_quantize``): scale search and clipping per
  decoder layer, group 64; embeddings and LM head at its defaults, 4 bits, group 32;
- ``dwq-<bits>``: ``mlx_lm.dwq`` (``dwq_quantize``): ``mlx_lm.convert`` at those bits,
  group 64, then every scale and bias trained (Adam, ``--learning-rate``, batches of 4,
  temperature 2) to match the source's logits on the calibration sequences, one epoch;
  the last ``--dwq-valid`` sequences are its validation set, not trained on.

Calibration is the packaged text ``lsaq-mlx`` calibrates on: ``--tokens`` of it in
sequences of ``--seq-len``. The peers compute in float32 (float16 matmuls are slow on
the CPU backend) and the result is stored in float16, as their command lines store a
float16 source. Used by ``quality_table.py --peers``.
"""

import argparse
import copy
import re
import sys

import mlx.core as mx

from common import start


def calibration(tokenizer, tokens: int, seq_len: int) -> mx.array:
    from lsaq_mlx.scoring.calibration import load_calibration, token_sequences

    sequences = token_sequences(tokenizer, load_calibration(None), tokens, seq_len)
    return mx.array([s for s in sequences if len(s) == seq_len])


def quantize_as_peer(peer: str, model, tokenizer, config: dict, args) -> dict:
    """Quantize ``model`` in place as ``peer`` does; the config to save with it."""
    kind, bits, group = re.fullmatch(r"(convert|gptq|awq|dwq)-(\d)(?:-(\d+))?", peer).groups()
    bits = int(bits)
    if kind == "convert":
        from mlx_lm.utils import quantize_model

        _, config = quantize_model(model, config, int(group or 64), bits)
        return config
    if kind == "dwq":
        return distilled(model, tokenizer, config, bits, args)
    data = calibration(tokenizer, args.tokens, args.seq_len)
    if kind == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        _, config["quantization"] = gptq_quantize(model, data, bits, 64, fallback_bits=6, fallback_group_size=64)
        return config
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

    awq_quantize(model, data, AWQ_MODEL_CONFIGS[config["model_type"]], bits=bits, group_size=64, n_grid=args.n_grid)
    return update_config(model, config)


def distilled(model, tokenizer, config: dict, bits: int, args) -> dict:
    """``mlx_lm.dwq``'s training with the source in memory as the teacher (its command
    line's path without ``--target-dir``), in float32 like the other peers."""
    import mlx.optimizers as optimizers
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    # dwq feeds batch[:, :-1], so each sequence carries one token more
    data = [(s.tolist(), 0) for s in calibration(tokenizer, args.tokens, args.seq_len + 1)]
    if len(data) < args.dwq_valid + 4:
        sys.exit(f"dwq needs at least {args.dwq_valid + 4} sequences of {args.seq_len + 1} tokens; raise --tokens")
    train, valid = data[: -args.dwq_valid], data[-args.dwq_valid:]
    teacher = copy.deepcopy(model)
    _, config = quantize_model(model, config, 64, bits)
    opt = optimizers.Adam(learning_rate=args.learning_rate, bias_correction=True)
    dwq_quantize(model, lambda batch, i, split: teacher(batch), opt, train, valid, batch_size=4,
                 max_seq_length=args.seq_len + 1, seed=123, dtype=mx.float32)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer")
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--n-grid", type=int, default=20, help="mlx_lm.awq's scale and clip grid (its default 20)")
    parser.add_argument("--dwq-valid", type=int, default=4, help="calibration sequences dwq validates on")
    parser.add_argument("--learning-rate", type=float, default=1e-6, help="dwq's Adam learning rate (its default)")
    args = parser.parse_args()
    if not re.fullmatch(r"(convert-\d-\d+|gptq-\d|awq-\d|dwq-\d)", args.peer):
        sys.exit(f"unknown peer {args.peer!r}")
    start()
    from mlx_lm.utils import load, save

    model, tokenizer, config = load(args.source, return_config=True)
    model.set_dtype(mx.float32)
    config = quantize_as_peer(args.peer, model, tokenizer, config, args)
    model.set_dtype(mx.float16)
    save(args.out, args.source, model, tokenizer, config)


if __name__ == "__main__":
    main()
