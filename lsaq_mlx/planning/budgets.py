"""Budgets: bits per weight (mlx-lm's definition) or bytes of weights, and how a total
memory budget becomes bytes of weights."""

from dataclasses import dataclass, field

import psutil

from lsaq_mlx.errors import UserError
from lsaq_mlx.sizes import parse_size

KV_BYTES = 2  # float16 KV cache


@dataclass
class Budget:
    """A budget in bits per weight (mlx-lm's definition) or in bytes of weights."""

    bits_per_weight: float | None = None
    bytes: int | None = None
    assumptions: dict = field(default_factory=dict)  # how a memory budget became bytes

    def describe(self) -> dict:
        if self.bits_per_weight is not None:
            return {"bits_per_weight": self.bits_per_weight}
        return {"bytes": self.bytes, **self.assumptions}

    def text(self) -> str:
        from lsaq_mlx.sizes import format_size

        if self.bits_per_weight is not None:
            return f"bits-per-weight budget {self.bits_per_weight:g}"
        return f"memory budget of {format_size(self.bytes)} of weights"


def check_bits_budget(bits: float) -> None:
    if not 1.0 <= bits <= 32.0:
        raise UserError(f"bits-per-weight budget {bits:g} is not between 1 and 32", setting="bits_budget")


def memory_budget(text: str, config: dict, context: int) -> Budget:
    """Weights bytes for a total memory budget, after a KV cache of ``context`` tokens
    (float16) and a runtime reserve of 10 % (activations, MLX's buffers)."""
    size = parse_size(text)
    layers = config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * layers * kv_heads * head_dim * KV_BYTES * context
    reserve = size // 10  # activations, MLX's buffers
    weights = size - kv - reserve
    assumptions = {"memory_budget": size, "kv_cache_bytes": kv, "kv_cache_context": context,
                   "runtime_reserve_bytes": reserve}
    if weights <= 0:
        raise UserError(f"memory budget {text} leaves no room for weights after a {context}-token KV cache "
                        f"({kv / 1e9:.2f} GB) and a 10 % runtime reserve", setting="memory_budget")
    return Budget(bytes=weights, assumptions=assumptions)


def headroom(predicted_bytes: int) -> dict:
    """Memory now available on this machine, and what is left once the weights are loaded."""
    available = psutil.virtual_memory().available
    return {"available_bytes": available, "headroom_bytes": available - predicted_bytes}
