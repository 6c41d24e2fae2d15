"""lsaq-mlx: layer-specific adaptive quantization for MLX models."""

import os

__version__ = "0.1.0"

# transformers (used by mlx-lm for tokenizers) warns that PyTorch is absent and about
# long token sequences, neither of which concerns us: keep its errors only.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
