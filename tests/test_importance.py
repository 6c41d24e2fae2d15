import mlx.core as mx
import numpy as np
import pytest

from lsaq_mlx.scoring import metrics as importance
from lsaq_mlx.scoring.calibration import CalibrationText, load_calibration, token_sequences
from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import inner_model
from lsaq_mlx.scoring.lens import Lens, find_lens, layer_hooks, top_k_ids
from tiny_models import ARGS, tiny_model

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
TOKENS = [[3, 17, 99, 5, 250, 42, 8, 1, 77, 123, 64, 200]]


def make_identity(model, index):
    """Zero the output projections of layer ``index``: it then returns its input."""
    layer = inner_model(model)["layers"][index]
    layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
    layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_lens_of_last_layer_is_the_logits(arch):
    model = tiny_model(arch)
    lens, outputs = find_lens(model), {}
    last = ARGS[arch]["num_hidden_layers"] - 1
    with layer_hooks(model, lambda i, x, out: outputs.__setitem__(i, out)):
        logits = model(mx.array(TOKENS))
    np.testing.assert_allclose(np.array(lens.logits(outputs[last])), np.array(logits), atol=1e-5, rtol=1e-5)
    assert type(inner_model(model)["layers"][0]).__name__ != "HookedTransformerBlock"  # hooks removed


@pytest.mark.parametrize("vocab", [300, 320, 1000, 49152])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_blockwise_top_k_is_exact(vocab, k):
    logits = mx.random.normal((37, vocab), key=mx.random.key(vocab + k))
    logits[3, : vocab // 2] = 7.0  # many ties at the top of one row
    got = np.sort(np.array(top_k_ids(logits, k)), axis=-1)
    values = np.take_along_axis(np.array(logits), got, axis=-1)
    kth = -np.sort(-np.array(logits), axis=-1)[:, k - 1 : k]
    assert (values >= kth).all() and all(len(set(row)) == k for row in got.tolist())


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_layer_scores_zero(arch):
    model = tiny_model(arch)
    make_identity(model, 1)
    jaccard, cosine, positions = importance.lens_statistics(model, TOKENS, k=5)
    assert positions == len(TOKENS[0])
    assert jaccard[1] == pytest.approx(1.0) and cosine[1] == pytest.approx(1.0, abs=1e-6)
    assert jaccard[0] < 1.0 and cosine[0] < 1.0
    union, _, _ = importance.lens_statistics(model, TOKENS, k=5, sets="sequence")
    assert union[1] == pytest.approx(1.0)
    sens = importance.sensitivity_scores(model, TOKENS, bits=2)
    assert sens[1] == pytest.approx(0.0, abs=1e-6) and sens[0] > 1e-6


def test_jaccard_of_sets():
    a = mx.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_allclose(np.array(importance.jaccard_per_position(a, a)), [1.0, 1.0])
    b = mx.array([[3, 2, 9], [7, 8, 9]])  # 2 shared of 4 distinct; 0 shared
    np.testing.assert_allclose(np.array(importance.jaccard_per_position(a, b)), [0.5, 0.0])
    assert importance.jaccard_of_union(a, b, 10).item() == pytest.approx(2 / 9)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_stride_lenses_every_stride_th_position(stride, monkeypatch):
    model = tiny_model("llama")
    sequences = [TOKENS[0], TOKENS[0][:7]]
    lensed, original = [], Lens.top_k

    def counted_top_k(self, h, k, ordered=False):
        lensed.append(h.shape[0])
        return original(self, h, k, ordered)

    monkeypatch.setattr(Lens, "top_k", counted_top_k)
    _, _, positions = importance.lens_statistics(model, sequences, k=3, stride=stride)
    per_sequence = [-(-len(seq) // stride) for seq in sequences]
    assert positions == sum(per_sequence)
    # every layer projects its output; the first layer also its input (sequences may run concurrently)
    layers = ARGS["llama"]["num_hidden_layers"]
    assert sorted(lensed) == sorted(n for n in per_sequence for _ in range(layers + 1))


def test_sequences_on_several_workers_give_the_same_scores():
    model = tiny_model("qwen2")
    sequences = [[(7 * i + 13 * j) % 300 for j in range(90 + 10 * i)] for i in range(5)]
    done = []
    serial = importance.lens_statistics(model, sequences, k=5, stride=2, workers=1)
    parallel = importance.lens_statistics(model, sequences, k=5, stride=2, workers=3, progress=done.append)
    assert parallel[0] == serial[0] and parallel[2] == serial[2]
    np.testing.assert_allclose(parallel[1], serial[1], atol=1e-6)
    assert sorted(done) == sorted(map(len, sequences))


def test_zscore_prefers_fewer_outliers():
    model = tiny_model("llama")
    layers = inner_model(model)["layers"]
    w = layers[0].mlp.up_proj.weight
    # a heavy-tailed layer has fewer weights beyond one standard deviation than a Gaussian
    layers[0].mlp.up_proj.weight = mx.where(mx.arange(w.size).reshape(w.shape) % 50 == 0, 10.0, 0.0)
    scores = importance.zscore_scores(model)
    assert scores[0] > scores[1]


def test_random_is_seeded():
    assert importance.random_scores(5, 1) == importance.random_scores(5, 1) != importance.random_scores(5, 2)


def test_top_k_bounds():
    with pytest.raises(UserError, match="top-k"):
        importance.lens_statistics(tiny_model("qwen3"), TOKENS, k=10_000)


class CharTokenizer:
    def encode(self, text):
        return [ord(c) % 300 for c in text]


def test_calibration_inputs(tmp_path):
    assert load_calibration().name == "default" and len(load_calibration().text) > 100_000
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_calibration(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_calibration(str(tmp_path / "latin1.txt"))
    with pytest.raises(UserError, match="not found"):
        load_calibration(str(tmp_path / "missing.txt"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("abc")
    (tmp_path / "dir" / "b.txt").write_text("def")
    calib = load_calibration(str(tmp_path / "dir"))
    assert calib.text == "abc\n\ndef"
    seqs = token_sequences(CharTokenizer(), CalibrationText("x", "abcdefghij"), 7, 3, skip_tokens=1)
    assert seqs == [[98, 99, 100], [101, 102, 103], [104]] or seqs == [[98, 99, 100], [101, 102, 103]]
    with pytest.raises(UserError, match="at least 1"):
        token_sequences(CharTokenizer(), calib, 0, 8)
    with pytest.raises(UserError, match="only 8 tokens"):
        token_sequences(CharTokenizer(), calib, 100, 8)
