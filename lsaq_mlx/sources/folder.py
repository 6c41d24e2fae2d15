"""Checking a Hugging Face or MLX model folder before mlx-lm opens it."""

import json
import struct
from pathlib import Path

from lsaq_mlx.cache import file_sha256, fingerprint_bytes
from lsaq_mlx.errors import UserError


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a model folder: config.json is missing")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def check_model_type(config: dict, folder: Path) -> None:
    from mlx_lm.utils import _get_classes

    if "model_type" not in config:
        raise UserError(f"{folder}/config.json has no model_type")
    try:
        _get_classes(config)
    except ValueError:
        raise UserError(f"model type '{config['model_type']}' in {folder} is not supported by mlx-lm") from None


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise UserError(f"{path} is corrupt: its header length is impossible")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path} is corrupt: its header is not JSON") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}")
    return header


def weight_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights")
    for f in files:
        safetensors_header(f)
    return files


def check_model_folder(folder: Path) -> dict:
    """Raise a one-line UserError unless mlx-lm can open ``folder``; return its config."""
    config = read_config(folder)
    check_model_type(config, folder)
    weight_files(folder)
    return config


def folder_fingerprint(folder: Path) -> str:
    """Content fingerprint: the config and every weight file's hash."""
    folder = Path(folder)
    parts = [(folder / "config.json").read_bytes()]
    for f in weight_files(folder):
        parts += [f.name, file_sha256(f)]
    return fingerprint_bytes(*parts)
