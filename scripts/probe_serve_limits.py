"""Hostile requests against a real `lsaq-mlx serve` process, as docs/security.md states them.

Starts `lsaq-mlx serve -m MODEL -b BUDGET` on a free loopback port and reports, as JSON:
the server's resident memory before and after an 8 MB prompt (refused: the context is
checked while tokenizing), the replies to token ids past the vocabulary and to seeds MLX
does not take, and 50 concurrent clients (how many were reset or refused, how many
replies differ from the same request sent alone). Every request is bounded in count and
time and goes to 127.0.0.1 only.

    python scripts/probe_serve_limits.py [--model default] [--budget 8] [--clients 50]
"""

import argparse
import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.request

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 600) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError as e:  # reset, refused
        return 0, {"error": {"message": f"{type(e).__name__}: {e}"}}


def chat(text: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8} | fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budget", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lsaq_mlx", "serve", "-m", args.model, "-b", str(args.budget),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 600
        while time.monotonic() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        process = psutil.Process(server.pid)
        results = {"model": args.model, "budget": args.budget}
        post(port, chat("hello"))
        results["rss_before_bytes"] = process.memory_info().rss
        started = time.perf_counter()
        code, reply = post(port, chat("word " * (8 << 20 >> 3)))
        results["long_prompt"] = {"status": code, "seconds": round(time.perf_counter() - started, 2),
                                  "rss_after_bytes": process.memory_info().rss, "message": reply["error"]["message"]}
        results["bad_ids_and_seeds"] = {
            name: post(port, chat("hi", **fields))[0] for name, fields in {
                "logit_bias 10**9": {"logit_bias": {str(10**9): 100}}, "logit_bias 2**63": {"logit_bias": {str(2**63): 1}},
                "seed -1": {"seed": -1}, "seed 2**64": {"seed": 2**64}}.items()}
        topics = [f"Tell me about topic {i % 10}." for i in range(args.clients)]
        alone = {t: post(port, chat(t))[1] for t in dict.fromkeys(topics)}
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            replies = list(pool.map(lambda t: post(port, chat(t)), topics))
        results["concurrent"] = {
            "clients": args.clients, "ok": sum(c == 200 for c, _ in replies),
            "reset_or_refused": sum(c == 0 for c, _ in replies),
            "differs_from_alone": sum(c == 200 and r["choices"][0]["message"]["content"]
                                      != alone[t]["choices"][0]["message"]["content"]
                                      for t, (c, r) in zip(topics, replies))}
        results["alive"] = server.poll() is None
        print(json.dumps(results, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
