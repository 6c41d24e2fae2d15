import json

import mlx.core as mx
import numpy as np
import pytest

from cli_run import assert_one_line_error, run_cli
from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.convert import convert, quantized_model
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.planner import Planner, PlanRequest
from lsaq_mlx.sources import load_model, resolve_model
from lsaq_mlx.swsc import lowrank
from lsaq_mlx.swsc.candidates import candidates, fitting_settings
from lsaq_mlx.swsc.codec import SWSCSettings, compress, pack_labels, unpack_labels
from lsaq_mlx.swsc.format import CONFIG_KEY, FILE
from lsaq_mlx.swsc.kmeans import kmeans
from lsaq_mlx.swsc.layer import SWSCLinear
from tiny_models import tiny_model, write_gguf

SWSC_CODECS = ("affine", "swsc")


def float16_exact(shape, seed=0):
    """Random values that float16 holds exactly, so float16 centroids can be exact."""
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(mx.float16).astype(mx.float32)


def relative_error(w, approx) -> float:
    return (mx.square(w - approx).sum() / mx.square(w).sum()).item()


@pytest.mark.parametrize("axis", ["output", "input"])
def test_k_equal_to_the_channels_reproduces_w_exactly(axis):
    w = float16_exact((48, 32))
    channels = 48 if axis == "output" else 32
    clusters = kmeans(w if axis == "output" else w.T, channels)
    assert sorted(np.array(clusters.labels).tolist()) == list(range(channels))
    assert clusters.inertia == pytest.approx(0.0, abs=1e-4)
    compressed = compress(w, SWSCSettings(channels, 0, axis, centroid_bits=16))
    assert mx.array_equal(compressed.dense(), w).item()
    fewer = compress(w, SWSCSettings(channels // 2, 0, axis, centroid_bits=16))
    assert relative_error(w, fewer.dense()) > 0.1


@pytest.mark.parametrize("axis", ["output", "input"])
def test_full_rank_reproduces_w(axis):
    w = mx.random.normal((64, 32), key=mx.random.key(1))
    without = compress(w, SWSCSettings(4, 0, axis, centroid_bits=4, centroid_group_size=32))
    full = compress(w, SWSCSettings(4, 32, axis, centroid_bits=4, centroid_group_size=32))
    assert relative_error(w, without.dense()) > 0.3
    # the factors are stored in float16: exact up to its rounding
    assert relative_error(w, full.dense()) < 1e-5


def test_truncated_svd_is_the_best_rank_r_approximation(monkeypatch):
    e = mx.random.normal((40, 24), key=mx.random.key(2))
    singular = np.linalg.svd(np.array(e, dtype=np.float64), compute_uv=False)
    for limit in (lowrank.EXACT_LIMIT, 0):  # exact, then randomized
        monkeypatch.setattr(lowrank, "EXACT_LIMIT", limit)
        for rank in (0, 5, 24):
            u, s, v = lowrank.truncated_svd(e, rank)
            residual = np.linalg.norm(np.array(e - (u * s) @ v, dtype=np.float64))
            assert residual == pytest.approx(np.sqrt((singular[rank:] ** 2).sum()), rel=1e-3, abs=1e-4)
        wide_u, _, wide_v = lowrank.truncated_svd(e.T, 24)
        assert wide_u.shape == (24, 24) and wide_v.shape == (24, 40)


@pytest.mark.parametrize("k", [1, 2, 3, 255, 256, 1000])
def test_labels_pack_and_unpack_exactly(k):
    settings = SWSCSettings(k, 0)
    labels = mx.array(np.random.default_rng(k).integers(0, k, size=1000), dtype=mx.uint32)
    packed = pack_labels(labels, settings.label_bits)
    assert packed.nbytes == 4 * -(-1000 // (32 // settings.label_bits))
    assert mx.array_equal(unpack_labels(packed, settings, 1000, 8), labels).item()


def test_layer_computes_the_product_without_the_matrix_and_counts_bytes_exactly():
    w = mx.random.normal((96, 64), key=mx.random.key(3))
    x = mx.random.normal((2, 3, 64), key=mx.random.key(4))
    for settings in (SWSCSettings(20, 4), SWSCSettings(20, 4, "input", 4, 32), SWSCSettings(7, 3, centroid_bits=16)):
        compressed = compress(w, settings)
        layer = SWSCLinear.from_weights(compressed)
        assert mx.allclose(layer(x), x @ compressed.dense().T, atol=1e-4).item()
        assert compressed.nbytes == settings.nbytes(96, 64)
        assert settings.multiply_adds(96, 64) < 96 * 64


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(UserError, match="k must be at least 1"):
        compress(mx.zeros((8, 32)), SWSCSettings(0, 0))
    with pytest.raises(UserError, match=r"rank r=9 is larger than the rank of a 8x32 matrix \(8\)"):
        compress(mx.zeros((8, 32)), SWSCSettings(2, 9))
    with pytest.raises(UserError, match="more than the 8 output channels"):
        SWSCSettings(9, 0).check(8, 32)
    with pytest.raises(UserError, match="centroid group size"):
        SWSCSettings(2, 0, "input").check(8, 32)


def test_candidates_fill_their_bits_per_weight():
    for settings in candidates(1536, 576):
        assert settings.bits_per_weight(1536, 576) <= 4.0
        assert settings.multiply_adds(1536, 576) < 1536 * 576
    assert {s.centroid_bits for s in candidates(1536, 576)} == {2, 3, 4}
    # every channel its own centroid: the bytes left go to the rank
    saturated = fitting_settings(192, 576, 3, 4.0)
    assert saturated.k == 192 and saturated.rank > 0 and 3.9 < saturated.bits_per_weight(192, 576) <= 4.0
    assert fitting_settings(192, 576, 4, 0.01) is None


@pytest.fixture
def tiny_source(tmp_path, empty_cache):
    model = tiny_model("qwen2")
    # rows of layer 0's up projection in 4 tight clusters: SWSC holds them almost exactly
    centres = mx.random.normal((4, 64), key=mx.random.key(5)) * 0.1
    up = centres[mx.arange(128) % 4] + 1e-4 * mx.random.normal((128, 64), key=mx.random.key(6))
    model.model.layers[0].mlp.up_proj.weight = up
    write_gguf(model, "qwen2", tmp_path / "tiny.gguf")
    return resolve_model(str(tmp_path / "tiny.gguf"))


def test_planner_weighs_swsc_and_convert_writes_a_folder_lsaq_mlx_loads(tiny_source, tmp_path):
    affine_only = Planner(tiny_source).plan(PlanRequest(method="lsaq", bits_budgets=[3.0]))
    assert not affine_only.swsc_modules()
    plan = Planner(tiny_source).plan(PlanRequest(method="lsaq", bits_budgets=[3.0], codecs=SWSC_CODECS))
    assert "model.layers.0.mlp.up_proj" in plan.swsc_modules()
    assert plan.details["cost"] <= affine_only.details["cost"]
    assert plan.predicted_bits_per_weight <= 3.0

    report = convert(tiny_source, plan, tmp_path / "out")
    assert report.bits_per_weight == pytest.approx(plan.predicted_bits_per_weight)
    assert report.written_bytes == plan.predicted_bytes
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(config[CONFIG_KEY]["modules"]) == set(plan.swsc_modules())
    assert (tmp_path / "out" / FILE).is_file()

    in_memory, _ = quantized_model(tiny_source, plan)
    loaded, _, _ = load_model(resolve_model(str(tmp_path / "out")), compute=False)
    # labels, centroids and factors round-trip through the file
    held, read = dict(in_memory.named_modules()), dict(loaded.named_modules())
    for path, settings in plan.swsc_modules().items():
        assert isinstance(read[path], SWSCLinear) and read[path].settings == settings
        for name, array in held[path].parameters().items():
            assert mx.array_equal(read[path][name], array).item(), (path, name)
    tokens = mx.array([[1, 5, 7, 20, 100, 3]])
    prepare_for_compute(in_memory)
    prepare_for_compute(loaded)
    assert mx.allclose(loaded(tokens), in_memory(tokens), atol=1e-4).item()

    from mlx_lm.utils import load

    with pytest.raises(ValueError, match="lsaq-mlx codec"):
        load(str(tmp_path / "out"))
    with pytest.raises(UserError, match="holds SWSC layers"):
        Planner(resolve_model(str(tmp_path / "out"))).plans(PlanRequest(method="uniform", bits=4))


def test_cli_swsc_plan_convert_and_bad_parameters(tiny_source, tmp_path):
    model = tiny_source.origin
    plan_file = tmp_path / "plan.json"
    done = run_cli("plan", "--model", model, "-b", "3.5", "--codecs", "affine,swsc", "--json", "-o", str(plan_file),
                   "--override", r"layers\.1\.mlp\.down_proj=swsc:16:4")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["modules"]["model.layers.1.mlp.down_proj"] == SWSCSettings(16, 4).to_choice()
    assert_one_line_error(run_cli("convert", "--model", model, "--plan", str(plan_file), "-o", str(tmp_path / "x")),
                          "allow the codecs affine,swsc (--codecs)")
    assert_one_line_error(run_cli("plan", "--model", model, "-b", "3.5", "--codecs", "swsc"), "codecs must be affine, with any of swsc")
    assert_one_line_error(run_cli("plan", "--model", model, "-b", "3.5", "--override", "down_proj=swsc:16:4"),
                          "needs the codecs affine,swsc")
    assert_one_line_error(run_cli("plan", "--model", model, "-b", "3.5", "--codecs", "affine,swsc",
                                  "--override", "down_proj=swsc:0:4"), "SWSC k must be at least 1")
    assert_one_line_error(run_cli("convert", "--model", model, "-b", "3.5", "--codecs", "affine,swsc",
                                  "--override", "down_proj=swsc:8:999", "-o", str(tmp_path / "x")),
                          "rank r=999 is larger than the rank")
    assert not (tmp_path / "x").exists()
