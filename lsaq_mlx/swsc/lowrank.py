"""The truncated SVD of SWSC's error matrix: its best rank-r approximation U diag(S) V.

Matrices whose smaller side is at most ``EXACT_LIMIT`` (every matrix of models up to a
few billion parameters' attention and MLP projections on one side) are decomposed
exactly through the eigenvectors of the smaller Gram matrix: ``mx.linalg.svd`` (CPU
only) also builds the full square singular basis of the larger side, ~10x slower on a
1536 x 576 matrix. Larger ones use a randomized range finder (Halko, Martinsson, Tropp
2011) with power iterations: a few matrix products and QRs of m x (r + 10) blocks
instead of a cubic decomposition of the whole matrix.
"""

import mlx.core as mx

EXACT_LIMIT = 2048
OVERSAMPLE = 10
POWER_ITERATIONS = 2


def truncated_svd(e: mx.array, rank: int, seed: int = 0) -> tuple[mx.array, mx.array, mx.array]:
    """``(u, s, v)``: ``u`` (m x r) and ``v`` (r x n) with orthonormal columns / rows,
    ``s`` (r) descending, such that ``(u * s) @ v`` is the best rank-r approximation."""
    m, n = e.shape
    if not 0 <= rank <= min(m, n):
        raise ValueError(f"rank must be between 0 and {min(m, n)}, not {rank}")
    e = e.astype(mx.float32)
    if rank == 0:
        return mx.zeros((m, 0)), mx.zeros((0,)), mx.zeros((0, n))
    if min(m, n) <= EXACT_LIMIT:
        return _exact(e, rank)
    return _randomized(e, rank, seed)


def _exact(e: mx.array, rank: int):
    if e.shape[0] < e.shape[1]:
        v, s, u = _exact(e.T, rank)
        return u.T, s, v.T
    # tall: the eigenvectors of e^T e (n x n) are the right singular vectors
    _, vectors = mx.linalg.eigh(e.T @ e, stream=mx.cpu)
    right = vectors[:, ::-1][:, :rank]
    scaled = e @ right  # u * s
    s = mx.sqrt(mx.square(scaled).sum(axis=0))
    u = scaled / mx.where(s > 0, s, 1.0)
    return u, s, right.T


def _randomized(e: mx.array, rank: int, seed: int):
    m, n = e.shape
    width = min(rank + OVERSAMPLE, min(m, n))
    basis = _orthonormal(e @ mx.random.normal((n, width), key=mx.random.key(seed)))
    for _ in range(POWER_ITERATIONS):
        basis = _orthonormal(e @ _orthonormal(e.T @ basis))
    small_u, s, v = _exact(basis.T @ e, rank)
    return basis @ small_u, s, v


def _orthonormal(a: mx.array) -> mx.array:
    q, _ = mx.linalg.qr(a, stream=mx.cpu)
    mx.eval(q)
    return q
