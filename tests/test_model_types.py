"""mlx-lm model types (dense, mixture-of-experts, hybrid: ``hf_models.ALL_CONFIGS``)
through the stages; and wherever hidden states become logits outside the model's
forward (the logit lens, streamed references, the Fisher's head), the model's own
transforms of its head's output apply: granite's logits scaling, gemma2's soft-capping.
``scripts/model_matrix.py`` runs every CLI stage on each type."""

import mlx.core as mx
import numpy as np
import pytest

from hf_models import ALL_CONFIGS, DENSE_CONFIGS, build, write_hf_folder


@pytest.mark.parametrize("model_type", list(ALL_CONFIGS))
def test_the_lens_gives_the_models_own_logits(model_type):
    from lsaq_mlx.modules import final_norm, inner_model
    from lsaq_mlx.scoring.lens import find_lens

    model, _ = build(model_type, vocab_size=300)
    tokens = mx.array([[5, 17, 250, 9, 41, 120, 7, 88]])
    lens = find_lens(model)
    assert (lens.transform is not None) == (model_type in DENSE_CONFIGS)
    inner = inner_model(model)
    name = final_norm(inner)
    norm, inner[name] = inner[name], lambda x: x
    try:
        hidden = inner(tokens)
    finally:
        inner[name] = norm
    np.testing.assert_allclose(np.array(lens.logits(hidden)), np.array(model(tokens)), atol=1e-4)


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


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(ALL_CONFIGS))
def test_each_model_type_scores_plans_converts_and_stays_close_at_8_bits(model_type, session_cache, tmp_path,
                                                                        monkeypatch):
    from lsaq_mlx.convert import convert
    from lsaq_mlx.evaluation.divergence import ReferenceDistributions, compare_to_reference
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.scoring.run import ScoreOptions, score
    from lsaq_mlx.sources import load_model, resolve_model

    source = resolve_model(str(write_hf_folder(model_type, tmp_path / model_type, resolve_model("default").path)))
    scores = {}
    for stream in ("always", "never"):
        monkeypatch.setenv("LSAQ_MLX_STREAM", stream)
        scores[stream] = score(source, ScoreOptions(tokens=128, seq_len=64)).scores
    np.testing.assert_allclose(scores["always"], scores["never"], atol=1e-5)
    planner = Planner(source)
    assert planner.plan(PlanRequest(bits_budgets=[6.0])).predicted_bits_per_weight <= 6.0
    convert(source, planner.plan(PlanRequest(method="uniform", bits=8)), tmp_path / "q8", smoke_tokens=2)
    tokens = list(range(100, 356))
    reference = ReferenceDistributions.compute(load_model(source, compute=True)[0], tokens, 64)
    kl = compare_to_reference(load_model(resolve_model(str(tmp_path / "q8")), compute=True)[0], reference).kl
    if kl >= 0.01:  # random Gemma 4 weights lose more at 8 bits: no more than mlx-lm's own 8-bit folder
        from mlx_lm.convert import convert as mlx_lm_convert

        mlx_lm_convert(str(source.path), str(tmp_path / "stock"), quantize=True, q_bits=8, q_group_size=64)
        stock = compare_to_reference(load_model(resolve_model(str(tmp_path / "stock")), compute=True)[0], reference).kl
        assert kl <= 1.05 * stock, (kl, stock)
    assert 0 <= kl < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(ALL_CONFIGS))
def test_inspect_counts_the_parameters_mlx_lm_counts_float_and_quantized(model_type, session_cache, tmp_path):
    from mlx_lm import load
    from mlx_lm.convert import convert as mlx_lm_convert
    from mlx_lm.utils import get_total_parameters

    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.inspection import describe_model

    folder = write_hf_folder(model_type, tmp_path / "float", resolve_model("default").path)
    mlx_lm_convert(str(folder), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    for path in (folder, tmp_path / "q4"):
        expected = get_total_parameters(load(str(path), lazy=True)[0])
        assert describe_model(resolve_model(str(path)))["parameters"] == expected, path.name
