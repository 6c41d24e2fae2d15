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
