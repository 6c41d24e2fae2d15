"""SWSC layers in a model folder, next to the parts stock mlx-lm reads.

Affine and float modules stay where mlx-lm expects them (``model*.safetensors``, each
named in ``config.json``'s ``quantization`` entry). SWSC modules are written to
``swsc.safetensors`` (the ``SWSCLinear`` parameters under each module's path) and
described in ``config.json``'s ``lsaq_swsc`` entry. Their ``quantization`` entry names
``STOCK_MODE``, a mode MLX does not know: stock ``mlx_lm.load`` stops at once with
``[quantize] Invalid quantization mode 'swsc (...)'`` and our explanation, instead of
building a model with missing weights. ``load_swsc_folder`` opens these folders.
"""

import glob
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from lsaq_mlx.errors import UserError
from lsaq_mlx.formats import config_fixes, read_config, safetensors_header
from lsaq_mlx.swsc.codec import SWSCSettings
from lsaq_mlx.swsc.layer import SWSCLinear

CONFIG_KEY = "lsaq_swsc"
FILE = "swsc.safetensors"
FORMAT_VERSION = 1
STOCK_MODE = "swsc (an lsaq-mlx codec: open this folder with lsaq-mlx, or convert with --codecs affine for stock mlx-lm)"


def stock_entry(settings: SWSCSettings) -> dict:
    """What ``config.json``'s ``quantization`` says about an SWSC module: a mode stock
    mlx-lm cannot build, so it fails with our message."""
    return {"group_size": settings.centroid_group_size, "bits": min(settings.centroid_bits, 8), "mode": STOCK_MODE}


def is_swsc_folder(folder: Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and CONFIG_KEY in read_config(folder)


def take_swsc_layers(model: nn.Module) -> tuple[dict, dict]:
    """``(tensors, modules)``: every ``SWSCLinear``'s parameters under its path, and its
    description; the layers are removed from ``model``, whose rest mlx-lm then saves."""
    tensors, modules = {}, {}
    for path, m in model.named_modules():
        if isinstance(m, SWSCLinear):
            tensors |= {f"{path}.{name}": a for name, a in tree_flatten(m.parameters())}
            modules[path] = {**asdict(m.settings), "rows": m.rows, "cols": m.cols, "bias": "bias" in m}
    if modules:
        model.update_modules(tree_unflatten([(p, nn.Module()) for p in modules]))
    return tensors, modules


def write_swsc(folder: Path, tensors: dict, modules: dict, config: dict) -> dict:
    """Save the SWSC tensors; return ``config`` with the ``lsaq_swsc`` entry and the
    ``quantization`` entries that stop stock mlx-lm."""
    mx.save_safetensors(str(Path(folder) / FILE), tensors, metadata={"format": "mlx"})
    config = dict(config)
    entries = {p: stock_entry(_settings(d)) for p, d in modules.items()}
    for key in ("quantization", "quantization_config"):
        config[key] = {**config.get(key, {}), **entries}
    config[CONFIG_KEY] = {"version": FORMAT_VERSION, "file": FILE, "modules": modules}
    return config


def _settings(entry: dict) -> SWSCSettings:
    return SWSCSettings(**{k: v for k, v in entry.items() if k in SWSCSettings.__dataclass_fields__})


def load_swsc_folder(folder: Path, lazy: bool = False):
    """``(model, tokenizer, config)`` of a folder with SWSC layers: mlx-lm builds the
    rest, the SWSC modules become ``SWSCLinear`` with the tensors of ``swsc.safetensors``."""
    from mlx_lm.utils import load_model, load_tokenizer

    folder = Path(folder)
    config = read_config(folder)
    entry = config[CONFIG_KEY]
    if entry.get("version") != FORMAT_VERSION:
        raise UserError(f"{folder}: SWSC format version {entry.get('version')} (this lsaq-mlx reads {FORMAT_VERSION})")
    modules = entry["modules"]
    swsc_file = folder / entry.get("file", FILE)
    if not swsc_file.is_file():
        raise UserError(f"{folder} has SWSC layers but no {swsc_file.name}")
    plain = {**config.get("quantization", {}), **{p: False for p in modules}}
    model, _ = load_model(folder, lazy=True, strict=False,
                          model_config=config_fixes(config) | {"quantization": plain, "quantization_config": plain})
    layers = [(p, SWSCLinear(d["rows"], d["cols"], _settings(d), d["bias"])) for p, d in modules.items()]
    model.update_modules(tree_unflatten(layers))
    model.load_weights(list(mx.load(str(swsc_file)).items()), strict=False)
    _check_complete(model, folder, swsc_file)
    if not lazy:
        mx.eval(model.parameters())
    tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def _check_complete(model: nn.Module, folder: Path, swsc_file: Path) -> None:
    """What mlx-lm's strict loading checks: the files hold exactly the model's tensors."""
    stored = set()
    for f in sorted(glob.glob(str(folder / "model*.safetensors"))) + [str(swsc_file)]:
        stored |= {k for k in safetensors_header(Path(f)) if k != "__metadata__"}
    expected = {k for k, _ in tree_flatten(model.parameters())}
    missing, extra = sorted(expected - stored), sorted(stored - expected)
    if missing or extra:
        what = f"{len(missing)} tensors missing, e.g. {missing[0]}" if missing else f"{len(extra)} unknown tensors, e.g. {extra[0]}"
        raise UserError(f"{folder} does not match its config: {what}")
