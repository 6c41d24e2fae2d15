"""``lsaq-mlx score``: compute (or read from the cache) a model's ``LayerScores``."""

import time
from dataclasses import dataclass


from lsaq_mlx.backend.compute import describe
from lsaq_mlx.cache import read_cache_json
from lsaq_mlx.errors import UserError
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
from lsaq_mlx.scoring.registry import METRICS
from lsaq_mlx.scoring.scores import (
    DEFAULT_SEQ_LEN,
    DEFAULT_STRIDE,
    DEFAULT_TOKENS,
    DEFAULT_TOP_K,
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
            raise UserError(f"unknown metric '{self.metric}' (one of {', '.join(METRICS)})", setting="metric")
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
        metric = METRICS[self.metric]
        if not metric.calibrated:
            return metric.params(self)
        return {"calibration": self.calib or "default", "calibration_fingerprint": calib_fingerprint,
                "tokens": self.tokens, "seq_len": self.seq_len, "skip_tokens": self.skip_tokens} | metric.params(self)


def cached_score(source: ModelSource, opts: ScoreOptions) -> LayerScores | None:
    """The scores of ``source`` under ``opts`` if the cache holds them (intact), else None."""
    calib = load_calibration(opts.calib) if METRICS[opts.metric].calibrated else None
    params = opts.params(calib.fingerprint if calib else None)
    path = cached_scores_path(scores_key(source.fingerprint, opts.metric, params))
    return read_cache_json(path, "scores", lambda d: _cached_scores(d, path, source.fingerprint, opts.metric, params))


def score(source: ModelSource, opts: ScoreOptions, use_cache: bool = True, model=None) -> LayerScores:
    """The scores of ``source`` under ``opts``; cached by content fingerprint. ``model``:
    the source already loaded in the compute mode, ``(model, tokenizer)`` or a function
    that returns them (called only when the scores are not cached)."""
    opts.check()
    calib = load_calibration(opts.calib) if METRICS[opts.metric].calibrated else None
    params = opts.params(calib.fingerprint if calib else None)
    path = cached_scores_path(scores_key(source.fingerprint, opts.metric, params))
    cached = cached_score(source, opts) if use_cache else None
    if cached is not None:
        return cached
    start = time.perf_counter()
    metric = METRICS[opts.metric]
    if streams(source):
        model, tokenizer, compute = StreamedModel(source), load_tokenizer(source), metric.streamed
    else:
        if model is None:
            model, tokenizer, _ = load_model(source)
        else:
            model, tokenizer = model() if callable(model) else model
        compute = metric.whole
    if calib is None:
        scores = compute(model, None, opts, None)
    else:
        sequences = token_sequences(tokenizer, calib, opts.tokens, opts.seq_len, opts.skip_tokens)
        with progress_bar(f"{opts.metric} scores", opts.tokens) as advance:
            scores = compute(model, sequences, opts, advance)
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
