import mlx.core as mx
import numpy as np
import pytest

from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
from lsaq_mlx.scoring.divergence import token_kl
from lsaq_mlx.evaluation.perplexity import perplexity
from tiny_models import tiny_model

TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, 300, 70)]


def test_a_model_against_itself():
    model = tiny_model("qwen3")
    result = compare_to_reference(model, ReferenceDistributions.compute(model, TOKENS, 32))
    assert result.kl == pytest.approx(0.0, abs=1e-3) and result.top1_agreement == 1.0
    assert result.tokens == 31 + 31 + 5
    assert result.perplexity.mean_nll == pytest.approx(perplexity(model, TOKENS, 32).mean_nll, rel=1e-5)


def test_kl_matches_a_direct_computation():
    reference, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    result = compare_to_reference(other, ReferenceDistributions.compute(reference, TOKENS[:33], 33))
    x = mx.array(TOKENS[:32])[None]
    direct = token_kl(reference(x)[0], other(x)[0]).mean().item()
    assert result.kl == pytest.approx(direct, rel=2e-3) and result.kl > 0.01
    agree = (mx.argmax(reference(x)[0], -1) == mx.argmax(other(x)[0], -1)).mean().item()
    assert result.top1_agreement == pytest.approx(agree)
