"""Checks on written model folders shared by the quantizer tests."""

import os
import subprocess
import sys
import textwrap

import mlx.core as mx


def held_out_errors(source, folders) -> dict[str, float]:
    """``{folder name: mean squared logit error}`` against the source, on calibration
    text after the tokens the calibrated quantizers read."""
    from mlx_lm import load

    from lsaq_mlx.gptq import hessians
    from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
    from lsaq_mlx.sources.load import load_model, load_tokenizer

    tokens = mx.array(token_sequences(load_tokenizer(source), load_calibration(None), 1024, 128,
                                      skip_tokens=hessians.TOKENS)[:8])
    reference = load_model(source, compute=True)[0](tokens)
    return {f.name: float(mx.mean((load(str(f))[0](tokens).astype(mx.float32) - reference) ** 2)) for f in folders}


def assert_loads_with_only_mlx_lm(folder) -> None:
    """The folder generates in a process that imports mlx_lm and nothing of ours."""
    script = textwrap.dedent(f"""
        import sys
        from mlx_lm import load, generate
        model, tokenizer = load({str(folder)!r})
        print(repr(generate(model, tokenizer, "hello", max_tokens=4)))
        assert not [m for m in sys.modules if m.startswith("lsaq")]
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSAQ")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr


def smaller_plan_direct_and_as_track(source, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """``(direct, made)``: GPTQ's codes of ``source``'s uniform 3-bit plan written
    directly, and made as the smaller plan of an adaptive folder over the 4-bit plan
    (on its own activation track), each by module path; neither checks layers against
    rounding (a direct convert would, an adaptive folder's smaller settings do not)."""
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    small, top = (Planner(source).plan(PlanRequest(method="uniform", bits=b, group_size=32)) for b in (3, 4))
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:6]
    monkeypatch.setattr(writer, "_better_layer", lambda layer, modules, hessians, affine, arrays, count: arrays)
    for folder in ("direct", "adaptive"):
        (tmp_path / folder).mkdir()
    direct = writer.calibrated_weights(StreamedModel(source), tokens, dict(small.modules), tmp_path / "direct",
                                       QUANTIZERS["gptq"], held_out=2)
    made, spilled = {}, tmp_path / "adaptive" / "tracks"
    on_disk = []  # the track's Hessians wait there while their layer is fitted, and are gone after

    def also(path, weight, bias, h, codes, choice, codes_at):
        made[path] = codes_at(small.modules[path])
        on_disk.append(any(spilled.rglob("*.npy")) or ".layers." not in path)  # the LM head's are in memory

    writer.calibrated_weights(StreamedModel(source), tokens, dict(top.modules), tmp_path / "adaptive",
                              QUANTIZERS["gptq"], held_out=2, also=also, tracks=[dict(small.modules)])
    assert on_disk and all(on_disk) and not any(spilled.rglob("*.npy"))
    return direct, made
