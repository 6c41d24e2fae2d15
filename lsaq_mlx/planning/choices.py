"""What a plan gives one module: ``Affine`` (MLX affine quantization at some bits and
group size), ``Keep`` (float16), ``Microscaled`` (MLX's mxfp4, nvfp4 and mxfp8 formats,
``planning.microscaled``), or ``SWSC`` (the SWSC codec, ``lsaq_mlx.swsc``, which stock
mlx-lm cannot open). ``CODECS`` lists them: a new codec is one class here (or in
its own module) and one entry there.

Each choice knows its cache key, the label people read (``4/64``, ``f16``), its bytes
for a module's shape (MLX's storage exactly: ``bits/8`` bytes per weight and one float16
scale and one float16 bias per group), the entry mlx-lm's ``config.json`` records
(``{"bits", "group_size", "mode"}``, or ``false``; SWSC: its own settings) and how to
read it back (``from_config``); its class prices a list of its choices for a matrix
(``errors``: the Fisher-weighted squared error the cost table holds), and a choice turns
a float module into the module it stands for (``module``).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.affine_error import chunked_affine_errors
from lsaq_mlx.planning.microscaled import Microscaled
from lsaq_mlx.swsc.codec import SWSCSettings, compress, is_swsc
from lsaq_mlx.swsc.layer import SWSCLinear

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
FLOAT_BYTES = 2  # float16: kept modules, norms, biases, and the scales and biases of groups
STORED_FLOAT = mx.float16  # the dtype convert writes every float tensor in


@dataclass(frozen=True)
class Affine:
    bits: int
    group_size: int

    @property
    def key(self) -> str:
        return f"{self.bits}/{self.group_size}"

    label = key

    def weight_bytes(self, rows: int, cols: int) -> int:
        weights = rows * cols
        return weights * self.bits // 8 + 2 * FLOAT_BYTES * weights // self.group_size

    def bits_per_weight(self) -> float:
        return self.bits + 2 * FLOAT_BYTES * 8 / self.group_size

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": "affine"}

    def fits(self, cols: int) -> bool:
        """Whether groups of this size tile an input dimension of ``cols``."""
        return cols % self.group_size == 0

    @classmethod
    def from_config(cls, value) -> "Affine | None":
        if (isinstance(value, dict) and value.get("bits") in BITS and value.get("group_size") in GROUP_SIZES
                and value.get("mode", "affine") == "affine" and set(value) <= {"bits", "group_size", "mode"}):
            return cls(value["bits"], value["group_size"])
        return None

    @staticmethod
    def errors(weight: mx.array, fisher: mx.array, choices: list["Affine"]) -> list[float]:
        return chunked_affine_errors(weight, fisher, choices)

    def module(self, float_module: nn.Module) -> nn.Module:
        """Quantized lazily: the caller evaluates it (or fills it a row block at a time)."""
        return float_module.to_quantized(group_size=self.group_size, bits=self.bits)


@dataclass(frozen=True)
class Keep:
    key = "keep"
    label = "f16"

    def weight_bytes(self, rows: int, cols: int) -> int:
        return rows * cols * FLOAT_BYTES

    def bits_per_weight(self) -> float:
        return 8.0 * FLOAT_BYTES

    def config(self) -> bool:
        return False

    def fits(self, cols: int) -> bool:
        return True

    @classmethod
    def from_config(cls, value) -> "Keep | None":
        return KEEP if value is False else None

    @staticmethod
    def errors(weight: mx.array, fisher: mx.array, choices: list["Keep"]) -> list[float]:
        return [0.0] * len(choices)

    def module(self, float_module: nn.Module) -> nn.Module:
        return float_module


@dataclass(frozen=True)
class SWSC:
    settings: SWSCSettings

    @property
    def key(self) -> str:
        s = self.settings
        return f"swsc/{s.axis}/{s.k}/{s.rank}/{s.centroid_bits}/{s.centroid_group_size}"

    @property
    def label(self) -> str:
        """``s3:490+8``: centroid bits, clusters, rank."""
        return f"s{self.settings.centroid_bits}:{self.settings.k}+{self.settings.rank}"

    def weight_bytes(self, rows: int, cols: int) -> int:
        return self.settings.nbytes(rows, cols)

    def bits_per_weight(self) -> float | None:
        return None  # depends on the shape: see weight_bytes

    def config(self) -> dict:
        return self.settings.to_choice()

    def fits(self, cols: int) -> bool:
        return True

    @classmethod
    def from_config(cls, value) -> "SWSC | None":
        return cls(SWSCSettings.from_choice(value)) if is_swsc(value) else None

    @staticmethod
    def errors(weight: mx.array, fisher: mx.array, choices: list["SWSC"]) -> list[float]:
        """k-means and the SVD see the whole matrix."""
        return [(fisher * mx.square(weight - compress(weight, c.settings).dense())).sum().item() for c in choices]

    def module(self, float_module: nn.Module) -> nn.Module:
        return SWSCLinear.from_linear(float_module, self.settings)


Choice = Affine | Keep | Microscaled | SWSC
CODECS: list[type] = [Keep, Affine, Microscaled, SWSC]  # tried in order by choice_from_config
KEEP = Keep()


def choice_from_config(value, where: str = "the plan") -> Choice:
    """The choice a plan file or config.json records (``false``, ``{"bits",
    "group_size"}``, an SWSC entry...): the first codec that reads it; anything else is
    a one-line ``UserError``."""
    for codec in CODECS:
        choice = codec.from_config(value)
        if choice is not None:
            return choice
    raise UserError(f"{where}: {str(value)[:80]} is not a module choice (bits/group_size, mxfp4/nvfp4/mxfp8, false or swsc)")
