"""Is the output coherent while the engine swaps precision under it?

    python benchmarks/swap_coherence.py [--low 4.5] [--high 6.0] [--tokens 96]

For a few prompts, three greedy replies from the runtime engine: at the --low lsaq plan
throughout, at --high throughout, and starting at --low with --high requested after the
first token, so the engine swaps one decoder layer per generated token while it replies.
Each reply is scored by the source model: mean negative log-likelihood per token (lower =
more fluent to the reference). Target: a reply during the swap scores no worse than the
worse of the two plans' replies. Pick plans that are coherent on their own: at 3 bits per
weight SmolLM2-135M's replies are already noise, with or without a swap.
"""

import argparse
import os
import platform

import mlx.core as mx

from common import engine_reply, start

PROMPTS = ("Tell me about the history of Paris.", "How do plants make their food?",
           "Write a short poem about the sea.")


def reply_nll(model, tokenizer, prompt: list[int], text: str) -> float:
    """Mean negative log-likelihood per token of ``text`` after ``prompt`` under ``model``."""
    reply = tokenizer.encode(text, add_special_tokens=False)
    tokens = mx.array(prompt + reply)
    logits = model(tokens[None, :-1])[0, len(prompt) - 1:].astype(mx.float32)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, tokens[len(prompt):, None], axis=-1)[:, 0]
    return nll.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--low", type=float, default=4.5)
    parser.add_argument("--high", type=float, default=6.0)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    start()
    from lsaq_mlx.backend.compute import compute_mode
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.sources import resolve_model

    source = resolve_model(args.model)
    planner = Planner(source)
    low, high = planner.plans(PlanRequest(method="lsaq", bits_budgets=[args.low, args.high]))
    plans = {args.low: low, args.high: high}
    scorer, tokenizer = planner.loaded()
    rows, worst = [], 0
    for text in PROMPTS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        replies = {"low": engine_reply(source, plans, args.low, args.tokens, prompt=text)[0],
                   "high": engine_reply(source, plans, args.high, args.tokens, prompt=text)[0]}
        replies["swap"], swapped = engine_reply(source, plans, args.low, args.tokens, swap_to=args.high, prompt=text)
        nll = {k: reply_nll(scorer, tokenizer, prompt, r.text) for k, r in replies.items()}
        worst += nll["swap"] <= max(nll["low"], nll["high"])
        rows.append((text, nll, replies, swapped))

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}, {compute_mode()} compute; model {args.model}; lsaq plans {args.low} -> {args.high} "
          f"bpw; greedy replies of up to {args.tokens} tokens\n")
    print(f"| prompt | NLL at {args.low} | NLL during the swap | NLL at {args.high} | swap |")
    print("|---|---|---|---|---|")
    for text, nll, _, swapped in rows:
        print(f"| {text} | {nll['low']:.3f} | {nll['swap']:.3f} | {nll['high']:.3f} | "
              f"{swapped.changed} modules, {swapped.seconds:.1f} s |")
    print(f"\nreplies during the swap no worse than the worse plan: {worst} of {len(rows)}\n")
    for text, _, replies, _ in rows:
        print(f"{text}")
        for key, label in (("low", f"{args.low} bpw"), ("swap", "during the swap"), ("high", f"{args.high} bpw")):
            print(f"  {label}: {' '.join(replies[key].text.split())[:200]}")


if __name__ == "__main__":
    main()
