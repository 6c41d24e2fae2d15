"""``lsaq-mlx score``: compute (or read from the cache) a model's ``LayerScores``."""

import time
from dataclasses import dataclass

import mlx.core as mx

from lsaq_mlx.backend.compute import describe
from lsaq_mlx.cache import read_cache_json
from lsaq_mlx.errors import UserError
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.scoring import metrics as importance
from lsaq_mlx.scoring import streamed
from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
from lsaq_mlx.modules import inner_model
from lsaq_mlx.scoring.scores import (
    DEFAULT_SEQ_LEN,
    DEFAULT_STRIDE,
    DEFAULT_TOKENS,
    DEFAULT_TOP_K,
    METRICS,
    LayerScores,
    cached_scores_path,
    scores_key,
)
from lsaq_mlx.sources import ModelSource, load_model
from lsaq_mlx.sources.load import load_tokenizer
from lsaq_mlx.sources.streaming import StreamedModel, streams

@dataclass
class ScoreOptions:
    metric: str = "jaccard"
    calib: str | None = None
    tokens: int = DEFAULT_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    top_k: int = DEFAULT_TOP_K
    stride: int | None = None  # None: DEFAULT_STRIDE for jaccard, every position for cosine
    sets: str = "position"  # or "sequence": one (union) set per sequence
    seed: int = 0
    bits: int = 3  # sensitivity: the low bit width a layer is quantized to
    skip_tokens: int = 0  # start this far into the calibration text

    def __post_init__(self) -> None:
        if self.stride is None:
            self.stride = DEFAULT_STRIDE if self.metric == "jaccard" else 1

    def check(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"unknown metric '{self.metric}' (one of {', '.join(METRICS)})")
        if self.tokens < 1:
            raise UserError("calibration tokens must be at least 1", setting="tokens")
        if self.seq_len < 2 or self.stride < 1:
            raise UserError("the sequence length must be at least 2 and the stride at least 1", setting="seq_len")
        if self.top_k < 1:
            raise UserError("top-k must be at least 1", setting="top_k")
        if self.sets not in ("position", "sequence"):
            raise UserError("sets must be 'position' or 'sequence'", setting="sets")
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise UserError("sensitivity bits must be one of 2, 3, 4, 5, 6, 8", setting="bits")

    def params(self, calib_fingerprint: str | None) -> dict:
        """The parameters that change this metric's result (the cache key uses them)."""
        if self.metric == "random":
            return {"seed": self.seed}
        if self.metric == "zscore":
            return {}
        common = {"calibration": self.calib or "default", "calibration_fingerprint": calib_fingerprint,
                  "tokens": self.tokens, "seq_len": self.seq_len, "skip_tokens": self.skip_tokens}
        if self.metric == "sensitivity":
            return common | {"bits": self.bits, "group_size": 32}
        lens = {"stride": self.stride} | ({"top_k": self.top_k, "sets": self.sets} if self.metric == "jaccard" else {})
        return common | lens


def cached_score(source: ModelSource, opts: ScoreOptions) -> LayerScores | None:
    """The scores of ``source`` under ``opts`` if the cache holds them (intact), else None."""
    calib = None if opts.metric in ("random", "zscore") else load_calibration(opts.calib)
    params = opts.params(calib.fingerprint if calib else None)
    path = cached_scores_path(scores_key(source.fingerprint, opts.metric, params))
    return read_cache_json(path, "scores", lambda d: _cached_scores(d, path, source.fingerprint, opts.metric, params))


def score(source: ModelSource, opts: ScoreOptions, use_cache: bool = True, model=None) -> LayerScores:
    """The scores of ``source`` under ``opts``; cached by content fingerprint. ``model``:
    the source already loaded in the compute mode, ``(model, tokenizer)`` or a function
    that returns them (called only when the scores are not cached)."""
    opts.check()
    calib = None if opts.metric in ("random", "zscore") else load_calibration(opts.calib)
    params = opts.params(calib.fingerprint if calib else None)
    path = cached_scores_path(scores_key(source.fingerprint, opts.metric, params))
    cached = cached_score(source, opts) if use_cache else None
    if cached is not None:
        return cached
    start = time.perf_counter()
    if streams(source):
        scores = _compute(StreamedModel(source), load_tokenizer(source), opts, calib, streamed)
    else:
        if model is None:
            model, tokenizer, _ = load_model(source)
        else:
            model, tokenizer = model() if callable(model) else model
        scores = _compute(model, tokenizer, opts, calib, importance)
    result = LayerScores(source.fingerprint, opts.metric, params, scores, time.perf_counter() - start,
                         describe(), source.spec or "default")
    if use_cache:
        result.save(path)
    return result


def _cached_scores(data, path, fingerprint: str, metric: str, params: dict) -> LayerScores:
    scores = LayerScores.from_dict(data, str(path))
    if (scores.model_fingerprint, scores.metric, scores.params) != (fingerprint, metric, params):
        raise ValueError("it holds the scores of another model or setting")
    return scores


def _compute(model, tokenizer, opts: ScoreOptions, calib, metrics) -> list[float]:
    """The scores on ``model`` with ``metrics``: ``scoring.metrics`` on a whole model, or
    ``scoring.streamed`` on a ``StreamedModel``."""
    if opts.metric == "random":
        n_layers = len(model.layers) if metrics is streamed else len(inner_model(model)["layers"])
        return importance.random_scores(n_layers, opts.seed)
    if opts.metric == "zscore":
        return metrics.zscore_scores(model)
    sequences = token_sequences(tokenizer, calib, opts.tokens, opts.seq_len, opts.skip_tokens)
    with progress_bar(f"{opts.metric} scores", opts.tokens) as advance:
        if opts.metric == "sensitivity":
            return metrics.sensitivity_scores(model, sequences, opts.bits, progress=advance)
        jaccard, cosine, _ = metrics.lens_statistics(
            model, sequences, opts.top_k, opts.stride, opts.sets, opts.metric == "jaccard", advance
        )
    similarity = jaccard if opts.metric == "jaccard" else cosine
    mx.clear_cache()
    return [1.0 - s for s in similarity]
