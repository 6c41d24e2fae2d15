"""Every stage of lsaq-mlx on a tiny random model of each mlx-lm model type, as a user
runs them (the CLI, one process per command), and a table of what passed.

    python scripts/model_matrix.py OUT [--types qwen3_moe mixtral ...] [--budget 6]

Models come from ``tests/hf_models.py`` (mlx-lm's own classes; mixture-of-experts types
with Hugging Face names where the table there has them, experts apart; the default
model's tokenizer). Stages: ``score`` (streamed), ``plan -b``, ``convert -b`` with
``rtn`` and ``awq-gptq``, load + generate in a process that imports only mlx_lm,
``eval --reference`` (KL, whole and streamed reference), ``chat -b`` with a ``/plan``
swap. Writes OUT/matrix.json and prints a markdown table. Random weights: the KL shows
the stage works, not how good a quantizer is.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hf_models import ALL_CONFIGS, write_hf_folder  # noqa: E402

STAGES = ("score", "plan", "convert rtn", "convert awq-gptq", "mlx_lm load", "eval KL", "eval KL streamed", "chat swap")


def run(args: list[str], env: dict | None = None, stdin: str | None = None, timeout: int = 600):
    done = subprocess.run(args, capture_output=True, text=True, env=os.environ | (env or {}), input=stdin,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def first_error(out: str, err: str) -> str:
    lines = [line for line in (err + out).splitlines() if "error" in line.lower() or "Error" in line]
    return (lines[0] if lines else (err.strip().splitlines() or ["failed"])[-1])[:160]


def stages_of(model_type: str, folder: Path, out: Path, budget: float) -> dict:
    cli = [sys.executable, "-m", "lsaq_mlx"]
    result = {}

    def step(name, args, env=None, stdin=None, check=None):
        code, stdout, stderr = run(args, env, stdin)
        ok = code == 0 and (check is None or check(stdout, stderr))
        result[name] = "ok" if ok else first_error(stdout, stderr)
        return stdout if ok else None

    step("score", cli + ["score", "-m", str(folder), "--tokens", "256", "--json"], {"LSAQ_MLX_STREAM": "always"})
    step("plan", cli + ["plan", "-m", str(folder), "-b", str(budget), "--json"])
    for quantizer in ("rtn", "awq-gptq"):
        step(f"convert {quantizer}", cli + ["convert", "-m", str(folder), "-b", str(budget), "--quantizer", quantizer,
                                           "-o", str(out / quantizer), "--force"])
    script = ("import sys; from mlx_lm import load, generate; m, t = load(sys.argv[1]); "
              "generate(m, t, 'hello', max_tokens=4); assert not [n for n in sys.modules if n.startswith('lsaq')]")
    step("mlx_lm load", [sys.executable, "-c", script, str(out / "awq-gptq")])
    for name, stream in (("eval KL", "never"), ("eval KL streamed", "always")):
        text = step(name, cli + ["eval", "-m", str(out / "awq-gptq"), "--reference", str(folder), "--max-tokens", "256",
                                 "--json"], {"LSAQ_MLX_STREAM": stream})
        if text:
            result[name] = round(json.loads(text)["divergence"]["kl"], 5)
    step("chat swap", cli + ["chat", "-m", str(folder), "-b", str(budget), "--max-tokens", "4"],
         stdin=f"Hi\n/plan {budget + 1:g}\nHi\n",
         check=lambda o, e: "swapped" in o + e and "failed" not in o + e and "error" not in (o + e).lower())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--types", nargs="+", default=list(ALL_CONFIGS))
    parser.add_argument("--budget", type=float, default=6.0)
    args = parser.parse_args()

    from lsaq_mlx.sources import resolve_model

    default = resolve_model("default").path
    rows = {}
    for model_type in args.types:
        folder = write_hf_folder(model_type, args.out / model_type / "source", default)
        rows[model_type] = stages_of(model_type, folder, args.out / model_type, args.budget)
        print(model_type, json.dumps(rows[model_type]), flush=True)
    (args.out / "matrix.json").write_text(json.dumps(rows, indent=1))
    print("\n| model type | " + " | ".join(STAGES) + " |\n|---|" + "---|" * len(STAGES))
    for model_type, row in rows.items():
        print(f"| {model_type} | " + " | ".join(str(row.get(s, "")) for s in STAGES) + " |")


if __name__ == "__main__":
    main()
