"""How the engine picks each next token, and how much KV cache it keeps."""

from dataclasses import dataclass

from lsaq_mlx.errors import UserError


@dataclass(frozen=True)
class Sampling:
    temp: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    max_kv_size: int | None = None  # tokens the KV cache keeps (a rotating cache); None: the whole conversation

    def check(self) -> None:
        if self.temp < 0:
            raise UserError(f"temperature must be 0 or more, not {self.temp:g}", setting="temp")
        if self.top_k < 0:
            raise UserError(f"top-k must be 0 (off) or more, not {self.top_k}", setting="top_k")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], not {self.top_p:g}", setting="top_p")
        if not 0 <= self.min_p < 1:
            raise UserError(f"min-p must be in [0, 1), not {self.min_p:g}", setting="min_p")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise UserError(f"the seed must be between 0 and 2**64 - 1, not {self.seed}", setting="seed")
        if self.max_kv_size is not None and self.max_kv_size < 1:
            raise UserError(f"the KV cache must keep at least one token, not {self.max_kv_size}", setting="max_kv_size")

    def sampler(self, temp: float | None = None):
        """mlx-lm's sampler for these settings (``temp`` overrides the temperature)."""
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=self.temp if temp is None else temp, top_p=self.top_p, min_p=self.min_p,
                            top_k=self.top_k)

    def describe(self) -> str:
        if self.temp == 0:
            return "greedy"
        parts = [f"temp {self.temp:g}"] + ([f"top-p {self.top_p:g}"] if self.top_p < 1 else []) + (
            [f"top-k {self.top_k}"] if self.top_k else []) + (
            [f"min-p {self.min_p:g}"] if self.min_p > 0 else [])
        return ", ".join(parts) + (f", seed {self.seed}" if self.seed is not None else "")
