"""``lsaq-mlx eval``: perplexity, KL to a reference, zero-shot tasks -> an ``EvalResult``.

Perplexity uses non-overlapping windows of ``seq_len`` tokens over the first
``max_tokens`` tokens of the text (each window predicts its tokens 2..n from the ones
before, within the window). KL divergence and top-1 agreement compare the model's
next-token distributions with a reference model's on exactly those windows.
"""

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lsaq_mlx.backend.compute import describe
from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
from lsaq_mlx.errors import UserError
from lsaq_mlx.evaluation.perplexity import perplexity
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.sources import ModelSource, load_model
from lsaq_mlx.sources.load import load_tokenizer
from lsaq_mlx.sources.streaming import StreamedModel, streams
from lsaq_mlx.evaluation.tasks import TASKS, load_task
from lsaq_mlx.evaluation.zeroshot import evaluate_task

EVAL_VERSION = 1
DATA_ENV = "LSAQ_MLX_DATA"  # a folder laid out like ../shared/data


@dataclass
class EvalResult:
    model: str
    model_fingerprint: str
    perplexity: dict | None = None
    divergence: dict | None = None  # vs --reference
    tasks: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    backend: dict = field(default_factory=dict)
    version: int = EVAL_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


def data_dir() -> Path | None:
    """``$LSAQ_MLX_DATA``, else ``../shared/data`` from here or from the checkout."""
    candidates = [os.environ.get(DATA_ENV), "../shared/data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), None)


PACKAGED_TEXT = Path(__file__).resolve().parents[1] / "data" / "eval.txt"
PACKAGED_NAME = "packaged: State of the Union addresses 1961-1963 (public domain)"


def _local_wikitext() -> Path | None:
    root = data_dir()
    path = root / "wikitext-2-raw" / "wiki.test.raw" if root else None
    return path if path is not None and path.is_file() else None


def read_ppl_text(spec: str) -> tuple[str, str]:
    """``(name, text)`` for ``--ppl``: ``auto`` (WikiText-2 test when a local copy is
    found, else the packaged text), ``wikitext2``, ``packaged``, or a text file."""
    if spec == "auto":
        spec = "wikitext2" if _local_wikitext() else "packaged"
    if spec == "packaged":
        return PACKAGED_NAME, PACKAGED_TEXT.read_text(encoding="utf-8")
    if spec == "wikitext2":
        path = _local_wikitext()
        if path is None:
            raise UserError(f"WikiText-2 not found: set {DATA_ENV} to a folder with wikitext-2-raw/wiki.test.raw, "
                            "or pass --ppl FILE (or packaged)")
    else:
        path = Path(spec)
    try:
        return str(path), path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"perplexity text not found: {path}", setting="ppl") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise UserError(f"perplexity text {path} is not a UTF-8 text file", setting="ppl") from None


def reference_distributions(reference: ModelSource, tokens: list[int], seq_len: int) -> ReferenceDistributions:
    """The reference's distributions: streamed one layer at a time when it is large."""
    if streams(reference):
        return ReferenceDistributions.compute_streamed(StreamedModel(reference), tokens, seq_len)
    ref_model, _, _ = load_model(reference)
    return ReferenceDistributions.compute(ref_model, tokens, seq_len)


def ppl_tokens(tokenizer, ppl: str, max_tokens: int) -> tuple[str, list[int]]:
    name, text = read_ppl_text(ppl)
    tokens = tokenizer.encode(text)[:max_tokens]
    if len(tokens) < 2:
        raise UserError(f"{name} has fewer than two tokens")
    return name, tokens


def load_tasks(tasks: list[str], limit: int | None, task_dir: Path | None = None) -> list:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task '{unknown[0]}' (one of {', '.join(TASKS)})")
    task_root = Path(task_dir) if task_dir else (data_dir() / "tasks" if data_dir() else None)
    if tasks and (task_root is None or not task_root.is_dir()):
        raise UserError(f"task folder not found: give the folder of the task files (like ../shared/data/tasks) or "
                        f"set {DATA_ENV}", setting="data_dir")
    return [load_task(t, task_root, limit) for t in tasks]


@dataclass(kw_only=True)
class EvalRequest:
    """What ``eval`` measures: perplexity (and KL, given a reference) on the first
    ``max_tokens`` tokens of ``ppl`` in windows of ``seq_len``, and zero-shot ``tasks``."""

    ppl: str | None = "auto"  # auto, wikitext2, packaged, a text file, or None
    tasks: list[str] = field(default_factory=list)
    max_tokens: int = 4096
    seq_len: int = 512
    limit: int | None = None  # items per task
    task_dir: Path | None = None

    @classmethod
    def from_text(cls, ppl: str, tasks: str, **values) -> "EvalRequest":
        """From the CLI's spelling: ``ppl`` ``none`` for no text, ``tasks`` comma-separated or ``all``."""
        names = list(TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
        return cls(ppl=None if ppl == "none" else ppl, tasks=names, **values)

    def check(self) -> None:
        if self.max_tokens < 2 or self.seq_len < 2:
            raise UserError("the perplexity text's tokens and the window length must be at least 2",
                            setting="max_tokens")


def evaluate(source: ModelSource, request: EvalRequest, reference: ModelSource | None = None, model=None,
             distributions: ReferenceDistributions | None = None) -> EvalResult:
    """Evaluate ``source`` (or an in-memory ``(model, tokenizer)`` made from it). KL is
    measured against ``reference``, or against ``distributions`` computed beforehand on
    the same tokens and windows (what a sweep does once per model)."""
    request.check()
    start = time.perf_counter()
    task_data = load_tasks(request.tasks, request.limit, request.task_dir)
    net, tokenizer = model if model is not None else (None, load_tokenizer(source))
    result = EvalResult(source.spec or "default", source.fingerprint, backend=describe())
    ppl, seq_len = request.ppl, request.seq_len
    if ppl:
        name, tokens = ppl_tokens(tokenizer, ppl, request.max_tokens)
        if reference is not None and distributions is None:  # before the model is loaded: not both at once
            distributions = reference_distributions(reference, tokens, seq_len)
    if net is None:
        net = load_model(source)[0]
    if ppl:
        if distributions is not None:
            compared = compare_to_reference(net, distributions)
            result.perplexity = {"data": name, **compared.perplexity.to_dict()}
            result.divergence = {"reference": (reference.spec or "default") if reference else "given", "kl": compared.kl,
                                 "kl_stderr": compared.kl_stderr, "top1_agreement": compared.top1_agreement,
                                 "tokens": compared.tokens}
        else:
            result.perplexity = {"data": name, **perplexity(net, tokens, seq_len).to_dict()}
    for data in task_data:
        with progress_bar(data.name, len(data.items)) as advance:
            result.tasks.append({**evaluate_task(net, tokenizer, data, advance).to_dict(), "files": data.source})
    result.wall_seconds = time.perf_counter() - start
    return result
