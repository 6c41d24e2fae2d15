"""What ``mlx.launch`` costs its ranks on one machine, with and without their fixes.

    python benchmarks/bench_launcher.py [--ranks 2] [--repeats 3]

1. The launcher's own CPU use while its ranks sleep: ranks that leave it alone vs ranks
   that quiet it (``lsaq_mlx.backend.ranks.quiet_launcher``: its relay blocks, nice 19), Linux;
2. seconds per forward pass of the default model (511 tokens) in each rank: one process
   with all BLAS threads and with 1, --ranks independent processes with 1 thread each
   (the ideal), and --ranks ranks under ``mlx.launch`` with 1 BLAS thread each, without
   and with the fixes (``lsaq_mlx.backend.ranks.Ranks`` applies them).

The launcher's stdin is an open, silent pipe, as a terminal would be (and, once, /dev/null).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

SLEEP_S = 6.0


def child(mode: str, repeats: int) -> None:
    if mode.startswith("sleep"):
        from lsaq_mlx.backend.ranks import quiet_launcher

        if mode == "sleep-quiet":
            quiet_launcher()
        before, start = cpu_seconds(os.getppid()), time.perf_counter()
        time.sleep(SLEEP_S)
        print(json.dumps({"seconds": (cpu_seconds(os.getppid()) - before) / (time.perf_counter() - start)}))
        return
    import mlx.core as mx

    from lsaq_mlx.backend.ranks import Ranks
    from lsaq_mlx.sources import load_model, resolve_model

    if mode == "ranks":
        Ranks()
    model = load_model(resolve_model(None))[0]
    x = mx.arange(100, 611)[None]
    mx.eval(model(x))
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(model(x))
    print(json.dumps({"seconds": (time.perf_counter() - start) / repeats}))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(command: list[str], env: dict | None = None, processes: int = 1, stdin=subprocess.PIPE) -> list[float]:
    """The numbers printed by ``processes`` copies of ``command`` run together."""
    running = [subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})}) for _ in range(processes)]
    outputs = [p.stdout.read() for p in running]  # stdin stays open: at end of file the launcher spins
    for p in running:
        p.wait()
        if p.stdin:
            p.stdin.close()
    if any(p.returncode for p in running):
        sys.exit(f"{' '.join(command)} failed")
    return [json.loads(line)["seconds"] for out in outputs for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from lsaq_mlx.backend.blas import reexec_with_fast_blas

    reexec_with_fast_blas()
    if args.child:
        return child(args.child, args.repeats)
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        sys.exit("mlx.launch is not installed")
    me = [sys.executable, os.path.abspath(__file__), "--repeats", str(args.repeats), "--child"]
    launch = [launcher, "-n", str(args.ranks)]
    one_thread = {"OPENBLAS_NUM_THREADS": "1"}

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; {args.ranks} ranks\n")
    print(f"| ranks sleeping {SLEEP_S:.0f} s under mlx.launch | cores the launcher keeps busy (seen by each rank) |")
    print("|---|---|")
    for label, mode, stdin in (("ranks leave the launcher alone", "sleep-plain", subprocess.PIPE),
                               ("ranks quiet the launcher", "sleep-quiet", subprocess.PIPE),
                               ("ranks quiet the launcher, its stdin at end of file (only nice 19 helps)", "sleep-quiet",
                                subprocess.DEVNULL)):
        print(f"| {label} | {' / '.join(f'{c:.2f}' for c in run([*launch, *me, mode], stdin=stdin))} |")

    print("\n| forward pass of the default model, 511 tokens | seconds per forward, each process |")
    print("|---|---|")
    rows = (("1 process, all BLAS threads", [*me, "plain"], {}, 1),
            ("1 process, 1 BLAS thread", [*me, "plain"], one_thread, 1),
            (f"{args.ranks} independent processes, 1 BLAS thread each", [*me, "plain"], one_thread, args.ranks),
            (f"mlx.launch -n {args.ranks}, 1 BLAS thread each, launcher left alone", [*launch, *me, "plain"],
             one_thread, 1),
            (f"mlx.launch -n {args.ranks} through lsaq_mlx.backend.ranks.Ranks (launcher quieted, cores shared)",
             [*launch, *me, "ranks"], {}, 1))
    for label, command, env, processes in rows:
        print(f"| {label} | {' / '.join(f'{t:.2f}' for t in run(command, env, processes))} |")


if __name__ == "__main__":
    main()
