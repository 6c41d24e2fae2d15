"""SWSC (Zeng, Tang, Liu et al., 2025): shared weights for similar channels, with SVD
error compensation.

A weight matrix ``W`` (rows: output channels, columns: input channels) becomes

    W ~ W' + U diag(S) V,   W' = the channels of W replaced by their cluster's centroid

- the channels along ``axis`` (``output``: the rows, ``input``: the columns) are
  clustered by k-means into ``k`` clusters: ``k`` centroids (float16, or MLX affine
  with ``centroid_bits`` and float16 scales and biases per ``centroid_group_size``)
  and one label per channel (``ceil(log2 k)`` bits, packed into uint32 words);
- the error ``W - W'`` (of the centroids as stored, so their rounding is compensated
  too) is approximated by its top ``rank`` singular triplets, stored in float16.

Bytes are counted exactly as the arrays are held in memory and on disk.
"""

import math
from dataclasses import asdict, dataclass

import mlx.core as mx

from lsaq_mlx.errors import UserError
from lsaq_mlx.swsc.kmeans import DEFAULT_ITERATIONS, kmeans
from lsaq_mlx.swsc.lowrank import truncated_svd

AXES = ("output", "input")
CENTROID_BITS = (2, 3, 4, 5, 6, 8, 16)  # 16: float16 centroids, else MLX affine
CENTROID_GROUP_SIZES = (32, 64, 128)
FLOAT_BYTES = 2
WORD_BITS = 32
SEED = 0


def is_swsc(choice) -> bool:
    """Whether a plan's module choice is an SWSC one (affine choices carry no codec)."""
    return isinstance(choice, dict) and choice.get("codec") == "swsc"


@dataclass(frozen=True)
class SWSCSettings:
    k: int  # clusters (centroids)
    rank: int  # singular triplets of the error kept
    axis: str = "output"  # which channels share weights
    centroid_bits: int = 4
    centroid_group_size: int = 64

    def to_choice(self) -> dict:
        """The module's entry in a ``QuantPlan``."""
        return {"codec": "swsc", **asdict(self)}

    @classmethod
    def from_choice(cls, choice: dict) -> "SWSCSettings":
        try:
            settings = cls(**{k: v for k, v in choice.items() if k != "codec"})
        except TypeError:
            raise UserError(f"not a valid SWSC choice: {str(choice)[:120]}") from None
        ints = (settings.k, settings.rank, settings.centroid_bits, settings.centroid_group_size)
        if (not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) or settings.axis not in AXES
                or settings.centroid_bits not in CENTROID_BITS or settings.centroid_group_size not in CENTROID_GROUP_SIZES):
            raise UserError(f"not a valid SWSC choice: {str(choice)[:120]}")
        return settings

    def channels(self, rows: int, cols: int) -> int:
        return rows if self.axis == "output" else cols

    def centroid_length(self, rows: int, cols: int) -> int:
        return cols if self.axis == "output" else rows

    @property
    def label_bits(self) -> int:
        return max(1, (self.k - 1).bit_length())

    def check(self, rows: int, cols: int) -> None:
        """A one-line ``UserError`` unless these settings can compress a rows x cols matrix."""
        if self.axis not in AXES:
            raise UserError(f"SWSC axis must be one of {', '.join(AXES)}, not '{self.axis}'")
        channels = self.channels(rows, cols)
        if self.k < 1:
            raise UserError(f"SWSC k must be at least 1, not {self.k}")
        if self.k > channels:
            raise UserError(f"SWSC k={self.k} is more than the {channels} {self.axis} channels of a {rows}x{cols} matrix")
        if self.rank < 0:
            raise UserError(f"SWSC rank must be at least 0, not {self.rank}")
        if self.rank > min(rows, cols):
            raise UserError(f"SWSC rank r={self.rank} is larger than the rank of a {rows}x{cols} matrix ({min(rows, cols)})")
        if self.centroid_bits not in CENTROID_BITS:
            raise UserError(f"SWSC centroid bits must be one of {CENTROID_BITS}, not {self.centroid_bits}")
        length = self.centroid_length(rows, cols)
        if self.centroid_bits < 16 and (self.centroid_group_size not in CENTROID_GROUP_SIZES
                                        or length % self.centroid_group_size):
            raise UserError(f"SWSC centroid group size {self.centroid_group_size} must be one of "
                            f"{CENTROID_GROUP_SIZES} and divide the centroid length {length}")

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of the compressed matrix: centroids, packed labels, factors."""
        length = self.centroid_length(rows, cols)
        if self.centroid_bits == 16:
            centroids = self.k * length * FLOAT_BYTES
        else:
            centroids = self.k * length * self.centroid_bits // 8 + 2 * FLOAT_BYTES * self.k * length // self.centroid_group_size
        labels = WORD_BITS // 8 * _label_words(self.channels(rows, cols), self.label_bits)
        factors = FLOAT_BYTES * self.rank * (rows + cols + 1)
        return centroids + labels + factors

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.nbytes(rows, cols) * 8 / (rows * cols)

    def multiply_adds(self, rows: int, cols: int) -> int:
        """Per input vector, with the factors (``SWSCLinear``): the centroid product plus the
        low-rank correction; the dense matrix would take rows x cols."""
        return self.k * self.centroid_length(rows, cols) + self.rank * (rows + cols)


@dataclass
class SWSCWeights:
    """A compressed matrix: the ``SWSCLinear`` parameters and what they stand for."""

    settings: SWSCSettings
    rows: int
    cols: int
    arrays: dict  # centroids[, scales, biases], labels, u, s, v

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def dense(self) -> mx.array:
        """The float32 matrix the compressed form stands for, ``W' + U diag(S) V``."""
        shared = centroid_matrix(self.arrays, self.settings)[unpack_labels(self.arrays["labels"], self.settings, self.rows, self.cols)]
        shared = shared if self.settings.axis == "output" else shared.T
        u, s, v = (self.arrays[n].astype(mx.float32) for n in ("u", "s", "v"))
        return shared + (u * s) @ v


def compress(w: mx.array, settings: SWSCSettings, iterations: int = DEFAULT_ITERATIONS, seed: int = SEED) -> SWSCWeights:
    """Cluster ``w``'s channels, store the centroids, then the top singular triplets of the error."""
    rows, cols = w.shape
    settings.check(rows, cols)
    w = w.astype(mx.float32)
    channels = w if settings.axis == "output" else w.T
    clusters = kmeans(channels, settings.k, iterations, seed)
    arrays = _stored_centroids(clusters.centroids, settings)
    arrays["labels"] = pack_labels(clusters.labels, settings.label_bits)
    shared = centroid_matrix(arrays, settings)[clusters.labels]
    error = w - (shared if settings.axis == "output" else shared.T)
    u, s, v = truncated_svd(error, settings.rank, seed)
    arrays |= {"u": u.astype(mx.float16), "s": s.astype(mx.float16), "v": v.astype(mx.float16)}
    mx.eval(arrays)
    return SWSCWeights(settings, rows, cols, arrays)


def _stored_centroids(centroids: mx.array, settings: SWSCSettings) -> dict:
    if settings.centroid_bits == 16:
        return {"centroids": centroids.astype(mx.float16)}
    packed, scales, biases = mx.quantize(centroids, settings.centroid_group_size, settings.centroid_bits)
    return {"centroids": packed, "scales": scales.astype(mx.float16), "biases": biases.astype(mx.float16)}


def centroid_matrix(arrays: dict, settings: SWSCSettings, dtype=mx.float32) -> mx.array:
    """The centroids (k x length) as values, dequantized if stored quantized."""
    if settings.centroid_bits == 16:
        return arrays["centroids"].astype(dtype)
    return mx.dequantize(arrays["centroids"], arrays["scales"].astype(dtype), arrays["biases"].astype(dtype),
                         settings.centroid_group_size, settings.centroid_bits)


def _label_words(channels: int, bits: int) -> int:
    return math.ceil(channels / (WORD_BITS // bits))


def pack_labels(labels: mx.array, bits: int) -> mx.array:
    """``WORD_BITS // bits`` labels per uint32 word, none split across words."""
    per_word = WORD_BITS // bits
    padded = mx.concatenate([labels.astype(mx.uint32), mx.zeros((-labels.size) % per_word, mx.uint32)])
    shifts = (mx.arange(per_word, dtype=mx.uint32) * bits)[None, :]
    return mx.left_shift(padded.reshape(-1, per_word), shifts).sum(axis=1).astype(mx.uint32)


def unpack_labels(packed: mx.array, settings: SWSCSettings, rows: int, cols: int) -> mx.array:
    bits = settings.label_bits
    per_word = WORD_BITS // bits
    shifts = (mx.arange(per_word, dtype=mx.uint32) * bits)[None, :]
    labels = mx.right_shift(packed[:, None], shifts) & ((1 << bits) - 1)
    return labels.reshape(-1)[: settings.channels(rows, cols)]
