"""lsaq-mlx: layer-specific adaptive quantization for MLX models."""

import os

__version__ = "0.1.0"

# transformers (used by mlx-lm for tokenizers) warns at import that PyTorch is absent: we never need it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
