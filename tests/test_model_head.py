"""Wherever hidden states become logits outside the model's forward (the logit lens,
streamed references, the Fisher's head), the model's own transforms of its head's
output apply: granite's logits scaling, gemma2's soft-capping."""

import mlx.core as mx
import numpy as np
import pytest

from hf_models import DENSE_CONFIGS, build, write_hf_folder


@pytest.mark.parametrize("model_type", list(DENSE_CONFIGS))
def test_the_lens_gives_the_models_own_logits(model_type):
    from lsaq_mlx.modules import inner_model
    from lsaq_mlx.scoring.lens import find_lens

    model, _ = build(model_type, vocab_size=300)
    tokens = mx.array([[5, 17, 250, 9, 41, 120, 7, 88]])
    lens = find_lens(model)
    assert lens.transform is not None
    inner = inner_model(model)
    norm, inner["norm"] = inner["norm"], lambda x: x
    try:
        hidden = inner(tokens)
    finally:
        inner["norm"] = norm
    np.testing.assert_allclose(np.array(lens.logits(hidden)), np.array(model(tokens)), atol=1e-4)


def test_a_plain_model_has_no_transform():
    from lsaq_mlx.scoring.lens import find_lens

    assert find_lens(build("qwen3_moe", vocab_size=300)[0]).transform is None


@pytest.mark.parametrize("model_type", list(DENSE_CONFIGS))
def test_streamed_and_whole_model_references_agree(model_type, session_cache, tmp_path, monkeypatch):
    from lsaq_mlx.evaluation.divergence import ReferenceDistributions
    from lsaq_mlx.sources import load_model, resolve_model
    from lsaq_mlx.sources.streaming import StreamedModel

    source = resolve_model(str(write_hf_folder(model_type, tmp_path / model_type, resolve_model("default").path)))
    tokens = list(range(100, 356))
    whole = ReferenceDistributions.compute(load_model(source, compute=True)[0], tokens, 64)
    streamed = ReferenceDistributions.compute_streamed(StreamedModel(source), tokens, 64)
    for a, b in zip(whole.logprobs, streamed.logprobs):
        np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), atol=2e-2)
