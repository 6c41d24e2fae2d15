"""Per-token divergences between two models' next-token distributions."""

import math
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from lsaq_mlx.evaluation.perplexity import PerplexityResult, windows
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.scoring.divergence import log_softmax


@dataclass
class ReferenceDistributions:
    """A reference model's next-token log-probabilities on fixed token windows, kept in
    float16 (vocab x tokens x 2 bytes), so candidates are compared without rerunning it."""

    windows: list[list[int]]
    logprobs: list[mx.array]

    @classmethod
    def compute(cls, model, tokens: list[int], seq_len: int) -> "ReferenceDistributions":
        chunks = list(windows(tokens, seq_len))
        logprobs = []
        for w in chunks:
            lp = log_softmax(model(mx.array(w)[None, :-1])[0]).astype(mx.float16)
            mx.eval(lp)
            logprobs.append(lp)
        return cls(chunks, logprobs)

    @classmethod
    def compute_streamed(cls, streamed, tokens: list[int], seq_len: int) -> "ReferenceDistributions":
        """The same from a ``StreamedModel``: the windows of one length go through the
        layers together, one layer in memory at a time."""
        from lsaq_mlx.scoring.lens import find_lens

        lens = find_lens(streamed.model)
        chunks = list(windows(tokens, seq_len))
        logprobs: list = [None] * len(chunks)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(chunks):
            by_length.setdefault(len(w), []).append(i)
        with progress_bar("reference, layer by layer", len(by_length) * len(streamed.layers)) as advance:
            for ids in by_length.values():
                hidden = streamed.run_layers(mx.array([chunks[i][:-1] for i in ids]), lambda *_: advance())
                for row, i in enumerate(ids):
                    logprobs[i] = log_softmax(lens.logits(hidden[row])).astype(mx.float16)
                    mx.eval(logprobs[i])
        return cls(chunks, logprobs)


@dataclass
class DivergenceResult:
    tokens: int
    kl: float  # mean KL(reference || model), nats per token
    kl_stderr: float
    top1_agreement: float  # share of positions where both models' most likely token agree
    perplexity: PerplexityResult  # of the model, on the same tokens

    def to_dict(self) -> dict:
        return asdict(self)


def compare_to_reference(model, reference: ReferenceDistributions) -> DivergenceResult:
    """KL, top-1 agreement and perplexity of ``model`` on the reference's windows."""
    kls, nlls, agree = [], [], 0
    with progress_bar("KL to the reference", len(reference.windows)) as advance:
        for window, ref_lp in zip(reference.windows, reference.logprobs):
            lp = log_softmax(model(mx.array(window)[None, :-1])[0])
            ref = ref_lp.astype(mx.float32)
            kl = (mx.exp(ref) * (ref - lp)).sum(axis=-1)
            nll = -mx.take_along_axis(lp, mx.array(window[1:])[:, None], axis=-1)[:, 0]
            same = (mx.argmax(lp, axis=-1) == mx.argmax(ref, axis=-1)).sum()
            mx.eval(kl, nll, same)
            kls.append(np.array(kl))
            nlls.append(np.array(nll))
            agree += same.item()
            advance()
    kl, nll = np.concatenate(kls), np.concatenate(nlls)
    ppl = PerplexityResult(
        int(nll.size), len(reference.windows), len(reference.windows[0]), float(nll.mean()),
        math.exp(float(nll.mean())), float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else 0.0,
    )
    stderr = float(kl.std(ddof=1) / math.sqrt(kl.size)) if kl.size > 1 else 0.0
    return DivergenceResult(int(kl.size), float(kl.mean()), stderr, agree / kl.size, ppl)
