"""Runtime benchmark: hot-swap latency and memory, and generation speed, in one run.

    python benchmarks/bench_runtime.py [--model default] [--low 3.0] [--high 5.0] [--swaps 200] [--layer-store]

1. A full swap between the --low and --high lsaq plans, its time per layer and the bytes
   it reads; with --layer-store, the same swap read from a layer store (built first, in a
   temporary folder) instead of re-quantized, and a check that both give the same weights
   (warm page cache; cold: benchmarks/bench_storage.py);
2. MLX active memory after a swap vs a fresh load of the target plan (target: within 5 %);
3. --swaps alternating full swaps while generating (a whole plan between two tokens):
   active memory at the end vs a fresh load of the same plan (target: no growth);
4. greedy output after swapping to a plan vs a model converted straight to that plan
   (target: identical);
5. generation tokens/s through the engine vs mlx_lm.stream_generate on the same model
   (target: >= 0.95x).
(Output during a swap: benchmarks/swap_coherence.py.)
1, 2 and 4 are measured with MLX's quantized kernels (LSAQ_MLX_COMPUTE=quantized, the
weights stay quantized as on Apple silicon); 3 and 5 in this machine's compute mode
(on the CPU backend: dequantized float32, where MLX's quantized kernel would take seconds
per token), the same mode on both sides of every comparison.
"""

import argparse
import os
import platform
from pathlib import Path

import mlx.core as mx

from common import engine_reply, params_digest, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--low", type=float, default=3.0)
    parser.add_argument("--high", type=float, default=5.0)
    parser.add_argument("--swaps", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layer-store", action="store_true", help="Also swap from a layer store (see 1).")
    args = parser.parse_args()
    start()
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from lsaq_mlx.backend import compute
    from lsaq_mlx.convert import quantized_model
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.runtime.swap import layer_groups, swap_modules
    from lsaq_mlx.sources.tensors import SourceTensors
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.load import load_tokenizer

    source = resolve_model(args.model)
    low, high = Planner(source).plans(PlanRequest(method="lsaq", bits_budgets=[args.low, args.high]))
    tokenizer = load_tokenizer(source)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the history of Paris."}],
                                           add_generation_prompt=True)
    rows = []

    # 1-4 with quantized weights held as such
    os.environ["LSAQ_MLX_COMPUTE"] = "quantized"
    weights = SourceTensors(source.path)

    def fresh(plan):
        model, _ = quantized_model(source, plan)
        mx.eval(model.parameters())
        return model

    model = fresh(low)
    mx.clear_cache()
    changes = {p: c for p, c in high.modules.items() if low.modules[p] != c}
    report = swap_modules(model, changes, weights, float32_compute=False)
    full, requantized = report.seconds, params_digest(model)
    n_layers = len(layer_groups(changes))
    rows.append((f"swap {args.low} -> {args.high} bpw ({len(changes)} modules, {n_layers} layer groups), re-quantizing",
                 f"{full:.2f} s, {full / n_layers * 1000:.0f} ms per layer, {report.source_bytes / 1e6:.1f} MB read "
                 "from the source", ""))
    mx.clear_cache()
    swapped_active = mx.get_active_memory()
    swapped_out = greedy(model, tokenizer, prompt, args.tokens, stream_generate, make_sampler)
    del model
    mx.clear_cache()
    direct = fresh(high)
    direct_active = mx.get_active_memory()
    direct_out = greedy(direct, tokenizer, prompt, args.tokens, stream_generate, make_sampler)
    del direct
    mx.clear_cache()
    rows.append(("MLX active memory after the swap vs a fresh load of the target",
                 f"{swapped_active / 1e6:.1f} MB vs {direct_active / 1e6:.1f} MB = {swapped_active / direct_active:.3f}",
                 "within 5 %"))
    rows.append(("greedy output after swapping vs converted directly", "identical" if swapped_out == direct_out
                 else f"differs: {swapped_out[:60]!r} vs {direct_out[:60]!r}", "identical"))
    if args.layer_store:
        rows += store_swap(fresh, low, high, changes, weights, full, requantized)

    # 3-6 in this machine's compute mode
    os.environ.pop("LSAQ_MLX_COMPUTE")
    float32 = compute.compute_mode() == "float32"

    def fresh_compute(plan):
        return compute.prepare_for_compute(fresh(plan))

    model = fresh_compute(low)
    mx.clear_cache()
    start_active, plans, current = mx.get_active_memory(), [high, low], dict(low.modules)
    swap_seconds = []
    for i, _ in enumerate(stream_generate(model, tokenizer, mx.array(prompt), max_tokens=args.swaps + 1,
                                          sampler=make_sampler(temp=0.0))):
        if i == args.swaps:
            break
        target = plans[i % 2]  # a whole plan between two tokens
        swap_seconds.append(swap_modules(model, {p: c for p, c in target.modules.items() if current[p] != c},
                                         weights, float32).seconds)
        current = dict(target.modules)
    mx.clear_cache()
    end_active = mx.get_active_memory()
    final = plans[(args.swaps - 1) % 2]
    del model
    mx.clear_cache()
    reference = fresh_compute(final)
    ref_active = mx.get_active_memory()
    del reference
    mx.clear_cache()
    rows.append((f"{args.swaps} alternating full swaps between generated tokens ({compute.compute_mode()} compute, "
                 f"{sum(swap_seconds):.0f} s of swaps)",
                 f"{end_active / 1e6:.1f} MB at the end vs {ref_active / 1e6:.1f} MB for a fresh load of the same plan "
                 f"({end_active / ref_active:.3f}); {start_active / 1e6:.1f} MB at the start ({args.low} bpw)", "no growth"))

    # 5: speed
    plain = fresh(high)
    compute.prepare_for_compute(plain)
    tps = []
    for r in stream_generate(plain, tokenizer, mx.array(prompt), max_tokens=args.tokens, sampler=make_sampler(temp=0.0)):
        tps.append(r.generation_tps)
    del plain
    mx.clear_cache()
    by_budget = {args.low: low, args.high: high}
    ours, _ = engine_reply(source, by_budget, args.high, args.tokens)
    rows.append((f"generation tok/s, {args.tokens} tokens, {compute.compute_mode()} compute",
                 f"engine {ours.stats.generation_tps:.1f} vs mlx_lm.stream_generate {tps[-1]:.1f} = "
                 f"{ours.stats.generation_tps / tps[-1]:.2f}x", ">= 0.95x"))

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}; model {args.model}; plans lsaq {args.low} / {args.high} bpw\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def store_swap(fresh, low, high, changes: dict, weights, requantize_s: float, requantized: str) -> list[tuple]:
    """The swap of 1 read from a layer store: rows for its time and bytes, and identity."""
    import tempfile

    from lsaq_mlx.runtime.swap import layer_groups, module_maker, swap_modules
    from lsaq_mlx.storage.layer_store import LayerStore

    with tempfile.TemporaryDirectory(prefix="layer-store-") as root:
        store = LayerStore(Path(root))
        model = fresh(low)
        built = store.build([low, high], module_maker(model, weights))
        store.close()  # swap from files opened afresh
        report = swap_modules(model, changes, weights, float32_compute=False, store=store)
        same = params_digest(model) == requantized and not report.failed
        store.close()
    del model
    mx.clear_cache()
    n_layers = len(layer_groups(changes))
    return [(f"the same swap read from a layer store ({built['bytes'] / 1e6:.1f} MB on disk for both plans, "
             f"built in {built['seconds']:.1f} s)",
             f"{report.seconds:.2f} s, {report.seconds / n_layers * 1000:.0f} ms per layer, "
             f"{report.store_bytes / 1e6:.1f} MB read (source: {report.source_bytes / 1e6:.1f} MB); "
             f"{requantize_s / report.seconds:.1f}x faster than re-quantizing", ""),
            ("weights after the swap: layer store vs re-quantizing", "identical" if same else "DIFFER", "identical")]


def greedy(model, tokenizer, prompt, n, stream_generate, make_sampler) -> str:
    return "".join(r.text for r in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=n,
                                                   sampler=make_sampler(temp=0.0)))


if __name__ == "__main__":
    main()
