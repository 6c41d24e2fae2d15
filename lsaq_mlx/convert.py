"""Write a ``QuantPlan`` as a model folder that stock mlx-lm opens.

The folder holds ``config.json`` whose ``quantization`` (and ``quantization_config``)
entry names every quantizable module (its bits and group size, or ``false``), the
weights as ``model*.safetensors``, the source's tokenizer files (chat template
included), ``lsaq_plan.json`` and ``lsaq_report.json``. Weights are quantized from the
source's float32 copy with float16 scales and biases; other float tensors become
float16. The source is read lazily and the weights are computed one decoder layer at a
time, each layer saved as its own shard, so peak memory is set by one layer (and the
embeddings), not by the model. The folder is built beside the target and
renamed into place only when complete.

A plan that gives modules to the SWSC codec (``--codecs affine,swsc``) compresses them
here (k-means and SVD, one module at a time) and writes them to ``swsc.safetensors``
(``lsaq_mlx.swsc.format``): such a folder opens with lsaq-mlx, not with stock mlx-lm.
"""

import json
import logging
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from lsaq_mlx import __version__
from lsaq_mlx.cache import atomic_dir, check_replaceable
from lsaq_mlx.backend.compute import dequantize_layers, describe, prepare_for_compute
from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import module_groups, shard_groups
from lsaq_mlx.planning.choices import STORED_FLOAT
from lsaq_mlx.planning.plan import QuantPlan
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.quantizers import QUANTIZERS
from lsaq_mlx.sources import ModelSource, load_model
from lsaq_mlx.sources.load import skeleton_model
from lsaq_mlx.sources.tensors import source_tensors
from lsaq_mlx.swsc.format import is_swsc_folder, load_swsc_folder, take_swsc_layers, write_swsc
from lsaq_mlx.swsc.layer import model_bits_per_weight, swsc_layers

log = logging.getLogger(__name__)

SMOKE_PROMPT = "The capital of France is"
_NOT_COPIED = {"model.safetensors.index.json", "config.json", "lsaq_plan.json", "lsaq_report.json"}
REPORT_VERSION = 1


@dataclass
class ConvertReport:
    source: str
    source_fingerprint: str
    out: str
    method: str
    predicted_bytes: int
    written_bytes: int
    bits_per_weight: float  # mlx-lm's compute_bits_per_weight of the written model (SWSC layers counted as their matrix)
    budget: dict
    wall_seconds: float  # quantizing and writing (planning not included: plan_seconds)
    peak_memory_bytes: int  # MLX's peak allocation during the conversion
    max_rss_bytes: int
    smoke_prompt: str
    smoke_text: str
    backend: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    plan_seconds: float = 0.0  # making the plan (the cost table, when it was not cached)
    quantizer: str = "rtn"  # how affine modules were quantized (QUANTIZERS)
    adaptive: dict = field(default_factory=dict)  # an adaptive folder's plans and stored settings
    version: int = REPORT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


def convert(source: ModelSource, plan: QuantPlan, out: Path, force: bool = False, smoke_tokens: int = 8,
            float_model=None, plan_seconds: float = 0.0, quantizer: str = "rtn", calib=None,
            adaptive=None, costs=None) -> ConvertReport:
    """Write ``plan`` of ``source`` at ``out``; ``float_model``: the source already in
    memory (as the planner loaded it), so it is not loaded again; ``plan_seconds``: how
    long making the plan took, for the report; ``quantizer``: see ``QUANTIZERS``
    (``calib``: GPTQ's calibration text, a ``CalibrationText``; default the packaged one).
    ``adaptive``: an ``adaptive.side.AdaptiveSide`` whose top plan is ``plan``: its plan
    set and smaller settings are written too. ``costs``: the ``CarriedCosts`` the plan
    was priced by, carried in the folder for planning on it later."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    try:
        check_replaceable(out, force)  # before the work, not only when it is done
    except FileExistsError:
        raise UserError(f"{out} already exists", setting="force") from None
    if quantizer not in QUANTIZERS:
        raise UserError(f"unknown quantizer {quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
    start = time.perf_counter()
    mx.reset_peak_memory()
    try:
        with atomic_dir(out, force=force) as tmp:
            if adaptive is not None:
                adaptive.scratch = tmp / "gptq"
            pending = {}
            model, config = quantized_model(source, plan, float_model, quantizer, calib, tmp / "gptq", adaptive,
                                            pending=pending)
            kinds = {p: type(m).__name__ for p, m in model.named_modules() if p in plan.modules}
            _write_folder(model, config, plan, source, tmp, pending)
            del model  # written: the side store reads the stored modules back one at a time
            if costs is not None:
                costs.save(tmp)
            side = adaptive.write(tmp, kinds) if adaptive is not None else {}  # its room: what is written so far
            shutil.rmtree(tmp / "gptq", ignore_errors=True)
            smoke_text, bpw, written = _check_written(tmp, smoke_tokens)
            report = ConvertReport(
                source.spec or "default", source.fingerprint, str(out), plan.method, plan.predicted_bytes, written, bpw,
                plan.budget, time.perf_counter() - start, mx.get_peak_memory(), _max_rss(), SMOKE_PROMPT, smoke_text,
                describe(), _versions(), plan_seconds, quantizer, side,
            )
            (tmp / "lsaq_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    except FileExistsError:
        raise UserError(f"{out} already exists", setting="force") from None
    return report


def default_output(source: ModelSource, plan: QuantPlan) -> Path:
    """``<model>-<method>-<bits>bpw`` in the working folder."""
    stem = Path(source.origin).stem if source.kind != "default" else "smollm2-135m"
    return Path(f"{stem}-{plan.method}-{plan.predicted_bits_per_weight:.2f}bpw")


def quantized_model(source: ModelSource, plan: QuantPlan, float_model=None, quantizer: str = "rtn", calib=None,
                    scratch: Path | None = None, side=None, keep=None, pending: dict | None = None):
    """``(model, config)``: the source quantized as ``plan`` says, lazily (nothing is
    computed until the weights are used or saved; the largest matrices are quantized
    now, a row block at a time, SWSC modules compressed now); float16 outside quantized
    weights. ``float_model``: the source's float weights already in memory (any float
    dtype): shared, never changed, nothing loaded. With a calibrated ``quantizer``
    (gptq, awq, awq-gptq) the linear modules are quantized first, a layer at a time,
    into ``scratch`` (a folder that must outlive the model). ``side``: an adaptive
    folder's ``AdaptiveSide``, given each module at its smaller settings. ``keep``: cuts
    the lazily loaded model down to what this process holds (a pipeline rank's share,
    ``runtime.pipeline.keep_share``) before anything is read. ``pending``: a dict that
    receives the largest matrices (path -> ``MatrixRows``) instead of their being
    quantized now, for ``save_weights_by_layer`` to quantize as it saves their shard (the
    quantized experts of every layer held at once grow with the depth: 4 GB at 12
    layers of Qwen3-30B-A3B at 4 bits)."""
    tensors, as_stored = None, set()
    if float_model is None:
        model, _, config = load_model(source, compute=False, lazy=True)
        if keep:
            keep(model)
        # a calibrated quantizer's equalization rescales a norm's every consumer: none is kept
        as_stored = set() if QUANTIZERS[quantizer].calibrated else stored_at_plan(model, plan)
        dequantize_layers(model, {p for p, m in model.named_modules() if hasattr(m, "scales")} - as_stored)
        tensors = source_tensors(source)
    else:
        model, config = skeleton_model(source)
        model.update(float_model.parameters())
    _check_plan_matches(plan, model)
    swsc = plan.swsc_modules()
    quantized = {p for p in plan.modules if p not in swsc and plan.modules[p].config() and p not in as_stored}
    compensated = _calibrated_weights(source, plan, quantized, QUANTIZERS[quantizer], calib, scratch, side)
    if side is not None:
        _rounded_settings(model, tensors, config, plan, quantized - set(compensated), side)
    floats = large_matrices(model, quantized - set(compensated), tensors, config)  # upcast a block at a time
    model.set_dtype(mx.float32)
    nn.quantize(model, class_predicate=lambda path, m: path in quantized and plan.modules[path].config())
    if pending is None:
        quantize_by_row_blocks(model, floats)
    else:
        pending.update(floats)
    modules = dict(model.named_modules())
    for path, arrays in compensated.items():
        modules[path].update(arrays)
    if swsc:
        with progress_bar("SWSC compression", len(swsc)) as advance:
            swsc_layers(model, swsc, advance)
    model.set_dtype(STORED_FLOAT)
    return model, config


def stored_at_plan(model: nn.Module, plan: QuantPlan) -> set[str]:
    """The modules of a quantized source stored at the setting ``plan`` gives them:
    their codes are kept as they are (exact, and nothing is dequantized)."""
    return {p for p, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)) and p in plan.modules
            and plan.modules[p].config() == {"bits": m.bits, "group_size": m.group_size, "mode": m.mode}}


def _calibrated_weights(source: ModelSource, plan: QuantPlan, quantized: set[str], quantizer, calib,
                        scratch: Path, side=None) -> dict:
    if not quantizer.calibrated:
        return {}
    from lsaq_mlx.gptq.hessians import HELD_OUT_TOKENS, SEQ_LEN, calibration_tokens
    from lsaq_mlx.gptq.solver import MIN_EXPERT_TOKENS
    from lsaq_mlx.gptq.writer import CalibrationCounts, calibrated_weights
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    streamed = StreamedModel(source)
    tokens = calibration_tokens(load_tokenizer(source), calib or load_calibration(None), HELD_OUT_TOKENS)
    Path(scratch).mkdir(parents=True, exist_ok=True)
    count = CalibrationCounts()
    with progress_bar(f"{quantizer.name} (layer by layer)", len(streamed.layers) + 1) as advance:
        weights = calibrated_weights(streamed, tokens, {p: plan.modules[p] for p in quantized}, scratch, quantizer,
                                     advance, count, held_out=HELD_OUT_TOKENS // SEQ_LEN,
                                     also=side.collect if side else None,
                                     equalize_for=side.equalize_for if side else None,
                                     tracks=side.tracks if side else None)
    if count.rows_rounded or count.layers_rounded:
        log.warning("note: %s kept round to nearest on %d of %d rows and %d of %d whole layers, where it did better on "
                    "held-out calibration text", quantizer.name, count.rows_rounded, count.rows, count.layers_rounded,
                    count.layers)
    if count.experts_rounded:
        log.warning("warning: %d of %d experts saw fewer than %d calibration tokens and were rounded to nearest",
                    count.experts_rounded, count.experts_rounded + count.experts_calibrated, MIN_EXPERT_TOKENS)
    if count.refused:
        log.warning("warning: equalization left %d layers as they were: folding changed their output (e.g. %s)",
                    len(count.refused), count.refused[0])
    return weights


def _rounded_settings(model: nn.Module, tensors, config: dict, plan: QuantPlan, paths: set[str], side) -> None:
    """Give ``side`` (an adaptive folder's ``AdaptiveSide``) the modules at ``paths`` that
    are rounded to nearest, each weight read afresh from ``tensors`` when the model was
    loaded from them (stacked experts an expert at a time)."""
    from lsaq_mlx.backend.expert_blocks import experts_of
    from lsaq_mlx.sources.expert_stacks import checkpoint_experts
    from lsaq_mlx.sources.model_tensors import ModelTensors
    from lsaq_mlx.sources.tensors import DequantizedTensors

    named = ModelTensors(tensors, model) if tensors is not None else None
    weights = DequantizedTensors(named, config) if named is not None else None
    experts = checkpoint_experts(named, config, model) if named is not None else {}
    modules = dict(model.named_modules())
    paths = [p for p in paths if p in side.lower and p not in side.collected]
    with progress_bar("smaller settings rounded", len(paths)) as advance:
        for path in paths:
            m = modules[path]
            if isinstance(m, SwitchLinear):
                weight = experts.get(path) or experts_of(m)
            else:
                weight = weights.get(f"{path}.weight") if weights is not None else None
            side.collect_rounded(path, m.weight if weight is None else weight, m.get("bias"), plan.modules[path])
            advance()


QUANTIZE_BLOCK_BYTES = 64 << 20  # float32 bytes of a matrix's rows quantized at once


def large_matrices(model: nn.Module, paths, tensors=None, config: dict | None = None) -> dict:
    """``{path: MatrixRows}`` of the modules at ``paths`` above ``QUANTIZE_BLOCK_BYTES``,
    read from ``tensors`` (the source's, see ``sources.tensors``) where they hold the
    same matrix (stacked experts a block of experts at a time, as ``config``'s model
    reads them: ``sources.expert_stacks``), else sliced from the module's weight."""
    modules = dict(model.named_modules())
    large = [p for p in paths if p in modules and modules[p].weight.size * 4 > QUANTIZE_BLOCK_BYTES]
    experts = {}
    if tensors is not None and config is not None and any(modules[p].weight.ndim == 3 for p in large):
        from lsaq_mlx.sources.expert_stacks import checkpoint_experts
        from lsaq_mlx.sources.model_tensors import ModelTensors

        experts = checkpoint_experts(ModelTensors(tensors, model), config, model)
    return {p: MatrixRows(modules[p].weight, tensors, f"{p}.weight", getattr(modules[p], "stored_rows", None)
                          or _expert_rows(experts.get(p)))
            for p in large}


def _expert_rows(stack):
    return None if stack is None else lambda block: stack.block(block.start, min(block.stop, stack.shape[0]))


class MatrixRows:
    """A float matrix to be read one row block at a time: from the source's file where
    it holds the matrix as stored (none of the rest is read), from the stored quantized
    rows (``stored_rows``, see ``backend.compute.dequantize_layers``), else sliced from
    ``weight`` (a lazily loaded tensor is then read whole, once)."""

    def __init__(self, weight: mx.array, tensors=None, name: str | None = None, stored_rows=None):
        self.shape = weight.shape
        self.weight = weight
        self.from_file = (hasattr(tensors, "rows") and name in getattr(tensors, "files", {})
                          and list(tensors.shape_of(name)[0]) == list(weight.shape) and weight.dtype != mx.uint32)
        self.tensors, self.name, self.stored_rows = tensors, name, stored_rows
        # MLX's dequantize of 3, 5 or 6 bits takes up to 7x its float32 result in temporaries
        self.block_bytes = QUANTIZE_BLOCK_BYTES // (32 if stored_rows else 1)

    def __call__(self, start: int, stop: int) -> mx.array:
        if self.from_file:
            return self.tensors.rows(self.name, start, min(stop, self.shape[0]))
        if self.stored_rows is not None:
            return self.stored_rows(slice(start, stop))
        return self.weight[start:stop]


def quantize_by_row_blocks(model: nn.Module, floats: dict) -> None:
    """Give each quantized module of ``floats`` (path -> its ``MatrixRows``) the same
    values computed one row block at a time (``rows_quantized``). Each module's entry
    leaves ``floats`` once done, so its source (a lazy stack of experts, once read) is
    released."""
    modules = dict(model.named_modules())
    for path in list(floats):
        m = modules[path]
        m.update({k: v.astype(m[k].dtype) for k, v in rows_quantized(m, floats.pop(path)).items()})


def rows_quantized(m: nn.Module, rows_of) -> dict[str, mx.array]:
    """``{"weight", "scales"[, "biases"]}`` of the quantized module ``m``'s setting for the
    matrix ``rows_of`` reads (a ``MatrixRows``), computed one row block at a time (groups
    run along rows), each block evaluated into its rows of the result before the next is
    read: one block in float32 at a time. Stacked experts go a block of experts at a time."""
    rows = max(1, getattr(rows_of, "block_bytes", QUANTIZE_BLOCK_BYTES) // (4 * math.prod(rows_of.shape[1:])))
    out = {}
    for r in range(0, rows_of.shape[0], rows):
        part = mx.quantize(rows_of(r, r + rows).astype(mx.float32), m.group_size, m.bits, mode=m.mode)
        for name, value in zip(("weight", "scales", "biases"), part):
            if name not in out:
                out[name] = mx.zeros((rows_of.shape[0], *value.shape[1:]), value.dtype)
            out[name][r : r + rows] = value
        mx.eval(list(out.values()))
    return out


def _check_plan_matches(plan: QuantPlan, model: nn.Module) -> None:
    modules = dict(model.named_modules())
    missing = [p for p in plan.modules if p not in modules]
    if missing:
        raise UserError(f"the plan does not fit this model: it names {len(missing)} unknown modules, e.g. {missing[0]}")


def _write_folder(model: nn.Module, config: dict, plan: QuantPlan, source: ModelSource, folder: Path,
                  pending: dict) -> None:
    from mlx_lm.utils import save_config

    swsc_tensors, swsc_modules = take_swsc_layers(model)
    save_weights_by_layer(model, folder, pending)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["quantization"] = plan.quantization_config()
    config["torch_dtype"] = "float16"
    if swsc_modules:
        config = write_swsc(folder, swsc_tensors, swsc_modules, config)
    save_config(config, folder / "config.json")
    for f in _tokenizer_files(source):
        shutil.copy2(f, folder / f.name)
    plan.save(folder / "lsaq_plan.json")


def save_weights_by_layer(model: nn.Module, folder: Path, pending: dict | None = None) -> None:
    """Save the (lazy) weights one decoder layer (or one module outside the layers) per
    shard, computed module by module as it is saved, with mlx-lm's index: memory holds
    one layer's results and one module's sources, not the model's."""
    from mlx_lm.utils import get_total_parameters

    weights = dict(tree_flatten(model.parameters()))
    index = {"total_size": sum(v.nbytes for v in weights.values()), "total_parameters": get_total_parameters(model)}
    modules = dict(model.named_modules())
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))
    groups = [list(g) for g in shard_groups(weights)]
    weight_map = {}
    with progress_bar("writing weights", len(groups)) as advance:
        for n, names in enumerate(groups):
            shard = {name: weights.pop(name) for name in names}
            for path in [p for p in (pending or {}) if f"{p}.weight" in shard]:
                made = rows_quantized(modules[path], pending.pop(path))
                shard.update({f"{path}.{k}": v.astype(shard[f"{path}.{k}"].dtype) for k, v in made.items()})
            for module in module_groups(shard):
                mx.eval(list(module.values()))
            file = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
            mx.save_safetensors(str(folder / file), shard, metadata={"format": "mlx"})
            weight_map |= dict.fromkeys(shard, file)
            del shard
            advance()
    index_data = {"metadata": index, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=4))


def _tokenizer_files(source: ModelSource) -> list[Path]:
    """The source's files to copy (tokenizer, chat template...): not weights, not hidden,
    and never a link out of the model (a hub snapshot links into its repository's blobs)."""
    trusted = source.path.resolve().parents[1] if source.kind == "hub" else source.path.resolve()
    files = []
    for f in sorted(source.path.iterdir()):
        if f.name.startswith(".") or f.suffix == ".safetensors" or f.name in _NOT_COPIED or not f.is_file():
            continue
        if not f.resolve().is_relative_to(trusted):
            log.warning("warning: not copying %s: it links outside the model folder", f)
            continue
        files.append(f)
    return files


def _check_written(folder: Path, smoke_tokens: int) -> tuple[str, float, int]:
    """Open the folder with mlx-lm exactly as a user would (with lsaq-mlx when it holds
    SWSC layers), measure it, generate a little: in memory, or, for a model above
    ``STREAM_ABOVE_BYTES`` (whose whole weights would set the command's peak), a layer
    at a time (``_streamed_greedy``)."""
    from mlx_lm import generate
    from mlx_lm.utils import load

    from lsaq_mlx.settings import settings
    from lsaq_mlx.sources.streaming import STREAM_ABOVE_BYTES

    swsc = is_swsc_folder(folder)
    model, tokenizer = load_swsc_folder(folder, lazy=True)[:2] if swsc else load(str(folder), lazy=True)
    bpw = model_bits_per_weight(model)
    written = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    stream = settings().stream
    if not swsc and (stream == "always" or stream != "never" and written > STREAM_ABOVE_BYTES):
        del model
        return _streamed_greedy(folder, tokenizer, SMOKE_PROMPT, smoke_tokens), bpw, written
    prepare_for_compute(model)
    text = generate(model, tokenizer, SMOKE_PROMPT, max_tokens=smoke_tokens, verbose=False)
    return text, bpw, written


def _streamed_greedy(folder: Path, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy tokens after ``prompt`` from the folder read a layer at a time (each token
    runs the whole sequence again: no cache, for a few tokens)."""
    from lsaq_mlx.scoring.lens import find_lens
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.streaming import StreamedModel

    streamed = StreamedModel(resolve_model(str(folder)))
    lens = find_lens(streamed.model)
    tokens, text = list(tokenizer.encode(prompt)), tokenizer.detokenizer  # mlx-lm's wrapper, as generate decodes
    text.reset()
    for _ in range(max_tokens):
        hidden = streamed.run_layers(mx.array([tokens]))
        token = int(mx.argmax(lens.logits(hidden[:, -1:]), axis=-1).item())
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
        text.add_token(token)
    text.finalize()
    return text.text


def _max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _versions() -> dict:
    import mlx_lm

    return {"lsaq-mlx": __version__, "mlx": mx.__version__, "mlx-lm": mlx_lm.__version__}
