"""``lsaq-mlx plan`` / ``convert``: from a model source and budgets to ``QuantPlan``s.

Gathers what each method needs (the float model, layer scores, the cost model's error
table, cached by content fingerprint) and calls the planner.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lsaq_mlx.cache import cache_dir, fingerprint_bytes, read_cache_json, write_json_atomic
from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
from lsaq_mlx.backend.compute import dequantize_layers
from lsaq_mlx.planning import cost
from lsaq_mlx.planning.cost import fisher_diagonal, layer_weights, quantization_errors, swsc_errors
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.methods import (
    METHODS,
    RECIPES,
    TIER_METRICS,
    Budget,
    Override,
    PlanningContext,
    check_codecs,
    plan_lsaq,
    plan_recipe,
    plan_tiers,
    plan_uniform,
)
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.scoring.scores import LayerScores
from lsaq_mlx.scoring.run import ScoreOptions, score
from lsaq_mlx.sizes import parse_size
from lsaq_mlx.sources import ModelSource, load_model
from lsaq_mlx.swsc.layer import SWSCLinear

COST_VERSION = 3  # 3: errors keyed by choice
SWSC_COST_VERSION = 2
FISHER_TOKENS = 2048  # calibration tokens for the cost model's Fisher information
FISHER_SEQ_LEN = 256
KV_BYTES = 2  # float16 KV cache


@dataclass
class PlanRequest:
    method: str = "lsaq"
    bits_budgets: list[float] = field(default_factory=list)
    memory_budget: str | None = None
    context: int = 4096  # tokens of KV cache a memory budget reserves
    recipe: str | None = None
    scores_file: Path | None = None
    calib: str | None = None
    high_bits: int = 8
    low_bits: int = 4
    group_size: int | None = None
    bits: int | None = None  # uniform: a fixed bit width
    overrides: list[str] = field(default_factory=list)
    low_fraction: float | None = None  # tiers: this share of the layers at low bits, instead of a budget
    codecs: tuple[str, ...] = ("affine",)  # ("affine", "swsc"): lsaq may also choose SWSC (not for stock mlx-lm)

    def check(self) -> None:
        if self.recipe is None and self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}' (one of {', '.join(METHODS)}; or --recipe {'|'.join(RECIPES)})")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise UserError(f"unknown recipe '{self.recipe}' (one of {', '.join(RECIPES)})")
        budgets = bool(self.bits_budgets) + bool(self.memory_budget)
        if self.low_fraction is not None and (self.method not in TIER_METRICS or budgets):
            raise UserError("a share of layers at low bits goes with a tiers method and no budget")
        fixed = self.method == "uniform" and self.bits or self.low_fraction is not None
        if self.recipe is None and budgets != 1 and not (fixed and not budgets):
            raise UserError("give a budget: --bits-budget B (repeatable) or --memory-budget SIZE")
        for b in self.bits_budgets:
            if not 1.0 <= b <= 32.0:
                raise UserError(f"--bits-budget {b:g} is not a number of bits per weight between 1 and 32")
        check_codecs(self.codecs)


def memory_budget(text: str, config: dict, context: int) -> Budget:
    """Weights bytes for a total memory budget, after a KV cache of ``context`` tokens
    (float16) and a runtime reserve of 10 % (activations, MLX's buffers)."""
    size = parse_size(text)
    layers = config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * layers * kv_heads * head_dim * KV_BYTES * context
    reserve = size // 10
    weights = size - kv - reserve
    assumptions = {"memory_budget": size, "kv_cache_bytes": kv, "kv_cache_context": context,
                   "runtime_reserve_bytes": reserve}
    if weights <= 0:
        raise UserError(f"{text} leaves no room for weights after a {context}-token KV cache "
                        f"({kv / 1e9:.2f} GB) and a 10 % runtime reserve")
    return Budget(bytes=weights, assumptions=assumptions)


def make_plans(source: ModelSource, request: PlanRequest):
    """``(plans, model, config)``: one plan per budget (or the recipe's), smallest first."""
    request.check()
    overrides = [Override.parse(o) for o in request.overrides]
    model, tokenizer, config = load_model(source, compute=False)
    if any(isinstance(m, SWSCLinear) for _, m in model.named_modules()):
        raise UserError(f"{source.spec} holds SWSC layers: plan from the model it was converted from")
    dequantize_layers(model)
    ctx = PlanningContext(model, source.fingerprint, overrides, request.codecs)
    if request.recipe:
        return [plan_recipe(ctx, model, request.recipe, request.group_size or 64)], model, config
    budgets = [Budget(bits_per_weight=b) for b in request.bits_budgets]
    if request.memory_budget:
        budgets = [memory_budget(request.memory_budget, config, request.context)]
    if request.method == "uniform":
        if not budgets:
            return [plan_uniform(ctx, None, request.bits, request.group_size or 64)], model, config
        return [plan_uniform(ctx, b, request.bits, request.group_size) for b in budgets], model, config
    if request.method in TIER_METRICS:
        scores = _scores(source, request, TIER_METRICS[request.method], (model, tokenizer))
        return [plan_tiers(ctx, b, scores, request.method, request.high_bits, request.low_bits,
                           request.group_size or 64, request.low_fraction) for b in budgets or [Budget()]], model, config
    errors = _error_table(source, model, tokenizer, ctx, request.calib)
    scores = _scores(source, request, "jaccard", (model, tokenizer)) if cost.IMPORTANCE_POWER else None
    weights = layer_weights(scores.scores if scores else None, ctx.modules)
    return [plan_lsaq(ctx, b, errors, weights, scores) for b in budgets], model, config


def _scores(source, request: PlanRequest, metric: str, loaded) -> LayerScores:
    if request.scores_file:
        scores = LayerScores.load(request.scores_file)
        if scores.model_fingerprint != source.fingerprint:
            raise UserError(f"{request.scores_file} holds scores of another model (fingerprint {scores.model_fingerprint})")
        return scores
    return score(source, ScoreOptions(metric, request.calib), model=loaded)


def _error_table(source, model, tokenizer, ctx: PlanningContext, calib_spec) -> dict:
    """The cost model's errors of every module and candidate (``ctx.candidates``), cached
    by model and calibration; the SWSC ones in their own file, computed only when the
    context has SWSC candidates."""
    calib = load_calibration(calib_spec)
    key = fingerprint_bytes(source.fingerprint, calib.fingerprint, str(FISHER_TOKENS), str(COST_VERSION))
    path = cache_dir() / "errors" / f"{key}.json"
    options = {p: [c.key for c in choices] for p, choices in ctx.swsc_options.items()}
    swsc_key = fingerprint_bytes(key, json.dumps(options, sort_keys=True), str(SWSC_COST_VERSION))
    swsc_path = cache_dir() / "errors" / f"swsc-{swsc_key}.json"
    keys = {q.path: {c.key for c in q.choices()} for q in ctx.modules}
    table = read_cache_json(path, "cost table", lambda d: _check_table(d, keys))
    swsc_keys = {p: {c.key for c in choices} for p, choices in ctx.swsc_options.items()}
    swsc = {} if not ctx.swsc_options else read_cache_json(swsc_path, "SWSC cost table",
                                                           lambda d: _check_table(d, swsc_keys))
    if table is None or swsc is None:
        sequences = token_sequences(tokenizer, calib, FISHER_TOKENS, FISHER_SEQ_LEN)
        with progress_bar("Fisher information", FISHER_TOKENS) as advance:
            fisher = fisher_diagonal(model, ctx.modules, sequences, advance)
        if table is None:
            with progress_bar("quantization errors", len(ctx.modules)) as advance:
                table = quantization_errors(model, ctx.modules, fisher, advance)
            write_json_atomic(path, table)
        if swsc is None:
            with progress_bar("SWSC errors (k-means, SVD)", len(ctx.swsc_options)) as advance:
                swsc = swsc_errors(model, ctx.swsc_options, fisher, advance)
            write_json_atomic(swsc_path, swsc)
        del fisher
    return {p: errs | swsc.get(p, {}) for p, errs in table.items()}


def _check_table(data, keys: dict) -> dict:
    """``data`` if it holds, for every module, a finite error for each of its choices."""
    if not isinstance(data, dict) or set(data) != set(keys):
        raise ValueError("its modules are not this model's")
    for path, errs in data.items():
        if (not isinstance(errs, dict) or set(errs) != keys[path]
                or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in errs.values())):
            raise ValueError(f"the errors of {path} are malformed")
    return data


def headroom(predicted_bytes: int) -> dict:
    """Memory now available on this machine, and what is left once the weights are loaded."""
    available = psutil.virtual_memory().available
    return {"available_bytes": available, "headroom_bytes": available - predicted_bytes}
