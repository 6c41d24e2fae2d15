"""Loading a resolved model with mlx-lm, in this machine's compute mode."""

from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.errors import UserError
from lsaq_mlx.sources.resolve import ModelSource


def load_model(source: ModelSource, compute: bool = True, lazy: bool = False):
    """``(model, tokenizer, config)`` via ``mlx_lm.load``; with ``compute`` the model is
    put in the compute mode of this machine (float32 dequantized on the CPU backend)."""
    from mlx_lm.utils import load

    from lsaq_mlx.sources.pack import load_packed
    from lsaq_mlx.swsc.format import is_swsc_folder, load_swsc_folder

    try:
        if source.kind == "pack":
            model, tokenizer, config = load_packed(source, lazy=lazy)
        elif is_swsc_folder(source.path):
            model, tokenizer, config = load_swsc_folder(source.path, lazy=lazy)
        else:
            model, tokenizer, config = load(str(source.path), lazy=lazy, return_config=True)
    except (ValueError, OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = source.origin if source.kind == "pack" else source.path
        raise UserError(f"cannot load the model in {where}: {first}") from None
    if compute:
        prepare_for_compute(model)
    return model, tokenizer, config
