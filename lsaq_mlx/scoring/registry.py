"""Every layer-importance metric, one entry each: adding a metric is adding an entry here.

An entry says what ``score --metric NAME`` does: its help text (the CLI's is made from
these), whether it reads calibration text, the parameters that change its result (the
cache key), and how it is computed on a whole model (``scoring.metrics``) and on a
``StreamedModel`` (``scoring.streamed``, one layer in memory at a time). Both compute
functions take ``(model, sequences, opts, progress)``; ``sequences`` is None for a metric
that reads no calibration text.
"""

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from lsaq_mlx.modules import inner_model
from lsaq_mlx.scoring import metrics, streamed


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    whole: Callable  # (model, sequences, opts, progress) -> one score per decoder layer
    streamed: Callable  # the same on a StreamedModel
    calibrated: bool = True  # reads calibration text
    params: Callable = lambda opts: {}  # what changes its result besides the calibration text
    display: bool = False  # cheap and meaningful enough for the TUI's layers panel


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def metric_help() -> str:
    return " | ".join(f"{m.name} ({m.help})" for m in METRICS.values())


def _lens(kind: str, source):
    def compute(model, sequences, opts, progress) -> list[float]:
        jaccard, cosine, _ = source.lens_statistics(model, sequences, opts.top_k, opts.stride, opts.sets,
                                                    kind == "jaccard", progress)
        mx.clear_cache()
        return [1.0 - s for s in (jaccard if kind == "jaccard" else cosine)]

    return compute


def layer_count(model) -> int:
    return len(model.layers) if hasattr(model, "run_layers") else len(inner_model(model)["layers"])  # streamed or whole


register(Metric("jaccard", "LSAQ: 1 - Jaccard of the logit-lens top-k sets entering and leaving a layer",
                _lens("jaccard", metrics), _lens("jaccard", streamed), display=True,
                params=lambda o: {"stride": o.stride, "top_k": o.top_k, "sets": o.sets}))
register(Metric("cosine", "Block Influence / LIM: 1 - cosine of a layer's input and output hidden states",
                _lens("cosine", metrics), _lens("cosine", streamed), display=True,
                params=lambda o: {"stride": o.stride}))
register(Metric("zscore", "ZD: 1 - the share of a layer's weights more than one deviation from its mean",
                lambda model, *_: metrics.zscore_scores(model), lambda model, *_: streamed.zscore_scores(model),
                calibrated=False, display=True))
register(Metric("random", "a seeded random score per layer (a baseline)",
                lambda model, _, opts, __: metrics.random_scores(layer_count(model), opts.seed),
                lambda model, _, opts, __: metrics.random_scores(layer_count(model), opts.seed),
                calibrated=False, params=lambda o: {"seed": o.seed}))
register(Metric("sensitivity", "the KL at the logits when only that layer is quantized to --bits",
                lambda model, seqs, opts, progress: metrics.sensitivity_scores(model, seqs, opts.bits, progress=progress),
                lambda model, seqs, opts, progress: streamed.sensitivity_scores(model, seqs, opts.bits, progress=progress),
                params=lambda o: {"bits": o.bits, "group_size": 32}))
