"""Perplexity over non-overlapping windows (the evaluation issue builds on this).

Each window of ``seq_len`` tokens predicts its last ``seq_len - 1`` tokens from
the ones before them within the window; windows do not overlap and the last
partial window is used when it has at least two tokens.
"""

import math
from dataclasses import asdict, dataclass

import mlx.core as mx

from lsaq_mlx.progress import progress_bar
import mlx.nn as nn


@dataclass
class PerplexityResult:
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    mean_nll: float
    perplexity: float
    stderr_nll: float  # standard error of the mean NLL over tokens

    def to_dict(self) -> dict:
        return asdict(self)


def token_nlls(model, tokens: mx.array) -> mx.array:
    """Negative log-likelihood, in float32, of tokens[1:] given what precedes them."""
    logits = model(tokens[None, :-1])[0].astype(mx.float32)
    return nn.losses.cross_entropy(logits, tokens[1:], reduction="none")


def windows(tokens: list[int], seq_len: int):
    for start in range(0, len(tokens), seq_len):
        window = tokens[start : start + seq_len]
        if len(window) >= 2:
            yield window


def perplexity(model, tokens: list[int], seq_len: int = 1024) -> PerplexityResult:
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
    total = total_sq = 0.0
    count = n_windows = 0
    chunks = list(windows(tokens, seq_len))
    with progress_bar("perplexity", len(chunks)) as advance:
        for window in chunks:
            nll = token_nlls(model, mx.array(window))
            mx.eval(nll)
            total += nll.sum().item()
            total_sq += (nll * nll).sum().item()
            count += nll.size
            n_windows += 1
            advance()
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    stderr = math.sqrt(var / max(count - 1, 1))
    return PerplexityResult(count, n_windows, seq_len, mean, math.exp(mean), stderr)
