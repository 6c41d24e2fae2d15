"""Zero-shot multiple choice by log-likelihood, as lm-evaluation-harness defines it.

For each choice, the continuation's tokens are those of ``context + continuation`` after
the tokens of ``context`` alone (the harness's ``_encode_pair``), and its score is the
sum of their log-probabilities. ``acc``: the highest sum is the gold choice. ``acc_norm``:
the same after dividing each sum by the continuation's length in bytes. LAMBADA
(one continuation): ``acc`` is whether greedy decoding reproduces every target token,
plus the perplexity of the targets. Each reported with its standard error.
"""

import math
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from lsaq_mlx.evaluation.tasks import TaskData


@dataclass
class TaskResult:
    task: str
    items: int
    skipped: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    perplexity: float | None = None  # lambada

    def to_dict(self) -> dict:
        return asdict(self)


def _tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """The tokens of context + continuation and where the continuation starts."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = min(len(tokenizer.encode(context, add_special_tokens=False)), len(whole) - 1)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None and n_context == 0 else []
    return bos + whole, n_context + len(bos)


def choice_logprobs(model, tokenizer, contexts: list[str], continuations: list[str]) -> list[tuple[float, bool]]:
    """For each (context, continuation): the sum of the continuation's token log-probabilities
    and whether each of its tokens was the greedy choice. All choices of an item go through
    the model as one batch, right-padded: under the causal mask padding after a sequence
    cannot change its logits."""
    encoded = [_tokens(tokenizer, c, x) for c, x in zip(contexts, continuations)]
    longest = max(len(t) for t, _ in encoded)
    batch = mx.array([t[:-1] + [0] * (longest - len(t)) for t, _ in encoded])
    logits = model(batch)
    results = []
    for row, (tokens, start) in enumerate(encoded):
        scores = logits[row, start - 1 : len(tokens) - 1].astype(mx.float32)
        logprobs = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
        targets = mx.array(tokens[start:])
        picked = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        greedy = (mx.argmax(logprobs, axis=-1) == targets).all()
        mx.eval(picked, greedy)
        results.append((picked.sum().item(), bool(greedy.item())))
    return results


def _stderr(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def evaluate_task(model, tokenizer, task: TaskData, progress=None) -> TaskResult:
    acc, acc_norm, nll = [], [], []
    for item in task.items:
        scored = choice_logprobs(model, tokenizer, item.contexts, item.continuations)
        if task.name == "lambada":
            logprob, greedy = scored[0]
            acc.append(float(greedy))
            nll.append(-logprob)
        else:
            sums = [s for s, _ in scored]
            acc.append(float(int(np.argmax(sums)) == item.gold))
            norm = [s / len(x.encode("utf-8")) for s, x in zip(sums, item.continuations)]
            acc_norm.append(float(int(np.argmax(norm)) == item.gold))
        if progress:
            progress(1)
    if not acc:
        return TaskResult(task.name, 0, task.skipped, float("nan"), float("nan"))
    result = TaskResult(task.name, len(acc), task.skipped, float(np.mean(acc)), _stderr(acc))
    if task.name == "lambada":
        result.perplexity = math.exp(float(np.mean(nll)))
    elif task.name != "winogrande":  # one continuation for both options: acc_norm = acc
        result.acc_norm, result.acc_norm_stderr = float(np.mean(acc_norm)), _stderr(acc_norm)
    return result
