"""``SWSCLinear``: a linear layer whose weight is held SWSC-compressed.

It computes ``x @ (C[labels] + U diag(S) V)^T`` from the factors and never builds the
rows x cols matrix: with output channels shared, ``x @ C^T`` gives one value per
centroid and the labels pick each output's; with input channels shared, the inputs
of a cluster are summed first and multiplied by its centroid. That is
``k x length + r x (rows + cols)`` multiply-adds per input instead of ``rows x cols``
(every setting the planner offers has fewer; only k = channels with a rank has more,
by the rank's share) and only the compressed arrays in memory: rebuilding the matrix
would cost as much memory as a float16 layer, which is what SWSC is there to avoid.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from lsaq_mlx.backend.compute import compute_mode
from lsaq_mlx.swsc.codec import SWSCSettings, SWSCWeights, centroid_matrix, compress, unpack_labels


class SWSCLinear(nn.Module):
    def __init__(self, rows: int, cols: int, settings: SWSCSettings, bias: bool = False):
        """Zero parameters of the right shapes, to be filled by ``load_weights``."""
        super().__init__()
        settings.check(rows, cols)
        self.rows, self.cols, self.settings = rows, cols, settings
        length = settings.centroid_length(rows, cols)
        if settings.centroid_bits == 16:
            self.centroids = mx.zeros((settings.k, length), dtype=mx.float16)
        else:
            self.centroids = mx.zeros((settings.k, length * settings.centroid_bits // 32), dtype=mx.uint32)
            self.scales = mx.zeros((settings.k, length // settings.centroid_group_size), dtype=mx.float16)
            self.biases = mx.zeros_like(self.scales)
        per_word = 32 // settings.label_bits
        self.labels = mx.zeros((-(-settings.channels(rows, cols) // per_word),), dtype=mx.uint32)
        self.u = mx.zeros((rows, settings.rank), dtype=mx.float16)
        self.s = mx.zeros((settings.rank,), dtype=mx.float16)
        self.v = mx.zeros((settings.rank, cols), dtype=mx.float16)
        if bias:
            self.bias = mx.zeros((rows,), dtype=mx.float16)

    @classmethod
    def from_weights(cls, weights: SWSCWeights, bias: mx.array | None = None) -> "SWSCLinear":
        layer = cls(weights.rows, weights.cols, weights.settings, bias is not None)
        layer.update(dict(weights.arrays))
        if bias is not None:
            layer.bias = bias
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, settings: SWSCSettings) -> "SWSCLinear":
        """Compress a float linear layer (computes now: k-means and the SVD run eagerly)."""
        bias = linear.bias.astype(mx.float16) if "bias" in linear else None
        return cls.from_weights(compress(linear.weight, settings), bias)

    @property
    def weight_count(self) -> int:
        """Logical parameters: the dense matrix and the bias this layer stands for."""
        return self.rows * self.cols + (self.rows if "bias" in self else 0)

    def __call__(self, x: mx.array) -> mx.array:
        s = self.settings
        labels = unpack_labels(self.labels, s, self.rows, self.cols)
        if s.axis == "output":
            y = mx.take(self._times_centroids(x, transpose=True), labels, axis=-1)
        else:
            flat = x.reshape(-1, self.cols)
            summed = mx.zeros((s.k, flat.shape[0]), dtype=x.dtype).at[labels].add(flat.T)
            y = self._times_centroids(summed.T, transpose=False).reshape(*x.shape[:-1], self.rows)
        if s.rank:
            y = y + ((x @ self.v.T) * self.s) @ self.u.T
        if "bias" in self:
            y = y + self.bias
        return y

    def _times_centroids(self, x: mx.array, transpose: bool) -> mx.array:
        """``x @ C^T`` (output channels shared) or ``x @ C`` (input channels shared)."""
        s = self.settings
        if s.centroid_bits < 16 and compute_mode() == "quantized":
            return mx.quantized_matmul(x, self.centroids, self.scales, self.biases, transpose=transpose,
                                       group_size=s.centroid_group_size, bits=s.centroid_bits)
        # float32 compute mode (MLX's CPU backend): dequantize, then a fast float GEMM
        c = centroid_matrix(dict(self), s, x.dtype)
        return x @ c.T if transpose else x @ c


def swsc_layers(model: nn.Module, choices: dict, progress=None) -> int:
    """Replace every linear layer named in ``choices`` ({path: SWSCSettings}) by its
    compressed ``SWSCLinear``, one at a time; returns how many were replaced."""
    modules = dict(model.named_modules())
    for path, settings in choices.items():
        model.update_modules(tree_unflatten([(path, SWSCLinear.from_linear(modules[path], settings))]))
        if progress:
            progress(1)
    return len(choices)


def model_bits_per_weight(model: nn.Module) -> float:
    """mlx-lm's ``compute_bits_per_weight``, with an ``SWSCLinear`` counting the
    weights of the matrix it stands for (so SWSC and affine figures compare)."""
    from mlx_lm.utils import get_total_parameters

    layers = [m for _, m in model.named_modules() if isinstance(m, SWSCLinear)]
    params = get_total_parameters(model) + sum(m.weight_count - _stored_count(m) for m in layers)
    return sum(a.nbytes for _, a in tree_flatten(model.parameters())) * 8 / params


def _stored_count(layer: SWSCLinear) -> int:
    return sum(a.size for _, a in tree_flatten(layer.parameters()))
