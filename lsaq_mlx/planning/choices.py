"""What a plan gives one module: ``Affine`` (MLX affine quantization at some bits and
group size), ``Keep`` (float16), or ``SWSC`` (the SWSC codec, ``lsaq_mlx.swsc``, which
stock mlx-lm cannot open).

Each choice knows its cache key, the label people read (``4/64``, ``f16``), its bytes
for a module's shape (MLX's storage exactly: ``bits/8`` bytes per weight and one float16
scale and one float16 bias per group) and the entry mlx-lm's ``config.json`` records
(``{"bits", "group_size", "mode"}``, or ``false``; SWSC: its own settings).
"""

from dataclasses import dataclass

from lsaq_mlx.errors import UserError
from lsaq_mlx.swsc.codec import SWSCSettings, is_swsc

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
FLOAT_BYTES = 2  # float16: kept modules, norms, biases, and the scales and biases of groups


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


Choice = Affine | Keep | SWSC
KEEP = Keep()


def choice_from_config(value, where: str = "the plan") -> Choice:
    """The choice a plan file or config.json records: ``false``, ``{"bits", "group_size"}``
    or an SWSC entry; anything else is a one-line ``UserError``."""
    if value is False:
        return KEEP
    if is_swsc(value):
        return SWSC(SWSCSettings.from_choice(value))
    if (isinstance(value, dict) and value.get("bits") in BITS and value.get("group_size") in GROUP_SIZES
            and value.get("mode", "affine") == "affine" and set(value) <= {"bits", "group_size", "mode"}):
        return Affine(value["bits"], value["group_size"])
    raise UserError(f"{where}: {str(value)[:80]} is not a module choice (bits/group_size, false or swsc)")
