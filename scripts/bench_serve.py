"""Load test: `lsaq-mlx serve` next to `mlx_lm.server` on the same model, in one run.

Each server is a fresh process on a free loopback port. After a warm-up (one request
from each client at once, so that batches have been made once), CLIENTS threads each send REQUESTS chat completions in turn (greedy, MAX_TOKENS tokens,
end-of-sequence banned so every reply has the same length), within a time limit. Reported
per server: failed requests, p50/p95 latency, completion tokens per second over the
whole run, and the server's resident memory after the warm-up, at its peak (sampled
every 0.2 s), half-way through and at the end (growth in the second half is a leak;
before it, buffers and caches filling up).

Rows: the source precision on both servers, then our plan at --budget and mlx_lm.server
on the folder `lsaq-mlx convert` writes for it (the same weights).

    python scripts/bench_serve.py [--model default] [--clients 4] [--requests 20] [--max-tokens 32]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

TOPICS = ["rivers", "bridges", "music", "winter", "trains", "gardens", "the sea", "mountains", "bread", "clocks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


class Server:
    def __init__(self, name: str, command: list[str], port: int):
        from lsaq_mlx.backend.blas import find_fast_blas

        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ)  # both servers get the BLAS lsaq-mlx preloads for itself
        if find_fast_blas():
            env["LD_PRELOAD"] = ":".join(p for p in (find_fast_blas(), env.get("LD_PRELOAD")) if p)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, limit: float) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self.log.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/models", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready within {limit:.0f} s")

    def rss(self) -> int:
        process = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def chat_body(i: int, max_tokens: int, eos: list[int]) -> dict:
    return {"messages": [{"role": "user", "content": f"Request {i}: write about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": max_tokens, "temperature": 0.0, "logit_bias": {str(t): -100 for t in eos}}


def load(server: Server, clients: int, requests: int, max_tokens: int, eos: list[int], limit: float) -> dict:
    latencies, tokens, failures, lock = [], [], [], threading.Lock()
    deadline = time.monotonic() + limit

    def client(c: int) -> None:
        for r in range(requests):
            left = deadline - time.monotonic()
            if left <= 0:
                with lock:
                    failures.append("time limit")
                continue
            start = time.perf_counter()
            try:
                reply = post(server.url + "/chat/completions", chat_body(c * requests + r, max_tokens, eos), left)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens.append(reply["usage"]["completion_tokens"])
            except Exception as e:  # any failure of a request is counted, not fatal to the run
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")

    peak, done = [(time.perf_counter(), server.rss())], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak.append((time.perf_counter(), server.rss()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start_rss, start = server.rss(), time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None  # noqa: E731
    return {"server": server.name, "requests": clients * requests, "failed": len(failures),
            "failures": sorted(set(failures))[:5], "p50_s": pick(0.5), "p95_s": pick(0.95),
            "mean_s": statistics.fmean(latencies) if latencies else None, "completion_tokens": sum(tokens),
            "tokens_per_s": sum(tokens) / wall, "wall_s": wall, "rss_after_warmup": start_rss,
            "rss_peak": max(r for _, r in peak), "rss_half": next(r for t, r in peak if t >= start + wall / 2),
            "rss_end": server.rss()}


def run_server(name, command, port, args, eos) -> dict:
    server = Server(name, command, port)
    try:
        server.wait_ready(args.ready_limit)
        load(server, args.clients, 1, args.max_tokens, eos, args.time_limit)  # warm-up: one burst of concurrent requests
        result = load(server, args.clients, args.requests, args.max_tokens, eos, args.time_limit)
    finally:
        server.stop()
    print(row(result), flush=True)
    return result


def row(r: dict) -> str:
    mb = lambda b: f"{b / 1e6:.0f}"  # noqa: E731
    if r["p50_s"] is None:
        return f"| {r['server']} | 0/{r['requests']} ({'; '.join(r['failures'])}) | | | | | | | | |"
    return (f"| {r['server']} | {r['requests'] - r['failed']}/{r['requests']} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {mb(r['rss_after_warmup'])} | {mb(r['rss_peak'])} | {mb(r['rss_half'])} | "
            f"{mb(r['rss_end'])} | {(r['rss_end'] - r['rss_half']) / 1e6:+.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds per server for the whole load")
    parser.add_argument("--ready-limit", type=float, default=300, help="seconds a server may take to start")
    parser.add_argument("--servers", default="1,2,3,4", help="which rows to run (1-4, in the order above)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.load import load_tokenizer

    source = resolve_model(args.model)
    eos = sorted(load_tokenizer(source).eos_token_ids)
    lsaq = [sys.executable, "-m", "lsaq_mlx", "serve", "-m", args.model, "--max-tokens", str(args.max_tokens)]
    mlx_lm = [sys.executable, "-m", "mlx_lm", "server", "--log-level", "ERROR", "--max-tokens", str(args.max_tokens)]
    with tempfile.TemporaryDirectory() as work:
        converted = Path(work) / "converted"
        subprocess.run([sys.executable, "-m", "lsaq_mlx", "convert", "-m", args.model, "-b", str(args.budget),
                        "--quantizer", "rtn", "-o", str(converted), "--json"], check=True, stdout=subprocess.DEVNULL)
        runs = [("lsaq-mlx serve (source)", lsaq), ("mlx_lm.server (source)", mlx_lm + ["--model", str(source.path)]),
                (f"lsaq-mlx serve -b {args.budget:g}", lsaq + ["-b", str(args.budget)]),
                (f"mlx_lm.server (lsaq {args.budget:g} folder)", mlx_lm + ["--model", str(converted)])]
        print(f"{args.clients} clients x {args.requests} requests, {args.max_tokens} tokens each, "
              f"model {args.model}, {os.cpu_count()} cores\n")
        print("| server | ok | p50 s | p95 s | tokens/s | RSS after warm-up MB | peak MB | half-way MB | end MB | "
              "second half MB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        results = []
        for number, (name, command) in enumerate(runs, 1):
            if str(number) not in args.servers.split(","):
                continue
            port = free_port()
            results.append(run_server(name, command + ["--port", str(port)], port, args, eos))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
