"""Models in a pack (``lsaq-mlx pack``): resolved without unpacking the weights.

The small files (config, tokenizer, plan) are extracted once into the cache under the
pack's content fingerprint, which is the packed folder's own (recomputed from the
decoded bytes, never read from the pack), so that folder stands in as
``ModelSource.path`` for everything but the weights. The weights are decoded from the
pack straight into memory when the model loads.
"""

import json
import logging
from pathlib import Path

from lsaq_mlx.cache import atomic_dir, cache_entry
from lsaq_mlx.errors import UserError
from lsaq_mlx.formats import config_fixes, read_config
from lsaq_mlx.sizes import format_size
from lsaq_mlx.sources.model_source import ModelSource
from lsaq_mlx.storage.container import MAGIC
from lsaq_mlx.documents import read_json

PACK_SUFFIX = ".lsaqpack"
_MANIFEST = ".lsaq-pack-files.json"  # the small files extracted, with their SHA-256
MAX_SMALL_FILE_BYTES = 128 << 20  # Gemma 3's tokenizer.json, among the largest, is 33 MB
MAX_SMALL_FILES_BYTES = 256 << 20

log = logging.getLogger(__name__)


def is_pack(path: Path) -> bool:
    """Whether ``path`` is a file that starts as a container does."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def pack_source(spec: str, path: Path):
    from lsaq_mlx.storage.model_pack import PackedModel

    packed = PackedModel(path)
    try:
        fingerprint = packed.content_fingerprint()
        target = cache_entry("packs", fingerprint)
        small = sorted(n for n in packed.files if not n.endswith(".safetensors"))
        check_small_files(path, {n: packed.files[n]["size"] for n in small})
        expected = {n: packed.files[n]["sha256"] for n in small}
        if not _extracted(target, expected):
            with atomic_dir(target, force=True) as tmp:
                packed.write_files(tmp, small)
                (tmp / _MANIFEST).write_text(json.dumps(expected, indent=2) + "\n")
    finally:
        packed.close()
    return ModelSource(spec, "pack", target, str(Path(path).resolve()), fingerprint)


def check_small_files(pack: Path, sizes: dict[str, int]) -> None:
    """The files besides the weights (config, tokenizer, template) land in the cache:
    a pack may not fill the disk through them."""
    large = next((n for n, size in sizes.items() if size > MAX_SMALL_FILE_BYTES), None)
    if large is not None:
        raise UserError(f"{pack} holds {large} of {format_size(sizes[large])}; files besides the weights may take "
                        f"{format_size(MAX_SMALL_FILE_BYTES)} each (a tokenizer takes a few MB)")
    if sum(sizes.values()) > MAX_SMALL_FILES_BYTES:
        raise UserError(f"{pack} holds {format_size(sum(sizes.values()))} of files besides the weights; at most "
                        f"{format_size(MAX_SMALL_FILES_BYTES)} are extracted")


def _extracted(target: Path, expected: dict) -> bool:
    """Whether ``target`` holds exactly the small files ``expected`` (name -> SHA-256):
    a damaged or stale entry is reported and extracted again."""
    if not target.exists():
        return False
    from lsaq_mlx.cache import file_sha256

    try:
        manifest = read_json(target / _MANIFEST)
        ok = manifest == expected and all(file_sha256(target / n) == sha for n, sha in expected.items())
        if ok:
            read_config(target)
            return True
        problem = "its files differ from the pack's"
    except (OSError, ValueError, UserError) as e:
        problem = str(e) or type(e).__name__
    log.warning("warning: the cached files of this pack in %s are damaged (%s); extracting them again", target, problem)
    return False


def load_packed(source, lazy: bool = False):
    """``(model, tokenizer, config)`` as ``mlx_lm.load`` builds them, with the weights
    read from the pack ``source.origin``."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import infer_quant_config, load_model, load_tokenizer

    from lsaq_mlx.storage.model_pack import PackedModel

    packed = PackedModel(Path(source.origin))
    try:
        weights = packed.weights()
    finally:
        packed.close()
    # mlx-lm builds the model from config.json (quantizing the modules it names); the
    # folder holds no weights, so the rest follows here, as mlx-lm does with its own
    model, config = load_model(source.path, lazy=True, strict=False,
                               model_config=config_fixes(read_json(source.path / "config.json")))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if config.get("quantization"):
        q = config["quantization"]
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights
                    and infer_quant_config(p, m, weights))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UserError(f"the weights in {source.origin} do not fit its config: {e}") from None
    if not lazy:
        mx.eval(model.parameters())
    tokenizer = load_tokenizer(source.path, eos_token_ids=config.get("eos_token_id", None))
    return model, tokenizer, config
