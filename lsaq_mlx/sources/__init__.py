"""Model sources: what ``--model`` names, resolved to an MLX folder, and loading it."""

from lsaq_mlx.sources.load import load_model
from lsaq_mlx.sources.model_source import ModelSource
from lsaq_mlx.sources.resolve import resolve_model

__all__ = ["ModelSource", "load_model", "resolve_model"]
