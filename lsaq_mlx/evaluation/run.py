"""``lsaq-mlx eval``: perplexity, KL to a reference, zero-shot tasks -> an ``EvalResult``.

Perplexity uses non-overlapping windows of ``seq_len`` tokens over the first
``max_tokens`` tokens of the text (each window predicts its tokens 2..n from the ones
before, within the window). KL divergence and top-1 agreement compare the model's
next-token distributions with a reference model's on exactly those windows.
"""

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
from lsaq_mlx.evaluation.data_sources import load_tasks, read_ppl_text
from lsaq_mlx.evaluation.tasks import TASKS
from lsaq_mlx.evaluation.zeroshot import evaluate_task

EVAL_VERSION = 1


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


def check_same_vocabulary(tokenizer, reference_tokenizer) -> None:
    """KL compares distributions token by token: both models must share one vocabulary."""
    ours, theirs = tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    if ours != theirs:
        differ = next((t for t in ours if theirs.get(t) != ours[t]), None) or next(t for t in theirs if t not in ours)
        raise UserError(f"the reference has another vocabulary ({len(theirs)} tokens, this model {len(ours)}; "
                        f"token {differ!r} differs): KL needs the same tokenizer", setting="reference")


def reference_distributions(reference: ModelSource, tokens: list[int], seq_len: int) -> ReferenceDistributions:
    """The reference's distributions: streamed one layer at a time when it is large."""
    if streams(reference):
        return ReferenceDistributions.compute_streamed(StreamedModel(reference), tokens, seq_len)
    ref_model, _, _ = load_model(reference)
    return ReferenceDistributions.compute(ref_model, tokens, seq_len)


CHARS_PER_TOKEN = 8  # a first guess of a prefix long enough; English runs about 4
SPARE_TOKENS = 16


def ppl_tokens(tokenizer, ppl: str, max_tokens: int) -> tuple[str, list[int]]:
    """The first ``max_tokens`` tokens of the text ``ppl``, reading and tokenizing only
    a prefix of it: one that has a few tokens more than needed, so the last ones kept are
    those of the whole text."""
    chars = CHARS_PER_TOKEN * (max_tokens + SPARE_TOKENS)
    while True:
        name, text = read_ppl_text(ppl, chars)
        tokens = tokenizer.encode(text)
        if len(text) < chars or len(tokens) >= max_tokens + SPARE_TOKENS:
            break
        chars *= 4
    tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise UserError(f"{name} has fewer than two tokens")
    return name, tokens


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
        if self.limit is not None and self.limit < 1:
            raise UserError(f"the items per task must be at least 1, not {self.limit} (leave it out for all)",
                            setting="limit")


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
        if reference is not None:
            check_same_vocabulary(tokenizer, load_tokenizer(reference))
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
