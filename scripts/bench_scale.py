"""Peak memory and wall time of every stage at real model sizes, next to mlx-lm.

    python scripts/bench_scale.py [--shapes 0.5b,1.1b,llama3-8b] [--models DIR]
        [--steps score,plan,convert,convert-awq-gptq,eval,chat,mlx_lm.convert,...] [--json FILE]

For each shape a random float16 llama folder is written (``make_random_model.py``;
``llama3-8b/16`` means that shape with 16 layers). Each step is a fresh process,
measured from outside: peak resident memory is the child's own ``ru_maxrss``
(``wait4``), wall time includes loading. A watchdog kills a child whose resident memory
passes ``--rss-limit`` (the row then says so) so that no step takes the machine down.

- ``score``, ``plan -b 4.0``, ``convert -b 4.0``: each with an empty cache (so ``plan``
  and ``convert`` each compute the cost table);
- ``convert-gptq``, ``convert-awq``, ``convert-awq-gptq``: ``convert -b 4.0 --quantizer
  ...`` with the cache ``convert`` filled (the cost table is read): what the calibrated
  quantizer adds, 16,384 calibration tokens a layer at a time;
- ``convert-from-q4``: ``convert -b 3.5`` (rtn, an empty cache) from mlx-lm's 4-bit
  folder of the same model (``mlx_lm.convert -q``, 4 bits, group 64; made first, not
  measured): a quantized source, as the hub holds models;
- ``eval --max-tokens 1024`` of the converted model, with KL to the source;
- ``chat -b 4.0`` scripted: a message, ``/plan 3.5``, a message, ``/plan 4.5``, a message,
  16 tokens each; the cost table comes from the cache ``convert`` filled (planning a new
  budget reads it: no model is loaded for it);
- ``chat-float32``: the same chat with the whole model dequantized to float32 (what
  the CPU backend did before hybrid layers), for tokens/s and memory against it;
- ``convert-adaptive``: ``convert --adaptive 3-6 --quantizer rtn`` (the cost table from
  the cache ``convert`` filled): a folder that serves every plan from 3 to 6 bits per
  weight without the source;
- ``swap-adaptive``: in one process on that folder (``benchmarks/adaptive_folder.py``'s
  ``swap_round_trip``): the swap from its smallest plan to its largest and back, each
  step between neighbouring plans, and a fresh load of the folder (its largest plan) in
  the same process and in a new one; the seconds are in the row's ``swaps``;
- ``mlx_lm.convert -q`` (4 bits, group 64), and ``mlx_lm.dynamic_quant``'s sensitivity
  estimate (``estimate_sensitivities``, its gradient pass, the part comparable to our
  cost table) on the same folder and the same 2,048 calibration tokens in 8 x 256 as
  our cost table, in float32 as we compute.

The children inherit this process's OpenBLAS preload (on Linux), mlx-lm's too.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("score", "plan", "convert", "convert-gptq", "convert-awq", "convert-awq-gptq", "convert-from-q4", "eval",
         "chat", "chat-float32", "convert-adaptive", "swap-adaptive", "mlx_lm.convert", "dynamic_quant")
CHAT_SCRIPT = "Tell me about Paris.\n/plan 3.5\nAnd about Rome?\n/plan 4.5\nThanks.\n/quit\n"
EVAL_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def measure(cmd: list[str], env: dict, rss_limit: int, stdin: str | None = None) -> dict:
    """``{"wall_s", "peak_rss", "status"}`` of ``cmd`` in its own process (and, for a chat,
    ``"tok_s"``: the generation speed of each reply as the chat printed it)."""
    begin = time.perf_counter()
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()

    def watch():
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                rss = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                           if line.startswith("VmRSS"))
            except (OSError, StopIteration):
                rss = 0
            if rss > rss_limit:
                killed.set()
                proc.kill()
            time.sleep(0.2)

    if Path("/proc").is_dir():
        threading.Thread(target=watch, daemon=True).start()
    if stdin:
        proc.stdin.write(stdin)
        proc.stdin.close()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    row = {"wall_s": time.perf_counter() - begin,
           "peak_rss": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)}
    if killed.is_set():
        row["status"] = f"killed above {rss_limit / 1e9:.0f} GB"
    elif code != 0:
        row["status"] = f"failed ({code}): {err.strip().splitlines()[-1] if err.strip() else ''}"
    else:
        row["status"] = "ok"
    out.seek(0)
    printed = out.read()
    speeds = re.findall(r"tokens · ([0-9.]+) tok/s", printed)
    if speeds:
        row["tok_s"] = [float(v) for v in speeds]
    swaps = re.search(r"^SWAPS (.*)$", printed, re.M)
    if swaps:
        row["swaps"] = json.loads(swaps.group(1))
    return row


def make_model(spec: str, models: Path) -> Path:
    shape, _, layers = spec.partition("/")
    out = models / spec.replace("/", "-")
    if not (out / "config.json").is_file():
        extra = ["--layers", layers] if layers else []
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_model.py"), str(out), "--shape", shape,
                        *extra], check=True)
    return out


def dynamic_quant_child(folder: str) -> None:
    """Run mlx-lm's sensitivity estimate on ``folder`` (a child of this script)."""
    import mlx.core as mx
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities
    from mlx_lm.utils import load

    from lsaq_mlx.planning.cost_table import FISHER_SEQ_LEN, FISHER_TOKENS
    from lsaq_mlx.scoring.calibration import load_calibration, token_sequences

    model, tokenizer = load(folder)
    model.set_dtype(mx.float32)
    data = mx.array(token_sequences(tokenizer, load_calibration(None), FISHER_TOKENS, FISHER_SEQ_LEN))
    estimate_sensitivities(model, data, 4, 64, 5, 64)


def swap_child(folder: str) -> None:
    """Print ``SWAPS {json}``: ``swap_round_trip`` on the adaptive folder ``folder`` (a child of this script)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from adaptive_folder import swap_round_trip

    from lsaq_mlx.sources import resolve_model

    print("SWAPS " + json.dumps(swap_round_trip(resolve_model(folder), Path(folder))), flush=True)


def run_shape(spec: str, steps: list[str], models: Path, work: Path, rss_limit: int) -> dict:
    folder = make_model(spec, models)
    cli = [sys.executable, "-m", "lsaq_mlx"]
    name = spec.replace("/", "-")
    out, adaptive = work / f"{name}-4.0", work / f"{name}-adaptive"
    rows = {}

    def env(cache: str) -> dict:
        return dict(os.environ, LSAQ_MLX_CACHE=str(work / "caches" / name / cache))

    for step in steps:
        if step == "score":
            rows[step] = measure([*cli, "score", "-m", str(folder), "--json"], env("score"), rss_limit)
        elif step == "plan":
            rows[step] = measure([*cli, "plan", "-m", str(folder), "-b", "4.0", "--json"], env("plan"), rss_limit)
        elif step == "convert":
            shutil.rmtree(out, ignore_errors=True)
            rows[step] = measure([*cli, "convert", "-m", str(folder), "-b", "4.0", "--quantizer", "rtn", "-o", str(out), "--json"],
                                 env("convert"), rss_limit)
        elif step == "convert-from-q4":
            q4, target = work / f"{name}-q4-source", work / f"{name}-3.5-from-q4"
            if not q4.is_dir():
                subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(folder), "-q", "--q-bits",
                                "4", "--q-group-size", "64", "--mlx-path", str(q4)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(target, ignore_errors=True)
            rows[step] = measure([*cli, "convert", "-m", str(q4), "-b", "3.5", "--quantizer", "rtn", "-o", str(target),
                                  "--json"], env(step), rss_limit)
            shutil.rmtree(target, ignore_errors=True)
        elif step == "convert-adaptive":
            shutil.rmtree(adaptive, ignore_errors=True)
            rows[step] = measure([*cli, "convert", "-m", str(folder), "--adaptive", "3-6", "--quantizer", "rtn", "-o",
                                  str(adaptive), "--json"], env("convert"), rss_limit)
        elif step == "swap-adaptive":
            rows[step] = measure([sys.executable, __file__, "--swap-child", str(adaptive)], env("convert"), rss_limit)
        elif step.startswith("convert-"):  # a calibrated quantizer, the cost table from convert's cache
            target = work / f"{name}-4.0-{step}"
            shutil.rmtree(target, ignore_errors=True)
            rows[step] = measure([*cli, "convert", "-m", str(folder), "-b", "4.0", "--quantizer",
                                  step.removeprefix("convert-"), "-o", str(target), "--json"], env("convert"), rss_limit)
            shutil.rmtree(target, ignore_errors=True)
        elif step == "eval":
            ppl = ["--ppl", str(EVAL_TEXT)] if EVAL_TEXT.is_file() else ["--ppl", str(ROOT / "README.md")]
            rows[step] = measure([*cli, "eval", "-m", str(out), "--reference", str(folder), *ppl, "--max-tokens",
                                  "1024", "--json"], env("eval"), rss_limit)
        elif step in ("chat", "chat-float32"):  # chat-float32: the whole model dequantized, as before
            chat_env = env("convert") | ({"LSAQ_MLX_FLOAT_COPY": "all"} if step == "chat-float32" else {})
            rows[step] = measure([*cli, "chat", "-m", str(folder), "-b", "4.0", "-n", "16"], chat_env, rss_limit,
                                 stdin=CHAT_SCRIPT)
        elif step == "mlx_lm.convert":
            target = work / f"{name}-mlx-q4"
            shutil.rmtree(target, ignore_errors=True)
            rows[step] = measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(folder), "-q",
                                  "--q-bits", "4", "--q-group-size", "64", "--mlx-path", str(target)],
                                 dict(os.environ), rss_limit)
            shutil.rmtree(target, ignore_errors=True)
        elif step == "dynamic_quant":
            rows[step] = measure([sys.executable, __file__, "--dynamic-quant-child", str(folder)], dict(os.environ),
                                 rss_limit)
        print(f"{spec} {step}: {rows[step]['wall_s']:.0f} s, {rows[step]['peak_rss'] / 1e9:.2f} GB, "
              f"{rows[step]['status']}", file=sys.stderr, flush=True)
    return {"folder": str(folder), "model_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            "steps": rows}


def table(results: dict) -> str:
    steps = [s for s in STEPS if any(s in r["steps"] for r in results.values())]
    lines = ["| model | float16 size | " + " | ".join(steps) + " |", "|---|---|" + "---|" * len(steps)]
    for spec, r in results.items():
        cells = []
        for s in steps:
            row = r["steps"].get(s)
            if row is None:
                cells.append("")
            elif row["status"] == "ok":
                speed = f", {sum(row['tok_s']) / len(row['tok_s']):.1f} tok/s" if row.get("tok_s") else ""
                cells.append(f"{row['peak_rss'] / 1e9:.2f} GB, {row['wall_s']:.0f} s{speed}")
            else:
                cells.append(f"{row['status']} ({row['peak_rss'] / 1e9:.1f} GB, {row['wall_s']:.0f} s)")
        lines.append(f"| {spec} | {r['model_bytes'] / 1e9:.2f} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--dynamic-quant-child":
        return dynamic_quant_child(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--swap-child":
        return swap_child(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="0.5b,1.1b,llama3-8b")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--models", type=Path, default=Path("/tmp/lsaq-scale-models"))
    parser.add_argument("--work", type=Path, default=None, help="outputs and caches (default: a temporary folder)")
    parser.add_argument("--rss-limit", default="18e9", help="bytes; a child above it is killed")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    from lsaq_mlx.backend.blas import reexec_with_fast_blas

    reexec_with_fast_blas()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        sys.exit(f"unknown step {unknown[0]} (steps: {', '.join(STEPS)})")
    args.models.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="lsaq-scale-"))
    results = {}
    for spec in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        results[spec] = run_shape(spec, steps, args.models, work, int(float(args.rss_limit)))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.0f} GB\n")
    print(table(results))
    for spec, r in results.items():
        swaps = r["steps"].get("swap-adaptive", {}).get("swaps")
        if swaps:
            print(f"\n{spec}: swap 3 -> 6 {swaps['up_seconds']:.1f} s, back {swaps['down_seconds']:.1f} s "
                  f"({swaps['modules']} modules); fresh load {swaps['fresh_load_seconds']:.1f} s in the process, "
                  f"{swaps['fresh_process_seconds']:.1f} s in a new one; peak RSS through the swaps "
                  f"{swaps['swaps_peak_rss'] / 1e9:.2f} GB (the new process {swaps['fresh_process_peak_rss'] / 1e9:.2f} GB); steps "
                  + ", ".join(f"{x:.1f}" for x in swaps["step_seconds"]) + " s")


if __name__ == "__main__":
    main()
