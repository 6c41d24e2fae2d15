"""The SWSC settings the ``lsaq`` planner weighs for each module, next to affine bit widths.

Each candidate is (centroid bits, bits per weight to fill, share of the bytes spent on
the low-rank correction): the rank takes its share, ``k`` is then the largest that fits.
Output channels are shared: on SmolLM2-135M they cluster better than input channels
at every size tried (``benchmarks/swsc_table.py``). The targets sit between MLX's affine
sizes (b bits cost b + 0.5 bits per weight at group 64, b + 1 at group 32), where
SWSC with b-bit centroids can undercut the next affine size down.
"""

from lsaq_mlx.swsc.codec import CENTROID_GROUP_SIZES, SWSCSettings

CANDIDATES = (  # (centroid bits, bits per weight, share of bytes for the factors)
    (2, 2.0, 0.0),
    (3, 2.75, 0.0),
    (3, 3.0, 0.0),
    (3, 3.0, 0.05),
    (4, 3.75, 0.0),
    (4, 4.0, 0.0),
    (4, 4.0, 0.05),
)
GROUP_SIZE = 64


def fitting_settings(rows: int, cols: int, centroid_bits: int, bits_per_weight: float, rank_share: float = 0.0,
                     axis: str = "output", group_size: int = GROUP_SIZE) -> SWSCSettings | None:
    """The settings with the most centroids whose bytes stay within ``bits_per_weight``
    after ``rank_share`` of them went to the factors (when every channel gets its own
    centroid, what is left goes to the rank); None if not even k = 1 fits or
    ``group_size`` does not divide the centroids."""
    budget = int(bits_per_weight * rows * cols / 8)
    rank = min(int(rank_share * budget / (2 * (rows + cols + 1))), min(rows, cols))
    channels, length = (rows, cols) if axis == "output" else (cols, rows)
    if centroid_bits < 16 and length % group_size:
        return None

    def fits(k: int) -> bool:
        return SWSCSettings(k, rank, axis, centroid_bits, group_size).nbytes(rows, cols) <= budget

    if not fits(1):
        return None
    low, high = 1, channels  # the largest k that fits, by bisection (bytes grow with k)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    if low == channels:
        left = budget - SWSCSettings(low, rank, axis, centroid_bits, group_size).nbytes(rows, cols)
        rank = min(rank + left // (2 * (rows + cols + 1)), min(rows, cols))
    return SWSCSettings(low, rank, axis, centroid_bits, group_size)


def candidates(rows: int, cols: int) -> list[SWSCSettings]:
    """The planner's SWSC options for a rows x cols linear layer (none if no centroid
    group size divides its input size)."""
    group = next((g for g in sorted(CENTROID_GROUP_SIZES, key=lambda g: abs(g - GROUP_SIZE)) if cols % g == 0), None)
    if group is None:
        return []
    found = []
    for bits, bpw, share in CANDIDATES:
        settings = fitting_settings(rows, cols, bits, bpw, share, group_size=group)
        if settings is not None and settings not in found:
            found.append(settings)
    return found
