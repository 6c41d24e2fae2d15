"""MLX's microscaling float formats as plan choices (``--codecs affine,nvfp4,...``):
``mxfp4`` (FP4 E2M1 codes, one power-of-two scale per 32 weights: 4.25 bits per weight),
``nvfp4`` (FP4, one FP8 E4M3 scale per 16: 4.5) and ``mxfp8`` (FP8 E4M3, one scale per
32: 8.25). No bias; stock mlx-lm reads a module's ``mode`` from its config.json entry.
The planner prices them beside affine and takes them only where they cost less per byte.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from lsaq_mlx.backend.cores import map_on_cores

FORMATS = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # mode -> (bits, group size)
SCALE_BYTES = 1  # one 8-bit scale per group
CHUNK_BYTES = 4 << 20  # float32 bytes of the rows priced at a time


@dataclass(frozen=True)
class Microscaled:
    mode: str

    @property
    def bits(self) -> int:
        return FORMATS[self.mode][0]

    @property
    def group_size(self) -> int:
        return FORMATS[self.mode][1]

    @property
    def key(self) -> str:
        return self.mode

    label = key

    def weight_bytes(self, rows: int, cols: int) -> int:
        weights = rows * cols
        return weights * self.bits // 8 + SCALE_BYTES * weights // self.group_size

    def bits_per_weight(self) -> float:
        return self.bits + SCALE_BYTES * 8 / self.group_size

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    def fits(self, cols: int) -> bool:
        return cols % self.group_size == 0

    @classmethod
    def from_config(cls, value) -> "Microscaled | None":
        if (isinstance(value, dict) and isinstance(value.get("mode"), str) and value["mode"] in FORMATS and set(value) <= {"bits", "group_size", "mode"}
                and (value.get("bits"), value.get("group_size")) == FORMATS[value["mode"]]):
            return cls(value["mode"])
        return None

    @staticmethod
    def errors(weight: mx.array, fisher: mx.array, choices: list["Microscaled"]) -> list[float]:
        """``sum F (W - Q(W))^2`` of each format, on row chunks spread over the cores."""
        step = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
        chunks = [slice(r, r + step) for r in range(0, weight.shape[0], step)]
        mx.eval(weight, fisher)
        per_chunk = map_on_cores(lambda rows: [(fisher[rows] * mx.square(weight[rows] - roundtrip(weight[rows], c)))
                                               .sum().item() for c in choices], chunks)
        return [float(sum(errs[j] for errs in per_chunk)) for j in range(len(choices))]

    def module(self, float_module: nn.Module) -> nn.Module:
        """Quantized lazily: the caller evaluates it (or fills it a row block at a time)."""
        return float_module.to_quantized(group_size=self.group_size, bits=self.bits, mode=self.mode)


def roundtrip(w: mx.array, choice: Microscaled) -> mx.array:
    """``w`` in ``choice``'s format and back, as the written model holds it."""
    codes, scales = mx.quantize(w, choice.group_size, choice.bits, mode=choice.mode)
    return mx.dequantize(codes, scales, None, choice.group_size, choice.bits, mode=choice.mode)
