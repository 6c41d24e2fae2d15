"""Model sources: what ``--model`` names, resolved to an MLX folder, and loading it."""

from lsaq_mlx.sources.load import load_model
from lsaq_mlx.sources.resolve import ModelSource, resolve_model

__all__ = ["ModelSource", "load_model", "resolve_model"]
