"""What the benchmark scripts share: the evaluation text, timing a command from outside,
digests of weights, and a reply from an engine (run as ``python benchmarks/NAME.py``,
each script imports this module from its own folder)."""

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lsaq_mlx.backend.blas import reexec_with_fast_blas

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"
LAMBADA = SHARED / "tasks" / "lambada" / "lambada_test.jsonl"


def start() -> None:
    """Give MLX the optimized BLAS, as the CLI does (restarts the script once on Linux)."""
    reexec_with_fast_blas()


def wikitext_tokens(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of WikiText-2 test."""
    if not WIKITEXT.is_file():
        sys.exit(f"{WIKITEXT} is missing (see ../shared/data/README.md)")
    with open(WIKITEXT, encoding="utf-8") as f:
        return tokenizer.encode(f.read(400_000))[:n]


def lambada_tokens(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of LAMBADA's test passages (fiction), one after another: a
    second evaluation text, unlike both WikiText and the calibration text."""
    import json

    if not LAMBADA.is_file():
        sys.exit(f"{LAMBADA} is missing (see ../shared/data/README.md)")
    texts = []
    with open(LAMBADA, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if sum(map(len, texts)) > 8 * n:
                break
    return tokenizer.encode("\n\n".join(texts))[:n]


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """``(wall seconds, peak resident bytes)`` of ``cmd`` run in its own process. On Linux
    the peak comes from GNU time, whose own child is forked from a small process: Linux
    carries the high-water mark of resident memory across fork and exec, so a command
    started straight from a large benchmark process would report the benchmark's."""
    gnu_time = Path("/usr/bin/time")
    with tempfile.TemporaryDirectory() as tmp:
        errors, peak = Path(tmp, "stderr"), Path(tmp, "peak")
        if sys.platform.startswith("linux") and gnu_time.exists():
            cmd = [str(gnu_time), "-f", "%M", "-o", str(peak), *cmd]
        with open(errors, "w") as err:  # a file, not a pipe: a chatty child cannot block on it
            begin = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - begin
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{errors.read_text()[-4000:]}")
        if peak.is_file():
            return wall, int(peak.read_text().split()[-1]) * 1024
    return wall, usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024


def params_digest(model) -> str:
    """SHA-256 of every parameter's name and bytes: equal digests, equal weights."""
    from mlx.utils import tree_flatten

    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        digest.update(name.encode())
        digest.update(bytes(memoryview(value)))
    return digest.hexdigest()


def engine_reply(source, plans: dict, budget: float, tokens: int, swap_to: float | None = None,
                 prompt: str = "Tell me about the history of Paris."):
    """``(ReplyDone, Swapped or None)``: a greedy reply from an engine that starts at
    ``budget`` (``plans``: bits per weight -> plan); with ``swap_to``, that plan is requested
    after the first token, so the engine swaps one layer per token while replying."""
    from lsaq_mlx.planning.planner import FixedPlans
    from lsaq_mlx.runtime import Engine
    from lsaq_mlx.runtime.events import EngineError, ReplyDone, Swapped, Token
    from lsaq_mlx.runtime.options import RuntimeOptions

    engine = Engine(source, FixedPlans(plans), RuntimeOptions(bits_budget=budget)).start()
    swapped, requested = None, swap_to is not None
    try:
        engine.events.get()
        engine.chat(prompt, tokens)
        while not isinstance(event := engine.events.get(), ReplyDone):
            if isinstance(event, Token) and swap_to is not None:
                engine.apply_budget(swap_to)
                swap_to = None
            elif isinstance(event, Swapped):
                swapped = event
            elif isinstance(event, EngineError):
                raise RuntimeError(event.message)
        done = event
        while requested and swapped is None:  # swaps left at the end of the reply finish after it
            if isinstance(event := engine.events.get(), Swapped):
                swapped = event
    finally:
        engine.shutdown()
    return done, swapped


# ---- mlx-lm's dynamic_quant as a peer, at a budget of ours ----
def low_bits_for(ctx, budget: float) -> int | None:
    """The largest bit width whose uniform group-64 model fits ``budget``."""
    from lsaq_mlx.planning.choices import BITS
    from lsaq_mlx.planning.methods import plan_uniform

    fitting = [b for b in BITS if plan_uniform(ctx, None, b, 64).predicted_bits_per_weight <= budget]
    return max(fitting) if fitting else None


def dynamic_quant_plan(ctx, budget: float, sensitivities: dict, low: int, high: int):
    """mlx-lm's dynamic_quant rule: modules above a sensitivity threshold get ``high``
    bits, the rest ``low`` (group 64); the threshold is the lowest that fits."""
    from lsaq_mlx.planning.budgets import Budget
    from lsaq_mlx.planning.choices import Affine

    choices = {q.path: Affine(low, 64) for q in ctx.modules}
    limit = int(budget * ctx.parameters / 8)
    for path in sorted(sensitivities, key=lambda p: -sensitivities[p]):
        trial = choices | {path: Affine(high, 64)}
        if ctx.total_bytes(trial) > limit:
            break
        choices = trial
    return ctx.plan("dynamic_quant", Budget(budget), choices, details={"low_bits": low, "high_bits": high})


def dq_sensitivities(source, tokenizer, low: int, high: int, tokens: int) -> dict:
    """mlx-lm's own sensitivity estimate, on a float32 copy of its own (it changes the model)."""
    import mlx.core as mx
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
    from lsaq_mlx.sources import load_model

    model, _, _ = load_model(source)
    model.set_dtype(mx.float32)
    data = mx.array(token_sequences(tokenizer, load_calibration(None), tokens, 512))
    return dict(estimate_sensitivities(model, data, low, 64, high, 64))
