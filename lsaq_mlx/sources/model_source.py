"""A model resolved from ``--model``: what every stage after ``sources`` takes."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a folder that ``mlx_lm.load`` opens."""

    spec: str  # what the user passed
    kind: str  # "default" | "gguf" | "folder" | "pack" | "hub"
    path: Path  # the MLX model folder (for a pack: its files but the weights, see sources/pack.py)
    origin: str  # the file, folder or hub id it came from
    fingerprint: str  # content fingerprint, the key of every cache built on it
