"""The file formats lsaq-mlx reads from model folders, each validated in one place before
any of it is used: ``config.json`` and safetensors headers.

Every check ends in a one-line ``UserError`` naming the file: a hostile or damaged file
never reaches code that would raise something else or allocate what it declares.
"""

import math
import struct
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.documents import parse_json, read_json

MAX_HEADER_BYTES = 100 << 20
MAX_CONFIG_BYTES = 16 << 20
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
# Hyperparameters mlx-lm builds models from, with the largest value any real model has
# (with room): a config beyond them describes no model, and building it could take all
# memory or time before the weights are even looked at.
CONFIG_LIMITS = {
    "hidden_size": 1 << 17, "num_hidden_layers": 1024, "intermediate_size": 1 << 20,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
    "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24, "sliding_window": 1 << 24,
}


def read_config(folder: Path) -> dict:
    """``config.json`` of a model folder: a JSON object whose hyperparameters are
    positive integers within ``CONFIG_LIMITS`` and whose quantization entry is well formed."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a model folder: config.json is missing")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{path} is too large to be a model config")
    config = read_json(path, max_bytes=MAX_CONFIG_BYTES)
    check_config(config, path)
    return config


def check_config(config, where) -> None:
    if not isinstance(config, dict):
        raise UserError(f"{where} is not a JSON object")
    for section in [config, config.get("text_config")]:
        if not isinstance(section, dict):
            continue
        for key, limit in CONFIG_LIMITS.items():
            value = section.get(key)
            if value is not None and (not _is_int(value) or not 0 < value <= limit):
                raise UserError(f"{where}: {key} is {value!r}, not a whole number between 1 and {limit}")
        theta = section.get("rope_theta")
        if theta is not None and (not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0):
            raise UserError(f"{where}: rope_theta is {theta!r}, not a positive number")
    if config.get("quantization") is not None:
        _check_quantization(config["quantization"], f"{where} (quantization)")
    q = config.get("quantization_config")
    if isinstance(q, dict) and "quant_method" not in q:  # mlx-lm's copy; others are Hugging Face's own
        _check_quantization(q, f"{where} (quantization_config)")


def _check_quantization(q, where: str) -> None:
    if not isinstance(q, dict):
        raise UserError(f"{where} is not an object")
    for key in ("bits", "group_size"):
        if key in q and not (_is_int(q[key]) and 1 <= q[key] <= 1024):
            raise UserError(f"{where}: {key} is {q[key]!r}")
    if "mode" in q and not isinstance(q["mode"], str):
        raise UserError(f"{where}: mode is {q['mode']!r}, not a name")
    for path, entry in q.items():
        if isinstance(entry, dict) and (not all(_is_int(entry.get(k)) and 1 <= entry[k] <= 1024
                                                for k in ("bits", "group_size") if k in entry)
                                        or not isinstance(entry.get("mode", ""), str)):
            raise UserError(f"{where}: the entry of {path} is malformed")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked as a whole against the format and the
    file's size: an object of tensors, each with a known dtype, a shape of non-negative
    integers and data offsets that hold exactly that many bytes, inside the file, without
    overlaps; ``__metadata__`` maps strings to strings."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            raise UserError(f"{path} is corrupt: its header length is impossible")
        try:
            header = parse_json(f.read(n), "its header")
        except UserError as e:
            raise UserError(f"{path} is corrupt: {e}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is corrupt: its header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and (not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values())):
                raise UserError(f"{path} is corrupt: its __metadata__ is not a map of strings")
            continue
        spans.append((*_tensor_span(info, name, path), name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise UserError(f"{path} is corrupt: tensor {name!r} overlaps another")
        end = stop
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The folder's ``*.safetensors`` files, each header checked."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights")
    for f in files:
        safetensors_header(f)
    return files


def _tensor_span(info, name: str, path: Path) -> tuple[int, int]:
    bad = f"{path} is corrupt: the header entry of {name[:80]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise UserError(f"{bad} is not a tensor description")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise UserError(f"{bad} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
        raise UserError(f"{bad} has an invalid shape")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{bad} has invalid data offsets")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise UserError(f"{bad}: shape {shape} of {dtype} does not fill its {offsets[1] - offsets[0]} bytes")
    return offsets[0], offsets[1]


def config_fixes(config: dict) -> dict:
    """What mlx-lm needs added to a ``config.json`` written by transformers 5, which
    moved RoPE settings into ``rope_parameters`` (mlx-lm 0.32 reads only the older
    top-level ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` and silently
    falls back to a default base without them). Keys the config already has are kept;
    ``text_config`` of multimodal configs gets the same. Empty when nothing is missing."""
    fixes = _rope_fixes(config)
    text = config.get("text_config")
    if isinstance(text, dict) and _rope_fixes(text):
        fixes["text_config"] = text | _rope_fixes(text)
    return fixes


def normalized_config(config: dict) -> dict:
    """``config`` with ``config_fixes`` applied and, for a checkpoint stored in a format
    MLX holds natively, mlx-lm's ``quantization`` entry for it: what lsaq-mlx builds models
    from and writes."""
    return config | config_fixes(config) | native_quantization(config)


def native_quantization(config: dict) -> dict:
    """``{"quantization": ...}`` for a Hugging Face ``quantization_config`` whose format
    MLX stores as it is (gpt-oss's MXFP4 experts; MXFP8; FP8 with power-of-two scales
    over 32x32 blocks, which is MXFP8), as ``mlx_lm.load`` reads them; else empty."""
    q = config.get("quantization_config")
    if config.get("quantization") is not None or not isinstance(q, dict):
        return {}
    method = q.get("quant_method")
    if method == "fp8" and q.get("scale_fmt") == "ue8m0" and q.get("weight_block_size") == [32, 32]:
        method = "mxfp8"
    if not isinstance(method, str):
        return {}
    native = {"mxfp4": (32, 4), "mxfp8": (32, 8)}.get(method)
    return {"quantization": {"group_size": native[0], "bits": native[1], "mode": method}} if native else {}


def _rope_fixes(section: dict) -> dict:
    params = section.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    # one set for all layers, or one per attention type (Gemma 3: full and sliding)
    full = params.get("full_attention", params)
    sliding = params.get("sliding_attention")
    fixes = {}
    if isinstance(full, dict):
        if "rope_theta" in full and section.get("rope_theta") is None:
            fixes["rope_theta"] = full["rope_theta"]
        kind = full.get("rope_type", full.get("type", "default"))
        if kind != "default" and section.get("rope_scaling") is None:
            fixes["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"} | {"rope_type": kind, "type": kind}
    if isinstance(sliding, dict) and "rope_theta" in sliding and section.get("rope_local_base_freq") is None:
        fixes["rope_local_base_freq"] = sliding["rope_theta"]
    theta = fixes.get("rope_theta")
    if theta is not None and (not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0):
        raise UserError(f"config.json: rope_parameters.rope_theta is {theta!r}, not a positive number")
    return fixes
