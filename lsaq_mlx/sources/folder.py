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
    shapes = {n: info["shape"] for f in weight_files(folder) for n, info in safetensors_header(f).items()
              if n != "__metadata__"}
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER.search(n))}
    declared = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if layers and declared and max(layers) + 1 < declared:
        raise UserError(f"{folder}/config.json declares {declared} layers, its weights hold {max(layers) + 1}")
    _check_quantized_shapes(config, shapes, folder)
    return config


def _check_quantized_shapes(config: dict, shapes: dict, folder: Path) -> None:
    """Each quantized module's packed weight and scales must agree with the bits and group
    size config.json gives it (MLX would fail, or read garbage, deep inside a load)."""
    q = config.get("quantization") or config.get("quantization_config") or {}
    for name, scale_shape in shapes.items():
        path = name.removesuffix(".scales")
        weight = shapes.get(f"{path}.weight")
        if path == name or not weight or not scale_shape:
            continue
        entry = q.get(path) if isinstance(q.get(path), dict) else q
        bits, group = entry.get("bits"), entry.get("group_size")
        if not isinstance(bits, int) or not isinstance(group, int) or bits <= 0 or group <= 0:
            continue  # formats.read_config checked what is there; no bits: not ours to judge
        if weight[-1] * 32 != scale_shape[-1] * group * bits:
            raise UserError(f"{folder}/config.json quantizes {path} at {bits} bits in groups of {group}, but its "
                            f"tensors ({weight[-1]} packed words, {scale_shape[-1]} scales a row) were written otherwise")


def folder_fingerprint(folder: Path) -> str:
    folder = Path(folder)
    return model_fingerprint((folder / "config.json").read_bytes(), {f.name: file_sha256(f) for f in weight_files(folder)})
