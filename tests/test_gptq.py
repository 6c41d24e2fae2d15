import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from converted_models import assert_loads_with_only_mlx_lm, held_out_errors, smaller_plan_direct_and_as_track

from lsaq_mlx.convert import convert
from lsaq_mlx.gptq.packing import pack_codes
from lsaq_mlx.gptq.solver import AffineCodes, gptq_quantize, hessian_factor, output_error
from lsaq_mlx.planning.planner import Planner, PlanRequest


def _unpack(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Reference reading of MLX's packing: each row a little-endian bit stream."""
    stream = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, : cols * bits]
    return (stream.reshape(words.shape[0], cols, bits) << np.arange(bits)).sum(axis=2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packed_codes_are_the_words_mx_quantize_writes(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, 64, bits)
    codes = _unpack(np.array(packed), bits, 128)
    assert codes.max() <= (1 << bits) - 1
    assert np.array_equal(pack_codes(codes, bits), np.array(packed))


def _correlated_problem(rows=48, cols=256, samples=2048, seed=0, halves=False):
    """A weight and the Hessian of inputs like real ones (correlated, uneven); with
    ``halves``, two Hessians of independent samples of the same inputs."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(cols, cols)) / np.sqrt(cols) + np.eye(cols)
    spread = rng.uniform(0.2, 3.0, size=cols)
    weight = rng.normal(size=(rows, cols)).astype(np.float32) * 0.05
    hessians = []
    for _ in range(2 if halves else 1):
        x = (rng.normal(size=(samples, cols)) * spread) @ mixing
        hessians.append((x.T @ x).astype(np.float32))
    return (weight, *hessians)


@pytest.mark.parametrize("bits,group_size", [(3, 64), (4, 128), (2, 32)])
def test_gptq_lowers_the_output_error_and_dequantizes_to_what_it_computed(bits, group_size):
    weight, hessian = _correlated_problem()
    codes = gptq_quantize(weight, hessian_factor(hessian), bits, group_size)
    packed, scales, biases = codes.arrays()
    assert packed.dtype == mx.uint32 and scales.dtype == biases.dtype == mx.float16
    read = np.array(mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits))
    ints = _unpack(codes.weight, bits, weight.shape[1]).astype(np.float32)
    expected = ints * np.repeat(codes.scales.astype(np.float32), group_size, axis=1) + np.repeat(
        codes.biases.astype(np.float32), group_size, axis=1)
    np.testing.assert_allclose(read, expected, rtol=0, atol=1e-6)
    rtn = mx.dequantize(*mx.quantize(mx.array(weight), group_size, bits), group_size, bits)
    gptq_error, rtn_error = output_error(weight, read, hessian), output_error(weight, np.array(rtn), hessian)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("bits,group_size", [(3, 64), (4, 32)])
def test_refitted_scales_lower_every_rows_output_error_and_dequantize_exactly(bits, group_size):
    from lsaq_mlx.gptq.row_errors import row_output_errors

    weight, hessian = _correlated_problem()
    factor = hessian_factor(hessian)
    plain = gptq_quantize(weight, factor, bits, group_size, hessian)
    refit = gptq_quantize(weight, factor, bits, group_size, hessian, refit_by=hessian)
    assert np.array_equal(plain.weight, refit.weight)  # the codes stay GPTQ's

    def row_errors(codes):
        packed, scales, biases = codes.arrays()
        read = np.array(mx.dequantize(packed, scales, biases, group_size, bits).astype(mx.float32))
        return row_output_errors(read.astype(np.float64) - weight, hessian.astype(np.float64))

    before, after = row_errors(plain), row_errors(refit)
    assert np.all(after <= before * (1 + 1e-6))
    assert after.sum() < 0.97 * before.sum(), (before.sum(), after.sum())


def _rounding_error(group, hessian, scales, biases, levels):
    s, b = scales.astype(np.float32)[:, None], biases.astype(np.float32)[:, None]
    e = group - (np.clip(np.rint((group - b) / s), 0, levels) * s + b)
    return float(np.einsum("ij,ij->", e @ hessian, e))


def test_clipped_group_scales_lower_the_groups_rounding_error():
    from lsaq_mlx.gptq.solver import _group_scales

    _, hessian = _correlated_problem(cols=64)
    group = (np.random.default_rng(1).standard_t(3, size=(256, 64)) * 0.05).astype(np.float32)  # heavy tails, as in LLMs
    levels = np.full(256, 7.0, dtype=np.float32)
    plain = _rounding_error(group, hessian, *_group_scales(group, levels), 7)
    clipped = _rounding_error(group, hessian, *_group_scales(group, levels, hessian), 7)
    assert clipped < 0.9 * plain, (plain, clipped)  # measured 0.73x


def test_gptq_refuses_a_group_size_that_does_not_divide_the_columns():
    weight, hessian = _correlated_problem(cols=96)
    with pytest.raises(ValueError, match="group size 64"):
        gptq_quantize(weight, hessian_factor(hessian), 4, 64)


def test_a_gptq_model_is_closer_to_the_source_and_loads_with_only_mlx_lm(tiny_source, tmp_path):
    source = tiny_source("llama")
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=3, group_size=32))
    rtn, gptq = tmp_path / "rtn", tmp_path / "gptq"
    convert(source, plan, rtn)
    report = convert(source, plan, gptq, quantizer="gptq")
    assert report.quantizer == "gptq" and report.written_bytes == plan.predicted_bytes
    assert json.loads((gptq / "lsaq_report.json").read_text())["quantizer"] == "gptq"
    assert not (gptq / "gptq").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    errors = held_out_errors(source, [rtn, gptq])
    assert errors["gptq"] < 0.9 * errors["rtn"], errors  # on held-out tokens

    assert_loads_with_only_mlx_lm(gptq)


def test_the_priced_ratio_is_what_gptq_writes_over_round_to_nearest():
    from lsaq_mlx.gptq.pricing import compensation_ratios
    from lsaq_mlx.planning.choices import Affine

    weight, fitted, hessian = _correlated_problem(rows=40, halves=True)  # fewer rows than the sample: exact
    choices = [Affine(3, 64), Affine(5, 64), Affine(4, 128)]
    ratios = compensation_ratios(mx.array(weight), (fitted, hessian), choices)
    for c in choices:  # fitted on one half, measured on the other
        codes = gptq_quantize(weight, hessian_factor(fitted), c.bits, c.group_size)
        written = mx.dequantize(*(a.astype(mx.float32) if a.dtype == mx.float16 else a for a in codes.arrays()),
                                c.group_size, c.bits)
        rtn = mx.dequantize(*mx.quantize(mx.array(weight), c.group_size, c.bits), c.group_size, c.bits)
        expected = output_error(weight, np.array(written), hessian) / output_error(weight, np.array(rtn), hessian)
        assert ratios[c.key] == pytest.approx(expected, rel=1e-3) and ratios[c.key] < 0.8


def test_the_ratio_table_prices_every_linear_module_and_is_cached(tiny_source, empty_cache, monkeypatch):
    import lsaq_mlx.gptq.pricing as pricing
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = tiny_source("qwen2")
    ctx = Planner(source).context()
    table = lambda: pricing.ratio_table(source.fingerprint, load_calibration(None), ctx, StreamedModel(source),
                                        load_tokenizer(source))
    ratios = table()
    assert set(ratios) == {q.path for q in ctx.modules}  # tied: the embedding is priced as the LM head
    assert all(0 < r < 1.5 for rs in ratios.values() for r in rs.values())
    monkeypatch.setattr(pricing, "each_layer_hessians", lambda *a, **k: pytest.fail("recomputed a cached table"))
    assert table() == ratios


def test_an_unknown_quantizer_is_a_one_line_error(tiny_source):
    from cli_run import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("convert", "-m", str(tiny_source("llama").path), "-b", "4", "--quantizer", "smoothquant"),
                          "unknown quantizer")


def test_convert_quantizer_gptq_from_the_command_line(tiny_source, tmp_path):
    from cli_run import run_cli

    out = tmp_path / "out"
    done = run_cli("convert", "-m", str(tiny_source("qwen3").path), "-b", "4.5", "--quantizer", "gptq", "-o", str(out),
                   "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["quantizer"] == "gptq" and report["bits_per_weight"] <= 4.5
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("gflops, chosen", [(1e6, "awq-gptq"), (1e-3, "rtn")])
def test_convert_by_default_calibrates_where_this_machine_affords_it(tiny_source, tmp_path, monkeypatch, gflops,
                                                                     chosen):
    import lsaq_mlx.doctor as doctor
    from cli_run import run_cli
    from lsaq_mlx.quantizers import AFFORDABLE_SECONDS, calibrated_seconds

    monkeypatch.delenv("LSAQ_MLX_QUANTIZER")
    monkeypatch.setattr(doctor, "gemm_gflops", lambda n=512, repeats=3: gflops)
    done = run_cli("convert", "-m", str(tiny_source("qwen3").path), "-b", "4.5", "-o", str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["quantizer"] == chosen
    line = next(x for x in done.stderr.splitlines() if x.startswith("quantizer: "))
    assert line.startswith(f"quantizer: {chosen} (")
    plan = json.loads((tmp_path / "out" / "lsaq_plan.json").read_text())
    estimate = calibrated_seconds(plan["parameters"], gflops, 16384)
    assert (estimate <= AFFORDABLE_SECONDS) == (chosen == "awq-gptq")
    assert f"about {estimate / 60:.0f} min" in line


def test_the_calibrated_time_estimate_grows_with_weights_and_falls_with_the_gemm_rate():
    from lsaq_mlx.quantizers import AFFORDABLE_SECONDS, choose_quantizer

    small, big = choose_quantizer(135_000_000, 40.0, 16384), choose_quantizer(8_000_000_000, 40.0, 16384)
    assert small.calibrated_seconds < big.calibrated_seconds
    assert choose_quantizer(8_000_000_000, 4000.0, 16384).calibrated_seconds < big.calibrated_seconds
    assert big.name == "rtn" and big.calibrated_seconds > AFFORDABLE_SECONDS and "--quantizer awq-gptq" in big.reason()


def test_each_layer_is_calibrated_on_what_the_layer_before_it_computes_as_written(tiny_source, tmp_path, monkeypatch):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import _parameters, calibration_tokens, each_layer_hessians
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = tiny_source("llama")
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=3, group_size=32))
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:4]
    layers, passed_on = [], []

    def spying(streamed, tokens, paths, on_modules, progress=None, **options):
        def spy(modules, hessians, layer):
            params = on_modules(modules, hessians, layer)
            if layer is not None:
                layers.append((layer.x_in, layer.x_out))
                with _parameters(layer.module, params):  # what the layer computes as written
                    passed_on.append(layer.forward(layer.x_in))
            return params
        each_layer_hessians(streamed, tokens, paths, spy, progress, **options)

    monkeypatch.setattr(writer, "each_layer_hessians", spying)
    weights = writer.calibrated_weights(StreamedModel(source), tokens, dict(plan.modules), tmp_path, QUANTIZERS["gptq"])
    assert len(layers) == 2
    (_, float_out), (next_in, _) = layers
    assert mx.allclose(next_in, passed_on[0], atol=1e-5)
    assert not mx.allclose(next_in, float_out, atol=1e-3)  # the float source's output is not what is passed on
    codes = weights["model.layers.0.mlp.down_proj"]
    assert mx.array_equal(writer._as_written({f"model.layers.0.mlp.down_proj.{k}": v for k, v in codes.items()},
                                             "model.layers.0.", plan.modules)["mlp.down_proj.weight"],
                          mx.dequantize(codes["weight"], codes["scales"], codes["biases"], 32, 3))


def test_an_embedding_tied_to_the_lm_head_is_written_by_gptq_on_the_final_hidden_states(tiny_source, tmp_path,
                                                                                       monkeypatch):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens, each_layer_hessians
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = tiny_source("qwen2")  # tied embeddings
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=3, group_size=32))
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:4]
    heads = {}

    def spying(streamed, tokens, paths, on_modules, progress=None, **options):
        def spy(modules, hessians, layer):
            if layer is None:
                heads.update({p: (np.array(m.weight.astype(mx.float32)), hessians[p]) for p, m in modules.items()})
            return on_modules(modules, hessians, layer)
        each_layer_hessians(streamed, tokens, paths, spy, progress, **options)

    monkeypatch.setattr(writer, "each_layer_hessians", spying)
    weights = writer.calibrated_weights(StreamedModel(source), tokens, dict(plan.modules), tmp_path, QUANTIZERS["gptq"])
    assert list(heads) == ["model.embed_tokens"]
    weight, hessian = heads["model.embed_tokens"]
    codes = weights["model.embed_tokens"]
    written = mx.dequantize(codes["weight"], codes["scales"], codes["biases"], 32, 3)
    rtn = mx.dequantize(*mx.quantize(mx.array(weight), 32, 3), 32, 3)
    assert output_error(weight, np.array(written), hessian) < 0.9 * output_error(weight, np.array(rtn), hessian)


def test_the_mlx_solver_writes_the_numpy_solvers_codes():
    """``tests/fixtures/gptq_numpy_codes.npz``: a fixed matrix and Hessian, and what the
    NumPy solver (before the column loop moved to MLX) wrote for them. The codes must be
    the same; a refit (a float32 solve, now MLX's) may move a float16 scale or bias by
    one step, and the output error by no more than float32 noise."""
    fixture = Path(__file__).parent / "fixtures" / "gptq_numpy_codes.npz"
    f = np.load(fixture)
    weight, hessian = f["weight"], f["hessian"]
    factor = hessian_factor(hessian)
    for bits, group_size in ((3, 64), (4, 32), (8, 128)):
        for clip in (0, 1):
            for refit in (0, 1):
                key = f"{bits}_{group_size}_{clip}_{refit}"
                got = gptq_quantize(weight, factor, bits, group_size, hessian if clip else None,
                                    hessian if refit else None)
                assert np.array_equal(got.weight, f[f"weight_{key}"]), key
                for name in ("scales", "biases"):
                    new, old = getattr(got, name).astype(np.float32), f[f"{name}_{key}"].astype(np.float32)
                    close = np.isclose(new, old, rtol=2e-3, atol=1e-6) if refit else new == old
                    assert close.all(), (key, name)

                def error(w, s, b):
                    d = mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=group_size, bits=bits)
                    return output_error(weight, np.array(d.astype(mx.float32)), hessian)

                old = error(f[f"weight_{key}"], f[f"scales_{key}"], f[f"biases_{key}"])
                assert error(got.weight, got.scales, got.biases) == pytest.approx(old, rel=1e-4), key


def test_each_row_keeps_round_to_nearest_where_it_beats_the_calibrated_codes():
    from lsaq_mlx.gptq.writer import CalibrationCounts, never_worse_than_rounding
    from lsaq_mlx.planning.choices import Affine

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((512, 64)).astype(np.float32) * np.linspace(0.2, 3.0, 64, dtype=np.float32)
    held_out = x.T @ x / len(x)
    choice = Affine(3, 32)
    factor = hessian_factor(np.diag(np.linspace(3.0, 0.1, 64)).astype(np.float32))  # fitted to other inputs
    gptq = gptq_quantize(weight, factor, 3, 32)
    gptq.weight[:4] = gptq.weight[4:8]  # four rows made bad: another row's codes
    count = CalibrationCounts()
    kept = never_worse_than_rounding(gptq, mx.array(weight), choice, held_out, count)

    def errors(codes):
        deq = np.array(mx.dequantize(*codes.arrays(), group_size=32, bits=3))
        return np.einsum("ij,ij->i", (deq - weight) @ held_out, deq - weight)

    rtn = AffineCodes(*(np.array(a.astype(mx.float16) if a.dtype == mx.float32 else a)
                        for a in mx.quantize(mx.array(weight), 32, 3)))
    assert np.all(errors(kept) <= np.minimum(errors(gptq), errors(rtn)) * (1 + 1e-6))
    assert 4 <= count.rows_rounded < 16 and count.rows == 16


def test_a_module_the_quantizer_makes_worse_than_rounding_is_written_as_rounding(tiny_source, tmp_path):
    from dataclasses import dataclass

    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens
    from lsaq_mlx.quantizers import QUANTIZERS, Quantizer
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    @dataclass(frozen=True)
    class Misplaced(Quantizer):  # each row gets the next row's codes: worse everywhere
        uses_hessian = True

        def codes(self, weight, inputs, choice, clip):
            codes = super().codes(weight, inputs, choice, clip)
            return AffineCodes(*(np.roll(getattr(codes, f), 1, axis=0) for f in ("weight", "scales", "biases")))

    source = tiny_source("llama")
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=4, group_size=32))
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:6]
    streamed = StreamedModel(source)
    count = writer.CalibrationCounts()
    written = writer.calibrated_weights(streamed, tokens, dict(plan.modules), tmp_path, Misplaced("misplaced", ""),
                                        count=count, held_out=2)
    path = "model.layers.1.mlp.down_proj"
    with streamed.layer(1) as layer:
        rtn = QUANTIZERS["rtn"].codes(layer.mlp.down_proj.weight, None, plan.modules[path], False)
    assert np.array_equal(np.array(written[path]["weight"]), rtn.weight)
    assert count.rows_rounded == count.rows > 0


def test_an_embedding_tied_to_the_head_above_its_bits_is_left_to_rounding(tiny_source, tmp_path):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = tiny_source("qwen2")  # tied embeddings
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:4]
    for bits, calibrated in ((writer.TIED_HEAD_MAX_BITS, True), (writer.TIED_HEAD_MAX_BITS + 1, False)):
        plan = Planner(source).plan(PlanRequest(method="uniform", bits=bits, group_size=32))
        (tmp_path / str(bits)).mkdir()
        weights = writer.calibrated_weights(StreamedModel(source), tokens, dict(plan.modules), tmp_path / str(bits),
                                            QUANTIZERS["gptq"])
        assert ("model.embed_tokens" in weights) == calibrated


def test_an_adaptive_folders_smaller_settings_of_a_rounded_tied_embedding_go_through_gptq(tiny_source, tmp_path):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens
    from lsaq_mlx.planning.choices import Affine
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = tiny_source("qwen2")  # tied embeddings
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:4]
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=writer.TIED_HEAD_MAX_BITS + 1, group_size=32))
    head, low, high = "model.embed_tokens", Affine(writer.TIED_HEAD_MAX_BITS, 32), Affine(writer.TIED_HEAD_MAX_BITS + 1, 32)
    made = {}

    def also(path, weight, bias, h, codes, choice, codes_at):
        if path == head:
            made.update(top=(codes, weight), low=codes_at(low), high=codes_at(high))

    weights = writer.calibrated_weights(StreamedModel(source), tokens, dict(plan.modules), tmp_path,
                                        QUANTIZERS["gptq"], also=also)
    assert head not in weights  # the planned setting is written by rounding, as without ``also``
    rtn = lambda choice: QUANTIZERS["rtn"].codes(made["top"][1], None, choice, False)  # noqa: E731
    assert np.array_equal(made["top"][0].weight, rtn(high).weight) and np.array_equal(made["high"].weight, rtn(high).weight)
    assert not np.array_equal(made["low"].weight, rtn(low).weight)  # within GPTQ's bits: compensated, as the head


def test_equalization_scales_the_held_out_inputs_the_rows_are_checked_on(tiny_source, tmp_path, monkeypatch):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = tiny_source("llama")
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=4, group_size=32))
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:6]
    check, checked = writer.never_worse_than_rounding, []
    monkeypatch.setattr(writer, "never_worse_than_rounding", lambda codes, weight, choice, held_out, count: (
        checked.append(held_out.copy()), check(codes, weight, choice, held_out, count))[1])
    monkeypatch.setattr(writer.CalibratedLayer, "unchanged_by", lambda self, params, tolerance: True)
    held = []
    for scales in (None, lambda h: np.exp(np.linspace(-1, 1, h.shape[0]))):
        checked.clear()
        monkeypatch.setattr(writer, "equalizing_scales", lambda weights, h, choices, measure: scales and scales(h))
        writer.calibrated_weights(StreamedModel(source), tokens, dict(plan.modules), tmp_path, QUANTIZERS["awq-gptq"],
                                  held_out=2)
        held.append(checked[:7])  # layer 0's modules: the same inputs in both runs
    scaled = 0
    for plain, equalized in zip(*held):  # the inputs of an equalized module are x / s (a norm fold: to float16)
        s = np.exp(np.linspace(-1, 1, plain.shape[0]))
        scaled += np.allclose(equalized, plain / s[:, None] / s[None, :], rtol=5e-3)
        assert scaled or np.array_equal(equalized, plain) or np.allclose(equalized, plain / s[:, None] / s[None, :],
                                                                          rtol=5e-3)
    assert scaled >= 5  # q, k, v, gate, up


def test_each_smaller_plan_of_an_adaptive_folder_is_calibrated_on_its_own_activations(tiny_source, tmp_path,
                                                                                     monkeypatch):
    direct, made = smaller_plan_direct_and_as_track(tiny_source("llama"), tmp_path, monkeypatch)
    assert set(made) == set(direct) and len(made) > 2
    for path, codes in made.items():  # layer 1 too: its inputs are those layer 0 as the small plan gives
        assert np.array_equal(codes.weight, np.array(direct[path]["weight"])), path


def test_a_layer_that_equalization_makes_worse_is_written_as_rounding_writes_it(tiny_source, tmp_path, monkeypatch):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    # exact in float (the fold check passes), ruinous once rounded: within each group half
    # the columns dwarf the others, whose inputs come back multiplied by 64
    monkeypatch.setattr(writer, "equalizing_scales",
                        lambda weights, h, choices, measure: np.where(np.arange(h.shape[0]) % 2, 64.0, 1 / 64))
    source = tiny_source("llama")
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=4, group_size=32))
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:6]
    streamed = StreamedModel(source)
    count = writer.CalibrationCounts()
    written = writer.calibrated_weights(streamed, tokens, dict(plan.modules), tmp_path, QUANTIZERS["awq"],
                                        count=count, held_out=2)
    assert count.equalized > 0 and count.layers_rounded == count.layers == len(streamed.layers)
    assert not any("norm" in path for path in written)  # no fold is written
    path = "model.layers.1.mlp.down_proj"
    with streamed.layer(1) as layer:
        rtn = QUANTIZERS["rtn"].codes(layer.mlp.down_proj.weight, None, plan.modules[path], False)
    assert np.array_equal(np.array(written[path]["weight"]), rtn.weight)


def test_a_layer_the_quantizer_improves_keeps_its_codes(tiny_source, tmp_path):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = tiny_source("llama")
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=3, group_size=64))
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:10]
    count = writer.CalibrationCounts()
    writer.calibrated_weights(StreamedModel(source), tokens, dict(plan.modules), tmp_path, QUANTIZERS["awq-gptq"],
                              count=count, held_out=2)
    assert count.layers == 2 and count.layers_rounded < count.layers
