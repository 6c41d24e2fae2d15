"""Loading a resolved model with mlx-lm, in this machine's compute mode; or only its
structure, built from its config without reading any weights."""


from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.errors import UserError
from lsaq_mlx.formats import config_fixes, normalized_config
from lsaq_mlx.sources.model_source import ModelSource
from lsaq_mlx.documents import read_json


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
            fixes = config_fixes(read_json(source.path / "config.json"))
            model, tokenizer, config = load(str(source.path), lazy=lazy or compute, return_config=True,
                                            model_config=fixes)
    except (ValueError, OSError, RuntimeError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = source.origin if source.kind == "pack" else source.path
        raise UserError(f"cannot load the model in {where}: {first}") from None
    if compute:
        prepare_for_compute(model)
    return model, tokenizer, config


def skeleton_model(source: ModelSource, shaped: bool = True):
    """``(model, config)``: the source's mlx-lm model built from its config alone, every
    module in float at its full shape, no weight read (the parameters are MLX's lazy
    initial values, never evaluated, so they take no memory): what planning needs.
    ``shaped=False``: before ``_shape_as_checkpoint``, for a caller that runs mlx-lm's
    ``sanitize`` itself (it may change the model, and only once)."""
    from mlx_lm.utils import _get_classes

    from lsaq_mlx.swsc.format import is_swsc_folder

    if is_swsc_folder(source.path):
        raise UserError(f"{source.spec} holds SWSC layers: plan from the model it was converted from")
    config = normalized_config(read_json(source.path / "config.json"))
    model_class, args_class = _get_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"cannot build the model of {source.path}/config.json: {e}") from None
    if shaped:
        _shape_as_checkpoint(model, source)
    return model, config


def model_tensors(source: ModelSource):
    """``source``'s tensors under its model's names (a ``ModelTensors``), mlx-lm's
    sanitize run on a model built for it: a loaded model may already be shaped by it
    (Gemma 3 without its LM head)."""
    from lsaq_mlx.sources.model_tensors import ModelTensors
    from lsaq_mlx.sources.tensors import source_tensors

    return ModelTensors(source_tensors(source), skeleton_model(source, shaped=False)[0])


def _shape_as_checkpoint(model, source: ModelSource) -> None:
    """Give the model the structure loading the checkpoint gives it: some mlx-lm models
    decide parts of it in ``sanitize`` from the tensors there are (Gemma 3 drops its LM
    head and ties it to the embeddings when the checkpoint has none). ``sanitize`` runs
    on unread placeholders of the checkpoint's tensors (their headers alone are read)."""
    from lsaq_mlx.sources.model_tensors import placeholders
    from lsaq_mlx.sources.tensors import source_tensors

    if not hasattr(model, "sanitize"):
        return
    if source.kind == "config":  # no weights (a plan on paper): the config's structure
        return
    tensors = source_tensors(source)
    model.sanitize(placeholders(tensors, tensors.names))


def load_tokenizer(source: ModelSource):
    """The tokenizer of ``source``, as ``mlx_lm.load`` makes it, without the model."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    config = read_json(source.path / "config.json")
    return mlx_load_tokenizer(source.path, eos_token_ids=config.get("eos_token_id", None))
