"""Checking a Hugging Face or MLX model folder before mlx-lm opens it."""

import re
from pathlib import Path

from lsaq_mlx.cache import file_sha256, model_fingerprint
from lsaq_mlx.errors import UserError
from lsaq_mlx.formats import read_config, safetensors_header, weight_files

_LAYER = re.compile(r"^(?:model\.|language_model\.model\.)?layers\.(\d+)\.")


def check_model_type(config: dict, folder: Path) -> None:
    from mlx_lm.utils import _get_classes

    if not isinstance(config.get("model_type"), str):
        raise UserError(f"{folder}/config.json has no model_type")
    try:
        _get_classes(config)
    except (ValueError, ImportError):
        raise UserError(f"model type '{config['model_type'][:40]}' in {folder} is not supported by mlx-lm") from None


def check_model_folder(folder: Path) -> dict:
    """Raise a one-line UserError unless mlx-lm can open ``folder``; return its config.
    Besides each file's own checks, the config's layer count must match the weights'."""
    config = read_config(folder)
    check_model_type(config, folder)
    names = [n for f in weight_files(folder) for n in safetensors_header(f) if n != "__metadata__"]
    layers = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    declared = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if layers and declared and max(layers) + 1 < declared:
        raise UserError(f"{folder}/config.json declares {declared} layers, its weights hold {max(layers) + 1}")
    return config


def folder_fingerprint(folder: Path) -> str:
    folder = Path(folder)
    return model_fingerprint((folder / "config.json").read_bytes(), {f.name: file_sha256(f) for f in weight_files(folder)})
