"""Per-token divergence between two models' next-token distributions (what the
sensitivity metric measures, and evaluation reports against a reference)."""

import mlx.core as mx


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def token_kl(ref_logits: mx.array, logits: mx.array) -> mx.array:
    """KL(reference || model) in nats at every position."""
    ref_lp, lp = log_softmax(ref_logits), log_softmax(logits)
    return (mx.exp(ref_lp) * (ref_lp - lp)).sum(axis=-1)
