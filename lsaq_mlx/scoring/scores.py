"""``LayerScores``: one importance score per decoder layer (higher = more important)."""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lsaq_mlx.cache import cache_dir, fingerprint_bytes, write_json_atomic
from lsaq_mlx.errors import UserError
from lsaq_mlx.documents import read_json
from lsaq_mlx.settings import settings

SCORES_VERSION = 1
# Defaults of the calibration-based metrics, chosen by benchmarks/stability_study.py (see README).
DEFAULT_TOP_K = 50
DEFAULT_TOKENS = 512
DEFAULT_SEQ_LEN = 512
DEFAULT_STRIDE = 8  # jaccard lenses positions 0, 8, 16...; the other metrics use every position


@dataclass
class LayerScores:
    model_fingerprint: str
    metric: str
    params: dict  # metric parameters, calibration fingerprint included
    scores: list[float]  # one per decoder layer, higher = more important
    wall_seconds: float = 0.0
    backend: dict = field(default_factory=dict)
    model: str = ""  # what --model named, for display
    version: int = SCORES_VERSION

    @property
    def key(self) -> str:
        """Cache key: model content, metric and every parameter that changes the result."""
        return scores_key(self.model_fingerprint, self.metric, self.params)

    def ranking(self) -> list[int]:
        """Layer indices, most important first."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path, force: bool = True, make_folders: bool = True) -> None:
        write_json_atomic(path, self.to_dict(), force, make_folders)

    @classmethod
    def from_dict(cls, data, where: str = "the scores") -> "LayerScores":
        """A LayerScores from its JSON form, every field checked."""
        if not isinstance(data, dict) or data.get("version") != SCORES_VERSION or "scores" not in data:
            raise UserError(f"{where} is not a LayerScores file of version {SCORES_VERSION}")
        data = {k: v for k, v in data.items() if k != "cached"}  # ``score --json`` says whether it was cached
        fields = set(cls.__dataclass_fields__)
        if set(data) - fields or not {"model_fingerprint", "metric", "params", "scores"} <= set(data):
            raise UserError(f"{where} has the wrong fields for LayerScores")
        scores = data["scores"]
        if (not isinstance(scores, list) or not scores
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores)):
            raise UserError(f"{where}: scores must be a list of finite numbers, one per layer")
        if not isinstance(data["metric"], str) or not isinstance(data["model_fingerprint"], str) or not isinstance(
                data["params"], dict):
            raise UserError(f"{where} has a malformed metric, fingerprint or params")
        return cls(**{**data, "scores": [float(x) for x in scores]})

    @classmethod
    def load(cls, path: Path) -> "LayerScores":
        if not Path(path).exists():
            raise UserError(f"scores file not found: {path}")
        return cls.from_dict(read_json(path, f"scores file {path}"), str(path))


def scores_key(model_fingerprint: str, metric: str, params: dict) -> str:
    return fingerprint_bytes(model_fingerprint, metric, json.dumps(params, sort_keys=True), settings().numeric_key())


def cached_scores_path(key: str) -> Path:
    return cache_dir() / "scores" / f"{key}.json"


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # average the ranks of ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom else 0.0
