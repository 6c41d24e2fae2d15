"""A cost table from a model's shapes alone, for plans on paper (``plan --dry-run``
from a config without weights): every weight equally sensitive, and a setting's error
per weight that of MLX's affine round trip on Gaussian weights of unit variance."""

from functools import cache

import mlx.core as mx

from lsaq_mlx.planning.affine_error import roundtrip
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.planning.cost import CostTable

_SAMPLE = (64, 1536)  # divisible by every group size


@cache
def gaussian_error(choice: Affine) -> float:
    """Mean squared error per weight of ``choice`` on unit Gaussian weights."""
    w = mx.random.normal(_SAMPLE, key=mx.random.key(0))
    return float(mx.mean((w - roundtrip(w, choice)) ** 2))


def shape_costs(ctx) -> CostTable:
    """Each module's cost: its weights times the error per weight of the setting (0 kept
    in float16)."""
    return CostTable({q.path: {c.key: q.copies * q.rows * q.cols * gaussian_error(c) if isinstance(c, Affine) else 0.0
                               for c in ctx.candidates(q)} for q in ctx.modules})
