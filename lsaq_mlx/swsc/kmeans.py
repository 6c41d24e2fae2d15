"""k-means over the rows of a matrix: k-means++ seeding, then Lloyd iterations.

Distances are ``||x||^2 - 2 x.c + ||c||^2``, a matrix product computed over blocks of
rows so memory stays bounded for any matrix size (8192 x 8192 with thousands of
centroids included). Everything is deterministic for a given seed.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

DEFAULT_ITERATIONS = 20
BLOCK_ELEMENTS = 1 << 23  # (row, centroid) distances held at once: 32 MB of float32
SEED_EVAL_EVERY = 32  # k-means++ steps kept lazy before evaluating, to bound the graph


@dataclass
class KMeans:
    centroids: mx.array  # (k, n) float32
    labels: mx.array  # (m,) uint32: the centroid of every row
    iterations: int  # Lloyd iterations run (fewer than the cap when assignments settled)
    inertia: float  # sum of squared distances of the rows to their centroids


def kmeans(x: mx.array, k: int, iterations: int = DEFAULT_ITERATIONS, seed: int = 0) -> KMeans:
    """Cluster the rows of ``x`` (m x n) into ``k`` clusters."""
    m = x.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k must be between 1 and the number of rows ({m}), not {k}")
    x = x.astype(mx.float32)
    centroids = _seed(x, k, seed)
    labels, done = None, 0
    for done in range(1, iterations + 1):
        new_labels, dist = _assign(x, centroids)
        if labels is not None and mx.array_equal(new_labels, labels).item():
            done -= 1
            break
        labels = new_labels
        centroids = _update(x, labels, dist, centroids)
    labels, dist = _assign(x, centroids)
    return KMeans(centroids, labels, done, dist.sum().item())


def _seed(x: mx.array, k: int, seed: int) -> mx.array:
    """k-means++: each next centroid is a row drawn with probability proportional to its
    squared distance from the nearest centroid chosen so far."""
    keys = mx.random.split(mx.random.key(seed), k)
    norms = mx.square(x).sum(axis=1)
    rows = mx.arange(x.shape[0])
    pick = mx.random.randint(0, x.shape[0], (), key=keys[0])
    chosen = [pick]
    nearest = mx.full(norms.shape, mx.inf)
    for i in range(1, k):
        to_pick = norms - 2 * (x @ x[pick]) + norms[pick]
        # the picked row's distance is exactly 0, whatever the rounding of the expansion
        nearest = mx.where(rows == pick, 0.0, mx.maximum(mx.minimum(nearest, to_pick), 0.0))
        # every row already a centroid (repeated rows): draw uniformly
        logits = mx.where(nearest.sum() > 0, mx.log(nearest), mx.zeros_like(nearest))
        pick = mx.random.categorical(logits, key=keys[i])
        chosen.append(pick)
        if i % SEED_EVAL_EVERY == 0:
            mx.eval(nearest, chosen)
    return x[mx.stack(chosen)]


def _assign(x: mx.array, centroids: mx.array) -> tuple[mx.array, mx.array]:
    """The nearest centroid of every row and the squared distance to it, by blocks of rows."""
    m, k = x.shape[0], centroids.shape[0]
    block = max(1, BLOCK_ELEMENTS // k)
    c_norms = mx.square(centroids).sum(axis=1)
    labels, dists = [], []
    for start in range(0, m, block):
        rows = x[start:start + block]
        d = c_norms[None, :] - 2 * (rows @ centroids.T)
        best = mx.argmin(d, axis=1)
        nearest = mx.take_along_axis(d, best[:, None], axis=1)[:, 0] + mx.square(rows).sum(axis=1)
        labels.append(best.astype(mx.uint32))
        dists.append(mx.maximum(nearest, 0))
        mx.eval(labels[-1], dists[-1])
    return mx.concatenate(labels), mx.concatenate(dists)


def _update(x: mx.array, labels: mx.array, dist: mx.array, centroids: mx.array) -> mx.array:
    """Every centroid becomes the mean of its rows; an empty cluster takes the row
    farthest from its centroid (deterministic), so no centroid is wasted."""
    k, n = centroids.shape
    sums = mx.zeros((k, n), dtype=mx.float32).at[labels].add(x)
    counts = mx.zeros((k,), dtype=mx.float32).at[labels].add(1.0)
    means = sums / mx.maximum(counts, 1.0)[:, None]
    empty = np.flatnonzero(np.array(counts) == 0)
    if empty.size:
        farthest = np.argsort(-np.array(dist), kind="stable")[: empty.size]
        means[mx.array(empty)] = x[mx.array(farthest)]
    mx.eval(means)
    return means
